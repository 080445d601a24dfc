#include "cli/local_processes.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <thread>

#include "cli/chaos_socket.hpp"

namespace moe::cli {

const char* to_string(process_errc e) noexcept {
  switch (e) {
    case process_errc::spawn_failed: return "spawn_failed";
    case process_errc::io_error: return "io_error";
  }
  return "unknown";
}

caf::error make_error(process_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("process"), caf::make_message(std::move(text))};
}

bool is_local_host(const std::string& host) {
  if (host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0) return true;
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name) != 0) return false;
  const std::string full = name;
  return host == full || host == full.substr(0, full.find('.'));
}

caf::expected<pid_t> spawn_detached(const std::vector<std::string>& argv,
                                    const std::filesystem::path& log, on_spawner_exit when) {
  if (argv.empty()) return make_error(process_errc::spawn_failed, "spawn: empty command");
  // Everything the child needs is prepared before fork: after it only async-signal-safe calls.
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return make_error(process_errc::io_error, "cannot open " + log.string() + ": " + std::strerror(errno));
  const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(log_fd);
    if (null_fd >= 0) ::close(null_fd);
    return make_error(process_errc::spawn_failed, std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    ::setsid();
    if (when == on_spawner_exit::terminate) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != parent) _exit(127);  // the spawner was gone before the prctl
    }
    // Signals blocked by the parent stay blocked across exec: unblock them for the node.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    ::execv(args[0], args.data());
    _exit(127);
  }
  ::close(log_fd);
  if (null_fd >= 0) ::close(null_fd);
  return pid;
}

bool process_running(pid_t pid) {
  if (pid <= 0) return false;
  int status = 0;
  if (::waitpid(pid, &status, WNOHANG) == pid) return false;  // our child, now reaped
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!stat || !std::getline(stat, text)) return true;  // no /proc: trust kill()
  // "PID (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
  const auto close = text.rfind(')');
  return close == std::string::npos || close + 2 >= text.size() || (text[close + 2] != 'Z' && text[close + 2] != 'X');
}

bool wait_for_exit(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (process_running(pid)) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return true;
}

void signal_process_group(pid_t pid, int sig) {
  if (pid <= 0) return;
  if (::getpgid(pid) == pid && ::kill(-pid, sig) == 0) return;
  ::kill(pid, sig);
}

std::optional<pid_t> read_pid_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  long pid = 0;
  if (!(in >> pid) || pid <= 0) return std::nullopt;
  return static_cast<pid_t>(pid);
}

caf::error write_pid_file(const std::filesystem::path& path, pid_t pid) {
  std::ofstream out(path, std::ios::trunc);
  out << pid << "\n";
  if (!out) return make_error(process_errc::io_error, "cannot write " + path.string());
  return {};
}

std::string tail_of_file(const std::filesystem::path& path, size_t max_lines) {
  std::ifstream in(path);
  std::deque<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    lines.push_back(std::move(line));
    if (lines.size() > max_lines) lines.pop_front();
  }
  std::string out;
  for (const auto& l : lines) out += "  | " + l + "\n";
  return out;
}

caf::expected<std::vector<uint16_t>> free_loopback_ports(size_t count) {
  // Every socket stays bound until all are: the kernel hands a port it just took back out
  // again, so closing each before asking for the next once gave a node the same control and
  // metrics port.
  std::vector<unique_fd> held;
  std::vector<uint16_t> ports;
  for (size_t i = 0; i < count; ++i) {
    unique_fd fd(::socket(AF_INET, SOCK_STREAM, 0));
    if (!fd) return make_error(process_errc::spawn_failed, "socket() failed");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const uint16_t port = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0
                              ? local_port(fd.get())
                              : uint16_t{0};
    if (port == 0)
      return make_error(process_errc::spawn_failed, "cannot find a free port on 127.0.0.1");
    ports.push_back(port);
    held.push_back(std::move(fd));
  }
  return ports;
}

std::filesystem::path cluster_run_dir(const std::string& run_dir, const std::string& cluster_name) {
  if (!run_dir.empty()) return run_dir;
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  return std::filesystem::path(xdg != nullptr && *xdg != '\0' ? xdg : "/tmp") / ("moe-" + cluster_name);
}

std::string self_executable() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("moe") : p.string();
}

}  // namespace moe::cli
