// Failure detection for a coordinator: joins every node of the cluster config (its gatekeeper,
// with the cluster's name and secret), then watches each node agent two ways:
//   - a CAF monitor: a node process that exits (or is killed) shows up at once as a down
//     message (remote_link_unreachable when its connection drops);
//   - heartbeats every cluster.heartbeat_interval_ms, each expecting an answer: a node whose
//     last answer is older than cluster.failure_timeout_ms is down even though its connection
//     is open (a stopped, hung or partitioned process never sends a down message).
//
// States per node: joining -> up <-> suspect -> down; refused when the node rejects our
// credentials (a config mismatch: not retried). Joining and down nodes are retried every
// join_retry, so a node started late, or restarted, comes (back) up. Every transition is
// logged, counted (moe_cluster_nodes{state}, moe_cluster_node_failures_total{cause},
// moe_cluster_failure_detection_seconds from the last good heartbeat) and sent as a
// member_event to every subscriber: what the controller uses to fail the requests that
// depended on a node instead of letting them hang.
//
// Ownership: the actor owns its view of the cluster; subscribers are monitored and dropped when
// they end. Thread safety: an actor; talk to it with messages only. It is detached (a thread of
// its own), so a worker pool held by the process's other actors delays no tick.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <memory>
#include <string>

#include "actors/cluster_messages.hpp"
#include "runtime/cluster_config.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

using member_subscribe_atom = caf::atom_constant<caf::atom("msubscribe")>;
using members_atom = caf::atom_constant<caf::atom("members")>;
using membership_tick_atom = caf::atom_constant<caf::atom("mtick")>;

/// subscribe: the actor receives a member_event for every later transition (ask `members`
/// for the current view first). members: a snapshot. tick: internal (the heartbeat timer).
using cluster_membership_actor =
    caf::typed_actor<caf::reacts_to<member_subscribe_atom, caf::actor>,
                     caf::replies_to<members_atom>::with<member_list>,
                     caf::reacts_to<membership_tick_atom>>;

struct cluster_membership_options {
  runtime::cluster_config config;       ///< nodes, cluster name and secret, heartbeat settings
  std::string peer_name = "coordinator";  ///< How the nodes' logs name us.
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  std::chrono::milliseconds join_timeout{2000};   ///< connect + join, each
  std::chrono::milliseconds join_retry{1000};     ///< between attempts for joining/down nodes
};

[[nodiscard]] cluster_membership_actor spawn_cluster_membership(caf::actor_system& sys,
                                                                cluster_membership_options options);

}  // namespace moe::actors
