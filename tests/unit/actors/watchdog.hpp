// A test's own time limit, below ctest's: when the test has not ended within it, the watchdog
// prints the phase the test last entered and every thread's stack (gdb, where installed), then
// aborts. A hang that ctest's timeout ends says nothing of where it was; the one this is for
// (rarely, under the sanitizers, at the end of a test of real node processes) gave no clue.
//
// Declare it first in the test, so that it still watches while the actor system and the
// children are torn down.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <sys/prctl.h>
#include <thread>
#include <unistd.h>

namespace moe::test {

class watchdog {
 public:
  explicit watchdog(std::chrono::seconds limit) : limit_(limit) {
    thread_ = std::thread([this] { watch(); });
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;
  ~watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ended_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  /// Names what the test does from now on (printed if the limit passes meanwhile).
  void phase(std::string what) {
    std::lock_guard<std::mutex> lock(mutex_);
    phase_ = std::move(what);
  }

 private:
  void watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (cv_.wait_for(lock, limit_, [this] { return ended_; })) return;
    std::fprintf(stderr, "FAIL: watchdog: the test is still in phase '%s' after %lld s\n",
                 phase_.c_str(), static_cast<long long>(limit_.count()));
    std::fflush(stderr);
    dump_stacks();
    std::abort();
  }

  // gdb attaches to this process: where the kernel lets only ancestors trace (Yama ptrace_scope
  // 1), this process first allows any tracer.
  static void dump_stacks() {
    if (std::system("command -v gdb >/dev/null 2>&1") != 0) {
      std::fprintf(stderr, "watchdog: no gdb to print the threads' stacks\n");
      return;
    }
    (void)::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    const std::string cmd = "gdb -p " + std::to_string(::getpid()) +
                            " -batch -nx -ex 'thread apply all bt' </dev/null 1>&2 2>/dev/null";
    (void)std::system(cmd.c_str());
  }

  const std::chrono::seconds limit_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool ended_ = false;
  std::string phase_ = "start";
  std::thread thread_;
};

}  // namespace moe::test
