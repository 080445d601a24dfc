// MLA prefill on the GPU: the device twin of cpu::mla_prefill (kernels/cpu/mla_attention.hpp),
// which defines the layouts, the strided views and the causal rule; read that header first.
// Causal attention over sequences packed along the token axis, with decompressed keys and
// values: per head, q = [q_nope (dn) | q_pe (dr)] against k = [k_nope (dn) | k_pe (dr)], where
// k_pe is one rotary key shared by every head; a sequence with Lk >= Lq keys (a cached prefix of
// Lk - Lq) lets its query i see keys [0, Lk - Lq + i] (bottom-right aligned).
//
// Two kernels, both flash-attention's order (keys and values streamed through shared memory,
// online softmax in float32, fully masked key tiles never loaded):
//  - bf16 with dn + dr <= 192 and dv <= 128 (DeepSeek-V2/V3's 128 + 64 and 128): tensor cores.
//    One block per (64-query tile, head), 4 warps of 16 query rows; 64-key tiles of
//    [k_nope | k_pe] and v staged with cp.async (16-byte copies where every view is 16-byte
//    aligned, element copies otherwise), S = Q K^T and O += P V with WMMA (bf16 operands, float32
//    accumulators). Rounding: the probabilities P are rounded to bf16 for P V (relative 2^-8
//    each) while the softmax sum is of the unrounded ones, which moves out by at most
//    2^-8 max|v| (tests/unit/kernels/cuda_mla_test.cpp derives its bound), then out's rounding;
//  - f32, and bf16 rows wider than that: CUDA cores, one block per (16-query tile, head),
//    32-key tiles, inputs widened to float32. Rounding: float32 dot products over dn + dr terms
//    and sums over up to Lk keys, so below 1e-6 of the values' magnitude in practice (the tests
//    allow 5e-6 and derive it); bf16 storage adds the final rounding of out.
// The CPU reference computes in double.
//
// Device data the host cannot check are the caller's guarantee: cu_seqlens_q/k non-decreasing
// from 0, within num_q_tokens/num_k_tokens, with Lk >= Lq per sequence. A sequence that breaks
// this is skipped (its rows of out are left untouched, nothing outside the inputs is read),
// where the CPU kernel refuses the whole call.
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

/// The widest q/k (dn + dr) and value (dv) rows the kernel stages in shared memory
/// (DeepSeek-V2/V3: 128 + 64 and 128).
inline constexpr int64_t mla_prefill_max_qk_dim = 576;
inline constexpr int64_t mla_prefill_max_v_dim = 512;

/// Strides are in elements; 0 means packed, as for the CPU kernel. out is always packed.
struct mla_prefill_args {
  const void* q = nullptr;       ///< (Tq, H, dn + dr) of `dt`: nope part, then rope part
  int64_t q_token_stride = 0;    ///< 0 = H * (dn + dr)
  int64_t q_head_stride = 0;     ///< 0 = dn + dr
  const void* k_nope = nullptr;  ///< (Tk, H, dn) of `dt`
  int64_t k_nope_token_stride = 0;
  int64_t k_nope_head_stride = 0;
  const void* k_pe = nullptr;    ///< (Tk, dr) of `dt`: shared by every head
  int64_t k_pe_token_stride = 0;
  const void* v = nullptr;       ///< (Tk, H, dv) of `dt`
  int64_t v_token_stride = 0;
  int64_t v_head_stride = 0;
  void* out = nullptr;           ///< (Tq, H, dv) of `dt`, packed
  /// (Tq, H) float32, packed; may be null. Each row's natural log-sum-exp of its scaled scores
  /// (of the unrounded probabilities, on either kernel), for mla_prefill_backward (backward.hpp)
  /// to recompute the probabilities from; -inf for a row without keys. Written with out: a
  /// skipped sequence leaves its rows untouched too.
  float* lse = nullptr;
  const int32_t* cu_seqlens_q = nullptr;  ///< (num_seqs + 1) int32, device
  const int32_t* cu_seqlens_k = nullptr;  ///< (num_seqs + 1) int32, device; null = cu_seqlens_q
  int64_t num_seqs = 0;
  int64_t num_q_tokens = 0;  ///< Tq: rows of q and out
  int64_t num_k_tokens = 0;  ///< Tk: rows of k_nope, k_pe, v; ignored without cu_seqlens_k
  /// A bound on every Lq the host knows, to size the grid; 0 = num_q_tokens. A longer sequence
  /// is still computed in full (its blocks loop over the extra query tiles).
  int64_t max_seqlen_q = 0;
  int64_t num_heads = 0;
  int64_t nope_dim = 0;  ///< dn
  int64_t rope_dim = 0;  ///< dr
  int64_t v_dim = 0;     ///< dv
  float softmax_scale = 0.0f;
  dtype dt = dtype::f32;  ///< f32 or bf16, for every input and out
};

/// ok, unsupported_dtype, or unsupported_shape for num_heads outside [1, 65535], v_dim outside
/// [1, 512], dn + dr above 576, negative sizes or strides, token counts or strides above
/// INT32_MAX, more than INT32_MAX blocks in the grid, a non-finite scale, or a null pointer
/// (null is accepted when num_seqs or num_q_tokens is 0; k_nope when dn == 0, k_pe when dr == 0).
[[nodiscard]] kernel_status mla_prefill_can_run(const mla_prefill_args& a) noexcept;
[[nodiscard]] kernel_status mla_prefill_run(const mla_prefill_args& a,
                                            cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
