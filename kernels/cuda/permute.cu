#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/permute.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

constexpr int threads_per_block = 256;
constexpr int warps_per_block = threads_per_block / 32;
constexpr int scan_threads = static_cast<int>(permute_max_experts);

// Plan step 1: one block per expert counts its entries into expert_offsets[e + 1].
// Integer counts, so the result does not depend on the order of the additions.
__global__ void count_kernel(const int32_t* topk_idx, int64_t n, int32_t* expert_offsets) {
  __shared__ int32_t warp_sums[warps_per_block];
  const auto e = static_cast<int32_t>(blockIdx.x);
  int32_t count = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) count += topk_idx[j] == e ? 1 : 0;
  for (int offset = 16; offset > 0; offset /= 2)
    count += __shfl_xor_sync(0xffffffff, count, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t total = 0;
    for (int w = 0; w < warps_per_block; ++w) total += warp_sums[w];
    expert_offsets[e + 1] = total;
    if (e == 0) expert_offsets[0] = 0;
  }
}

// Plan step 2: one block turns the counts in expert_offsets[1..E] into their inclusive scan, so
// expert_offsets becomes the exclusive offsets (Hillis-Steele over at most 1024 entries).
__global__ void scan_kernel(int32_t* expert_offsets, int num_experts) {
  __shared__ int32_t buf[scan_threads];
  const int tid = static_cast<int>(threadIdx.x);
  buf[tid] = tid < num_experts ? expert_offsets[tid + 1] : 0;
  __syncthreads();
  for (int d = 1; d < scan_threads; d *= 2) {
    const int32_t add = tid >= d ? buf[tid - d] : 0;
    __syncthreads();
    buf[tid] += add;
    __syncthreads();
  }
  if (tid < num_experts) expert_offsets[tid + 1] = buf[tid];
}

// Plan step 3: one block per expert walks the entries in index order, a block-wide chunk at a
// time; an entry's row is the expert's start + the matches in earlier chunks + those before it
// in this chunk (earlier warps' ballot counts, then its own warp's lower lanes). This is the
// stable order of the CPU plan. Every thread runs the same number of chunks, so the full-mask
// ballot and the barriers are reached by all.
__global__ void place_kernel(const int32_t* topk_idx, int64_t n, int num_experts,
                             const int32_t* expert_offsets, int32_t* positions, int32_t* inverse) {
  __shared__ int32_t warp_counts[warps_per_block];
  const auto e = static_cast<int32_t>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  int32_t next_row = expert_offsets[e];
  for (int64_t base = 0; base < n; base += threads_per_block) {
    const int64_t j = base + threadIdx.x;
    const bool match = j < n && topk_idx[j] == e;
    const unsigned ballot = __ballot_sync(0xffffffff, match);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int32_t before = 0, chunk_total = 0;
    for (int w = 0; w < warps_per_block; ++w) {
      if (w < warp) before += warp_counts[w];
      chunk_total += warp_counts[w];
    }
    if (match) {
      const int32_t row = next_row + before + __popc(ballot & ((1u << lane) - 1u));
      positions[j] = row;
      inverse[row] = static_cast<int32_t>(j);
    }
    next_row += chunk_total;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }

  // What no expert's block writes: -1 for skipped ids and for the rows past the last in use.
  // Spread over the whole grid; disjoint from the writes above.
  const int32_t rows_in_use = expert_offsets[num_experts];
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int32_t id = topk_idx[j];
    if (id < 0 || id >= num_experts) positions[j] = -1;
    if (j >= rows_in_use) inverse[j] = -1;
  }
}

// One block per entry: copies x's row of its token to its row of permuted. The raw element
// type is copied, so bf16 is moved bit for bit.
template <typename T>
__global__ void permute_rows_kernel(const T* x, const int32_t* positions, T* permuted,
                                    int64_t top_k, int64_t dim, int64_t num_rows) {
  const int64_t j = blockIdx.x;
  const int32_t row = positions[j];
  if (row < 0 || row >= num_rows) return;  // skipped, or outside the caller's guarantee
  const T* src = x + (j / top_k) * dim;
  T* dst = permuted + int64_t{row} * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

// One block per token; each thread owns columns and sums its token's k rows in k order.
template <typename T>
__global__ void unpermute_kernel(const T* y, const float* weight, const int32_t* positions, T* out,
                                 int64_t top_k, int64_t dim, int64_t num_rows) {
  const int64_t t = blockIdx.x;
  const int32_t* pos = positions + t * top_k;
  const float* w = weight != nullptr ? weight + t * top_k : nullptr;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t row = pos[k];
      if (row < 0 || row >= num_rows) continue;
      const float wk = w != nullptr ? w[k] : 1.0f;
      // Rounded product, then rounded sum: the host's arithmetic, not an FMA.
      acc = __fadd_rn(acc, __fmul_rn(wk, load(y, int64_t{row} * dim + i)));
    }
    store(out, t * dim + i, acc);
  }
}

template <typename T>
kernel_status launch_permute_rows(const permute_rows_args& a, cudaStream_t stream) {
  const int64_t n = a.num_tokens * a.top_k;
  permute_rows_kernel<T><<<static_cast<unsigned>(n), threads_per_block, 0, stream>>>(
      static_cast<const T*>(a.x), a.positions, static_cast<T*>(a.permuted), a.top_k, a.dim,
      a.num_rows);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename T>
kernel_status launch_unpermute(const unpermute_args& a, cudaStream_t stream) {
  unpermute_kernel<T><<<static_cast<unsigned>(a.num_tokens), threads_per_block, 0, stream>>>(
      static_cast<const T*>(a.y), a.weight, a.positions, static_cast<T*>(a.out), a.top_k, a.dim,
      a.num_rows);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

// Entries and rows are int32, and a grid of num_tokens blocks must fit the 31-bit grid.
bool entries_ok(int64_t num_tokens, int64_t top_k) noexcept {
  return num_tokens >= 0 && num_tokens <= INT32_MAX && top_k >= 0 &&
         (top_k == 0 || num_tokens <= INT32_MAX / top_k);
}

// rows * dim elements (for each of the row counts) index without overflow.
bool elements_ok(int64_t dim, int64_t num_rows, int64_t num_tokens) noexcept {
  if (dim < 0 || num_rows < 0) return false;
  return dim == 0 || std::max(num_rows, num_tokens) <= INT64_MAX / 2 / dim;
}

}  // namespace

kernel_status permute_plan_can_run(const permute_plan_args& a) noexcept {
  if (a.num_experts < 1 || a.num_experts > permute_max_experts)
    return kernel_status::unsupported_shape;
  if (!entries_ok(a.num_tokens, a.top_k) || a.expert_offsets == nullptr)
    return kernel_status::unsupported_shape;
  if (a.num_tokens * a.top_k > 0 &&
      (a.topk_idx == nullptr || a.positions == nullptr || a.inverse == nullptr))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status permute_plan_run(const permute_plan_args& a, cudaStream_t stream) noexcept {
  if (auto s = permute_plan_can_run(a); s != kernel_status::ok) return s;
  const int64_t n = a.num_tokens * a.top_k;
  const auto num_experts = static_cast<int>(a.num_experts);
  // With no entries the offsets are still written (all zero) by the first two steps.
  count_kernel<<<static_cast<unsigned>(num_experts), threads_per_block, 0, stream>>>(
      a.topk_idx, n, a.expert_offsets);
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  scan_kernel<<<1, scan_threads, 0, stream>>>(a.expert_offsets, num_experts);
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  if (n == 0) return kernel_status::ok;
  place_kernel<<<static_cast<unsigned>(num_experts), threads_per_block, 0, stream>>>(
      a.topk_idx, n, num_experts, a.expert_offsets, a.positions, a.inverse);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

kernel_status permute_rows_can_run(const permute_rows_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (!entries_ok(a.num_tokens, a.top_k) || !elements_ok(a.dim, a.num_rows, a.num_tokens))
    return kernel_status::unsupported_shape;
  if (a.num_tokens * a.top_k == 0 || a.dim == 0) return kernel_status::ok;
  if (a.x == nullptr || a.positions == nullptr || a.permuted == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status permute_rows_run(const permute_rows_args& a, cudaStream_t stream) noexcept {
  if (auto s = permute_rows_can_run(a); s != kernel_status::ok) return s;
  if (a.num_tokens * a.top_k == 0 || a.dim == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch_permute_rows<float>(a, stream);
    case dtype::bf16: return launch_permute_rows<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

kernel_status unpermute_can_run(const unpermute_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (!entries_ok(a.num_tokens, a.top_k) || !elements_ok(a.dim, a.num_rows, a.num_tokens))
    return kernel_status::unsupported_shape;
  if (a.num_tokens == 0 || a.dim == 0) return kernel_status::ok;
  if (a.out == nullptr || (a.top_k > 0 && (a.y == nullptr || a.positions == nullptr)))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status unpermute_run(const unpermute_args& a, cudaStream_t stream) noexcept {
  if (auto s = unpermute_can_run(a); s != kernel_status::ok) return s;
  if (a.num_tokens == 0 || a.dim == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch_unpermute<float>(a, stream);
    case dtype::bf16: return launch_unpermute<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
