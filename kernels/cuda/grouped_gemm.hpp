// The grouped expert product of a MoE layer on the GPU: every local expert's projection over the
// rows permute_plan / permute_rows (kernels/cuda/permute.hpp) laid out by expert, in ONE launch.
// The device twin of kernels/cpu/grouped_gemm.hpp, which defines the result.
//
// The per-expert row counts live on the device (expert_offsets, written by permute_plan), and
// the launch never reads them on the host: its grid is sized from the host's bound num_rows
// alone, so the call can be captured in a CUDA graph and replayed for any routing. Each block
// finds its (expert, row tile) by scanning the offsets; blocks past the rows in use exit.
//
// Element types (x and weights, y):
//   bf16, bf16 or f32   tensor cores (WMMA bf16 16x16x16, or on request Hopper's wgmma for
//                       many rows per expert), float32 accumulation
//   f32,  f32           CUDA cores, float32 fused multiply-adds in k order (no TF32)
// FP8 weights (DeepSeek-V3's e4m3 with float32 block scales, weight_scale set) with bf16 x: each
// weight element becomes bf16(e4m3 * scale) in shared memory right before the products, the
// value fp8_dequantize.hpp writes, so the result is the bf16 kernel's on fp8_dequantize's output,
// bit for bit, while half the weight bytes come from memory (what decode is bound by).
// Any n and k (neither needs to be a multiple of 16): tile edges are zero-filled. The bf16 path
// streams tiles with asynchronous 16-byte copies when k % 8 == 0 and x and weights are 16-byte
// aligned, and falls back to (slower) element loads otherwise.
//
// Device data the host cannot check are the caller's guarantee: offsets[0] == 0, non-decreasing,
// offsets[num_experts] <= num_rows. Offsets outside [0, num_rows] are clamped into it (nothing is
// read or written outside x and y), where the CPU kernel refuses the whole call.
//
// Framework-free: raw device pointers, shapes and a stream. No workspace.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The most experts one launch serves: every block scans all the offsets to find its tile, and
/// permute_plan, which writes them, serves at most this many (permute_max_experts).
inline constexpr int64_t grouped_gemm_max_experts = 1024;

/// For each expert e and each row r in [expert_offsets[e], expert_offsets[e + 1]):
///   y[r, :] = x[r, :] . weights[e]^T (+ beta * y[r, :])        (1, n) = (1, k) . (k, n)
/// accumulated in float32, rounded once to y_dt. Rows of y past expert_offsets[num_experts] are
/// untouched. k == 0 writes zeros.
struct grouped_gemm_args {
  const void* x = nullptr;                  ///< (num_rows, k) of `dt`, rows grouped by expert
                                            ///< (or gathered: x_entries)
  const int32_t* expert_offsets = nullptr;  ///< (num_experts + 1) int32, device
  const void* weights = nullptr;            ///< (num_experts, n, k) of `dt`: nn.Linear per expert
  void* y = nullptr;                        ///< (num_rows, n) of `y_dt`, not overlapping x
  int64_t num_rows = 0;      ///< rows of x and y: the host's bound on offsets[num_experts]
  int64_t num_experts = 0;   ///< [1, grouped_gemm_max_experts]
  int64_t n = 0;             ///< output features
  int64_t k = 0;             ///< input features
  dtype dt = dtype::bf16;    ///< x and weights: bf16 or f32 (x: bf16 with FP8 weights)
  dtype y_dt = dtype::bf16;  ///< bf16 or f32 for bf16 inputs; f32 for f32 inputs
  /// y = x . w^T + beta * y for the rows in use: the old y read (in y_dt) only where beta != 0,
  /// the sum rounded once (a residual add, as cuBLASLt's beta). Not with `wgmma`.
  float beta = 0.0f;

  /// FP8 weights: when set, `weights` holds (num_experts, n, k) e4m3 bytes, read as ONE
  /// (num_experts * n, k) matrix with this block-scale grid: row r of expert e scales by
  /// weight_scale[((e * n + r) / scale_block_rows) * scale_ld + c / scale_block_cols]. Each
  /// expert's weight starts a new grid row when n % scale_block_rows == 0 (stack the experts'
  /// own grids with a block height dividing n). dt must be bf16.
  const float* weight_scale = nullptr;
  int64_t scale_block_rows = 128;
  int64_t scale_block_cols = 128;
  int64_t scale_ld = 0;  ///< floats between grid rows; 0: ceil(k / scale_block_cols)

  /// On an sm_90 card, the wide tiling (num_rows >= 64 * num_experts: prefill, training) with
  /// bf16 weights runs on Hopper's warpgroup MMA (wgmma: 128x256 tiles of two warpgroups, k
  /// steps of 64 in a 128-byte swizzled layout) instead of WMMA, when k % 8 == 0 and x and the
  /// weights are 16-byte aligned, beta 0; ignored otherwise (another card, FP8 weights, few
  /// rows). The results differ from WMMA's only in the float32 summation order. Off by default
  /// until a card measures it (bench/gpu_kernels_bench.cpp's grouped_gemm_bf16).
  bool wgmma = false;
  /// With `wgmma`: the operands come in by TMA, one thread of a producer warpgroup issuing each
  /// stage's copies while two warpgroups multiply (warp-specialized), where the driver encodes
  /// the tensor maps (k > 0, num_experts * n <= INT32_MAX); false, or where it cannot: by
  /// cp.async, every thread copying between its products. The same products either way.
  bool tma = true;
  /// A gather map instead of grouped rows: when set, row r of the product reads x's row
  /// x_entries[r] / entries_per_x_row, x being the layer's input as the tokens come,
  /// (num_x_rows, k): permute_plan's `inverse` with top_k gives each expert row its token, so
  /// the permute_rows copy is not needed. Device data, the caller's guarantee for every row in
  /// use (r < expert_offsets[num_experts]): 0 <= x_entries[r] < num_x_rows * entries_per_x_row.
  /// The products are the same, bit for bit, as on the permuted copy. The WMMA and CUDA-core
  /// kernels gather; the wgmma ones do not (a call that sets it is not taken by them, whatever
  /// `wgmma` says).
  const int32_t* x_entries = nullptr;
  int64_t entries_per_x_row = 1;  ///< [1, INT32_MAX]
  int64_t num_x_rows = 0;         ///< rows of x with x_entries
  /// bf16 x: each expert's weight is its stacked (gate; up) projection, n = 2 I rows (I gate
  /// rows, then I up rows), and y, (num_rows, I) of y_dt, gets silu(x . gate^T) * (x . up^T)
  /// (swiglu.hpp's activation) from the float32 products, rounded once, where the unfused path
  /// rounds the products to y_dt, then applies swiglu_run: no (rows, 2 I) intermediate and no
  /// second launch. A tile computes bn / 2 activations: its first half of columns reads their
  /// gate rows, its second half their up rows (the wgmma kernels: alternating 64-row runs;
  /// WMMA: two halves in different warps, paired through shared memory). Every kernel of bf16
  /// x takes it (FP8 weights and the gather map included); host checks refuse it with n odd,
  /// f32 x or beta.
  bool fuse_swiglu = false;
};

/// Host-side checks only (no GPU needed): ok, unsupported_dtype, or unsupported_shape for
/// num_experts outside [1, grouped_gemm_max_experts], negative sizes, num_rows, n or k past
/// INT32_MAX, a grid past 2^31 - 1 blocks, element offsets past int64, or a null pointer
/// (expert_offsets and y are needed whenever num_rows * n > 0, x and weights when k > 0 too);
/// with FP8 weights also dt not bf16 (unsupported_dtype), block sizes below 1 or scale_ld below
/// ceil(k / scale_block_cols); with x_entries entries_per_x_row outside [1, INT32_MAX], a
/// negative num_x_rows or x's elements past int64; with fuse_swiglu n odd, f32 x or beta.
[[nodiscard]] kernel_status grouped_gemm_can_run(const grouped_gemm_args& a) noexcept;

/// Whether grouped_gemm_run would take the wgmma kernel for these arguments on the current device
/// (for tests and benchmarks to report which kernel they measured).
[[nodiscard]] bool grouped_gemm_uses_wgmma(const grouped_gemm_args& a) noexcept;

/// The kernel a grouped_gemm_run call launched.
enum class grouped_gemm_kernel : uint8_t {
  none,       ///< nothing: refused, or no rows or columns
  wgmma,      ///< Hopper's wgmma fed by cp.async (grouped_gemm_args::wgmma)
  wgmma_tma,  ///< Hopper's wgmma fed by TMA (grouped_gemm_args::tma)
  wmma,       ///< WMMA tensor cores (bf16 x)
  simt,       ///< CUDA cores (f32)
};

/// One launch on `stream`. launch_failed when CUDA refuses it (e.g. a device older than sm_80,
/// which lacks bf16 tensor cores and asynchronous copies). `launched`, when given, gets the
/// kernel the call launched (none unless the result is ok and there was work): the caller's
/// account of which kernel ran, without asking grouped_gemm_uses_wgmma first.
[[nodiscard]] kernel_status grouped_gemm_run(const grouped_gemm_args& a, cudaStream_t stream,
                                             grouped_gemm_kernel* launched = nullptr) noexcept;

}  // namespace moe::kernels::cuda
