// A scripted stand-in for the controller actor, for tests of the job-submission API (the
// api_server's unit test and the server that the Python client's tests run against).
//
// Each job "generates" one token per tick: token i is (last prompt token + 1 + i) % 50000, so a
// test knows the answer (fake_tokens). A generated token in stop_token_ids ends the job with
// reason "stop" (the token is kept); max_new_tokens ends it with "length". Scripted failures:
// a prompt starting with fail_token fails after one token; more than max_active unfinished
// jobs answer overloaded; max_new_tokens above 4096 is refused as invalid_request (as the real
// controller does with its limit). Cancel sends the job's final "cancelled" event.
//
// Thread safety: the actor's state is its own; fake_controller_log is shared with the test
// thread and locks internally.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "actors/controller.hpp"

namespace moe::actors::testing {

struct fake_controller_options {
  std::chrono::milliseconds token_interval{1};
  size_t max_active = 1000;
  int32_t fail_token = 999'999;
};

/// What the fake saw, for assertions from the test's thread.
class fake_controller_log {
 public:
  void record_submit(uint64_t id, const generation_job& job);
  void record_cancel(uint64_t id, bool was_active);

  [[nodiscard]] size_t num_submitted() const;
  [[nodiscard]] std::vector<generation_job> submitted() const;
  /// Waits until a cancel for `id` arrived; false after `timeout`.
  [[nodiscard]] bool wait_for_cancel(uint64_t id, std::chrono::milliseconds timeout) const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::vector<std::pair<uint64_t, generation_job>> submitted_;
  std::vector<uint64_t> cancelled_;
};

/// The tokens the fake generates for `job` (up to and including a stop token) unless it is
/// cancelled or scripted to fail.
[[nodiscard]] std::vector<int32_t> fake_tokens(const generation_job& job);

[[nodiscard]] controller_actor spawn_fake_controller(caf::actor_system& sys,
                                                     fake_controller_options options,
                                                     std::shared_ptr<fake_controller_log> log);

}  // namespace moe::actors::testing
