// Projections of a few rows (decode at small batches): y = x . w^T + beta * y, nn.Linear's layout
// as cpu::linear, for at most skinny_linear_max_rows rows. Such a product reads every weight
// once and does a handful of multiply-adds per weight element, so it is bound by how fast the
// weight streams from memory. cuBLASLt's kernels are tiled for many rows: on an H200 (2026-11-30)
// its one-row products took 561 us of a 2.04 ms batch-1 decode step of v2lite-8L, the largest
// share, though only its LM head came near the copy bandwidth (0.9 of it). This
// kernel streams each weight row once (16-byte loads of f32 and bf16, 8-byte loads of FP8) on
// CUDA cores, one warp per output column (or a few warps per column, each over a slice of k,
// where there are too few columns to keep the card's memory busy), and reads x through the L1
// cache (every warp reads all of it).
//
// The absorbed attention's per-head products (decode: q_nope . W_UK and out_latent . W_UV^T,
// 2 x 16 heads a layer of v2-lite) run as one batched launch each, reading kv_b_proj's slices
// and the strided activations in place. W_UK is read as (k, n) rows (k_by_n): each lane then
// owns 8 consecutive output columns (one 16-byte load of a weight row), the block's 8 warps
// split k, and their sums meet in a fixed tree.
//
// Weights: f32 or bf16 (the dtype of x; an f32 weight also takes bf16 x, widened exactly, as
// the router's bf16 input), or FP8 e4m3 with float32 block scales and bf16 x: the
// FP8 bytes are what streams (half of bf16's), and each element is expanded as fp8_dequantize
// expands it, bf16(e4m3 * scale), before its product; the sums run in the same order as for a
// bf16 weight, so the result equals, bit for bit, this kernel's on the weight fp8_dequantize
// expands (the values of gemm.hpp's fp8_linear_fallback_desc, without its bf16 copy of the
// weight). Arithmetic: float32 products and sums (each lane sums its slice of k in order,
// then a fixed tree across lanes and warps: the same inputs give the same bits every launch),
// beta * y added in float32, rounded once to y's dtype. NaN and infinities propagate as in any
// float32 sum.
//
// Framework-free: raw device pointers, shapes and a stream. Launches are asynchronous on the
// caller's stream; the caller owns every buffer. The launch shape depends on host values only,
// so the kernel may be captured into a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

#include "kernels/cuda/gemm.hpp"
#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The rows one pass over the weight takes. Each row adds a load of x and a multiply-add per
/// weight element; at 8 rows the CUDA cores, not memory, set the pace on an H200-class card, and
/// cuBLASLt's tensor-core kernels are the better choice for a large weight well before 16.
/// More rows run as passes of 8 in the same launch, each streaming the weight again: for a small
/// weight (the router's 0.5 MB, the absorbed attention's 2 MB a layer of v2-lite) the passes
/// after the first find it in L2.
inline constexpr int64_t skinny_linear_max_rows = 8;

/// How w is laid out: nn.Linear's (n, k) rows, y = x . w^T (every projection); or (k, n) rows,
/// y = x . w (the absorbed attention's q product reads kv_b_proj's W_UK that way, in place).
enum class skinny_weight_layout : uint8_t { n_by_k, k_by_n };

/// y(rows, n) = x(rows, k) . w(n, k)^T + beta * y (or x . w(k, n) with k_by_n), row-major, for
/// each of `batch` products.
struct skinny_linear_args {
  const void* x = nullptr;  ///< (rows, k) of x_dt
  const void* w = nullptr;  ///< (n, k) of w_dt; (k, n) with k_by_n
  void* y = nullptr;        ///< (rows, n) of y_dt; read only when beta != 0; not overlapping x
  int64_t rows = 0;         ///< 0 .. 65535 passes of skinny_linear_max_rows
  int64_t n = 0;
  int64_t k = 0;
  skinny_weight_layout w_layout = skinny_weight_layout::n_by_k;
  /// Row strides in elements; 0: packed (x: k; w: k, or n with k_by_n; y: n).
  int64_t ldx = 0;
  int64_t ldw = 0;
  int64_t ldy = 0;
  /// Products of this shape in one launch (1 .. 65535: the absorbed attention's, one per head):
  /// product i reads x + i * stride_x and w + i * stride_w and writes y + i * stride_y
  /// (elements). FP8 weights: one product.
  int64_t batch = 1;
  int64_t stride_x = 0;
  int64_t stride_w = 0;
  int64_t stride_y = 0;
  /// SwiGLU fused (n_by_k, one product, beta 0): w holds 2 n rows, the stacked gate|up
  /// projection (n gate rows, then n up rows), and y(rows, n) gets silu(x . gate^T) * (x . up^T)
  /// (swiglu.hpp's activation) from the float32 sums, rounded once: each column's warp streams
  /// its gate and its up row over the same x. One launch and no (rows, 2 n) intermediate where
  /// the product and swiglu_run round the sums to y_dt first.
  bool swiglu = false;
  dtype x_dt = dtype::bf16;  ///< f32 or bf16
  dtype w_dt = dtype::bf16;  ///< x_dt; or, with bf16 x, f8_e4m3 or f32 (x widened exactly)
  dtype y_dt = dtype::bf16;  ///< f32 or bf16
  float beta = 0.0f;
  /// FP8 weights: w_scale[(i / block_rows) * scale_ld + j / block_cols] scales w[i, j]
  /// (row-major block grid, rows scale_ld floats apart; 0: ceil(k / block_cols)).
  const float* w_scale = nullptr;
  int64_t block_rows = 128;
  int64_t block_cols = 128;
  int64_t scale_ld = 0;
};

/// y(rows, out_features) = x(rows, in_features) . w(out_features, in_features)^T + beta * y, x
/// and w of `ab`, y of `c`: the arguments for it, as gemm.hpp's linear_desc makes cuBLASLt's.
[[nodiscard]] inline skinny_linear_args skinny_linear_desc(const void* x, const void* w, void* y,
                                                           int64_t rows, int64_t in_features,
                                                           int64_t out_features, dtype ab, dtype c,
                                                           float beta = 0.0f) noexcept {
  skinny_linear_args a;
  a.x = x;
  a.w = w;
  a.y = y;
  a.rows = rows;
  a.n = out_features;
  a.k = in_features;
  a.x_dt = a.w_dt = ab;
  a.y_dt = c;
  a.beta = beta;
  return a;
}

/// The arguments for the product a gemm_desc describes (gemm.hpp: trans_b for nn.Linear's
/// n_by_k weight, else k_by_n; its strided batch as this kernel's batch), so that a caller can
/// try this kernel before cuBLASLt; nullopt where the desc has no form here (trans_a, alpha other
/// than 1). skinny_linear_can_run decides the rest.
[[nodiscard]] inline std::optional<skinny_linear_args> skinny_linear_of(
    const gemm_desc& g) noexcept {
  if (g.trans_a != transpose::no || g.alpha != 1.0f) return std::nullopt;
  skinny_linear_args a;
  a.x = g.a;
  a.w = g.b;
  a.y = g.c;
  a.rows = g.m;
  a.n = g.n;
  a.k = g.k;
  a.x_dt = a.w_dt = g.ab_dt;
  a.y_dt = g.c_dt;
  a.beta = g.beta;
  a.w_layout =
      g.trans_b == transpose::yes ? skinny_weight_layout::n_by_k : skinny_weight_layout::k_by_n;
  a.ldx = g.lda;
  a.ldw = g.ldb;
  a.ldy = g.ldc;
  a.batch = g.batch_count;
  a.stride_x = g.stride_a;
  a.stride_w = g.stride_b;
  a.stride_y = g.stride_c;
  return a;
}

/// Host-side checks. ok; unsupported_dtype for dtypes outside the combinations above (FP8 only
/// with n_by_k); unsupported_shape for negative sizes or strides, rows above 65535 passes of
/// skinny_linear_max_rows, batch outside 1 .. 65535 (or above 1 with FP8 or stride_y 0), swiglu
/// with k_by_n, a batch or beta, k == 0
/// (with n and rows not 0), a null pointer (where rows * n > 0), x or w not 16-byte aligned, a row
/// stride below its row, the dimension w's loads run along (k, or n with k_by_n) or a stride of x
/// (with n_by_k) or w not a multiple of the elements one load of w holds (4 f32, 8 bf16 or FP8), an
/// FP8 block grid with blocks below 1, block_cols not a multiple of 8 or a scale_ld below
/// ceil(k / block_cols), or sizes whose offsets pass int64. A caller with a refused shape uses
/// cuBLASLt (gemm.hpp).
[[nodiscard]] kernel_status skinny_linear_can_run(const skinny_linear_args& a) noexcept;
[[nodiscard]] kernel_status skinny_linear_run(const skinny_linear_args& a,
                                              cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
