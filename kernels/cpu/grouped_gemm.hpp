// The grouped expert product of a MoE layer: every local expert's projection over the rows the
// permute plan (kernels/cpu/permute.hpp) laid out by expert, in one call. The executable
// specification of kernels/cuda/grouped_gemm.hpp.
//
// Expert e owns rows [expert_offsets[e], expert_offsets[e + 1]) of x and y, and for each of them
// y[r, :] = x[r, :] . W[e]^T, with W[e] = weights[e] in nn.Linear's (n, k) layout. Rows past
// expert_offsets[num_experts] (the buffer is sized for the case where no assignment is skipped)
// are left untouched.
//
// Thread safety: a pure function of its arguments; safe to call concurrently on disjoint
// outputs. OpenBLAS may use its own thread pool inside the call (see kernels/cpu/gemm.hpp).
// Ownership: the caller owns every buffer. y must not overlap x or weights.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// x: (num_rows, k); weights: (num_experts, n, k), row-major; y: (num_rows, n);
/// expert_offsets: (num_experts + 1) int32, offsets[0] == 0, non-decreasing,
///   offsets[num_experts] <= num_rows (as permute_plan writes them).
/// Each expert's rows go through cpu::linear (float32 throughout). k == 0 writes zeros.
/// unsupported_shape (nothing written) for num_experts == 0, offsets that break the rule above,
/// a size past OpenBLAS's 32-bit integers, or a null pointer (x and weights may be null when
/// k == 0; x, y and weights when no row is in use or n == 0; expert_offsets never).
[[nodiscard]] kernel_status grouped_gemm(const float* x, const int32_t* expert_offsets,
                                         size_t num_experts, const float* weights, float* y,
                                         size_t num_rows, size_t n, size_t k) noexcept;

}  // namespace moe::kernels::cpu
