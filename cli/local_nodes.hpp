// A multi-process cluster on this machine for `moe demo --processes N`: a config with N nodes
// derived from a single-node one (the node's CPU slots and memory split between them, fresh
// ports, a random secret), written to a private run dir, and one `moe node` process per node.
//
// Ownership: RAII. Destruction stops every node (SIGTERM to its process group, SIGKILL after a
// grace period), reaps it and removes the run dir; a node that failed to start is reported
// with the end of its log. Where no destructor runs (the owner killed, or ended by a signal), the
// kernel sends each node SIGTERM when the thread that started them ends; the run dir, with the
// nodes' logs, then stays until the next demo starts (remove_stale_run_dirs). Thread safety: one
// owner thread, which must outlive the nodes' use.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::cli {

class local_nodes {
 public:
  /// Starts `count` (>= 1) node processes for `base` (whose first node is split between them).
  [[nodiscard]] static caf::expected<std::unique_ptr<local_nodes>> start(const runtime::cluster_config& base,
                                                                         int count);
  ~local_nodes();
  local_nodes(const local_nodes&) = delete;
  local_nodes& operator=(const local_nodes&) = delete;

  /// The generated config (nodes n0, n1, ...), as loaded back from its file.
  [[nodiscard]] const runtime::cluster_config& config() const noexcept { return config_; }
  [[nodiscard]] const std::filesystem::path& run_dir() const noexcept { return dir_; }
  /// The end of every node's log, for an error report.
  [[nodiscard]] std::string log_tails() const;

 private:
  local_nodes() = default;
  std::filesystem::path dir_;
  runtime::cluster_config config_;
  std::vector<pid_t> pids_;
};

/// Removes the run dirs under `parent` (moe-demo-*, this user's) whose demo no longer runs: those
/// whose pid file names a process that does not exist, as a demo killed before its destructor
/// ran leaves them (with the cluster's secret). A dir without a readable pid file, a demo's
/// starting now, is left alone. Returns how many were removed; never fails. Exposed for tests.
size_t remove_stale_run_dirs(const std::filesystem::path& parent);

/// The YAML of a config with `count` nodes split from `base`'s first node, on 127.0.0.1 with
/// the given ports (control and metrics, per node) and secret. Exposed for tests.
[[nodiscard]] std::string split_config_yaml(const runtime::cluster_config& base, int count,
                                            const std::vector<uint16_t>& ports, const std::string& secret);

}  // namespace moe::cli
