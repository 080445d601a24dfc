// A scripted stand-in for the training jobs actor (actors/training_jobs.hpp), for tests of the
// job API's training calls (the api_server's unit test and the server that the Python client's
// tests run against).
//
// A job runs one "step" per tick, one job at a time as the real actor; after step k its event
// has loss fake_loss(k), learning rate hyper.lr, grad norm 1/k, tokens/s 1000 and the load
// balance {1 + 1/k, 1.5}; steps 1..steps-1 are sent as they happen, then a finished event with
// step = steps. The job is refused as the real actor refuses it (check_training_job, with
// vocab_size and max_position_embeddings below). Scripted: a corpus starting with fail_token
// fails after one step ("scripted failure"); more than max_active unfinished jobs answer
// overloaded; a checkpoint directory ending in "/unwritable" fails as the file system would
// (model_errc::io_error). A checkpoint is answered after the running step (or at once between
// jobs), and the running job's next event carries it. Cancel ends a queued job at once and a
// running one after its step, as the real actor does.
//
// Thread safety: the actor's state is its own; fake_training_log is shared with the test
// thread and locks internally.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actors/training_jobs.hpp"

namespace moe::actors::testing {

struct fake_training_options {
  std::chrono::milliseconds step_interval{1};
  size_t max_active = 1000;
  int32_t fail_token = 499;
  int64_t vocab_size = 512;
  int64_t max_position_embeddings = 256;
};

/// The loss the fake reports after step `step` (from 1).
[[nodiscard]] double fake_loss(int64_t step);

/// What the fake saw, for assertions from the test's thread.
class fake_training_log {
 public:
  void record_submit(uint64_t id, const training_job& job);
  void record_cancel(uint64_t id);
  void record_checkpoint(const std::string& dir);

  [[nodiscard]] std::vector<training_job> submitted() const;
  [[nodiscard]] std::vector<std::string> checkpoints() const;
  /// Waits until a cancel for `id` arrived; false after `timeout`.
  [[nodiscard]] bool wait_for_cancel(uint64_t id, std::chrono::milliseconds timeout) const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::vector<training_job> submitted_;
  std::vector<uint64_t> cancelled_;
  std::vector<std::string> checkpoints_;
};

[[nodiscard]] training_jobs_actor spawn_fake_training_jobs(caf::actor_system& sys,
                                                           fake_training_options options,
                                                           std::shared_ptr<fake_training_log> log);

}  // namespace moe::actors::testing
