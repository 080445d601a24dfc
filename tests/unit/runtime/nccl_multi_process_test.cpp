// An NCCL world spanning processes: two forked processes join one world of 2 through a unique
// id that rank 0 makes and passes to rank 1 over a pipe (standing in for the control plane),
// then all-reduce a float buffer and both check the sum. Skipped, with the reason, without a GPU.
//
// CUDA does not survive fork(): a child may not use CUDA once its parent has initialised it.
// So this (parent) process never calls CUDA, not even discover_devices(), whose
// cudaGetDeviceCount initialises the driver: the GPUs are counted by a forked probe child, and
// each rank is a forked child that starts CUDA for itself. A child reports through a pipe (a
// line of text) and its exit code, and leaves with _exit() so no gtest or static teardown runs.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#ifdef MOE_HAVE_CUDA
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "runtime/cuda_memory.hpp"
#include "runtime/devices.hpp"
#include "runtime/nccl_comm.hpp"
#endif

#ifdef MOE_HAVE_CUDA
using namespace moe;

namespace {

constexpr int exit_ok = 0;
constexpr int exit_failed = 1;
constexpr int exit_refused_shared_device = 77;  ///< NCCL refused two ranks on one device.

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_exact(int fd, void* data, size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

std::string read_to_eof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  return out;
}

void report(int fd, const std::string& text) { write_all(fd, text.data(), text.size()); }

struct child {
  pid_t pid = -1;
  int report_fd = -1;  ///< The read end of the child's report pipe.
};

/// Forks a child that closes `close_in_child`, runs `body(report_fd)` and _exit()s with its
/// result. Empty pid on failure (errno says why).
template <class Body>
child spawn(Body body, std::vector<int> close_in_child = {}) {
  int fds[2];
  if (::pipe(fds) != 0) return {};
  std::fflush(nullptr);  // or the child would write the parent's buffered output again
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return {};
  }
  if (pid == 0) {
    ::close(fds[0]);
    for (int fd : close_in_child) ::close(fd);
    int code = exit_failed;
    try {
      code = body(fds[1]);
    } catch (const std::exception& e) {
      report(fds[1], std::string("exception: ") + e.what());
    } catch (...) {
      report(fds[1], "unknown exception");
    }
    ::close(fds[1]);
    std::fflush(nullptr);
    ::_exit(code);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

struct outcome {
  bool exited = false;  ///< Exited on its own; else killed by a signal or by our deadline.
  int code = -1;        ///< Exit code when `exited`.
  std::string how;      ///< "exit 1", "signal 11", "killed after 120 s".
  std::string report;
};

/// Waits for all `children` until `deadline`, SIGKILLs those still running then, and collects
/// each one's exit status and report.
std::vector<outcome> wait_all(const std::vector<child>& children,
                              std::chrono::steady_clock::time_point deadline, int limit_s) {
  std::vector<outcome> out(children.size());
  std::vector<bool> done(children.size(), false);
  size_t left = children.size();
  while (left > 0) {
    for (size_t i = 0; i < children.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      const pid_t r = ::waitpid(children[i].pid, &status, WNOHANG);
      if (r == 0) continue;
      done[i] = true;
      --left;
      if (r < 0) {
        out[i].how = std::string("waitpid: ") + std::strerror(errno);
      } else if (WIFEXITED(status)) {
        out[i].exited = true;
        out[i].code = WEXITSTATUS(status);
        out[i].how = "exit " + std::to_string(out[i].code);
      } else if (WIFSIGNALED(status)) {
        out[i].how = "signal " + std::to_string(WTERMSIG(status));
      }
    }
    if (left == 0) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      for (size_t i = 0; i < children.size(); ++i) {
        if (done[i]) continue;
        ::kill(children[i].pid, SIGKILL);
        ::waitpid(children[i].pid, nullptr, 0);
        out[i].how = "killed after " + std::to_string(limit_s) + " s";
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (size_t i = 0; i < children.size(); ++i) {
    out[i].report = read_to_eof(children[i].report_fd);
    ::close(children[i].report_fd);
  }
  return out;
}

/// How many GPUs a fresh process sees, and why none when none: discover_devices(), run in a
/// forked child so that this process never initialises CUDA.
struct gpu_probe {
  int count = 0;
  std::string reason;  ///< Why none, or why the probe itself failed.
};

gpu_probe probe_gpus_in_child() {
  const child c = spawn([](int fd) {
    const auto inv = runtime::discover_devices();
    report(fd, std::to_string(inv.gpus.size()) + "\n" + inv.no_gpu_reason);
    return exit_ok;
  });
  if (c.pid < 0) return {0, std::string("probe: fork or pipe failed: ") + std::strerror(errno)};
  const auto o = wait_all({c}, std::chrono::steady_clock::now() + std::chrono::seconds(60), 60)[0];
  const auto nl = o.report.find('\n');
  if (!o.exited || o.code != exit_ok || nl == std::string::npos)
    return {0, "the GPU probe child failed (" + o.how + "): " + o.report};
  return {std::stoi(o.report.substr(0, nl)), o.report.substr(nl + 1)};
}

/// One rank's life: get the id (make it, or read it from rank 0), join, all-reduce, check.
int run_rank(int rank, int device, bool shared_device, int id_fd, int report_fd) {
  const std::string me = "rank " + std::to_string(rank) + " on device " + std::to_string(device);
  runtime::nccl_unique_id id;
  if (rank == 0) {
    auto made = runtime::make_nccl_unique_id();
    if (!made) {
      report(report_fd, me + ": " + error_text(made.error()));
      return exit_failed;
    }
    id = *made;
    const bool sent = write_all(id_fd, id.bytes.data(), id.bytes.size());
    ::close(id_fd);
    if (!sent) {
      report(report_fd, me + ": could not send the id to rank 1");
      return exit_failed;
    }
  } else {
    const bool got = read_exact(id_fd, id.bytes.data(), id.bytes.size());
    ::close(id_fd);
    if (!got) {
      report(report_fd, me + ": no id from rank 0 (its pipe closed first)");
      return exit_failed;
    }
  }

  auto comm = runtime::join_nccl_comm(id, rank, 2, device);
  if (!comm) {
    const std::string text = error_text(comm.error());
    report(report_fd, me + ": " + text);
    return shared_device && text.find("invalid usage") != std::string::npos
               ? exit_refused_shared_device
               : exit_failed;
  }

  const size_t n = 1024;
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>((rank + 1) * i);
  auto buf = runtime::device_buffer::allocate(n * sizeof(float));
  if (!buf) {
    report(report_fd, me + ": " + error_text(buf.error()));
    return exit_failed;
  }
  auto stream = runtime::cuda_stream::create();
  if (!stream) {
    report(report_fd, me + ": " + error_text(stream.error()));
    return exit_failed;
  }
  if (auto err = buf->copy_from_host(host.data(), n * sizeof(float))) {
    report(report_fd, me + ": " + error_text(err));
    return exit_failed;
  }
  if (auto err = runtime::nccl_error(ncclAllReduce(buf->data(), buf->data(), n, ncclFloat,
                                                   ncclSum, comm->get(), stream->get()),
                                     "ncclAllReduce")) {
    report(report_fd, me + ": " + error_text(err));
    return exit_failed;
  }
  if (auto err = stream->synchronize()) {
    report(report_fd, me + ": " + error_text(err));
    return exit_failed;
  }
  std::vector<float> back(n);
  if (auto err = buf->copy_to_host(back.data(), n * sizeof(float))) {
    report(report_fd, me + ": " + error_text(err));
    return exit_failed;
  }
  for (size_t i = 0; i < n; ++i) {
    const auto want = static_cast<float>(3 * i);  // rank 0 gave i, rank 1 gave 2i
    if (back[i] != want) {
      report(report_fd, me + ": element " + std::to_string(i) + " is " + std::to_string(back[i]) +
                            ", want " + std::to_string(want));
      return exit_failed;
    }
  }
  report(report_fd, me + ": sum checked");
  return exit_ok;
}

}  // namespace
#endif  // MOE_HAVE_CUDA

TEST(nccl_multi_process, two_processes_all_reduce_through_an_id_passed_over_a_pipe) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  const auto probe = probe_gpus_in_child();
  if (probe.count < 1) GTEST_SKIP() << "no GPU: " << probe.reason;
  // One GPU: both ranks on it, which NCCL may refuse (then this test skips, saying so).
  const bool shared_device = probe.count < 2;
  const int devices[2] = {0, shared_device ? 0 : 1};

  int id_pipe[2];
  ASSERT_EQ(::pipe(id_pipe), 0) << std::strerror(errno);
  const child rank0 = spawn(
      [&](int fd) { return run_rank(0, devices[0], shared_device, id_pipe[1], fd); },
      {id_pipe[0]});
  const child rank1 = spawn(
      [&](int fd) { return run_rank(1, devices[1], shared_device, id_pipe[0], fd); },
      {id_pipe[1]});
  ::close(id_pipe[0]);
  ::close(id_pipe[1]);
  if (rank0.pid < 0 || rank1.pid < 0) {
    std::vector<child> started;
    for (const auto& c : {rank0, rank1})
      if (c.pid >= 0) started.push_back(c);
    wait_all(started, std::chrono::steady_clock::now(), 0);  // kills and reaps them
    FAIL() << "fork or pipe failed: " << std::strerror(errno);
  }

  constexpr int limit_s = 120;
  const auto out = wait_all({rank0, rank1},
                            std::chrono::steady_clock::now() + std::chrono::seconds(limit_s),
                            limit_s);
  const std::string story = "rank 0 (" + out[0].how + "): " + out[0].report + "\nrank 1 (" +
                            out[1].how + "): " + out[1].report;
  if (shared_device && (out[0].code == exit_refused_shared_device ||
                        out[1].code == exit_refused_shared_device))
    GTEST_SKIP() << "one GPU visible, and NCCL " << runtime::nccl_version_string()
                 << " refuses two ranks of one world on the same device:\n"
                 << story;
  EXPECT_TRUE(out[0].exited && out[0].code == exit_ok && out[1].exited && out[1].code == exit_ok)
      << story;
#endif
}
