// Real `moe node` processes for tests: each child runs in a session of its own (so a signal
// reaches its whole process group) and is killed and reaped on destruction, whatever the
// test's outcome, and dies with the test process should that end without destructors (an
// abort: a failed assertion of the library, the test's watchdog). MOE_BINARY_DIR comes from
// CMake.
#pragma once

#include <algorithm>
#include <array>
#include <cstdio>
#include <signal.h>
#include <stdexcept>
#include <string>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/local_processes.hpp"

namespace moe::test {

// `N` distinct free loopback ports (a small race until the nodes bind them; a node fails loudly
// if it lost one). Throws when the kernel has none, which fails the test that asked.
template <size_t N>
std::array<uint16_t, N> free_ports() {
  auto p = cli::free_loopback_ports(N);
  if (!p) throw std::runtime_error("no free loopback ports: " + caf::to_string(p.error()));
  std::array<uint16_t, N> out{};
  std::copy(p->begin(), p->end(), out.begin());
  return out;
}

/// A `moe node` child in a session of its own; SIGKILLed and reaped on destruction.
class node_child {
 public:
  node_child(const std::string& config, const std::string& name, const std::string& log) {
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::setsid();
      // SIGKILL when the forking thread ends (a test's main thread: the test process). The
      // parent may have gone before this line.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) _exit(127);
      std::FILE* out = std::freopen(log.c_str(), "w", stdout);
      if (out != nullptr) ::dup2(::fileno(stdout), STDERR_FILENO);
      const std::string moe = std::string(MOE_BINARY_DIR) + "/cli/moe";
      ::execl(moe.c_str(), moe.c_str(), "node", "--config", config.c_str(), "--name", name.c_str(), nullptr);
      _exit(127);
    }
  }
  ~node_child() { kill_and_reap(); }
  node_child(const node_child&) = delete;
  node_child& operator=(const node_child&) = delete;

  void signal(int sig) const {
    if (pid_ > 0) ::kill(-pid_, sig);
  }
  void kill_and_reap() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGCONT);
    ::kill(-pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

}  // namespace moe::test
