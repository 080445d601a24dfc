// The process effects of `moe cluster`: starting a detached node process with its log and pid
// file, telling whether a pid still runs, stopping it by signal, and whether a host is this one.
// Kept apart from the command's logic so the effects are in one small place.
//
// Liveness ignores zombies: a node started by `moe cluster up` is reparented once `up` exits,
// and where PID 1 does not reap (containers) a dead node stays a zombie that kill(pid, 0)
// still reports. Thread safety: plain functions; no shared state.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace moe::cli {

enum class process_errc : uint8_t {
  spawn_failed = 1,  ///< Maybe transient (out of processes); the reason says.
  io_error,          ///< Maybe transient: a log or pid file could not be written.
};

[[nodiscard]] const char* to_string(process_errc e) noexcept;
[[nodiscard]] caf::error make_error(process_errc code, std::string text);

/// True for 127.0.0.0/8, ::1, localhost and this machine's host name (short or full).
[[nodiscard]] bool is_local_host(const std::string& host);

/// What a spawned process does when the thread that spawned it ends, however it ends (an exit,
/// a crash, SIGKILL): `moe cluster up`'s nodes keep running; a demo's end with the demo.
enum class on_spawner_exit : uint8_t {
  keep_running,
  terminate,  ///< SIGTERM from the kernel (PR_SET_PDEATHSIG): no destructor needs to run
};

/// Forks and execs `argv` in a session of its own (setsid: a terminal's Ctrl-C or the death of
/// `moe cluster up` does not reach it), stdin from /dev/null, stdout and stderr appended to
/// `log`. Returns the child's pid, which is also its process group id. With
/// on_spawner_exit::terminate the calling thread must live as long as the process should (the
/// kernel ties it to the thread, not to this process).
[[nodiscard]] caf::expected<pid_t> spawn_detached(
    const std::vector<std::string>& argv, const std::filesystem::path& log,
    on_spawner_exit when = on_spawner_exit::keep_running);

/// Running and not a zombie. A pid of ours that has exited is reaped here.
[[nodiscard]] bool process_running(pid_t pid);

/// Polls process_running until it is false or `timeout` passes; true when it has ended.
[[nodiscard]] bool wait_for_exit(pid_t pid, std::chrono::milliseconds timeout);

/// Signals the process group `pid` leads (nodes are session leaders), else the process alone.
void signal_process_group(pid_t pid, int sig);

[[nodiscard]] std::optional<pid_t> read_pid_file(const std::filesystem::path& path);
[[nodiscard]] caf::error write_pid_file(const std::filesystem::path& path, pid_t pid);

/// The last `max_lines` lines of a file (for error messages about a node that did not start).
[[nodiscard]] std::string tail_of_file(const std::filesystem::path& path, size_t max_lines);

/// `count` distinct TCP ports on 127.0.0.1 that the kernel just handed out. Free again when this
/// returns: a node that loses the race for one fails to start and says so.
[[nodiscard]] caf::expected<std::vector<uint16_t>> free_loopback_ports(size_t count);

/// Where `moe cluster` keeps a cluster's logs and pid files: `run_dir` when non-empty, else
/// ${XDG_RUNTIME_DIR:-/tmp}/moe-<cluster_name>. `moe chaos` finds the nodes there too.
[[nodiscard]] std::filesystem::path cluster_run_dir(const std::string& run_dir, const std::string& cluster_name);

/// This executable (/proc/self/exe), to start nodes with the same build.
[[nodiscard]] std::string self_executable();

}  // namespace moe::cli

MOE_ERROR_ENUM(moe::cli::process_errc, "process")
