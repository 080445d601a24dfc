// What `moe node` and `moe cluster` share: the cluster config with an optional secret file
// (how a Kubernetes Secret reaches a node without being written into the ConfigMap), and the
// CAF configuration of a process that talks to other processes (middleman loaded, TLS when the
// config gives certificates).
// Thread safety: plain functions.
#pragma once

#include <string>

#include "base/error.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::cli {

/// load_cluster_config(config_file); when `secret_file` is non-empty its content (trailing
/// whitespace and newlines removed; must be non-empty) replaces cluster.secret.
[[nodiscard]] caf::expected<runtime::cluster_config> load_cluster_with_secret(const std::string& config_file,
                                                                              const std::string& secret_file);

/// Our message types, the middleman, and `num_worker_threads` workers (0: CAF's default); with
/// CAF's OpenSSL module when `cluster` has a `tls` section, so that every control-plane
/// connection of the process (runtime/control_plane.hpp) is TLS with certificates.
[[nodiscard]] runtime::actor_system_config make_networked_system_config(const runtime::cluster_config& cluster,
                                                                        size_t num_worker_threads = 0);

/// Our message types, without the middleman: a process whose actors all live in it.
[[nodiscard]] runtime::actor_system_config make_local_system_config();

}  // namespace moe::cli
