// Dense matrix products on the GPU through cuBLASLt: the projections of every block (`linear`,
// as cpu::linear) and the general strided-batched form the MLA weight absorption needs (as
// cpu::gemm_strided_batched). Every matrix is row-major, as on the CPU; the row-major product
// C = op(A) op(B) is run as cuBLASLt's column-major C^T = op(B)^T op(A)^T, which needs no copy.
//
// Element types (a, b, c):
//   bf16, bf16, bf16 or f32   float32 accumulation (CUBLAS_COMPUTE_32F): the GPU default
//   f32,  f32,  f32           float32 throughout, no TF32 (the exactness checks use it)
// FP8 weights are not multiplied here: fp8_dequantize.hpp expands their 128x128 blocks into a
// bf16 workspace first (kept in FP8 in memory, expanded per use).
//
// Ownership: a gemm_lt owns its cuBLASLt handle and the plans (descriptors and the chosen
// algorithm) it has made, one per distinct shape, so a decode step's repeated shapes pay the
// heuristic query once. The caller owns every buffer and the workspace.
// Thread safety: a gemm_lt is used by one thread at a time (its plan cache is unsynchronised);
// launches are asynchronous on the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

enum class transpose : uint8_t { no, yes };

/// C(m, n) = alpha * op(A)(m, k) . op(B)(k, n) + beta * C, row-major, batch_count times with
/// the given strides (elements; 0 shares an operand). A is stored (m, k) with lda >= k, or
/// (k, m) with lda >= m when trans_a; B (k, n) with ldb >= n, or (n, k) with ldb >= k when
/// trans_b; ldc >= n. beta == 0 does not read C. k >= 1 whenever m and n are not 0.
struct gemm_desc {
  transpose trans_a = transpose::no;
  transpose trans_b = transpose::no;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  float alpha = 1.0f;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.0f;
  void* c = nullptr;
  int64_t ldc = 0;
  dtype ab_dt = dtype::bf16;  ///< A and B
  dtype c_dt = dtype::bf16;
  int64_t batch_count = 1;
  int64_t stride_a = 0;
  int64_t stride_b = 0;
  int64_t stride_c = 0;
};

/// y(rows, out_features) = x(rows, in_features) . weight(out_features, in_features)^T + beta * y:
/// nn.Linear's layout, as cpu::linear.
[[nodiscard]] gemm_desc linear_desc(const void* x, const void* weight, void* y, int64_t rows,
                                    int64_t in_features, int64_t out_features, dtype ab_dt,
                                    dtype c_dt, float beta = 0.0f) noexcept;

/// What cuBLASLt may use as scratch on Hopper for its fastest kernels (NVIDIA's guidance: 32 MiB
/// on sm_90). Less works (cuBLASLt then picks among fewer algorithms); 256-byte aligned.
inline constexpr size_t gemm_workspace_bytes = size_t{32} << 20;

/// Host-side checks: dtypes, shapes, leading dimensions, pointers. No GPU needed.
[[nodiscard]] kernel_status gemm_can_run(const gemm_desc& d) noexcept;

struct cublaslt_deleter {
  void operator()(void* handle) const noexcept;
};

class gemm_lt {
 public:
  gemm_lt();
  gemm_lt(gemm_lt&&) noexcept;
  gemm_lt& operator=(gemm_lt&&) noexcept;
  ~gemm_lt();

  /// no_device without a driver or GPU, launch_failed for another cuBLASLt error.
  [[nodiscard]] static kernel_status create(gemm_lt& out) noexcept;

  /// Queues the product on `stream`. unsupported_shape when cuBLASLt has no algorithm for it
  /// (or gemm_can_run refuses it); launch_failed when cuBLASLt fails.
  [[nodiscard]] kernel_status run(const gemm_desc& d, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) noexcept;

  /// Plans made so far (one per distinct shape, dtype and workspace size).
  [[nodiscard]] size_t num_plans() const noexcept;

  struct plan;

 private:
  using plan_key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                              int, int64_t, int64_t, int64_t, int64_t, size_t, bool>;
  std::unique_ptr<void, cublaslt_deleter> handle_;
  std::map<plan_key, std::unique_ptr<plan>> plans_;
};

}  // namespace moe::kernels::cuda
