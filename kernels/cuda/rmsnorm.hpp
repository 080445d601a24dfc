// RMSNorm on the GPU, optionally fused with the residual add that precedes it in every
// decoder layer. Framework-free: raw device pointers, shapes and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

struct rmsnorm_args {
  const void* x = nullptr;       ///< (rows, dim) of `dt`, row stride x_stride
  void* residual = nullptr;      ///< optional (rows, dim) of `dt`: residual += x, then norm it
  const float* weight = nullptr; ///< (dim) float32
  void* out = nullptr;           ///< (rows, dim) of `dt`
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t x_stride = 0;  ///< elements between x's rows; 0 = dim (a slice of a wider row)
  float eps = 1e-6f;
  dtype dt = dtype::f32;         ///< f32 or bf16; accumulation is always float32
};

/// unsupported_shape: a negative size, a null pointer, or x_stride below dim.
[[nodiscard]] kernel_status rmsnorm_can_run(const rmsnorm_args& a) noexcept;
[[nodiscard]] kernel_status rmsnorm_run(const rmsnorm_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
