// The expert-group actor: a set of routed experts per MoE layer (and the shared experts where
// placed), run as a grouped batch per request.
//
// Placement versions (actors/rebalance_messages.hpp): the group answers batches of every
// version it holds. prepare_layout loads the replicas a new version adds (from the checkpoint,
// on a thread of its own, so serving goes on meanwhile) and binds that version's blocks;
// commit_layout drops every older version and frees the replicas no version held still uses;
// abort_layout drops a prepared version.
// Ownership: owns the weights of its replicas, one checkpoint per (layer, expert) so a dropped
// replica frees exactly its memory, and the blocks bound to them.
#pragma once

#include <caf/fwd.hpp>

#include <filesystem>
#include <memory>
#include <vector>

#include "actors/messages.hpp"
#include "actors/tensor_transport.hpp"
#include "base/error.hpp"
#include "model/checkpoint.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

struct expert_group_options {
  int group = 0;
  std::vector<int64_t> experts;  ///< logical experts held, the same for every MoE layer
  bool holds_shared_experts = false;
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  /// How rows from routers in other processes arrive and results go back (empty: one process).
  tensor_transport transport;
  /// The version `experts` belong to (every MoE layer holds them).
  uint32_t placement_version = 1;
  /// Where prepare_layout reads the weights of new replicas (empty: it refuses).
  std::filesystem::path checkpoint_dir;
};

/// Takes `weights` (at least its experts and, where placed, the shared experts; other tensors
/// are dropped), binds the group's blocks and spawns the actor. Errors: a weight is missing or
/// malformed.
[[nodiscard]] caf::expected<expert_group_actor> spawn_expert_group(
    caf::actor_system& sys, model::checkpoint weights, const expert_group_options& options);

/// The names an expert group needs from a checkpoint (for load_options::filter).
[[nodiscard]] bool expert_group_needs(const expert_group_options& options, std::string_view name);

}  // namespace moe::actors
