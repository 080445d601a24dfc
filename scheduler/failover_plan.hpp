// Where the routed experts of failed expert groups go. When a node dies, its expert groups are
// gone; every (layer, expert) they held that still has a replica in a surviving group keeps
// serving from there at once, and every one that does not must be loaded by a survivor (from the
// checkpoint) before the routers can switch to a placement without the lost groups.
//
// The rule is simple and deterministic, so every process computes the same layout: per MoE layer,
// each expert left without a holder goes to the surviving group holding the fewest experts of that
// layer (lowest index on ties), in ascending expert order. It balances slots, not measured load;
// the load is what the routers count afterwards.
//
// Thread safety: pure function on plain values.
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.hpp"

namespace moe::scheduler {

/// [MoE layer entry][expert group] -> the logical experts the group holds there, sorted.
using expert_layout = std::vector<std::vector<std::vector<int64_t>>>;

struct failover_plan {
  expert_layout experts;             ///< the lost groups hold nothing; each list sorted
  int64_t replicas_added = 0;        ///< (layer, expert) replicas survivors must load
  int64_t experts_on_replicas = 0;   ///< (layer, expert) pairs lost groups held that keep serving elsewhere
};

/// `lost[g]`: group g is gone. Errors (scheduler_errc::infeasible): every group lost; a layout
/// whose group count differs from `lost`'s; an expert id outside [0, num_experts).
[[nodiscard]] caf::expected<failover_plan> plan_failover(const expert_layout& current,
                                                         const std::vector<bool>& lost, int64_t num_experts);

}  // namespace moe::scheduler
