// Training forward and backward of one decoder layer's attention half: input RMSNorm, multi-head
// latent attention (MLA) with decompressed keys and values, o_proj, the residual add and the
// post-attention RMSNorm. The same math as attention_block::prefill (same kernels, same order,
// YaRN softmax scale, de-interleaved rope on q's rope part and on the shared k_pe), without a
// KV cache, keeping what backward needs.
//
// Attention is causal within each packed sequence, positions 0.. within each: the attention core
// is kernels/cpu/mla_attention's mla_prefill and mla_prefill_backward (dot products, softmax and
// sums in double, rounded to float once). Forward keeps q, k, v, the attention output and one
// log-sum-exp per (token, head), not the probabilities: backward recomputes them
// (FlashAttention's trade), so memory is O(T), not O(T^2) per head.
//
// Ownership: borrows its weights (see weight_lookup.hpp), which must outlive it; owns the saved
// activations, which are valid from a forward until the next one.
// Thread safety: confined to one thread; forward and backward reuse the block's buffers.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/rope.hpp"
#include "model/attention_weights.hpp"
#include "model/config.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

/// Gradients of one layer's attention-half weights, each shaped (row-major, flattened) as its
/// weight. Names follow the hub's, after "model.layers.{i}.".
struct attention_grads {
  std::vector<float> input_layernorm;           ///< input_layernorm.weight (hidden)
  std::vector<float> q_a_proj;                  ///< self_attn.q_a_proj.weight (q_rank, hidden); empty without q compression
  std::vector<float> q_a_layernorm;             ///< self_attn.q_a_layernorm.weight (q_rank); empty without
  std::vector<float> q_b_proj;                  ///< self_attn.q_b_proj.weight (H * (dn + dr), q_rank),
                                                ///< or self_attn.q_proj.weight (H * (dn + dr), hidden)
  std::vector<float> kv_a_proj_with_mqa;        ///< self_attn.kv_a_proj_with_mqa.weight (R + dr, hidden)
  std::vector<float> kv_a_layernorm;            ///< self_attn.kv_a_layernorm.weight (R)
  std::vector<float> kv_b_proj;                 ///< self_attn.kv_b_proj.weight (H * (dn + dv), R)
  std::vector<float> o_proj;                    ///< self_attn.o_proj.weight (hidden, H * dv)
  std::vector<float> post_attention_layernorm;  ///< post_attention_layernorm.weight (hidden)

  /// Zero-filled gradients of the right sizes for `c`.
  [[nodiscard]] static attention_grads for_config(const model_config& c);

  void zero();

  /// Calls f(suffix, tensor) for every non-empty gradient, suffix being the hub name after
  /// "model.layers.{i}." ("self_attn.q_b_proj.weight", or "self_attn.q_proj.weight" without q
  /// compression): the order and names an optimizer or an all-reduce walks.
  template <class F>
  void for_each(F&& f) {
    f(std::string_view{"input_layernorm.weight"}, input_layernorm);
    if (!q_a_proj.empty()) {
      f(std::string_view{"self_attn.q_a_proj.weight"}, q_a_proj);
      f(std::string_view{"self_attn.q_a_layernorm.weight"}, q_a_layernorm);
      f(std::string_view{"self_attn.q_b_proj.weight"}, q_b_proj);
    } else {
      f(std::string_view{"self_attn.q_proj.weight"}, q_b_proj);
    }
    f(std::string_view{"self_attn.kv_a_proj_with_mqa.weight"}, kv_a_proj_with_mqa);
    f(std::string_view{"self_attn.kv_a_layernorm.weight"}, kv_a_layernorm);
    f(std::string_view{"self_attn.kv_b_proj.weight"}, kv_b_proj);
    f(std::string_view{"self_attn.o_proj.weight"}, o_proj);
    f(std::string_view{"post_attention_layernorm.weight"}, post_attention_layernorm);
  }
};

class attention_training_block {
 public:
  /// Looks up layer `layer`'s attention-half weights (model_errc::missing_tensor / bad_tensor
  /// naming the tensor) and the RoPE parameters (model_errc::bad_config).
  [[nodiscard]] static caf::expected<attention_training_block> bind(const model_config& c,
                                                                    int64_t layer,
                                                                    const weight_lookup& weights);

  /// x: (T, hidden), the residual stream, updated in place: x += attention(input_norm(x)).
  /// mlp_in: (T, hidden) <- post_attention_norm(x). Causal attention within each packed
  /// sequence: sequence s holds tokens [cu_seqlens[s], cu_seqlens[s+1]) at positions 0, 1, ...
  /// model_errc::bad_input (nothing written, earlier saved state dropped) when cu_seqlens does
  /// not start at 0, decreases or does not end at num_tokens.
  [[nodiscard]] caf::error forward(float* x, float* mlp_in, size_t num_tokens,
                                   std::span<const int32_t> cu_seqlens);

  /// dx_out: (T, hidden) dL/d(x after forward), excluding the path through mlp_in;
  /// dmlp_in: (T, hidden) dL/d(mlp_in). dx_in: (T, hidden) <- dL/d(x before forward); may alias
  /// dx_out. Accumulates (+=) the weight gradients into `grads`, T being the last forward's.
  /// model_errc::bad_input without a successful forward since bind, or when `grads` is not
  /// sized for this block (see attention_grads::for_config).
  [[nodiscard]] caf::error backward(const float* dx_out, const float* dmlp_in, float* dx_in,
                                    attention_grads& grads);

  [[nodiscard]] int64_t layer() const noexcept { return w_.layer; }

 private:
  caf::error check_grads(const attention_grads& g) const;
  template <class Args>
  Args attention_args();
  caf::error attend(size_t T);
  caf::error attend_backward(size_t T);

  detail::attention_weights w_;

  // Saved by forward for backward; saved_tokens_ is set only after a forward succeeded.
  std::optional<size_t> saved_tokens_;
  std::vector<int32_t> cu_seqlens_;   // (num_seqs + 1)
  std::vector<int32_t> positions_;    // (T)
  std::vector<float> x_in_;           // (T, hidden)  input of the input norm
  std::vector<float> normed_;         // (T, hidden)
  std::vector<float> q_a_raw_;        // (T, q_rank)  before q_a_layernorm
  std::vector<float> q_a_;            // (T, q_rank)  after it
  std::vector<float> q_;              // (T, H, dn + dr), rope part rotated
  std::vector<float> ckv_;            // (T, R + dr): raw latent | rotated k_pe
  std::vector<float> latent_;         // (T, R) normed
  std::vector<float> kv_;             // (T, H, dn + dv): k_nope | v
  std::vector<double> lse_;           // (T, H) log-sum-exp of the scaled scores
  std::vector<float> attn_;           // (T, H * dv)
  std::vector<float> x_mid_;          // (T, hidden) after the residual add

  // Backward scratch.
  std::vector<float> dx_mid_, dattn_, dq_, dkv_, dckv_, dlatent_, dnormed_, dq_a_, dq_a_raw_;
};

}  // namespace moe::model
