// The MoE dispatch layout: the top-k assignments of a batch sorted by expert, so each expert's
// rows are contiguous for a grouped GEMM, and the way back (weighted combine). The executable
// specification of the CUDA kernels in kernels/cuda/permute.hpp, which must give the same
// positions and the same float32 sums.
//
// An assignment (t, k) is entry j = t * top_k + k of topk_idx (num_tokens, top_k). The plan is
// a stable counting sort: rows are ordered by expert, then by j ascending, so the layout is a
// pure function of topk_idx (no dependence on thread order, on any device).
// An id outside [0, num_experts) is skipped (position -1): the expert is not local to this
// group (the caller maps global ids to local ones and leaves the rest outside the range).
//
// Thread safety: pure functions; safe to call concurrently on disjoint outputs. No allocation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// topk_idx: (num_tokens, top_k) int32 expert ids.
/// expert_offsets: (num_experts + 1): expert e's rows are [offsets[e], offsets[e + 1]);
///   offsets[0] = 0 and offsets[num_experts] is the number of rows in use.
/// positions: (num_tokens, top_k): the row of entry j, or -1 for a skipped id.
/// inverse: (num_tokens * top_k): the entry j of each row in use; -1 for the rows past
///   offsets[num_experts] (the buffer is sized for the case where no id is skipped).
/// unsupported_shape for num_experts == 0 or > INT32_MAX, num_tokens * top_k > INT32_MAX (rows
/// are int32), or a null pointer (topk_idx, positions, inverse may be null when
/// num_tokens * top_k == 0; expert_offsets is always written).
[[nodiscard]] kernel_status permute_plan(const int32_t* topk_idx, size_t num_tokens, size_t top_k,
                                         size_t num_experts, int32_t* expert_offsets,
                                         int32_t* positions, int32_t* inverse) noexcept;

/// permuted[positions[j], :] = x[j / top_k, :] for every entry j whose position is >= 0: each
/// token's row copied to each of its experts' rows. Rows nothing maps to are left untouched.
/// x: (num_tokens, dim); positions: (num_tokens, top_k), distinct where >= 0 (as permute_plan
/// makes them); permuted: (num_rows, dim), not overlapping x.
/// unsupported_shape (nothing written) for a position < -1 or >= num_rows, a null pointer or
/// sizes past INT32_MAX entries.
[[nodiscard]] kernel_status permute_rows(const float* x, size_t num_tokens, size_t top_k,
                                         size_t dim, const int32_t* positions, float* permuted,
                                         size_t num_rows) noexcept;

/// The combine: out[t, :] = sum over k = 0, 1, ..., top_k - 1 (in that order) with
/// positions[t, k] >= 0 of weight[t, k] * y[positions[t, k], :], accumulated in float32 from
/// 0.0f, each product rounded before it is added (what the CUDA kernel reproduces). out is
/// overwritten; a token with no row gets zeros. weight: (num_tokens, top_k) float32 or null for
/// 1. y: (num_rows, dim); out: (num_tokens, dim), not overlapping y.
/// unsupported_shape (nothing written) for a position < -1 or >= num_rows, a null pointer or
/// sizes past INT32_MAX entries.
[[nodiscard]] kernel_status unpermute(const float* y, size_t num_rows, const float* weight,
                                      const int32_t* positions, size_t num_tokens, size_t top_k,
                                      size_t dim, float* out) noexcept;

}  // namespace moe::kernels::cpu
