// The expert-group actor: a set of routed experts (and the shared experts where placed) for
// every MoE layer, run as a grouped batch per request.
// Ownership: owns the weights it loaded (only its own experts) and its blocks.
#pragma once

#include <caf/fwd.hpp>

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
};

/// Binds the group's blocks to `weights` (which must hold at least its experts; the group keeps
/// the pointer alive) and spawns the actor. Errors: a weight is missing or malformed.
[[nodiscard]] caf::expected<expert_group_actor> spawn_expert_group(
    caf::actor_system& sys, std::shared_ptr<const model::checkpoint> weights,
    const expert_group_options& options);

/// The names an expert group needs from a checkpoint (for load_options::filter).
[[nodiscard]] bool expert_group_needs(const expert_group_options& options, std::string_view name);

}  // namespace moe::actors
