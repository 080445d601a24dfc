// The router actor of one attention shard (co-located with it): gating for every MoE layer,
// choice of a replica per routed row, dispatch to expert groups, and the combine.
// Ownership: owns its gate weights (through the checkpoint it keeps) and its placement table.
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

/// One expert group as the router sees it.
struct expert_group_route {
  expert_group_actor handle;
  std::vector<int64_t> experts;  ///< logical experts it holds (every MoE layer)
  bool holds_shared_experts = false;
};

struct router_options {
  int shard = 0;
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  uint32_t placement_version = 1;
  std::vector<expert_group_route> groups;
  /// How rows reach expert groups in other processes (empty: all groups are in this one).
  tensor_transport transport;
  /// Expert load is counted over this many recent steps (scheduler/load_window.hpp): tokens per
  /// logical expert and rows per physical slot (the groups' experts in placement order).
  int64_t load_window_steps = 1024;
};

/// Errors: a gate weight is missing, a logical expert has no holder, or shared experts exist
/// but no group holds them.
[[nodiscard]] caf::expected<router_actor> spawn_router(caf::actor_system& sys,
                                                       std::shared_ptr<const model::checkpoint> weights,
                                                       router_options options);

/// The names a router needs from a checkpoint (for load_options::filter).
[[nodiscard]] bool router_needs(std::string_view name);

}  // namespace moe::actors
