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

/// silu(x) = x / (1 + exp(-x)) (SwiGLU's activation; swiglu.cu and the grouped GEMM's fused
/// epilogue). exp(-x) overflows to inf for x < -88 and x / inf = -0: the right limit, no NaN (as
/// on the host).
__device__ inline float silu(float x) {
  return __fdiv_rn(x, __fadd_rn(1.0f, expf(-x)));
}

/// Whether p may be read or written 16 bytes at a time (the host decides on the vector forms).
__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

/// The two bf16 values of a 32-bit word (the lower address first), exactly.
__device__ inline float bf16_low(uint32_t word) {
  return __uint_as_float(word << 16);
}
__device__ inline float bf16_high(uint32_t word) {
  return __uint_as_float(word & 0xffff0000u);
}

// 16 bytes of a row as floats, and back (bf16 rounded to nearest even, as store does). p must
// be 16-byte aligned.
__device__ inline void load16(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}
__device__ inline void load16(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = bf16_low(words[i]);
    v[2 * i + 1] = bf16_high(words[i]);
  }
}
__device__ inline void store16(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ inline void store16(__nv_bfloat16* p, const float (&v)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    words[i] =
        static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * i]))) |
        (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * i + 1]))) << 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
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
