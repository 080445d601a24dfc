#include "kernels/cpu/moe_gate.hpp"

#include <algorithm>
#include <limits>
#include <cmath>

#include "kernels/cpu/ranking.hpp"

namespace moe::kernels::cpu {
namespace {

kernel_status check(const moe_gate_params& p) noexcept {
  if (p.num_experts == 0 || p.num_experts > moe_gate_max_experts || p.num_groups == 0 ||
      p.num_experts % p.num_groups != 0)
    return kernel_status::unsupported_shape;
  const size_t group_size = p.num_experts / p.num_groups;
  if (group_size < 2) return kernel_status::unsupported_shape;  // the group score needs 2
  if (p.topk_group == 0 || p.topk_group > p.num_groups) return kernel_status::unsupported_shape;
  if (p.top_k == 0 || p.top_k > p.topk_group * group_size) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

}  // namespace

kernel_status moe_gate(const moe_gate_params& p, const float* logits, const float* bias,
                       size_t num_tokens, int32_t* topk_idx, float* topk_weight) noexcept {
  if (auto s = check(p); s != kernel_status::ok) return s;
  if (num_tokens == 0) return kernel_status::ok;
  if (logits == nullptr || topk_idx == nullptr || topk_weight == nullptr)
    return kernel_status::unsupported_shape;

  const size_t num_experts = p.num_experts, group_size = num_experts / p.num_groups;
  float scores[moe_gate_max_experts];
  float biased[moe_gate_max_experts];
  float group_scores[moe_gate_max_experts / 2];
  int32_t order[moe_gate_max_experts];
  bool group_kept[moe_gate_max_experts / 2];

  for (size_t t = 0; t < num_tokens; ++t) {
    const float* row = logits + t * num_experts;
    for (size_t e = 0; e < num_experts; ++e) {
      scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
      biased[e] = scores[e] + (bias != nullptr ? bias[e] : 0.0f);
    }

    for (size_t g = 0; g < p.num_groups; ++g) {
      const auto first = static_cast<int32_t>(g * group_size);
      for (size_t i = 0; i < group_size; ++i) order[i] = first + static_cast<int32_t>(i);
      std::partial_sort(order, order + 2, order + group_size, ranks_before{biased});
      group_scores[g] = biased[order[0]] + biased[order[1]];
    }
    for (size_t g = 0; g < p.num_groups; ++g) order[g] = static_cast<int32_t>(g);
    std::partial_sort(order, order + p.topk_group, order + p.num_groups,
                      ranks_before{group_scores});
    std::fill(group_kept, group_kept + p.num_groups, false);
    for (size_t i = 0; i < p.topk_group; ++i) group_kept[order[i]] = true;
    for (size_t e = 0; e < num_experts; ++e)
      if (!group_kept[e / group_size]) biased[e] = -std::numeric_limits<float>::infinity();

    for (size_t e = 0; e < num_experts; ++e) order[e] = static_cast<int32_t>(e);
    std::partial_sort(order, order + p.top_k, order + num_experts, ranks_before{biased});

    int32_t* idx_out = topk_idx + t * p.top_k;
    float* weight_out = topk_weight + t * p.top_k;
    float sum = 0.0f;
    for (size_t i = 0; i < p.top_k; ++i) {
      idx_out[i] = order[i];
      weight_out[i] = scores[order[i]];
      sum += weight_out[i];
    }
    const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
    for (size_t i = 0; i < p.top_k; ++i)
      weight_out[i] = weight_out[i] / denom * p.routed_scaling_factor;
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
