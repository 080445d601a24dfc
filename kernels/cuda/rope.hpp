// Rotary position embedding on the GPU from precomputed cos/sin half-tables: the device twin of
// cpu::rope_apply_table (kernels/cpu/rope.hpp), which defines the layout and the numerics. The
// caller builds the tables on the host with cpu::rope_cos_sin_table(first_position = 0, ...)
// (double-precision angles, YaRN factor applied) and uploads them once.
//
// Layout: each rotary vector holds head_dim values as interleaved pairs (x0,x1),(x2,x3),...;
// the kernel de-interleaves and rotates halves in place, so the OUTPUT is in de-interleaved
// order, exactly as the CPU kernel leaves it:
//   out[i]        = x[2i]   * cos[p, i] - x[2i+1] * sin[p, i]
//   out[i + half] = x[2i+1] * cos[p, i] + x[2i]   * sin[p, i]      (half = head_dim / 2)
// The products and the sum are rounded separately (no FMA), as the host computes them, so f32
// results are bit-identical to the CPU's wherever the host code is not FMA-contracted (our
// default flags target x86-64 without FMA).
//
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The largest head_dim accepted (as cpu::rope_max_dim; DeepSeek-V3 uses 64): bounds the
/// registers each lane holds a vector in.
inline constexpr int64_t rope_max_head_dim = 512;

/// Token t, head h's vector starts at x + t * token_stride + h * head_stride (elements of `dt`)
/// and holds head_dim contiguous values, as cpu::rope_apply_args places them:
/// q (T, H, dn + dr) in place: x = q + dn, token_stride = H * (dn + dr), head_stride = dn + dr.
/// k_pe inside kv_a_proj's output (T, R + dr): x = ckv + R, num_heads = 1, token_stride = R + dr.
///
/// positions are device data, which the host cannot check: the caller guarantees
/// 0 <= positions[t] < table_positions. A token whose position is outside that range is left
/// untouched (nothing out of bounds is read), where the CPU kernel would refuse the whole call.
struct rope_args {
  void* x = nullptr;  ///< rotary vectors of `dt`, rotated in place
  int64_t num_tokens = 0;
  int64_t num_heads = 1;
  int64_t token_stride = 0;            ///< elements
  int64_t head_stride = 0;             ///< elements
  int64_t head_dim = 0;                ///< rotary dims per head (qk_rope_head_dim); even, > 0
  const int32_t* positions = nullptr;  ///< (num_tokens) int32, device
  const float* cos = nullptr;          ///< (table_positions, head_dim / 2) float32, device
  const float* sin = nullptr;          ///< (table_positions, head_dim / 2) float32, device
  int64_t table_positions = 0;
  dtype dt = dtype::f32;  ///< f32 or bf16; arithmetic is always float32
};

/// ok, unsupported_dtype, or unsupported_shape for an odd, zero or too large head_dim, negative
/// sizes, overlapping vectors (the same rule as cpu::rope_check_layout), more than INT32_MAX
/// vectors, or a null pointer (null is accepted only when there are no vectors).
[[nodiscard]] kernel_status rope_can_run(const rope_args& a) noexcept;
[[nodiscard]] kernel_status rope_run(const rope_args& a, cudaStream_t stream) noexcept;

/// Two sets of vectors in one launch (a layer's q heads and its k_pe): each rotated exactly as
/// rope_run would, the same bits. b shares a's num_tokens, head_dim, positions, tables and dt;
/// the two sets must not overlap (the caller's guarantee, not checked). What rope_can_run says
/// of either, unsupported_dtype or unsupported_shape where b differs from a in what it shares,
/// unsupported_shape past INT32_MAX vectors in all.
[[nodiscard]] kernel_status rope_pair_can_run(const rope_args& a, const rope_args& b) noexcept;
[[nodiscard]] kernel_status rope_pair_run(const rope_args& a, const rope_args& b,
                                          cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
