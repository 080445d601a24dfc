// What crosses the control plane between a node process and whoever joins it: the node's
// gatekeeper interface (join / status / shutdown, each with the cluster's credentials), the
// node's metadata, and the membership events a coordinator hands its listeners.
//
// Every type here is registered in the `moe_cluster` ID block below (actor_types.cpp adds it)
// and round-trips through tests/unit/actors/message_types_test.cpp.
// Thread safety: plain values.
#pragma once

#include <caf/atom.hpp>
#include <caf/detail/stringification_inspector.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/replies_to.hpp>
#include <caf/type_id.hpp>
#include <caf/typed_actor.hpp>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "actors/node_agent.hpp"
#include "base/error.hpp"

namespace moe::actors {

enum class node_errc : uint8_t {
  refused = 1,  ///< Permanent: wrong cluster name or secret (a config mismatch; do not retry).
  unreachable,  ///< Transient: nothing answers at the node's control endpoint (yet).
  timeout,      ///< Transient: the node did not answer in time (overloaded or stopped).
  bad_request,  ///< Permanent: the request makes no sense for this node (unknown node name, ...).
};

[[nodiscard]] const char* to_string(node_errc e) noexcept;
[[nodiscard]] caf::error make_error(node_errc code, std::string text);

/// What a peer presents to a node's gatekeeper. The secret travels in the clear unless the
/// config has cluster.tls (then the middleman runs over TLS and peers must hold a certificate of
/// the cluster's CA); it is checked either way, so a peer needs both with TLS on. `peer` names
/// the caller in the node's log.
struct node_credentials {
  std::string cluster;
  std::string secret;
  std::string peer;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_credentials& x) {
  // As text (caf::to_string, deep_to_string, CAF's "unexpected message" warnings) the secret
  // shows as <redacted>, so no log line can carry it; serializers send it as it is.
  if constexpr (std::is_same_v<Inspector, caf::detail::stringification_inspector>) {
    std::string redacted = "<redacted>";
    return f(caf::meta::type_name("node_credentials"), x.cluster, redacted, x.peer);
  } else {
    return f(caf::meta::type_name("node_credentials"), x.cluster, x.secret, x.peer);
  }
}

/// A node process as it describes itself.
struct node_info {
  std::string name;
  std::string host;
  uint16_t control_port = 0;
  uint16_t metrics_port = 0;
  int64_t gpus = 0;
  int64_t cpu_slots = 0;
  int64_t pid = 0;
  std::string data_address;  ///< The node's data plane (runtime/data_plane.hpp address()).
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_info& x) {
  return f(caf::meta::type_name("node_info"), x.name, x.host, x.control_port, x.metrics_port, x.gpus,
           x.cpu_slots, x.pid, x.data_address);
}

/// The answer to an accepted join: the node and its agent, which the caller monitors and
/// sends heartbeats to.
struct node_join_reply {
  node_info info;
  node_agent_actor agent;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_join_reply& x) {
  return f(caf::meta::type_name("node_join_reply"), x.info, x.agent);
}

struct node_status {
  node_info info;
  uint64_t uptime_ms = 0;
  std::vector<std::string> actors;  ///< What the process hosts: "node_agent", "gatekeeper", ...
  uint64_t heartbeats_answered = 0;
  uint64_t refused_joins = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_status& x) {
  return f(caf::meta::type_name("node_status"), x.info, x.uptime_ms, x.actors, x.heartbeats_answered,
           x.refused_joins);
}

/// A node's state as a coordinator sees it.
enum class member_state : uint8_t {
  joining = 0,  ///< Not joined yet (or unreachable so far); joins are retried.
  up,           ///< Joined; heartbeats answered.
  suspect,      ///< Up, but a heartbeat is late (missed at least one interval).
  down,         ///< The node agent is gone (down message) or silent for failure_timeout_ms.
  refused,      ///< The node refused our credentials: a config mismatch; not retried.
};

[[nodiscard]] const char* to_string(member_state s) noexcept;

/// One state transition, sent to every listener of the membership.
struct member_event {
  std::string node;
  member_state from = member_state::joining;
  member_state to = member_state::joining;
  std::string reason;  ///< Why, in words: "node agent down: remote_link_unreachable", ...
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, member_event& x) {
  return f(caf::meta::type_name("member_event"), x.node, x.from, x.to, x.reason);
}

/// A node in the membership's snapshot.
struct member_status {
  std::string node;
  std::string host;
  uint16_t control_port = 0;
  member_state state = member_state::joining;
  std::string reason;
  node_info info;  ///< Filled once joined.
  node_agent_actor agent;  ///< Set while the node is up or suspect.
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, member_status& x) {
  return f(caf::meta::type_name("member_status"), x.node, x.host, x.control_port, x.state, x.reason,
           x.info, x.agent);
}

struct member_list {
  std::vector<member_status> members;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, member_list& x) {
  return f(caf::meta::type_name("member_list"), x.members);
}

using join_atom = caf::atom_constant<caf::atom("join")>;
using node_status_atom = caf::atom_constant<caf::atom("nodestatus")>;
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;

/// What a node process publishes on its control endpoint. Every request carries credentials;
/// a wrong cluster name or secret is answered with node_errc::refused (never the agent).
/// shutdown replies once the node has begun to stop.
using node_gatekeeper_actor =
    caf::typed_actor<caf::replies_to<join_atom, node_credentials>::with<node_join_reply>,
                     caf::replies_to<node_status_atom, node_credentials>::with<node_status>,
                     caf::replies_to<shutdown_atom, node_credentials>::with<caf::atom_value>>;

}  // namespace moe::actors

MOE_ERROR_ENUM(moe::actors::node_errc, "node")

CAF_BEGIN_TYPE_ID_BLOCK(moe_cluster, caf::first_custom_type_id + 300)
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::node_credentials))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::node_info))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::node_join_reply))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::node_status))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::member_event))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::member_status))
CAF_ADD_TYPE_ID(moe_cluster, (moe::actors::member_list))
CAF_END_TYPE_ID_BLOCK(moe_cluster)
