// The MoE dispatch layout on the GPU: the device twin of kernels/cpu/permute.hpp, which defines
// the semantics exactly (read it first). Three steps, each its own entry point:
//   permute_plan:  topk_idx -> expert_offsets, positions, inverse (a stable counting sort)
//   permute_rows:  x -> permuted, each token's row copied to the rows of its experts
//   unpermute:     y -> out, the weighted combine, a float32 sum in k order
// The positions are those of the CPU plan bit for bit: each expert's rows are placed by one
// block, its warps counting and then placing the expert's entries of consecutive spans with
// ballots and a prefix over the spans, so nothing depends on atomics or thread order. The
// combine adds the same rounded products in the same order as the host, so f32 results are
// bit-identical too (against a host build without FMA contraction, which our default x86-64 flags
// give).
//
// Device data the host cannot check are the caller's guarantee: positions come from
// permute_plan over the same topk_idx (distinct where >= 0). A position outside [0, num_rows)
// is treated as skipped (nothing read or written out of bounds), where the CPU kernel refuses
// the whole call.
//
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: each launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The most experts a plan sorts by: the offsets are scanned by one block of this many threads.
inline constexpr int64_t permute_max_experts = 1024;

/// An entry j = t * top_k + k is the assignment of token t to expert topk_idx[j]; an id outside
/// [0, num_experts) is skipped (position -1), e.g. an expert not local to this group.
/// Work is O(num_experts * num_tokens * top_k) reads from L2 (each expert's blocks read every
/// id three times: once counting, twice placing): fine for a decode or prefill batch, not meant
/// for millions of entries.
struct permute_plan_args {
  const int32_t* topk_idx = nullptr;  ///< (num_tokens, top_k) int32, device
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t num_experts = 0;
  int32_t* expert_offsets = nullptr;  ///< (num_experts + 1) int32, device; always written
  int32_t* positions = nullptr;       ///< (num_tokens, top_k) int32, device: row of j, or -1
  int32_t* inverse = nullptr;         ///< (num_tokens * top_k) int32, device: j of each row;
                                      ///< -1 past expert_offsets[num_experts]
};

/// ok, or unsupported_shape for num_experts outside [1, 1024], negative sizes,
/// num_tokens * top_k > INT32_MAX, or a null pointer (all but expert_offsets may be null when
/// num_tokens * top_k == 0).
[[nodiscard]] kernel_status permute_plan_can_run(const permute_plan_args& a) noexcept;
/// One launch on `stream` for up to 1024 entries (a decode step), else three (count, scan,
/// place); the same plan either way.
[[nodiscard]] kernel_status permute_plan_run(const permute_plan_args& a,
                                             cudaStream_t stream) noexcept;

/// permuted[positions[j], :] = x[j / top_k, :] for each entry j with a position in
/// [0, num_rows); other rows of permuted are untouched. An exact copy in either dtype.
struct permute_rows_args {
  const void* x = nullptr;             ///< (num_tokens, dim) of `dt`
  const int32_t* positions = nullptr;  ///< (num_tokens, top_k) int32, device, from permute_plan
  void* permuted = nullptr;            ///< (num_rows, dim) of `dt`, not overlapping x
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t dim = 0;
  int64_t num_rows = 0;   ///< rows of permuted; num_tokens * top_k fits any plan
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, num_tokens * top_k >
/// INT32_MAX, element offsets past int64, or a null pointer (null is accepted when there is
/// nothing to copy).
[[nodiscard]] kernel_status permute_rows_can_run(const permute_rows_args& a) noexcept;
[[nodiscard]] kernel_status permute_rows_run(const permute_rows_args& a,
                                             cudaStream_t stream) noexcept;

/// The combine: out[t, :] = sum over k = 0..top_k-1, in that order, with positions[t, k] in
/// [0, num_rows), of weight[t, k] * y[positions[t, k], :]; float32 from 0.0f, every product
/// rounded before it is added (no FMA), rounded to `dt` once at the end. out is overwritten;
/// a token with no row gets zeros.
struct unpermute_args {
  const void* y = nullptr;             ///< (num_rows, dim) of `dt`: the experts' outputs
  const float* weight = nullptr;       ///< (num_tokens, top_k) float32, device; null for 1
  const int32_t* positions = nullptr;  ///< (num_tokens, top_k) int32, device, from permute_plan
  void* out = nullptr;                 ///< (num_tokens, dim) of `dt`, not overlapping y
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t dim = 0;
  int64_t num_rows = 0;   ///< rows of y
  dtype dt = dtype::f32;  ///< f32 or bf16; accumulation is always float32
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, num_tokens > INT32_MAX or
/// num_tokens * top_k > INT32_MAX, element offsets past int64, or a null pointer (null is
/// accepted when out is empty; y and positions may be null when top_k == 0).
[[nodiscard]] kernel_status unpermute_can_run(const unpermute_args& a) noexcept;
[[nodiscard]] kernel_status unpermute_run(const unpermute_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
