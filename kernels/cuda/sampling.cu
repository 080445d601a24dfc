#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/sampling.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::ranks_before;

constexpr int threads_per_row = 512;
constexpr int warps_per_row = threads_per_row / 32;

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

// One block per row. ranks_before is a total order, so the best of any partition of the row,
// combined in any order, is the row's single best: the result does not depend on the schedule.
template <typename T>
__global__ void sample_greedy_kernel(const T* logits, int32_t* tokens, int64_t vocab) {
  __shared__ candidate partial[warps_per_row];
  const T* row = logits + int64_t{blockIdx.x} * vocab;
  candidate best{__int_as_float(0x7fc00000), no_index};  // quiet NaN
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
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
  sample_greedy_kernel<T><<<static_cast<unsigned>(a.rows), threads_per_row, 0, stream>>>(
      static_cast<const T*>(a.logits), a.tokens, a.vocab);
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
