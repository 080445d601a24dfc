// Row gathers and scatters by index: the embedding lookup, and the MoE dispatch (gather the rows
// of the tokens routed to an expert) and combine (scatter-add each expert's rows back, weighted).
// Every index is bounds-checked before anything is written: an out-of-range id is bad input
// from a request, not a bug, so it answers unsupported_shape and leaves the output untouched.
// Thread safety: pure functions; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// out[i, :] = table[ids[i], :] for i < num_ids.
/// table: (num_rows, dim), e.g. embed_tokens (vocab, hidden); out: (num_ids, dim).
/// unsupported_shape when an id is negative or >= num_rows.
[[nodiscard]] kernel_status gather_rows(const float* table, size_t num_rows, size_t dim,
                                        const int64_t* ids, size_t num_ids, float* out) noexcept;
[[nodiscard]] kernel_status gather_rows(const float* table, size_t num_rows, size_t dim,
                                        const int32_t* ids, size_t num_ids, float* out) noexcept;

/// out[ids[i], :] += weights[i] * src[i, :] for i < num_ids, in order of i (so repeated ids
/// accumulate deterministically). weights may be null for 1. src: (num_ids, dim);
/// out: (num_rows, dim). unsupported_shape when an id is negative or >= num_rows.
[[nodiscard]] kernel_status scatter_add_rows(const float* src, size_t dim, const int32_t* ids,
                                             const float* weights, size_t num_ids, float* out,
                                             size_t num_rows) noexcept;

}  // namespace moe::kernels::cpu
