// Synthetic expert loads at DeepSeek-V3 scale, for tests and benchmarks of expert planning:
// Zipf-like token counts over 256 experts in 8 routing groups, to be placed in 288 slots on
// 4 nodes x 8 GPUs, with a different ranking of the experts in every layer.
// Thread safety: a pure function.
#pragma once

#include <cstdint>

#include "scheduler/expert_plan.hpp"

namespace moe::scheduler {

/// Layer l: expert e gets round(100000 / rank^exponent) tokens, where rank (1..256) is a random
/// permutation drawn from std::mt19937(seed), layer after layer.
[[nodiscard]] expert_plan_request zipf_expert_load(int layers, double exponent, uint32_t seed);

}  // namespace moe::scheduler
