// Blocking calls on a node's gatekeeper, for command-line tools (`moe cluster status|down`):
// connect to HOST:PORT, then status or shutdown with the cluster's credentials. Every call is
// bounded by `timeout`; a stopped or hung node costs at most that.
//
// Errors: node_errc::unreachable (nothing answers at the address: the node is not running),
// node_errc::timeout (something is there but does not answer), node_errc::refused (wrong
// cluster name or secret), anything else as CAF reports it.
// Thread safety: each call uses its own scoped actor; call from any non-actor thread.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <string>

#include "actors/cluster_messages.hpp"

namespace moe::actors {

[[nodiscard]] caf::expected<node_gatekeeper_actor> connect_gatekeeper(caf::actor_system& sys,
                                                                      const std::string& host, uint16_t port,
                                                                      std::chrono::milliseconds timeout);

[[nodiscard]] caf::expected<node_status> request_node_status(caf::actor_system& sys,
                                                             const node_gatekeeper_actor& gatekeeper,
                                                             const node_credentials& credentials,
                                                             std::chrono::milliseconds timeout);

/// Asks the node to stop; success means it has begun to (its process exits shortly after).
[[nodiscard]] caf::error request_node_shutdown(caf::actor_system& sys, const node_gatekeeper_actor& gatekeeper,
                                               const node_credentials& credentials,
                                               std::chrono::milliseconds timeout);

}  // namespace moe::actors
