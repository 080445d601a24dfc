#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/sampling.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::ranks_before;

// One block per row reads the whole row once: its speed is how many loads the block keeps in
// flight. On an H200 (2026-11-30) a 512-thread block with one load per step took 85 us for one
// 102400-entry row; 1024 threads with 4 vector loads (16 elements) per step keep ~32x as many
// bytes in flight.
constexpr int threads_per_row = 1024;
constexpr int warps_per_row = threads_per_row / 32;
constexpr int vectors_in_flight = 4;

// The candidate of a thread that saw no element: a NaN at an index past any real one, so
// every real element (NaN included) ranks before it. vocab <= INT32_MAX - 1 keeps it distinct.
constexpr int32_t no_index = INT32_MAX;

struct candidate {
  float value;
  int32_t index;
};

__device__ candidate better_of(candidate a, candidate b) {
  return ranks_before(b.value, b.index, a.value, a.index) ? b : a;
}

__device__ candidate warp_best(candidate c) {
  for (int offset = 16; offset > 0; offset /= 2) {
    candidate other;
    other.value = __shfl_xor_sync(0xffffffff, c.value, offset);
    other.index = __shfl_xor_sync(0xffffffff, c.index, offset);
    c = better_of(c, other);
  }
  return c;
}

// Four consecutive elements from a 4-element-aligned position (16 bytes of f32, 8 of bf16).
__device__ void load4(const float* p, float (&v)[4]) {
  detail::load16(p, v);
}
__device__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 q = *reinterpret_cast<const uint2*>(p);
  v[0] = detail::bf16_low(q.x);
  v[1] = detail::bf16_high(q.x);
  v[2] = detail::bf16_low(q.y);
  v[3] = detail::bf16_high(q.y);
}

// One block per row. ranks_before is a total order, so the best of any partition of the row,
// combined in any order, is the row's single best: the result does not depend on the schedule
// (nor on which thread reads which element). Vectorized: every row starts 4-element aligned
// (the host checks), each thread reads vectors_in_flight 4-element vectors before it compares;
// the last vocab % 4 elements are read one by one.
template <typename T, bool Vectorized>
__global__ void sample_greedy_kernel(const T* logits, int32_t* tokens, int64_t vocab) {
  __shared__ candidate partial[warps_per_row];
  const T* row = logits + int64_t{blockIdx.x} * vocab;
  candidate best{__int_as_float(0x7fc00000), no_index};  // quiet NaN
  int64_t tail = 0;
  if constexpr (Vectorized) {
    const int64_t vectors = vocab / 4;
    int64_t v = threadIdx.x;
    for (; v + (vectors_in_flight - 1) * threads_per_row < vectors;
         v += vectors_in_flight * threads_per_row) {
      float x[vectors_in_flight][4];
#pragma unroll
      for (int u = 0; u < vectors_in_flight; ++u) load4(row + 4 * (v + u * threads_per_row), x[u]);
#pragma unroll
      for (int u = 0; u < vectors_in_flight; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          best = better_of(
              best, candidate{x[u][j], static_cast<int32_t>(4 * (v + u * threads_per_row) + j)});
    }
    for (; v < vectors; v += threads_per_row) {
      float x[4];
      load4(row + 4 * v, x);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        best = better_of(best, candidate{x[j], static_cast<int32_t>(4 * v + j)});
    }
    tail = vectors * 4;
  }
  for (int64_t i = tail + threadIdx.x; i < vocab; i += threads_per_row)
    best = better_of(best, candidate{load(row, i), static_cast<int32_t>(i)});
  best = warp_best(best);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    candidate c = threadIdx.x < warps_per_row ? partial[threadIdx.x]
                                              : candidate{__int_as_float(0x7fc00000), no_index};
    c = warp_best(c);
    if (threadIdx.x == 0) tokens[blockIdx.x] = c.index;
  }
}

template <typename T>
kernel_status launch(const sample_greedy_args& a, cudaStream_t stream) {
  const auto rows = static_cast<unsigned>(a.rows);
  const auto* logits = static_cast<const T*>(a.logits);
  const bool aligned =
      reinterpret_cast<uintptr_t>(a.logits) % (4 * sizeof(T)) == 0 && a.vocab % 4 == 0;
  if (aligned)
    sample_greedy_kernel<T, true><<<rows, threads_per_row, 0, stream>>>(logits, a.tokens, a.vocab);
  else
    sample_greedy_kernel<T, false><<<rows, threads_per_row, 0, stream>>>(logits, a.tokens, a.vocab);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status sample_greedy_can_run(const sample_greedy_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.vocab < 1 || a.vocab >= INT32_MAX || a.rows < 0 || a.rows > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (a.rows == 0) return kernel_status::ok;
  if (a.logits == nullptr || a.tokens == nullptr) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status sample_greedy_run(const sample_greedy_args& a, cudaStream_t stream) noexcept {
  if (auto s = sample_greedy_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
