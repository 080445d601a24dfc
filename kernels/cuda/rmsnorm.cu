#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/rmsnorm.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::aligned16;
using detail::load;
using detail::load16;
using detail::store;
using detail::store16;

constexpr int threads_per_row = 256;

// The sum of every thread's v over a threads_per_row block (a fixed tree: lanes, then warps),
// returned to all of them.
__device__ float block_sum(float v) {
  __shared__ float partial[threads_per_row / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < threads_per_row / 32 ? partial[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffff, s, offset);
    if (threadIdx.x == 0) partial[0] = s;
  }
  __syncthreads();
  return partial[0];
}

// One block per row; a block-wide reduction of the sum of squares.
template <typename T>
__global__ void rmsnorm_kernel(const T* x, int64_t x_stride, T* residual, const float* weight,
                               T* out, int64_t dim, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
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
  const float inv = rsqrtf(block_sum(sum_sq) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    // Re-read what was stored: the norm applies to the rounded residual sum, as on the host.
    const float v = rr ? load(static_cast<const T*>(rr), i) : load(xr, i);
    store(outr, i, weight[i] * (v * inv));
  }
}

// The vectorized form: each thread holds up to max_vectors 16-byte vectors of its row in
// registers, so all of its loads (x, then the residual) are in flight at once and the row is
// read once. The scalar loop above waits for each load in turn, behind the residual store
// before it (which may alias the next load as far as the compiler knows): on an H200
// (2026-11-30) that took ~7 us per launch for one 2048-wide row, 25 launches a decode step.
// Covers dim <= threads_per_row * max_vectors * (8 bf16 or 4 f32): DeepSeek-V3's 7168 in bf16.
constexpr int max_vectors = 4;

// What storing v as T and reading it back gives.
__device__ inline float stored(float v, const float*) {
  return v;
}
__device__ inline float stored(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

template <typename T>
__global__ void rmsnorm_vec_kernel(const T* x, int64_t x_stride, T* residual, const float* weight,
                                   T* out, int64_t dim, float eps) {
  constexpr int E = 16 / sizeof(T);
  const int64_t base = int64_t{blockIdx.x} * dim;
  const T* xr = x + int64_t{blockIdx.x} * x_stride;
  const int64_t vectors = dim / E;
  float v[max_vectors][E];
#pragma unroll
  for (int j = 0; j < max_vectors; ++j) {
    const int64_t q = threadIdx.x + j * threads_per_row;
    if (q < vectors) load16(xr + q * E, v[j]);
  }
  if (residual != nullptr) {
    float r[max_vectors][E];
#pragma unroll
    for (int j = 0; j < max_vectors; ++j) {
      const int64_t q = threadIdx.x + j * threads_per_row;
      if (q < vectors) load16(residual + base + q * E, r[j]);
    }
#pragma unroll
    for (int j = 0; j < max_vectors; ++j) {
      const int64_t q = threadIdx.x + j * threads_per_row;
      if (q >= vectors) continue;
        // The norm applies to the stored (rounded) residual sum, as on the host.
#pragma unroll
      for (int e = 0; e < E; ++e) v[j][e] = stored(v[j][e] + r[j][e], x);
      store16(residual + base + q * E, v[j]);
    }
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < max_vectors; ++j)
    if (threadIdx.x + j * threads_per_row < vectors)
#pragma unroll
      for (int e = 0; e < E; ++e) sum_sq += v[j][e] * v[j][e];
  const float inv = rsqrtf(block_sum(sum_sq) / static_cast<float>(dim) + eps);
#pragma unroll
  for (int j = 0; j < max_vectors; ++j) {
    const int64_t q = threadIdx.x + j * threads_per_row;
    if (q >= vectors) continue;
    float w[E], y[E];
#pragma unroll
    for (int h = 0; h < E / 4; ++h) {
      float four[4];
      load16(weight + q * E + 4 * h, four);
#pragma unroll
      for (int e = 0; e < 4; ++e) w[4 * h + e] = four[e];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) y[e] = w[e] * (v[j][e] * inv);
    store16(out + base + q * E, y);
  }
}

template <typename T>
kernel_status launch(const rmsnorm_args& a, cudaStream_t stream) {
  constexpr int64_t E = 16 / sizeof(T);
  const int64_t x_stride = a.x_stride == 0 ? a.dim : a.x_stride;
  const bool vectorized = a.dim % E == 0 && a.dim / E <= int64_t{threads_per_row} * max_vectors &&
                          x_stride % E == 0 && aligned16(a.x) && aligned16(a.weight) &&
                          aligned16(a.out) && (a.residual == nullptr || aligned16(a.residual));
  const auto rows = static_cast<unsigned>(a.rows);
  const auto* x = static_cast<const T*>(a.x);
  auto* residual = static_cast<T*>(a.residual);
  auto* out = static_cast<T*>(a.out);
  if (vectorized)
    rmsnorm_vec_kernel<T>
        <<<rows, threads_per_row, 0, stream>>>(x, x_stride, residual, a.weight, out, a.dim, a.eps);
  else
    rmsnorm_kernel<T>
        <<<rows, threads_per_row, 0, stream>>>(x, x_stride, residual, a.weight, out, a.dim, a.eps);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status rmsnorm_can_run(const rmsnorm_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.dim <= 0 || a.rows > 0x7fffffff) return kernel_status::unsupported_shape;
  if (a.x_stride != 0 && a.x_stride < a.dim) return kernel_status::unsupported_shape;
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
