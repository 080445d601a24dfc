// Expert replication and placement from measured loads (what DeepSeek's EPLB does, done here):
// how many replicas each logical expert gets and which physical slot on which GPU holds each.
// A pure, deterministic function of its inputs: every node computes the same plan.
//
// Slots are GPU-major (slot j is on GPU j / (num_slots / num_gpus); GPU g on node
// g / (num_gpus / num_nodes)), the layout of EPLB's phy2log. The load model: an expert with load
// w and c replicas puts w / c on each (routers spread an expert's rows evenly over its replicas).
//
// Hierarchical when the routing groups divide evenly among the nodes (num_groups % num_nodes ==
// 0 and num_experts % num_groups == 0): every replica of a routing group's experts stays on one
// node, so group-limited routing (top-k groups per token) stays node-limited. Groups go to nodes
// to balance node load (greedy, then pairwise swaps judged by the resulting GPU loads); within a
// node, the node's spare slots go to its experts by water-filling (each to the expert whose
// replicas carry the most), which minimises the heaviest replica; the replicas are then packed
// onto the node's GPUs heaviest first, each onto the least loaded GPU with a free slot that does
// not hold that expert yet, and improved by swaps between the most loaded GPU and the others.
// Global otherwise: the same water-filling and packing over all slots and GPUs at once. Where
// both apply, each layer keeps the node-local plan unless it costs more GPU balance than
// `hierarchy_tolerance` allows (see there).
//
// Thread safety: pure functions and plain values.
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.hpp"

namespace moe::scheduler {

struct expert_plan_request {
  /// Per MoE layer, per logical expert: tokens routed in the measurement window.
  std::vector<std::vector<double>> load;
  int64_t num_slots = 0;   ///< Physical expert slots (>= experts), a multiple of num_gpus.
  int64_t num_groups = 1;  ///< The model's routing groups (n_group).
  int64_t num_nodes = 1;
  int64_t num_gpus = 1;    ///< Expert-holding devices (expert groups), a multiple of num_nodes.
  /// false: ignore the routing groups even where they divide among the nodes.
  bool hierarchical = true;
  /// How much GPU balance the group-per-node rule may cost: per layer, the hierarchical plan is
  /// kept when its busiest GPU is at most (1 + tolerance) times the global plan's, else the
  /// global plan is used for that layer. Keeping groups node-local is not free: on EPLB's
  /// README example the best node-local placement (found by exhaustive search) has a mean GPU
  /// ratio of 1.206, while a global one reaches 1.133. Infinity: always node-local.
  double hierarchy_tolerance = 0.02;
};

struct expert_plan {
  std::vector<std::vector<int32_t>> phy2log;  ///< [layer][slot] logical expert.
  std::vector<std::vector<int32_t>> logcnt;   ///< [layer][expert] replicas.
  std::vector<bool> hierarchical;             ///< [layer] whether its groups stay on one node.
};

/// Errors (scheduler_errc::bad_assignment): empty or ragged loads, negative or non-finite loads,
/// fewer slots than experts, slots not a multiple of GPUs, GPUs not a multiple of nodes.
[[nodiscard]] caf::expected<expert_plan> plan_experts(const expert_plan_request& request);

/// How balanced a plan is under the load model above (the figures DeepSeek's score.py prints).
struct expert_plan_score {
  double gpu_ratio_mean = 0;   ///< Mean over layers of max GPU load / mean GPU load.
  double gpu_ratio_max = 0;
  double node_ratio_mean = 0;  ///< The same per node.
  /// Mean over layers of the lower bound on gpu_ratio for any plan with these slots: the
  /// heaviest replica after optimal water-filling over all slots, against the mean GPU load.
  double lower_bound_mean = 0;
  std::vector<double> gpu_ratio;  ///< Per layer.
};

[[nodiscard]] expert_plan_score score_expert_plan(const expert_plan_request& request, const expert_plan& plan);

}  // namespace moe::scheduler
