#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/rmsnorm.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

constexpr int threads_per_row = 256;

// One block per row; a block-wide reduction of the sum of squares.
template <typename T>
__global__ void rmsnorm_kernel(const T* x, T* residual, const float* weight, T* out,
                               int64_t dim, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  T* rr = residual ? residual + row * dim : nullptr;
  T* outr = out + row * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = load(xr, i);
    if (rr) {
      v += load(rr, i);
      store(rr, i, v);
    }
    sum_sq += v * v;
  }
  __shared__ float partial[threads_per_row / 32];
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffff, sum_sq, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum_sq;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < threads_per_row / 32 ? partial[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffff, s, offset);
    if (threadIdx.x == 0) partial[0] = s;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    // Re-read what was stored: the norm applies to the rounded residual sum, as on the host.
    const float v = rr ? load(static_cast<const T*>(rr), i) : load(xr, i);
    store(outr, i, weight[i] * (v * inv));
  }
}

template <typename T>
kernel_status launch(const rmsnorm_args& a, cudaStream_t stream) {
  rmsnorm_kernel<T><<<static_cast<unsigned>(a.rows), threads_per_row, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.residual), a.weight, static_cast<T*>(a.out),
      a.dim, a.eps);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status rmsnorm_can_run(const rmsnorm_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.dim <= 0 || a.rows > 0x7fffffff) return kernel_status::unsupported_shape;
  if (!a.x || !a.weight || !a.out) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status rmsnorm_run(const rmsnorm_args& a, cudaStream_t stream) noexcept {
  if (auto s = rmsnorm_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
