// The actor config file (YAML, deploy/*.yaml) as a validated value: the cluster and its secret,
// the nodes with their devices and memory, the model, how the model is cut into actors
// (attention shards, expert groups, redundant expert slots), batching limits and ports.
// docs/configuration.md documents the schema; this header is its single implementation.
//
// Errors name the file, the line and the field, in the form
//   "deploy/local.yaml:12: nodes[1].devices.gpus: expected a non-negative integer"
//   "deploy/x.yaml:7: batching.max_queue_len: unknown key"
// Unknown keys are errors everywhere: a misspelt limit silently falling back to its default is
// worse than a refusal to start. yaml-cpp throws; its exceptions are caught here and never
// leave this unit.
//
// Only what can be checked without the model is checked here (types, ranges, uniqueness,
// explicit expert lists being well-formed). Whether the expert lists cover the model's experts,
// whether the model fits: the scheduler, which knows the model (scheduler/placement.hpp).
//
// The secret is held in plain text in memory (the node agents need it for the handshake) but
// every rendering (to_string, to_json) redacts it; so are the TLS keys' passphrases.
//
// Thread safety: plain values; every function is pure apart from reading the file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "base/error.hpp"

namespace moe::runtime {

enum class cluster_config_errc : uint8_t {
  bad_config = 1,  ///< Permanent: the file is not valid YAML or violates the schema.
  io_error,        ///< Maybe transient: the file could not be read.
};

[[nodiscard]] const char* to_string(cluster_config_errc e) noexcept;

/// caf::error carrying `text` as its reason (moe::error_text returns it).
[[nodiscard]] caf::error make_error(cluster_config_errc code, std::string text);

/// One host (or one process on loopback) of the cluster.
struct node_config {
  std::string name;                ///< Unique; [A-Za-z0-9_.-]+, used in device names "n1/gpu0".
  std::string host = "127.0.0.1";
  int64_t gpus = 0;                ///< devices.gpus
  int64_t cpu_slots = 0;           ///< devices.cpu_slots; every slot is a device of its own.
  uint64_t memory_bytes = 0;       ///< Host memory, shared equally by the CPU slots.
  uint64_t gpu_memory_bytes = 0;   ///< Memory of each GPU.
  /// The node process's control endpoint (its gatekeeper) and /metrics port; unset: the
  /// defaults of node_control_port / node_metrics_port below.
  std::optional<uint16_t> control_port;
  std::optional<uint16_t> metrics_port;
  int line = 0;                    ///< Where the node's entry starts, for later messages.
};

/// Exactly one of path and preset is set.
struct model_source {
  std::filesystem::path path;  ///< A checkpoint directory (relative: to the config file's dir).
  std::string preset;          ///< tiny, small, v2lite-8L (checked against the model component).
  std::optional<uint64_t> seed;  ///< Seed of a preset's random weights.
  int line = 0;                ///< Line of `path` or `preset`.
};

struct expert_groups_config {
  int64_t count = 1;
  /// Empty: the default even contiguous split of the routed experts over `count` groups.
  /// Otherwise one list per group of logical expert ids, each list sorted and free of
  /// duplicates; an expert in several lists is replicated.
  std::vector<std::vector<int64_t>> experts;
  int line = 0;                     ///< Line of `expert_groups`.
  std::vector<int> experts_lines;   ///< Line of each group's list.
};

struct batching_config {
  int64_t max_running_requests = 64;
  int64_t max_batch_tokens = 4096;   ///< Token budget of one step (prefill and decode together).
  int64_t max_queue = 256;
  int64_t max_new_tokens_limit = 4096;
  /// Deadline of a request that names none, from its submission (0: none): a request not
  /// finished by then fails with "deadline exceeded", so none waits forever on a failed cluster.
  int64_t request_timeout_ms = 0;
};

/// Online expert load balancing (actors/rebalancer.hpp, docs/configuration.md).
struct rebalancing_config {
  int64_t period_s = 0;             ///< A rebalance every period; 0: only on demand (`moe rebalance`).
  int64_t load_window_steps = 1024; ///< Steps each router counts expert load over.
  int64_t max_moved_replicas = -1;  ///< Replicas one rebalance may load; -1: no limit.
  int64_t min_improvement_pct = 2;  ///< A periodic rebalance moves only if the mean balance ratio improves by this (percent points).
  int line = 0;                     ///< Line of `rebalancing` (0: not given).
};

/// Recovery of training jobs from node failures (actors/trainer.hpp, docs/configuration.md).
struct training_config {
  /// A job keeps the cluster's training state in the coordinator's memory every this many steps
  /// (and before its first); a node failure rolls back to it. 0: none, and a node failure stops
  /// the job.
  int64_t snapshot_every_steps = 10;
  /// A recovery that has not rolled back within this time stops training.
  int64_t recovery_timeout_ms = 120'000;
};

/// 0 asks for an ephemeral port.
struct ports_config {
  uint16_t control = 7100;
  uint16_t api = 7101;
  uint16_t metrics = 7102;
};

/// cluster.tls: the control plane (CAF's middleman) over TLS, each side presenting a certificate
/// signed by `ca_file` and refusing a peer that does not (runtime/control_plane.hpp). A relative
/// path is relative to the config file's directory (load_cluster_config resolves it).
struct tls_config {
  std::filesystem::path certificate;  ///< PEM: this node's certificate (a chain may follow it).
  std::filesystem::path key;          ///< PEM: its private key; encrypted ones need `passphrase`.
  std::filesystem::path ca_file;      ///< PEM: the CA certificate(s) a peer's certificate must chain to.
  std::string passphrase;             ///< Of an encrypted key; empty: none. Never rendered.
  int line = 0;                       ///< Line of `tls`.
  int certificate_line = 0;           ///< Lines of the three paths, for load_cluster_config's file checks.
  int key_line = 0;
  int ca_file_line = 0;
};

/// api.tls: the job API (actors/api_server.hpp) over TLS. The server presents `certificate`;
/// clients check it against a CA they trust (their --ca-file) and its name against the host
/// they dial. With `client_ca_file`, the server also requires every client to present a
/// certificate signed by it (on top of the cluster secret, which is checked either way).
/// Relative paths: as for tls_config.
struct api_tls_config {
  std::filesystem::path certificate;     ///< PEM: the API server's certificate (a chain may follow it).
  std::filesystem::path key;             ///< PEM: its private key; encrypted ones need `passphrase`.
  std::filesystem::path client_ca_file;  ///< PEM: CA certificate(s) of client certificates; empty: none asked.
  std::string passphrase;                ///< Of an encrypted key; empty: none. Never rendered.
  int line = 0;                          ///< Line of `tls` under `api`.
  int certificate_line = 0;              ///< Lines of the paths, for check_tls_files.
  int key_line = 0;
  int client_ca_file_line = 0;
};

struct cluster_config {
  std::string source;  ///< The file (or name) it was read from; prefixes later messages.
  std::string name;
  std::string secret;  ///< Non-empty. Never rendered: see to_string / to_json.
  /// Failure detection (actors/cluster_membership.hpp): a heartbeat every interval; a node
  /// that has not answered one for failure_timeout_ms is down. failure_timeout_ms > interval.
  int64_t heartbeat_interval_ms = 500;
  int64_t failure_timeout_ms = 3000;
  std::optional<tls_config> tls;  ///< cluster.tls; unset: the control plane runs in the clear.
  std::vector<node_config> nodes;
  model_source model;
  int64_t attention_shards = 1;
  expert_groups_config expert_groups;
  int64_t redundant_expert_slots = 0;
  batching_config batching;
  rebalancing_config rebalancing;
  training_config training;
  ports_config ports;
  std::optional<api_tls_config> api_tls;  ///< api.tls; unset: the job API runs in plain TCP.
};

/// Where node `index` of the config publishes its gatekeeper: its `control_port`, else
/// ports.control + 10 * index (0 stays 0: ephemeral). The stride of 10 keeps the defaults of
/// several nodes on one host clear of ports.api and ports.metrics (7101, 7102 by default).
[[nodiscard]] uint16_t node_control_port(const cluster_config& config, size_t index);
/// The node process's /metrics port: its `metrics_port`, else ports.metrics + 10 * (index + 1)
/// (0 stays 0): 7112, 7122, ... by default, clear of every default control port.
[[nodiscard]] uint16_t node_metrics_port(const cluster_config& config, size_t index);
/// Index of the node named `name`, or nullopt.
[[nodiscard]] std::optional<size_t> find_node(const cluster_config& config, std::string_view name);

/// Parses YAML text; `source_name` prefixes every message. Relative model and TLS paths stay as
/// written, and no TLS file is opened (see check_tls_files).
[[nodiscard]] caf::expected<cluster_config> parse_cluster_config(std::string_view yaml,
                                                                 std::string source_name);

/// Reads and parses `path`; a relative model.path and relative cluster.tls / api.tls paths are
/// resolved against the file's directory, and the TLS files are checked (check_tls_files).
[[nodiscard]] caf::expected<cluster_config> load_cluster_config(const std::filesystem::path& path);

/// Opens the files of config.tls (nothing to do without it) and checks what CAF would otherwise
/// find out only when the first connection is made, by throwing on the middleman's thread: the
/// certificate and the CA file are readable PEM certificates, the key is a readable PEM private
/// key (decrypted with the passphrase when one is given) that matches the certificate, and the
/// certificate verifies against the CA file as a TLS server and as a TLS client certificate
/// (peers check it against the same file: every node's config names the same ca_file).
/// Errors name the file, line and key, e.g.
///   "deploy/x.yaml:6: cluster.tls.key: cannot read /etc/moe/tls/node.key: No such file or directory"
/// io_error when a file cannot be read, bad_config when its content is wrong.
/// With config.api_tls, its files too: the certificate and key as above (no CA to verify the
/// certificate against: clients bring theirs), the certificate usable by a TLS server and not
/// expired, and client_ca_file (when given) a readable PEM file of certificates, e.g.
///   "deploy/x.yaml:9: api.tls.key: the key in /etc/moe/api.key does not belong to the certificate in ..."
[[nodiscard]] caf::error check_tls_files(const cluster_config& config);

/// "8GiB", "512 MiB", "1.5GB", "4096" (bytes) -> bytes; nullopt when malformed or too large.
[[nodiscard]] std::optional<uint64_t> parse_size(std::string_view text);
/// 8589934592 -> "8 GiB", 1610612736 -> "1.5 GiB", 1000 -> "1000 B".
[[nodiscard]] std::string format_bytes(uint64_t bytes);
/// Sorted ids as ranges: {0,1,2,5,7,8} -> "0-2,5,7-8" (the form expert lists accept).
[[nodiscard]] std::string format_id_ranges(const std::vector<int64_t>& sorted_ids);

/// A readable multi-line summary; the secret appears as "<redacted>".
[[nodiscard]] std::string to_string(const cluster_config& config);
/// The config as JSON (sizes in bytes); "secret" is "<redacted>".
[[nodiscard]] nlohmann::json to_json(const cluster_config& config);

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::cluster_config_errc, "clustercfg")
