// The node agent: one per process (per host in a multi-host cluster). It owns the actors the
// scheduler assigns to its node: it loads just their weights from the checkpoint, spawns them
// (linked to itself, so they end with it) and hands their handles to whoever assembles the
// graph. Spawning is two-phase because routers need every expert group's handle: first the
// expert groups of all nodes, then the attention shards with their co-located routers. The
// agent is detached (a thread of its own, not CAF's worker pool, which its actors' compute may
// hold), and the weights are read on yet another thread, so the agent answers heartbeats and
// session requests while its actors compute and while a large checkpoint loads.
#pragma once

#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/replies_to.hpp>
#include <caf/type_id.hpp>
#include <caf/typed_actor.hpp>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/messages.hpp"
#include "actors/tensor_transport.hpp"
#include "model/latent_cache.hpp"
#include "runtime/caf_types.hpp"
#include "scheduler/scheduler_actor.hpp"

namespace prometheus {
class Counter;
class Registry;
}

namespace moe::actors {

struct group_handles {
  std::vector<int32_t> groups;
  std::vector<expert_group_actor> handles;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_handles& x) {
  return f(caf::meta::type_name("group_handles"), x.groups, x.handles);
}

struct shard_handles {
  std::vector<int32_t> shards;
  std::vector<attention_actor> handles;
  std::vector<router_actor> routers;  ///< each shard's co-located router
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, shard_handles& x) {
  return f(caf::meta::type_name("shard_handles"), x.shards, x.handles, x.routers);
}

/// One process of the cluster: its CAF node, where it receives tensors, and (for a node
/// process; port 0 for the coordinator) its control endpoint, which the other nodes connect to
/// so that their control messages go directly instead of through the coordinator.
struct data_plane_peer {
  caf::node_id node;
  std::string address;
  std::string control_host;
  uint16_t control_port = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, data_plane_peer& x) {
  return f(caf::meta::type_name("data_plane_peer"), x.node, x.address, x.control_host, x.control_port);
}

/// A coordinator's claim on a node process: the node serves it until it closes the session or
/// ends (the agent monitors `owner`); then the node drops the actors it spawned for it and can
/// serve the next coordinator. `peers`: every process of the cluster with its data plane.
/// `model_dir`: the checkpoint as the coordinator sees it; used when it exists on the node
/// (one host, or shared storage), else the node keeps its own (the config's model.path, or the
/// preset in its model cache).
struct cluster_session {
  caf::actor owner;
  std::vector<data_plane_peer> peers;
  std::string model_dir;
  int64_t cache_block_size = 16;  ///< Latent KV cache of each attention shard: block size
  int64_t cache_num_blocks = 0;   ///< and blocks (the scheduler's budget; 0: the node's default)
  int64_t load_window_steps = 1024;  ///< Steps each router counts expert load over
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_session& x) {
  return f(caf::meta::type_name("cluster_session"), x.owner, x.peers, x.model_dir,
           x.cache_block_size, x.cache_num_blocks, x.load_window_steps);
}

using spawn_groups_atom = caf::atom_constant<caf::atom("spawn_grp")>;
using spawn_shards_atom = caf::atom_constant<caf::atom("spawn_shrd")>;
using open_session_atom = caf::atom_constant<caf::atom("sess_open")>;
using close_session_atom = caf::atom_constant<caf::atom("sess_close")>;

/// spawn_groups: the expert groups placed on this node. spawn_shards: the attention shards (and
/// routers) placed here, given every group of the cluster. heartbeat: a liveness probe of the
/// coordinator (actors/cluster_membership.hpp); answered with the node's name, the same
/// sequence and the node's clock. open_session / close_session: see cluster_session; opening
/// fails (node_errc::bad_request) while another live coordinator holds the node.
using node_agent_actor = caf::typed_actor<
    caf::replies_to<spawn_groups_atom, scheduler::placement>::with<group_handles>,
    caf::replies_to<spawn_shards_atom, scheduler::placement, group_handles>::with<shard_handles>,
    caf::replies_to<runtime::heartbeat_atom, runtime::node_heartbeat>::with<runtime::node_heartbeat>,
    caf::replies_to<open_session_atom, cluster_session>::with<caf::atom_value>,
    caf::replies_to<close_session_atom>::with<caf::atom_value>>;

struct node_agent_options {
  std::string node;
  std::filesystem::path model_dir;
  model::latent_cache_options cache;
  std::shared_ptr<prometheus::Registry> metrics;  ///< this process's registry; may be null
  /// moe_node_heartbeats_answered_total of a node process (owned by its node_metrics, which
  /// outlives the agent); null in a single-process cluster.
  prometheus::Counter* heartbeats_answered = nullptr;
  /// The process's data plane for tensors to and from other processes (empty: one process).
  tensor_transport transport;
  /// Steps each router counts expert load over (config rebalancing.load_window_steps).
  int64_t load_window_steps = 1024;
  /// Tests only: called on the loading thread before each spawn request's weights are read
  /// (holding it shows the agent answering meanwhile).
  std::function<void()> before_loading;
};

[[nodiscard]] node_agent_actor spawn_node_agent(caf::actor_system& sys, node_agent_options options);

}  // namespace moe::actors

CAF_BEGIN_TYPE_ID_BLOCK(moe_node, caf::first_custom_type_id + 250)
CAF_ADD_TYPE_ID(moe_node, (moe::actors::group_handles))
CAF_ADD_TYPE_ID(moe_node, (moe::actors::shard_handles))
CAF_ADD_TYPE_ID(moe_node, (moe::actors::data_plane_peer))
CAF_ADD_TYPE_ID(moe_node, (moe::actors::cluster_session))
CAF_END_TYPE_ID_BLOCK(moe_node)
