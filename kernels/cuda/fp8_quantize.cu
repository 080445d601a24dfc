#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/fp8_quantize.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;

constexpr int threads_per_block = 256;
constexpr int warps_per_block = threads_per_block / 32;
constexpr int group = static_cast<int>(cpu::fp8_group_size);
constexpr int per_lane = group / 32;  // 4 elements of a group per lane
constexpr int64_t max_blocks = int64_t{1} << 16;

// One warp per (row, group): each lane holds 4 consecutive elements, the amax is a butterfly
// over the warp (max is exact and order-free, so every lane ends with the same value as the
// CPU's sequential fmax), then each lane converts its own 4. The task index is uniform across
// the warp, so every shuffle has all 32 lanes.
template <typename T>
__global__ void fp8_quantize_kernel(const T* x, uint8_t* q, float* scale, int64_t rows, int64_t k,
                                    int64_t num_groups, bool group_major, int64_t scale_ld) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warp = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  const int64_t num_warps = int64_t{gridDim.x} * warps_per_block;
  const int64_t tasks = rows * num_groups;
  for (int64_t t = warp; t < tasks; t += num_warps) {
    const int64_t r = t / num_groups, g = t - r * num_groups;
    const int64_t c0 = g * group + lane * per_lane;
    float v[per_lane];
    float amax = 0.0f;
    for (int i = 0; i < per_lane; ++i) {
      v[i] = c0 + i < k ? load(x, r * k + c0 + i) : 0.0f;
      amax = fmaxf(amax, fabsf(v[i]));
    }
    for (int offset = 16; offset > 0; offset /= 2)
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    float s = __fdiv_rn(amax, cpu::e4m3_max);
    if (s == 0.0f) s = 1.0f;
    for (int i = 0; i < per_lane; ++i)
      if (c0 + i < k)
        q[r * k + c0 + i] = static_cast<uint8_t>(
            __nv_cvt_float_to_fp8(__fdiv_rn(v[i], s), __NV_SATFINITE, __NV_E4M3));
    if (lane == 0) scale[group_major ? g * scale_ld + r : r * scale_ld + g] = s;
  }
}

int64_t effective_scale_ld(const fp8_quantize_args& a) {
  if (a.scale_ld != 0) return a.scale_ld;
  return a.layout == fp8_scale_layout::group_major ? a.rows : (a.k + group - 1) / group;
}

template <typename T>
kernel_status launch(const fp8_quantize_args& a, cudaStream_t stream) {
  const int64_t num_groups = (a.k + group - 1) / group;
  const int64_t tasks = a.rows * num_groups;
  const auto blocks =
      static_cast<unsigned>(std::min((tasks + warps_per_block - 1) / warps_per_block, max_blocks));
  fp8_quantize_kernel<T><<<blocks, threads_per_block, 0, stream>>>(
      static_cast<const T*>(a.x), a.q, a.scale, a.rows, a.k, num_groups,
      a.layout == fp8_scale_layout::group_major, effective_scale_ld(a));
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status fp8_quantize_can_run(const fp8_quantize_args& a) noexcept {
  if (a.x_dt != dtype::f32 && a.x_dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.k < 0) return kernel_status::unsupported_shape;
  if (a.layout != fp8_scale_layout::group_major && a.layout != fp8_scale_layout::row_major)
    return kernel_status::unsupported_shape;
  // rows * k (plus a group's overhang) must index without overflow.
  if (a.k > 0 && a.rows > (INT64_MAX - group) / a.k) return kernel_status::unsupported_shape;
  // The scales must not overlap, and scale_ld * groups must index without overflow.
  const int64_t packed_ld =
      a.layout == fp8_scale_layout::group_major ? a.rows : (a.k + group - 1) / group;
  if (a.scale_ld != 0 && a.scale_ld < packed_ld) return kernel_status::unsupported_shape;
  if (a.scale_ld > INT64_MAX / (a.k / group + a.rows + 2)) return kernel_status::unsupported_shape;
  if (a.rows == 0 || a.k == 0) return kernel_status::ok;
  if (a.x == nullptr || a.q == nullptr || a.scale == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status fp8_quantize_run(const fp8_quantize_args& a, cudaStream_t stream) noexcept {
  if (auto s = fp8_quantize_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0 || a.k == 0) return kernel_status::ok;
  switch (a.x_dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
