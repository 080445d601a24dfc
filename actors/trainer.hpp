// The trainer: runs training steps through the serving actors (actors/training_messages.hpp
// has the protocol). Per step it splits the batch's sequences over the attention shards
// (contiguous, as even as the count allows), runs their forward and backward, all-reduces the
// data-parallel gradients (the shards' trunks, the routers' gates) and sums the gradients of
// replicated experts, clips by the global norm, and has every owner step its AdamW and every
// router move its routing bias by the summed expert loads.
//
// The all-reduce goes through the trainer: each owner sends its gradients (over the data plane
// when it is in another process), the trainer sums them in a fixed order (shard 0 first), and
// every owner of the same values receives the same sum, so their copies stay identical.
//
// Steps run one at a time, in arrival order.
//
// Recovery: train_snapshot keeps the cluster's whole training state (every parameter and its
// AdamW moments, the steps run) in this actor's memory; a training job takes one every
// training.snapshot_every_steps steps. When a node running owners goes down (a member_event),
// the step in flight stops; once the surviving owners have answered whatever it asked of them
// and the failover (actors/rebalancer.hpp) has moved the lost groups' experts to survivors (its
// switch_layout), every surviving owner rolls back to the snapshot (train_restore), a lost
// attention shard's share of later batches goes to the others, and the interrupted step and
// those waiting fail with trainer_errc::rolled_back: the job runs the steps after its snapshot
// again, on the same batches, so its losses are those of a run without the failure. Without a
// snapshot, or when no shard survives, training stops (trainer_errc::unavailable).
//
// Thread safety: an actor; all state is confined to it.
#pragma once

#include <caf/fwd.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "actors/cluster_messages.hpp"
#include "actors/messages.hpp"
#include "actors/tensor_transport.hpp"
#include "base/error.hpp"
#include "model/config.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

enum class trainer_errc : uint8_t {
  busy = 1,     ///< Transient: a step runs or a hold is on; ask again later.
  bad_batch,    ///< Permanent: the batch is malformed (the text says how).
  failed,       ///< A step failed in an actor (the text says where); the cluster's weights may be
                ///< part-updated only if the failure came during the update phase.
  unavailable,  ///< Until the cluster is restarted: a node running owners is down and there is
                ///< no snapshot to roll back to, or the rollback failed. Training goes on from its
                ///< last checkpoint (the job API's checkpoint) on a restarted one.
  rolled_back,  ///< Transient: a node failure interrupted the step; the cluster is back at the
                ///< last snapshot (train_snapshot); run the steps after it again.
};

[[nodiscard]] const char* to_string(trainer_errc e) noexcept;
[[nodiscard]] caf::error make_error(trainer_errc code, std::string text);

}  // namespace moe::actors

MOE_ERROR_ENUM(moe::actors::trainer_errc, "trainer")

namespace moe::actors {

using train_snapshot_atom = caf::atom_constant<caf::atom("train_snap")>;
/// Internal: a recovery's time is up; a failed step's grace period ended.
using recovery_timeout_atom = caf::atom_constant<caf::atom("recov_tmo")>;
using failure_grace_atom = caf::atom_constant<caf::atom("fail_grace")>;
/// (failover_failed_atom, why): the rebalancer could not fail over lost expert groups; a recovery
/// waiting for it stops training with the reason at once.
using failover_failed_atom = caf::atom_constant<caf::atom("fo_failed")>;

/// step: answers the step's report, or a trainer_errc error; steps run one at a time, in arrival
/// order. save: writes a training checkpoint (model/training_checkpoint.hpp: the model in the hub
/// layout, AdamW's moments, the steps run) of the cluster's current weights to the directory and
/// answers it; refused (busy) while a step runs.
/// snapshot: keeps the cluster's training state in memory as the point a node failure rolls back
/// to, and answers the steps it has been trained for; refused (busy) while a step runs.
/// hold_steps / resume_steps: as the controller's (actors/controller.hpp): no step starts while
/// held; answered once the running step ended. The rebalancer holds training while it switches
/// the routers and then tells the trainer the new layout (switch_layout).
using trainer_actor = caf::typed_actor<caf::replies_to<train_step_atom, train_batch>::with<train_step_report>,
                                       caf::replies_to<train_save_atom, std::string>::with<std::string>,
                                       caf::replies_to<train_snapshot_atom>::with<int64_t>,
                                       caf::replies_to<hold_steps_atom>::with<uint64_t>,
                                       caf::reacts_to<resume_steps_atom, uint64_t>,
                                       caf::reacts_to<switch_layout_atom, router_layout>,
                                       caf::reacts_to<member_event>,
                                       caf::reacts_to<recovery_timeout_atom, uint64_t>,
                                       caf::reacts_to<failure_grace_atom, uint64_t>,
                                       caf::reacts_to<failover_failed_atom, std::string>>;

struct trainer_options {
  std::vector<attention_actor> shards;
  std::vector<router_actor> routers;  ///< one per shard
  std::vector<expert_group_actor> groups;
  /// Which groups hold which experts per MoE layer: the gradients of an expert held by several
  /// groups are summed. Must be the layout the routers use.
  router_layout layout;
  model::model_config model;
  /// How gradients of owners in other processes arrive (empty: one process).
  tensor_transport transport;
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  /// The steps the weights have been trained for already (a resumed checkpoint's), which saves
  /// count on from.
  int64_t steps_done = 0;
  /// A phase of a step (forward and backward, gradients, update) that takes longer fails.
  std::chrono::milliseconds phase_timeout{600'000};
  /// A hold_steps that is not resumed within this time ends by itself.
  std::chrono::milliseconds max_hold{30'000};
  /// The node running each shard (and its router) and each expert group; empty in a cluster of
  /// one process. A member_event saying one is down starts a recovery (see above) at once,
  /// instead of waiting phase_timeout for answers that will not come.
  std::vector<std::string> shard_nodes;
  std::vector<std::string> group_nodes;
  /// The group holding the shared experts (-1: none); a failover that moves them says where
  /// (router_layout::shared_group), and a recovery waits for it when their group is lost.
  int64_t shared_experts_group = -1;
  /// A recovery that has not rolled back within this time (the failover never came, an owner
  /// did not answer) stops training: trainer_errc::unavailable.
  std::chrono::milliseconds recovery_timeout{120'000};
  /// With nodes to watch and a snapshot: a step that fails waits this long for a member_event
  /// before failing for good, as the failure may be the first sign of a node that went down (a
  /// route to its experts failed before the membership reported it).
  std::chrono::milliseconds failure_grace{3'000};
};

[[nodiscard]] trainer_actor spawn_trainer(caf::actor_system& sys, trainer_options options);

/// The layout of a cluster whose groups hold the same experts in every MoE layer.
[[nodiscard]] router_layout uniform_layout(const model::model_config& c,
                                           const std::vector<std::vector<int64_t>>& group_experts,
                                           uint32_t version = 1);

}  // namespace moe::actors
