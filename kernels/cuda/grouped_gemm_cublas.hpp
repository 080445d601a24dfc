// The routed experts' grouped product (grouped_gemm.hpp's: expert e's rows of y = its rows of x
// times W_e^T) through cuBLAS's grouped GEMM, cublasGemmGroupedBatchedEx (cuBLAS 12.5+), for a
// caller that has the experts' row offsets on the host: a prefill, after one copy of the offsets
// and a wait (which a decode step, replayed from a CUDA graph, cannot afford). Each expert with
// rows is one problem; cuBLAS runs them all from one call. grouped_gemm_run's own kernel reached
// 170 TFLOP/s at prefill sizes on an H200 (2026-11-30), a fifth of the dense cuBLASLt product;
// this is the vendor's alternative, chosen per engine (gpu_engine_options::cublas_grouped_experts)
// until a card says which is faster.
//
// Row-major as everywhere here: y_e (rows_e, n) = x_e (rows_e, k) . W_e (n, k)^T is cuBLAS's
// column-major y_e^T (n, rows_e) = op(W_e) x_e^T with W_e read transposed, no copy.
// Element types: bf16 x, weights and y (float32 accumulation, CUBLAS_COMPUTE_32F), or f32
// throughout (no TF32: the handle keeps cuBLAS's default math mode). FP8 weights are not taken:
// grouped_gemm_run expands them itself.
//
// Ownership: a cublas_grouped_gemm owns its cuBLAS handle; the caller owns every buffer. The
// problems' sizes are host arrays cuBLAS reads during the call; the operands' addresses are a
// device array, which run() fills from the caller's pinned host scratch by an asynchronous copy
// on the stream: that scratch must stay untouched until the stream has passed the call (give
// each call in flight its own). Thread safety: one thread at a time per object.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

struct cublas_grouped_args {
  const void* x = nullptr;        ///< (num_rows, k) of dt, rows grouped by expert
  const void* weights = nullptr;  ///< (num_experts, n, k) of dt
  void* y = nullptr;              ///< (num_rows, n) of dt; rows no expert owns are not written
  const int32_t* offsets =
      nullptr;  ///< HOST (num_experts + 1): expert e owns rows [offsets[e], offsets[e + 1])
  int64_t num_rows = 0;
  int64_t num_experts = 0;
  int64_t n = 0;
  int64_t k = 0;
  dtype dt = dtype::bf16;  ///< bf16 or f32
  /// Scratch for the operands' addresses, 3 * num_experts pointers each: pinned host memory
  /// (written by run, then copied) and device memory (cuBLAS reads it).
  const void** host_pointers = nullptr;
  void** device_pointers = nullptr;
};

/// Host-side checks: ok; unsupported_dtype; unsupported_shape for negative sizes, n, k or a
/// leading dimension past INT32_MAX, offsets not starting at 0, decreasing or past num_rows, or
/// a null pointer (offsets and the scratch always; x, weights and y where any expert has rows).
[[nodiscard]] kernel_status cublas_grouped_can_run(const cublas_grouped_args& a) noexcept;

struct cublas_deleter {
  void operator()(void* handle) const noexcept;
};

class cublas_grouped_gemm {
 public:
  cublas_grouped_gemm();
  cublas_grouped_gemm(cublas_grouped_gemm&&) noexcept;
  cublas_grouped_gemm& operator=(cublas_grouped_gemm&&) noexcept;
  ~cublas_grouped_gemm();

  /// no_device without a driver or GPU, launch_failed for another cuBLAS error.
  [[nodiscard]] static kernel_status create(cublas_grouped_gemm& out) noexcept;

  /// Queues the address copy and the grouped product on `stream` (nothing when no expert has
  /// rows). unsupported_shape where cublas_grouped_can_run refuses or cuBLAS answers
  /// NOT_SUPPORTED or INVALID_VALUE for the problems (the caller then runs grouped_gemm_run);
  /// launch_failed for another error.
  [[nodiscard]] kernel_status run(const cublas_grouped_args& a, cudaStream_t stream) noexcept;

 private:
  std::unique_ptr<void, cublas_deleter> handle_;
  // The per-problem host arrays cuBLAS reads during the call, kept to reuse their memory.
  struct problems;
  std::unique_ptr<problems> problems_;
};

}  // namespace moe::kernels::cuda
