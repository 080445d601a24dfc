// Rotary position embedding as DeepSeek-V3 uses it: YaRN-scaled frequencies (or plain RoPE),
// applied to rotary dimensions that the checkpoint stores as interleaved pairs.
// The executable specification is rope_tables/apply_rope in shared/fixtures/reference.py.
//
// Layout: a rotary vector x of rope_dim floats holds pairs (x0,x1),(x2,x3),... as the checkpoint
// projects them. rope_apply de-interleaves it to [x0,x2,...,x1,x3,...] and rotates halves, so its
// OUTPUT is in the de-interleaved order. Queries and keys must both go through rope_apply (the dot
// product is then right); the latent KV cache stores k_pe in this rotated, de-interleaved order.
//
// Precision: frequencies, angles and cos/sin are computed in double from the exact position and
// rounded to float once (as reference.py does); the rotation itself is float32. Forming the
// angle in double keeps positions up to max_position_embeddings (163840) exact; transformers
// forms it in float32, which is ~1e-2 rad off there (and agrees to ~1e-6 at short positions).
// Thread safety: pure functions; safe to call concurrently on disjoint outputs. No allocation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// The largest rope_dim the kernels accept (DeepSeek-V3 uses 64); bounds their stack buffers.
inline constexpr size_t rope_max_dim = 512;

/// From config.json: qk_rope_head_dim, rope_theta and rope_scaling (type "yarn").
/// `mscale` and `mscale_all_dim` follow Python truthiness as transformers reads them: 0 means
/// absent, which switches the cos/sin factor to mscale(factor, 1) (see rope_attention_factor).
struct rope_params {
  size_t head_dim = 0;                ///< rotary dims per head (qk_rope_head_dim); even, > 0
  double theta = 10000.0;             ///< rope_theta
  bool has_yarn = false;              ///< rope_scaling present with type/rope_type "yarn"
  double factor = 1.0;                ///< rope_scaling.factor
  double original_max_pos = 4096.0;   ///< rope_scaling.original_max_position_embeddings
  double beta_fast = 32.0;            ///< rope_scaling.beta_fast
  double beta_slow = 1.0;             ///< rope_scaling.beta_slow
  double mscale = 1.0;                ///< rope_scaling.mscale (0 = absent)
  double mscale_all_dim = 0.0;        ///< rope_scaling.mscale_all_dim (0 = absent)
};

/// ok, or unsupported_shape for an odd, zero or too large head_dim, theta <= 1, or (with YaRN)
/// a non-positive factor/original_max_pos/beta. Every other rope function checks this first.
[[nodiscard]] kernel_status rope_check(const rope_params& p) noexcept;

/// YaRN's magnitude correction: 0.1 * m * ln(s) + 1, and 1 when s <= 1.
[[nodiscard]] double yarn_mscale(double scale, double m) noexcept;

/// The factor cos and sin are multiplied by: 1 without YaRN; with YaRN
/// mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else
/// mscale(factor, 1).
[[nodiscard]] double rope_attention_factor(const rope_params& p) noexcept;

/// What the attention block multiplies its softmax scale (qk_head_dim^-0.5) by:
/// mscale(factor, mscale_all_dim)^2 with YaRN and mscale_all_dim set, else 1.
[[nodiscard]] double rope_softmax_scale_multiplier(const rope_params& p) noexcept;

/// inv_freq: (head_dim / 2) in double, YaRN-blended when has_yarn.
[[nodiscard]] kernel_status rope_inv_freq(const rope_params& p, double* inv_freq) noexcept;

/// Precomputed half-tables for positions [first_position, first_position + num_positions):
/// cos, sin: (num_positions, head_dim / 2), already multiplied by rope_attention_factor.
/// (The full-width tables of reference.py repeat each half twice.)
[[nodiscard]] kernel_status rope_cos_sin_table(const rope_params& p, int64_t first_position,
                                               size_t num_positions, float* cos,
                                               float* sin) noexcept;

/// Where the rotary vectors sit: token t, head h starts at
/// x + t * token_stride + h * head_stride (elements); each vector is head_dim contiguous floats.
/// q (T, H, dn + dr) in place: x = q + dn, token_stride = H * (dn + dr), head_stride = dn + dr.
/// k_pe inside kv_a_proj's output (T, R + dr): x = ckv + R, num_heads = 1,
/// token_stride = R + dr.
struct rope_apply_args {
  float* x = nullptr;
  size_t num_tokens = 0;
  size_t num_heads = 1;
  size_t token_stride = 0;
  size_t head_stride = 0;
};

/// ok when `a` places num_tokens x num_heads vectors of head_dim floats without overlap (or is
/// empty), else unsupported_shape: the layout check of rope_apply and rope_backward.
[[nodiscard]] kernel_status rope_check_layout(const rope_apply_args& a, size_t head_dim) noexcept;

/// Rotates x in place by the angles of each token's position, computing cos/sin on demand.
/// positions: (num_tokens), each >= 0. unsupported_shape (x untouched) for a negative position,
/// overlapping vectors (strides smaller than the vectors) or a bad rope_params.
[[nodiscard]] kernel_status rope_apply(const rope_params& p, const rope_apply_args& a,
                                       const int64_t* positions) noexcept;
[[nodiscard]] kernel_status rope_apply(const rope_params& p, const rope_apply_args& a,
                                       const int32_t* positions) noexcept;

/// Same rotation with cos/sin read from rope_cos_sin_table(first_position = 0,
/// table_positions): a position >= table_positions is unsupported_shape (x untouched).
[[nodiscard]] kernel_status rope_apply_table(const rope_params& p, const rope_apply_args& a,
                                             const int64_t* positions, const float* cos,
                                             const float* sin, size_t table_positions) noexcept;
[[nodiscard]] kernel_status rope_apply_table(const rope_params& p, const rope_apply_args& a,
                                             const int32_t* positions, const float* cos,
                                             const float* sin, size_t table_positions) noexcept;

}  // namespace moe::kernels::cpu
