// Dense float32 matrix products on the CPU, through OpenBLAS's cblas interface.
// Every matrix is row-major. `linear` is the form the model blocks use with checkpoint weights;
// `gemm` and `gemm_strided_batched` are the general forms the MLA weight absorption needs.
// Thread safety: pure functions of their arguments; safe to call concurrently on disjoint
// outputs. OpenBLAS may use its own thread pool inside one call, sized by the environment
// (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS); these functions never change it.
// Ownership: the caller owns every buffer. C must not overlap A or B.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

enum class transpose : uint8_t { no, yes };

/// C(m, n) = alpha * op(A)(m, k) . op(B)(k, n) + beta * C(m, n), all row-major.
/// A is stored (m, k) with row stride lda >= k, or (k, m) with lda >= m when trans_a;
/// B is stored (k, n) with ldb >= n, or (n, k) with ldb >= k when trans_b; ldc >= n.
/// beta == 0 overwrites C without reading it (NaNs in C do not propagate), as BLAS does.
struct gemm_args {
  transpose trans_a = transpose::no;
  transpose trans_b = transpose::no;
  size_t m = 0;
  size_t n = 0;
  size_t k = 0;
  float alpha = 1.0f;
  const float* a = nullptr;
  size_t lda = 0;
  const float* b = nullptr;
  size_t ldb = 0;
  float beta = 0.0f;
  float* c = nullptr;
  size_t ldc = 0;
};

/// unsupported_shape when a leading dimension is too small, a needed pointer is null or a
/// size does not fit OpenBLAS's 32-bit integers. m == 0 or n == 0 is a no-op.
[[nodiscard]] kernel_status gemm(const gemm_args& args) noexcept;

/// `batch_count` independent products; product i uses a + i*stride_a, b + i*stride_b and
/// c + i*stride_c (strides in elements). A stride of 0 shares that operand across the batch.
/// The C blocks may interleave (per-head columns of one row-major matrix: stride_c = n,
/// ldc = batch_count * n) but must not overlap; that is the caller's invariant, not checked.
[[nodiscard]] kernel_status gemm_strided_batched(const gemm_args& args, size_t batch_count,
                                                 size_t stride_a, size_t stride_b,
                                                 size_t stride_c) noexcept;

/// y(rows, out_features) = x(rows, in_features) . weight(out_features, in_features)^T
///                         + beta * y
/// weight is row-major (out_features, in_features), as checkpoints store nn.Linear weights.
/// beta = 1 accumulates into y (a residual or a second projection); beta = 0 overwrites.
[[nodiscard]] kernel_status linear(const float* x, const float* weight, float* y, size_t rows,
                                   size_t in_features, size_t out_features,
                                   float beta = 0.0f) noexcept;

}  // namespace moe::kernels::cpu
