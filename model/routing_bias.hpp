// DeepSeek-V3's auxiliary-loss-free load balancing: after each training step, every routed
// expert's e_score_correction_bias moves by a fixed speed toward balance,
//   b_i += speed * sign(mean load - load_i),
// from the step's load per expert (how many tokens chose it among their top-k). The bias steers
// the top-k choice only and carries no gradient. One function for every path that trains (the
// single-process training_model and the routers of a cluster), so they move identically.
#pragma once

#include <cstdint>
#include <span>

namespace moe::model {

/// Updates `bias` (n_routed_experts) of one MoE layer from `load` (same size). A layer without
/// load (no token routed) and speed 0 leave it unchanged.
void update_routing_bias(std::span<float> bias, std::span<const int64_t> load, double speed);

}  // namespace moe::model
