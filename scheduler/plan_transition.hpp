// Moving a serving cluster from the expert layout it serves now to a better balanced one, within a
// budget of replica loads. Every replica a GPU gains must have its weights copied there (time and
// bandwidth while serving), so an online rebalance asks: what is the best plan reachable with at
// most N such loads?
//
// A move is a (layer, GPU, logical expert) that the new layout has and the previous one has not.
// Slot order within a GPU and GPU-local duplicates do not count: the runtime treats a GPU's
// experts as a set, and weights live on a GPU, not in a slot.
//
// Unlimited budget: plan_experts on the loads, then each layer's GPUs are relabelled to keep as
// many of the previous GPUs' experts in place as possible (a min-cost assignment between new and
// old GPUs; where the layer keeps its routing groups node-local, the GPUs of one new node go to
// one old node, so whole nodes are relabelled and GPUs within them). Relabelling permutes the GPU
// loads, so the balance is plan_experts' own; only the moves drop.
//
// Limited budget: a local search from the previous layout. A step either repoints one slot from
// an expert with a replica to spare to another expert (at most one load) or swaps two replicas
// between GPUs (at most two); a step may also cost nothing or give loads back, by moving a replica
// the transition loaded. Only steps that lower their layer's busiest GPU are taken, never one
// that puts two replicas of an expert on one GPU, and in a layer whose routing groups sit on one
// node each, never one that moves an expert off its group's node (so the search cannot even out
// node loads; only the layer's aligned plan can). The steps of all layers form one sequence,
// loading nothing first, then the most gain per load; a budget takes the longest prefix of it
// that fits, plus, when one load is left and the next step needs two, the single-load step of
// most gain. When the whole sequence fits, the rest of the budget switches whole layers to their
// aligned plan_experts layer where that balances better (an exact knapsack on the gain). Where
// the aligned unlimited plan fits the budget it is taken, unless the search balances better.
// So a larger budget never gives a worse mean GPU ratio, and budget 0 returns the previous layout
// unchanged. Cost: each step searches its layer anew (tens of microseconds at 288 slots on 32
// GPUs), so the time grows with the budget; the aligned layers are planned only where needed.
//
// Thread safety: pure functions and plain values; deterministic.
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.hpp"
#include "scheduler/expert_plan.hpp"

namespace moe::scheduler {

struct plan_transition_request {
  expert_plan_request
      plan;  ///< loads, num_slots, num_groups, num_nodes, num_gpus, hierarchical, tolerance
  /// The layout served now: [layer][slot] logical expert, same shape rules as expert_plan::phy2log
  /// (slots GPU-major). Every logical expert must appear at least once per layer.
  std::vector<std::vector<int32_t>> previous;
  /// Most replicas the transition may load, over all layers: a "move" is a (layer, GPU, expert)
  /// that the new plan has and the previous one did not. Negative: no limit.
  int64_t max_moves = -1;
};

struct plan_transition {
  expert_plan plan;                  ///< The chosen plan (phy2log, logcnt, hierarchical per layer).
  int64_t moves = 0;                 ///< Total; <= max_moves when that is >= 0.
  std::vector<int64_t> layer_moves;  ///< Per layer.
};

/// Errors (scheduler_errc::bad_assignment): whatever plan_experts refuses, and a previous layout
/// of another shape than the loads (layers, slots), with an expert id out of range, or missing an
/// expert in a layer.
[[nodiscard]] caf::expected<plan_transition> plan_transition_within_budget(
    const plan_transition_request& r);

/// (layer, GPU, expert) triples that `next` has and `previous` has not, per layer (slots
/// GPU-major). Errors (bad_assignment): layer counts or row lengths that differ, rows that do not
/// divide among `num_gpus`, negative expert ids.
[[nodiscard]] caf::expected<std::vector<int64_t>> count_moves(
    const std::vector<std::vector<int32_t>>& previous,
    const std::vector<std::vector<int32_t>>& next, int64_t num_gpus);

}  // namespace moe::scheduler
