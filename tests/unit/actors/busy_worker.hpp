// Holds one worker of an actor system's scheduler pool, as long compute in an actor does (a CPU
// expert group's forward): with a one-worker pool nothing else scheduled runs until it is
// released. For tests of what must keep working meanwhile (heartbeats, failure detection).
#pragma once

#include <caf/all.hpp>

#include <chrono>
#include <future>

namespace moe::test {

class busy_worker {
 public:
  /// Takes a worker and returns once it holds it (held() says whether it got there in 30 s).
  explicit busy_worker(caf::actor_system& sys) {
    hog_ = sys.spawn([this](caf::event_based_actor*) -> caf::behavior {
      return {[this](caf::atom_value) {
        busy_.set_value();
        released_.wait();
      }};
    });
    caf::anon_send(hog_, caf::atom("hold"));
    held_ = busy_.get_future().wait_for(std::chrono::seconds(30)) == std::future_status::ready;
  }
  busy_worker(const busy_worker&) = delete;
  busy_worker& operator=(const busy_worker&) = delete;
  ~busy_worker() {
    release();
    caf::anon_send_exit(hog_, caf::exit_reason::user_shutdown);
  }

  [[nodiscard]] bool held() const noexcept { return held_; }

  void release() {
    if (!released_flag_) release_.set_value();
    released_flag_ = true;
  }

 private:
  std::promise<void> busy_, release_;
  std::shared_future<void> released_ = release_.get_future().share();
  bool held_ = false;
  bool released_flag_ = false;
  caf::actor hog_;
};

}  // namespace moe::test
