// The process and network faults of `moe chaos`: signalling a node process that `moe cluster up`
// started (found through its pid file in the run dir), and tc netem, or tc tbf and nftables
// where the kernel has no netem, inside a network namespace (`ip netns exec NS tc ...`, run by
// fork/exec without a shell). The effects sit here, apart from the command's parsing, so the
// CLI file stays small and the argv building is testable.
//
// Thread safety: plain functions; no shared state.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::cli {

enum class chaos_errc : uint8_t {
  bad_request = 1,  ///< Permanent: an unknown node, a remote node, conflicting options.
  not_running,      ///< Permanent until the node is started: no pid file, or its process has ended.
  missing_tool,     ///< Permanent on this host: ip, tc or nft is not installed, or the kernel lacks the qdisc.
  no_namespace,     ///< Permanent until it is made: the network namespace does not exist.
  command_failed,   ///< The external command failed; its output is in the text.
  io_error,         ///< Maybe transient: a socket or file operation failed.
};

[[nodiscard]] const char* to_string(chaos_errc e) noexcept;
[[nodiscard]] caf::error make_error(chaos_errc code, std::string text);

/// A wall-clock instant as tests read it: "2025-01-31T12:00:00.123Z (unix 1738324800.123)".
/// Detection and recovery times are measured from it against other processes' logs.
[[nodiscard]] std::string chaos_timestamp(std::chrono::system_clock::time_point t);

/// The seeded generator of the proxy's flips and the random garbage (SplitMix64): the same
/// sequence on every platform and library, so a seed names a run.
[[nodiscard]] uint64_t splitmix64(uint64_t& state);

/// A node process started by `moe cluster up` on this host.
struct node_process {
  std::string node;
  pid_t pid = 0;
  std::filesystem::path pid_file;
};

/// The running process of `node`, from RUN_DIR/NODE.pid. Refuses nodes on other hosts (their
/// pid file names the ssh process, not the node) and pids that are no longer running.
[[nodiscard]] caf::expected<node_process> find_node_process(const runtime::cluster_config& config,
                                                            const std::string& node,
                                                            const std::filesystem::path& run_dir);

/// Sends `sig` to the node's process group (a node started by `moe cluster up` leads its own
/// session, so helpers it may have forked are stopped or killed with it), else to the process.
[[nodiscard]] caf::error signal_node(const node_process& p, int sig);

/// What to set on a device: delay (with optional jitter) and/or loss, or clear the qdisc.
struct netem_spec {
  std::optional<double> delay_ms;
  std::optional<double> jitter_ms;
  std::optional<double> loss_pct;
  bool clear = false;
};

/// `ip netns exec NS tc qdisc replace dev DEV root netem ...` (or `... qdisc del ...` to clear).
/// Exposed for tests (tests/unit/cli/chaos_faults_test.cpp). Precondition: the spec was checked
/// by check_netem_spec.
[[nodiscard]] std::vector<std::string> netem_argv(const std::string& ip, const std::string& tc,
                                                  const std::string& netns, const std::string& dev,
                                                  const netem_spec& spec);

/// The spec is one of: delay [jitter] [loss], loss, clear; values in range.
[[nodiscard]] caf::error check_netem_spec(const netem_spec& spec);

/// Runs netem_argv after checking that ip and tc exist and the namespace does; a missing qdisc
/// on --clear is not an error. Answers what tc now shows for the device.
[[nodiscard]] caf::expected<std::string> apply_netem(const std::string& netns, const std::string& dev,
                                                     const netem_spec& spec);

/// A slow or lossy link without netem (kernels built without sch_netem): a token-bucket rate
/// limit (tc tbf: packets beyond the rate wait in the queue, so latency grows with the traffic)
/// and/or random loss (nftables: `numgen random` drops that share of the packets leaving the
/// device). Both live in the namespace; clear removes both.
struct link_spec {
  std::optional<double> rate_kbit;
  std::optional<double> loss_pct;
  bool clear = false;
};

/// The spec is rate and/or loss, or clear; the rate in [8, 10^8] kbit/s, the loss a percentage.
[[nodiscard]] caf::error check_link_spec(const link_spec& spec);

/// One command of a link fault; `undo` ones remove an earlier setting and may fail harmlessly
/// (there was none).
struct link_command {
  std::vector<std::string> argv;
  bool undo = false;
};

/// The commands apply_link runs, in order, each `ip netns exec NS ...`: a spec replaces the
/// device's whole link fault (its root qdisc, and its own nftables table). Exposed for tests
/// (tests/unit/cli/chaos_faults_test.cpp).
/// Precondition: the spec and the device name were checked.
[[nodiscard]] std::vector<link_command> link_commands(const std::string& ip, const std::string& tc,
                                                      const std::string& nft, const std::string& netns,
                                                      const std::string& dev, const link_spec& spec);

/// Sets (or clears) a link fault after checking that ip, tc and nft exist and the namespace
/// does. Answers what tc and nft now show for the device.
[[nodiscard]] caf::expected<std::string> apply_link(const std::string& netns, const std::string& dev,
                                                    const link_spec& spec);

/// The result of a command run to completion with its stdout and stderr captured together.
struct command_result {
  int exit_code = -1;  ///< -1: killed by a signal.
  std::string output;
};

/// fork/exec of argv[0] (a path) without a shell, stdin from /dev/null; waits for it.
[[nodiscard]] caf::expected<command_result> run_captured(const std::vector<std::string>& argv);

/// The first executable `name` on $PATH (and the sbin directories, where iproute2 lives but a
/// user's PATH may not reach); empty when there is none.
[[nodiscard]] std::string find_program(const std::string& name);

}  // namespace moe::cli

MOE_ERROR_ENUM(moe::cli::chaos_errc, "chaos")
