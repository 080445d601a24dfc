// Per-token-group FP8 quantization of activations on the GPU, DeepSeek-V3 style: x (rows, k) of
// bf16 or f32 -> e4m3 (rows, k) plus one float32 scale per row and 128-wide group of columns,
// the left operand of the block-scaled FP8 product (gemm.hpp, gemm_lt::run_fp8_linear). The
// device twin of kernels/cpu/fp8.hpp, which defines the numerics (amax / 448 per group, scale 1
// for an all-zero group, x / scale rounded to nearest even, saturating to +-448) and the two
// scale layouts; the results are bit-identical to it.
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/fp8.hpp"
#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

using cpu::fp8_scale_layout;

/// x: (rows, k) of `x_dt`, packed; q: (rows, k) e4m3 bytes, packed; scale: in `layout`, its outer
/// index scale_ld floats apart (0: packed; group_major with scale_ld = fp8_linear_rows(rows) is
/// what gemm_lt::run_fp8_linear reads). A partial last group (k not a multiple of 128) is
/// quantized on its own; the product itself wants k % 128 == 0. No aliasing between x, q, scale.
struct fp8_quantize_args {
  const void* x = nullptr;
  uint8_t* q = nullptr;
  float* scale = nullptr;
  int64_t rows = 0;
  int64_t k = 0;
  dtype x_dt = dtype::bf16;  ///< bf16 or f32
  fp8_scale_layout layout = fp8_scale_layout::group_major;
  int64_t scale_ld = 0;  ///< 0: rows (group_major) or ceil(k / 128) (row_major); never less
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, an unknown layout, a scale_ld
/// below the packed one, sizes whose element count overflows, or a null pointer where
/// rows * k > 0.
[[nodiscard]] kernel_status fp8_quantize_can_run(const fp8_quantize_args& a) noexcept;
[[nodiscard]] kernel_status fp8_quantize_run(const fp8_quantize_args& a,
                                             cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
