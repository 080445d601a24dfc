// FP8 weights on the GPU: DeepSeek-V3 checkpoints store most projections as float8_e4m3fn with
// one float32 scale per 128x128 block. They stay FP8 in device memory (half of bf16's bytes);
// this kernel expands one weight into a bf16 (or f32) workspace right before its product, the
// portable path that works on every card, and the fallback of gemm.hpp's block-scaled FP8
// product (gemm_lt::run_fp8_linear) where cuBLASLt has no algorithm for it.
//
//   out[r, c] = e4m3(q[r, c]) * scale[r / block_rows, c / block_cols]
//   q: (rows, cols) bytes; scale: (ceil(rows / block_rows), ceil(cols / block_cols)) float32,
//   rows scale_ld floats apart (0: packed, ceil(cols / block_cols); gemm.hpp's FP8 weights pad
//   it to a multiple of 4, as cuBLASLt's block-scaled product reads them);
//   out: (rows, cols) of out_dt (bf16 or f32). Edge blocks are partial.
// The e4m3 decode is exact; the product is one float32 multiply; bf16 output rounds it once
// (nearest even), so the result equals model::dequantize_fp8_blocks rounded to bf16.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

struct fp8_dequantize_args {
  const uint8_t* q = nullptr;
  const float* scale = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t block_rows = 128;
  int64_t block_cols = 128;
  dtype out_dt = dtype::bf16;
  int64_t scale_ld = 0;  ///< floats between scale rows; 0: ceil(cols / block_cols)
};

[[nodiscard]] kernel_status fp8_dequantize_can_run(const fp8_dequantize_args& a) noexcept;
[[nodiscard]] kernel_status fp8_dequantize_run(const fp8_dequantize_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
