// One decoder layer's attention-half weights and dimensions, bound once for both blocks that
// compute with them (attention_block for inference, attention_training_block for training), so
// that the two cannot bind different tensors or disagree on a shape; and the few helpers both
// blocks' kernel calls share. Internal to model/.
// Ownership: borrows the weights (weight_lookup.hpp). A plain value; pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/kernel_status.hpp"
#include "model/config.hpp"
#include "model/scratch.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model::detail {

struct attention_weights {
  /// Looks up layer `layer`'s attention-half weights (model_errc::missing_tensor / bad_tensor
  /// naming the tensor) and the RoPE parameters (model_errc::bad_config).
  [[nodiscard]] static caf::expected<attention_weights> bind(const model_config& c, int64_t layer,
                                                             const weight_lookup& weights);

  int64_t layer = 0;
  int64_t hidden = 0, num_heads = 0, nope = 0, rope = 0, v_dim = 0, latent_dim = 0;
  int64_t q_rank = 0;  // 0: plain q_proj
  float eps = 1e-6f;
  float softmax_scale = 0.0f;
  kernels::cpu::rope_params rope_params;

  const float* input_norm = nullptr;  // (hidden)
  const float* q_a_proj = nullptr;    // (q_rank, hidden)
  const float* q_a_norm = nullptr;    // (q_rank)
  const float* q_b_proj = nullptr;    // (H * (dn + dr), q_rank), or q_proj (.., hidden)
  const float* kv_a_proj = nullptr;   // (R + dr, hidden)
  const float* kv_a_norm = nullptr;   // (R)
  const float* kv_b_proj = nullptr;   // (H * (dn + dv), R)
  const float* o_proj = nullptr;      // (hidden, H * dv)
  const float* post_norm = nullptr;   // (hidden)

  /// model_errc::kernel_failed naming this layer and the step `what` when a kernel refused its
  /// arguments; none on ok.
  [[nodiscard]] caf::error check(kernels::kernel_status s, const char* what) const;

  /// Where project() writes, each sized for its token count. q_a_raw and q_a may be one buffer
  /// (the norm then runs in place); both are unused without q compression (q_rank 0).
  struct projections {
    float* normed = nullptr;   // (T, hidden)  input_norm(x)
    float* q_a_raw = nullptr;  // (T, q_rank)  q_a_proj's output
    float* q_a = nullptr;      // (T, q_rank)  after q_a_layernorm
    float* q = nullptr;        // (T, H, dn + dr), its rope part rotated
    float* ckv = nullptr;      // (T, R + dr)  kv_a_proj's output, k_pe rotated
    float* latent = nullptr;   // (T, R)       kv_a_layernorm of ckv's latent
  };

  /// What every attention path starts with, for x (T, hidden) at `positions` (T; int32_t or
  /// int64_t): the input norm, q through q_a_proj, its norm and q_b_proj (or q_proj), kv_a_proj,
  /// the latent's norm, and RoPE on q's and k_pe's rotary parts.
  template <class Position>
  [[nodiscard]] caf::error project(const float* x, size_t T, const Position* positions,
                                   const projections& out) const;
};

/// Where q's rotary parts sit in q (T, H, dn + dr), for rope_apply and rope_backward alike.
kernels::cpu::rope_apply_args q_rope_args(float* q, size_t T, size_t H, size_t dn, size_t dr);

/// Where k_pe sits in kv_a_proj's output ckv (T, R + dr), after the latent.
kernels::cpu::rope_apply_args k_rope_args(float* ckv, size_t T, size_t R, size_t dr);

}  // namespace moe::model::detail
