// Holds one worker of an actor system's scheduler pool, as long compute in an actor does (a CPU
// expert group's forward): with a one-worker pool nothing else scheduled runs until it is
// released. For tests of what must keep working meanwhile (heartbeats, failure detection).
#pragma once

#include <caf/all.hpp>

#include <chrono>
#include <future>
#include <memory>

namespace moe::test {

class busy_worker {
 public:
  /// Takes a worker and returns once it holds it (held() says whether it got there in 30 s).
  explicit busy_worker(caf::actor_system& sys) : state_(std::make_shared<state>()) {
    // The hog shares the promises instead of pointing into this object: it may still be on its
    // way out of wait() when this object is gone.
    hog_ = sys.spawn([st = state_](caf::event_based_actor*) -> caf::behavior {
      return {[st](caf::atom_value) {
        st->busy.set_value();
        st->released.wait();
      }};
    });
    caf::anon_send(hog_, caf::atom("hold"));
    held_ =
        state_->busy.get_future().wait_for(std::chrono::seconds(30)) == std::future_status::ready;
  }
  busy_worker(const busy_worker&) = delete;
  busy_worker& operator=(const busy_worker&) = delete;
  ~busy_worker() {
    release();
    caf::anon_send_exit(hog_, caf::exit_reason::user_shutdown);
  }

  [[nodiscard]] bool held() const noexcept { return held_; }

  void release() {
    if (!released_) state_->release.set_value();
    released_ = true;
  }

 private:
  struct state {
    std::promise<void> busy, release;
    std::shared_future<void> released = release.get_future().share();
  };
  std::shared_ptr<state> state_;
  bool held_ = false;
  bool released_ = false;
  caf::actor hog_;
};

}  // namespace moe::test
