#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/gather.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

constexpr int threads = 256;
constexpr int64_t max_blocks = int64_t{1} << 16;

// One block per id (rows are thousands of elements wide: a block covers one coalesced).
template <typename T>
__global__ void gather_rows_kernel(const T* table, const int32_t* ids, T* out, int64_t num_rows, int64_t dim) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  T* dst = out + i * dim;
  if (id < 0 || id >= num_rows) {
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) store(dst, c, 0.0f);
    return;
  }
  const T* src = table + static_cast<int64_t>(id) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = src[c];
}

template <typename In, typename Out>
__global__ void convert_kernel(const In* in, Out* out, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(out, i, load(in, i));
}

template <typename T>
__global__ void accumulate_kernel(const T* x, T* y, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(y, i, load(y, i) + load(x, i));
}

template <typename T>
kernel_status launch_accumulate(const accumulate_args& a, cudaStream_t stream) {
  const int64_t blocks = (a.count + threads - 1) / threads;
  accumulate_kernel<T><<<static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks), threads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), a.count);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename T>
kernel_status launch_gather(const gather_rows_args& a, cudaStream_t stream) {
  gather_rows_kernel<T><<<static_cast<unsigned>(a.num_ids), threads, 0, stream>>>(
      static_cast<const T*>(a.table), a.ids, static_cast<T*>(a.out), a.num_rows, a.dim);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename In, typename Out>
kernel_status launch_convert(const convert_args& a, cudaStream_t stream) {
  const int64_t blocks = (a.count + threads - 1) / threads;
  convert_kernel<In, Out><<<static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks), threads, 0, stream>>>(
      static_cast<const In*>(a.in), static_cast<Out*>(a.out), a.count);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

bool float_type(dtype t) { return t == dtype::f32 || t == dtype::bf16; }

}  // namespace

kernel_status gather_rows_can_run(const gather_rows_args& a) noexcept {
  if (!float_type(a.dt)) return kernel_status::unsupported_dtype;
  if (a.num_rows < 0 || a.num_ids < 0 || a.dim < 0 || a.num_ids > INT32_MAX) return kernel_status::unsupported_shape;
  if (a.dim > 0 && (a.num_rows > INT64_MAX / a.dim || a.num_ids > INT64_MAX / a.dim))
    return kernel_status::unsupported_shape;
  if (a.num_ids == 0 || a.dim == 0) return kernel_status::ok;
  if (!a.table || !a.ids || !a.out) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status gather_rows_run(const gather_rows_args& a, cudaStream_t stream) noexcept {
  if (auto s = gather_rows_can_run(a); s != kernel_status::ok) return s;
  if (a.num_ids == 0 || a.dim == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch_gather<float>(a, stream);
    case dtype::bf16: return launch_gather<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

kernel_status convert_can_run(const convert_args& a) noexcept {
  if (!float_type(a.in_dt) || !float_type(a.out_dt)) return kernel_status::unsupported_dtype;
  if (a.count < 0) return kernel_status::unsupported_shape;
  if (a.count == 0) return kernel_status::ok;
  if (!a.in || !a.out) return kernel_status::unsupported_shape;
  // In place across dtypes of different widths would overwrite what is still to be read.
  if (a.in == a.out && a.in_dt != a.out_dt) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status convert_run(const convert_args& a, cudaStream_t stream) noexcept {
  if (auto s = convert_can_run(a); s != kernel_status::ok) return s;
  if (a.count == 0 || a.in == a.out) return kernel_status::ok;
  if (a.in_dt == dtype::f32 && a.out_dt == dtype::bf16) return launch_convert<float, __nv_bfloat16>(a, stream);
  if (a.in_dt == dtype::bf16 && a.out_dt == dtype::f32) return launch_convert<__nv_bfloat16, float>(a, stream);
  if (a.in_dt == dtype::f32) return launch_convert<float, float>(a, stream);
  return launch_convert<__nv_bfloat16, __nv_bfloat16>(a, stream);
}

kernel_status accumulate_can_run(const accumulate_args& a) noexcept {
  if (!float_type(a.dt)) return kernel_status::unsupported_dtype;
  if (a.count < 0) return kernel_status::unsupported_shape;
  if (a.count == 0) return kernel_status::ok;
  if (!a.x || !a.y || a.x == a.y) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status accumulate_run(const accumulate_args& a, cudaStream_t stream) noexcept {
  if (auto s = accumulate_can_run(a); s != kernel_status::ok) return s;
  if (a.count == 0) return kernel_status::ok;
  return a.dt == dtype::f32 ? launch_accumulate<float>(a, stream)
                            : launch_accumulate<__nv_bfloat16>(a, stream);
}

}  // namespace moe::kernels::cuda
