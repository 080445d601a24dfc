// DeepSeek-V3 expert routing ("noaux_tc"): sigmoid scores, the auxiliary-loss-free correction
// bias, group-limited top-k. The executable specification is moe() in
// shared/fixtures/reference.py; transformers' DeepseekV3TopkRouter computes the same in float32.
// Thread safety: pure function; safe to call concurrently on disjoint outputs. No allocation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// The largest number of routed experts accepted (DeepSeek-V3: 256); bounds stack buffers.
inline constexpr size_t moe_gate_max_experts = 1024;

/// From config.json: n_routed_experts, n_group, topk_group, num_experts_per_tok,
/// norm_topk_prob, routed_scaling_factor.
struct moe_gate_params {
  size_t num_experts = 0;
  size_t num_groups = 1;              ///< n_group; divides num_experts, >= 2 experts per group
  size_t topk_group = 1;              ///< groups kept per token, 1..num_groups
  size_t top_k = 0;                   ///< experts per token, 1..topk_group * group size
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

/// Per token t, over logits (num_tokens, E) (the block computes hidden . W_gate^T in float32):
///   score   = sigmoid(logit)
///   biased  = score + bias                                    (bias: e_score_correction_bias)
///   group score = sum of the 2 largest biased scores in each of the n_group groups
///   keep the topk_group groups with the largest group score; biased scores of experts outside
///   them are set to -inf (DeepSeek's code and transformers 5.17; transformers 4.x used 0.0,
///   which differs only if a kept biased score is below 0)
///   topk_idx    = the top_k experts by masked biased score
///   topk_weight = their unbiased scores, / (sum + 1e-20) if norm_topk_prob,
///                 then * routed_scaling_factor
/// Order: each token's k entries are sorted by masked biased score, descending, as
/// torch.topk(sorted=True) lists them; equal scores (and equal group scores) go to the lower
/// index first, so the result is deterministic. NaN scores rank below every number.
/// Arithmetic is float32 in the order transformers uses, so top-k choices match its.
/// topk_idx, topk_weight: (num_tokens, top_k). bias: (E), or null for zeros.
/// unsupported_shape (outputs untouched) for inconsistent params or a null pointer.
[[nodiscard]] kernel_status moe_gate(const moe_gate_params& p, const float* logits,
                                     const float* bias, size_t num_tokens, int32_t* topk_idx,
                                     float* topk_weight) noexcept;

}  // namespace moe::kernels::cpu
