#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/fp8_dequantize.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::store;

__device__ float decode_e4m3(uint8_t bits) {
  __nv_fp8_e4m3 v;
  v.__x = bits;
  return static_cast<float>(v);
}

constexpr int threads = 256;

// A grid-stride loop over elements: consecutive threads read consecutive bytes of a row
// (coalesced); the scale lookup hits the same few floats per warp (cached).
template <typename T>
__global__ void fp8_dequantize_kernel(const uint8_t* q, const float* scale, T* out, int64_t rows, int64_t cols,
                                      int64_t block_rows, int64_t block_cols, int64_t scale_cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    store(out, i, decode_e4m3(q[i]) * scale[(r / block_rows) * scale_cols + c / block_cols]);
  }
}

template <typename T>
kernel_status launch(const fp8_dequantize_args& a, cudaStream_t stream) {
  const int64_t total = a.rows * a.cols;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  const int64_t scale_cols = a.scale_ld > 0 ? a.scale_ld : (a.cols + a.block_cols - 1) / a.block_cols;
  fp8_dequantize_kernel<T><<<grid, threads, 0, stream>>>(a.q, a.scale, static_cast<T*>(a.out), a.rows, a.cols,
                                                        a.block_rows, a.block_cols, scale_cols);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status fp8_dequantize_can_run(const fp8_dequantize_args& a) noexcept {
  if (a.out_dt != dtype::f32 && a.out_dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.cols < 0 || a.block_rows <= 0 || a.block_cols <= 0) return kernel_status::unsupported_shape;
  if (a.cols > 0 && a.rows > INT64_MAX / a.cols) return kernel_status::unsupported_shape;
  if (a.scale_ld != 0 && (a.scale_ld < 0 || a.scale_ld < (a.cols + a.block_cols - 1) / a.block_cols))
    return kernel_status::unsupported_shape;
  if (a.rows > 0 && a.cols > 0 && (!a.q || !a.scale || !a.out)) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status fp8_dequantize_run(const fp8_dequantize_args& a, cudaStream_t stream) noexcept {
  if (auto s = fp8_dequantize_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0 || a.cols == 0) return kernel_status::ok;
  switch (a.out_dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
