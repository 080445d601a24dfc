// Dense matrix products on the GPU through cuBLASLt: the projections of every block (`linear`,
// as cpu::linear) and the general strided-batched form the MLA weight absorption needs (as
// cpu::gemm_strided_batched). Every matrix is row-major, as on the CPU; the row-major product
// C = op(A) op(B) is run as cuBLASLt's column-major C^T = op(B)^T op(A)^T, which needs no copy.
//
// Element types (a, b, c):
//   bf16, bf16, bf16 or f32   float32 accumulation (CUBLAS_COMPUTE_32F): the GPU default
//   f32,  f32,  f32           float32 throughout, no TF32 (the exactness checks use it)
// FP8, DeepSeek-V3 style (fp8_linear_desc): e4m3 activations with one float32 scale per row and
// 128 columns (fp8_quantize.hpp makes them) times e4m3 weights with one per 128x128 block, bf16
// out, float32 accumulation, through cuBLASLt's block-scaled modes (VEC128_32F for the
// activation, BLK128x128_32F for the weight; CUDA 12.9+, Hopper sm_90 only). Where cuBLASLt has no
// algorithm (another card, a shape it refuses) the call answers a refusal and the caller takes the
// fallback of ours that always runs (fp8_linear_fallback_desc): expand the weight to bf16 in a
// scratch (fp8_dequantize.hpp) and multiply the bf16 activation by it. That costs a write and a
// read of 2 bytes per weight element on top of the FP8 byte (about 5x the weight traffic, which
// is what decode is bound by) and runs at the bf16 tensor-core rate (half of FP8's), plus the
// n * k * 2 bytes of scratch.
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

/// y(m, n) bf16 = (e4m3(x_q) * x_scale)(m, k) . ((e4m3(w_q) * w_scale)(n, k))^T, float32
/// accumulation, nn.Linear's layout as linear_desc; every buffer on the device:
///   x_q:     (m, k) e4m3 bytes, packed
///   x_scale: (k / 128, m) float32, group-major: x_scale[g * m + r] scales x_q[r, 128g .. 128g+127]
///            (fp8_quantize with fp8_scale_layout::group_major and scale_ld = m; cuBLASLt reads
///            the token index contiguous)
///   w_q:     (n, k) e4m3 bytes, packed (the checkpoint's layout)
///   w_scale: (ceil(n / 128), fp8_weight_scale_ld(k)) float32, row-major: the checkpoint's
///            (ceil(n / 128), ceil(k / 128)) block scales with each row padded to a multiple of 4
///            floats (16 bytes), which is how cuBLASLt reads them (the pad is never read)
///   y:       (m, n) bf16, packed; overwritten (no beta)
/// m must be a multiple of 32: a caller with fewer rows pads to fp8_linear_rows(rows), sizing x_q,
/// x_scale (group stride m) and y for that many, and reads back its own rows (each output row
/// depends on its input row only, so whatever the padding rows hold, NaN included, stays there).
/// cuBLASLt refuses some row counts (seen on an H200 with CUDA 13.0: 1 row refused, 32 and 2048
/// taken); 32 is a multiple of every FP8 alignment it documents. k must be a multiple of 128 (the
/// activation groups and weight blocks must tile it for the two scale grids to line up) and n too
/// (a partial weight block row is refused rather than trusted: unchecked on a card); every
/// pointer 16-byte aligned. Other shapes are refused; the fallback takes them.
struct fp8_linear_desc {
  const uint8_t* x_q = nullptr;
  const float* x_scale = nullptr;
  const uint8_t* w_q = nullptr;
  const float* w_scale = nullptr;
  void* y = nullptr;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
};

/// The fallback: y(m, n) bf16 = x(m, k) bf16 . ((e4m3(w_q) * w_scale)(n, k))^T + beta * y. The
/// weight is expanded into w_scratch ((n, k) bf16, caller-owned, overwritten) and multiplied by
/// the bf16 activation itself, not its FP8 quantization (the activation rounding of the FP8 path
/// is absent, so the two differ by it). w_q and w_scale as in fp8_linear_desc by default; any
/// k >= 1 (partial last blocks included) and any n. Other block grids: w_scale's rows
/// scale_ld floats apart (0: fp8_weight_scale_ld(k)), one scale per block_rows x block_cols.
struct fp8_linear_fallback_desc {
  const void* x = nullptr;
  const uint8_t* w_q = nullptr;
  const float* w_scale = nullptr;
  void* w_scratch = nullptr;
  void* y = nullptr;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t block_rows = 128;
  int64_t block_cols = 128;
  int64_t scale_ld = 0;
  float beta = 0.0f;
};

/// Rows the block-scaled product runs on for `rows` tokens: rows rounded up to 32.
[[nodiscard]] constexpr int64_t fp8_linear_rows(int64_t rows) noexcept {
  return (rows + 31) / 32 * 32;
}

/// Floats between rows of an FP8 weight's block scales: ceil(k / 128) rounded up to 4.
[[nodiscard]] constexpr int64_t fp8_weight_scale_ld(int64_t k) noexcept {
  return ((k + 127) / 128 + 3) / 4 * 4;
}

/// Host-side checks of the block-scaled product: ok, or unsupported_shape for negative sizes,
/// k == 0, m % 32, k % 128 or n % 128 not 0, a null or not 16-byte aligned pointer (where
/// m * n > 0).
[[nodiscard]] kernel_status fp8_linear_can_run(const fp8_linear_desc& d) noexcept;
/// Host-side checks of the fallback: ok, or unsupported_shape for negative sizes, k == 0, blocks
/// below 1, a scale_ld below ceil(k / block_cols) or a null pointer (where m * n > 0).
[[nodiscard]] kernel_status fp8_linear_fallback_can_run(const fp8_linear_fallback_desc& d) noexcept;

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

  /// Queues the block-scaled FP8 product. unsupported_arch where the device is not compute
  /// capability 9.0 and cuBLASLt has no algorithm (the modes are Hopper's), unsupported_shape
  /// where fp8_linear_can_run refuses or cuBLASLt has no algorithm on sm_90; the caller then runs
  /// the fallback. launch_failed when cuBLASLt fails. The answer for a shape is remembered.
  [[nodiscard]] kernel_status run_fp8_linear(const fp8_linear_desc& d, void* workspace, size_t workspace_bytes,
                                             cudaStream_t stream) noexcept;

  /// Queues the fallback: the weight's expansion, then the bf16 product (both on `stream`).
  [[nodiscard]] kernel_status run_fp8_linear_fallback(const fp8_linear_fallback_desc& d, void* workspace,
                                                      size_t workspace_bytes, cudaStream_t stream) noexcept;

  /// Plans made so far (one per distinct shape, dtype and workspace size).
  [[nodiscard]] size_t num_plans() const noexcept;

  struct plan;

 private:
  // ... and the alignment of cuBLASLt's A, B and C/D pointers (part of the algorithm's choice).
  using plan_key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                              int, int64_t, int64_t, int64_t, int64_t, size_t, bool, uint32_t,
                              uint32_t, uint32_t>;
  std::unique_ptr<void, cublaslt_deleter> handle_;
  std::map<plan_key, std::unique_ptr<plan>> plans_;
  // m, n, k, workspace bytes, alignment of the weight, the activation and y
  using fp8_plan_key = std::tuple<int64_t, int64_t, int64_t, size_t, uint32_t, uint32_t, uint32_t>;
  std::map<fp8_plan_key, std::unique_ptr<plan>> fp8_plans_;
};

}  // namespace moe::kernels::cuda
