// Device-side pieces every CUDA kernel family shares: loads and stores of the storage dtypes
// (each kernel computes in float32 and converts only at memory), and the one "best first" order
// the CPU kernels rank by (kernels/cpu/ranking.hpp), so device top-k and argmax break ties the
// same way. Internal to kernels/cuda: .cu files only (it needs nvcc). Pure device functions.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace moe::kernels::cuda::detail {

__device__ inline float load(const float* p, int64_t i) {
  return p[i];
}
__device__ inline float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ inline void store(float* p, int64_t i, float v) {
  p[i] = v;
}
// Round to nearest even, as the host reference rounds its float32 result.
__device__ inline void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

/// cpu::ranks_before on values rather than indices into an array: does (va, a) rank before
/// (vb, b)? Larger value first, lower index first on equal values, NaN after every number.
/// A total order on distinct indices, so any reduction or rank count over it gives one answer.
__device__ inline bool ranks_before(float va, int32_t a, float vb, int32_t b) {
  const bool nan_a = isnan(va), nan_b = isnan(vb);
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && va != vb) return va > vb;
  return a < b;
}

}  // namespace moe::kernels::cuda::detail
