#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/routing.cuh"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::load16;
using detail::store;
using detail::store16;

constexpr int threads_per_block = 256;
constexpr int warps_per_block = threads_per_block / 32;
constexpr int scan_threads = static_cast<int>(permute_max_experts);
// The prefill-sized plan's count and place blocks: 32 warps, so that each walks a 32nd of the
// entries (a 2048-token prefill's 12288 entries: 12 steps of 32 a warp).
constexpr int plan_threads = 1024;
constexpr int plan_warps = plan_threads / 32;
// Steps of 32 ids a warp loads together before it uses any of them (one memory latency a batch).
constexpr int ids_in_flight = 8;

// Plan step 1: one block per expert counts its entries into expert_offsets[e + 1].
// Integer counts, so the result does not depend on the order of the additions.
__global__ void __launch_bounds__(plan_threads)
    count_kernel(const int32_t* __restrict__ topk_idx, int64_t n, int32_t* expert_offsets) {
  __shared__ int32_t warp_sums[plan_warps];
  const auto e = static_cast<int32_t>(blockIdx.x);
  int32_t count = 0;
#pragma unroll 8
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) count += topk_idx[j] == e ? 1 : 0;
  for (int offset = 16; offset > 0; offset /= 2)
    count += __shfl_xor_sync(0xffffffff, count, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t total = 0;
    for (int w = 0; w < plan_warps; ++w) total += warp_sums[w];
    expert_offsets[e + 1] = total;
    if (e == 0) expert_offsets[0] = 0;
  }
}

// Plan step 2: one block turns the counts in expert_offsets[1..E] into their inclusive scan, so
// expert_offsets becomes the exclusive offsets (over at most 1024 entries).
__global__ void scan_kernel(int32_t* expert_offsets, int num_experts) {
  __shared__ int32_t buf[scan_threads];
  const int tid = static_cast<int>(threadIdx.x);
  buf[tid] = tid < num_experts ? expert_offsets[tid + 1] : 0;
  __syncthreads();
  detail::block_inclusive_scan(buf, num_experts);
  if (tid < num_experts) expert_offsets[tid + 1] = buf[tid];
}

// The steps [first, last) of 32 entries that warp `warp` of a place block owns: the entries cut
// into plan_warps contiguous spans of whole steps, in index order (some empty when n is small).
struct warp_span {
  int64_t first, last;  // entries
};
__device__ inline warp_span span_of(int warp, int64_t n) {
  const int64_t steps = (n + 31) / 32;
  const int64_t span = (steps + plan_warps - 1) / plan_warps * 32;
  const int64_t first = std::min(n, int64_t{warp} * span);
  return {first, std::min(n, first + span)};
}

// Calls f(j, ballot) for each 32-entry step of the span, in index order, j being this lane's
// entry and ballot the lanes whose entry is expert e's. Warp-uniform bounds: every lane takes
// every ballot.
template <class F>
__device__ inline void for_each_step(const int32_t* __restrict__ topk_idx, warp_span s, int32_t e,
                                     int lane, F&& f) {
  for (int64_t base = s.first; base < s.last; base += 32 * ids_in_flight) {
    int32_t ids[ids_in_flight];
#pragma unroll
    for (int u = 0; u < ids_in_flight; ++u) {
      const int64_t j = base + 32 * u + lane;
      ids[u] = j < s.last ? topk_idx[j] : -1;  // never e (>= 0) past the span
    }
#pragma unroll
    for (int u = 0; u < ids_in_flight; ++u)
      if (base + 32 * u < s.last) f(base + 32 * u + lane, __ballot_sync(0xffffffff, ids[u] == e));
  }
}

// Plan step 3: one block per expert places its entries in index order, the stable order of the
// CPU plan. Warp w walks its span (span_of) twice: first counting the expert's entries there,
// then, after one barrier, placing each after the expert's start, the entries of the spans
// before its own, of its earlier steps and of its lower lanes. Nothing waits on a barrier
// between steps: a block of 256 threads that walked the entries together, a barrier per 256,
// spent ~30 us of an H200 prefill layer (12288 entries) mostly at its barriers.
__global__ void __launch_bounds__(plan_threads)
    place_kernel(const int32_t* __restrict__ topk_idx, int64_t n, int num_experts,
                 const int32_t* __restrict__ expert_offsets, int32_t* __restrict__ positions,
                 int32_t* __restrict__ inverse) {
  __shared__ int32_t warp_counts[plan_warps];
  const auto e = static_cast<int32_t>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const warp_span span = span_of(warp, n);
  int32_t count = 0;
  for_each_step(topk_idx, span, e, lane,
                [&](int64_t, unsigned ballot) { count += __popc(ballot); });
  if (lane == 0) warp_counts[warp] = count;
  __syncthreads();
  int32_t next_row = expert_offsets[e];
  for (int w = 0; w < warp; ++w) next_row += warp_counts[w];
  for_each_step(topk_idx, span, e, lane, [&](int64_t j, unsigned ballot) {
    if ((ballot >> lane & 1u) != 0) {
      const int32_t row = next_row + __popc(ballot & ((1u << lane) - 1u));
      positions[j] = row;
      inverse[row] = static_cast<int32_t>(j);
    }
    next_row += __popc(ballot);
  });

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

// A decode-sized plan (at most small_plan_entries entries) in one block and one launch instead of
// three (routing.cuh's small_plan). The three launches took ~2.8 us each, 21 a decode step, on an
// H200 (2026-11-30).
using detail::small_plan_entries;

__global__ void small_plan_kernel(const int32_t* topk_idx, int n, int num_experts,
                                  int32_t* expert_offsets, int32_t* positions, int32_t* inverse) {
  __shared__ int32_t ids[small_plan_entries];
  __shared__ int32_t ends[permute_max_experts];  // counts, then their inclusive scan
  const int tid = static_cast<int>(threadIdx.x);
  ids[tid] = tid < n ? topk_idx[tid] : -1;
  __syncthreads();
  detail::small_plan(ids, n, num_experts, ends, expert_offsets, positions, inverse);
}

// One warp per entry, warps_per_block entries a block: copies x's row of its token to its row
// of permuted. The raw element type is copied, so bf16 is moved bit for bit. Vectorized (rows
// 16-byte aligned, the host checks): each lane loads ids_in_flight 16-byte vectors before it
// stores any (a 2048-wide bf16 row is one such batch of the warp). One block per entry with one
// vector a thread waited on the position and then on the row, one 4 KiB row in flight a block:
// on an H200 (2026-11-30) 0.29 of a plain copy's bandwidth at 4096 tokens x 8 x 7168.
template <typename T, bool Vectorized>
__global__ void permute_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ positions,
                                    T* __restrict__ permuted, int64_t n, int64_t top_k, int64_t dim,
                                    int64_t num_rows) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t j = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  if (j >= n) return;
  const int32_t row = positions[j];
  if (row < 0 || row >= num_rows) return;  // skipped, or outside the caller's guarantee
  const T* src = x + (j / top_k) * dim;
  T* dst = permuted + int64_t{row} * dim;
  if constexpr (Vectorized) {
    const int64_t vectors = dim * static_cast<int64_t>(sizeof(T)) / 16;
    const auto* s = reinterpret_cast<const uint4*>(src);
    auto* d = reinterpret_cast<uint4*>(dst);
    for (int64_t base = lane; base < vectors; base += 32 * ids_in_flight) {
      uint4 v[ids_in_flight];
#pragma unroll
      for (int u = 0; u < ids_in_flight; ++u)
        if (base + 32 * u < vectors) v[u] = s[base + 32 * u];
#pragma unroll
      for (int u = 0; u < ids_in_flight; ++u)
        if (base + 32 * u < vectors) d[base + 32 * u] = v[u];
    }
  } else {
    for (int64_t i = lane; i < dim; i += 32) dst[i] = src[i];
  }
}

// One block per token; each thread owns columns (16 bytes of them where rows are 16-byte
// aligned) and sums its token's k rows in k order: the same arithmetic per element either way.
// The k rows are read rows_in_flight at a time (positions, then the rows, then the sums), so
// that a thread waits once per group rather than twice per row: 8, one group for the top 6 of
// v2-lite and the top 8 of DeepSeek-V3 (4 took two, and reached 0.46 of a copy's bandwidth on an
// H200 at 4096 tokens x 8 x 7168, 2026-11-30).
constexpr int rows_in_flight = 8;

template <typename T, bool Vectorized>
__global__ void unpermute_kernel(const T* y, const float* weight, const int32_t* positions, T* out,
                                 int64_t top_k, int64_t dim, int64_t num_rows) {
  constexpr int E = Vectorized ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int64_t t = blockIdx.x;
  const int32_t* pos = positions + t * top_k;
  const float* w = weight != nullptr ? weight + t * top_k : nullptr;
  for (int64_t i = threadIdx.x * E; i < dim; i += blockDim.x * E) {
    float acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.0f;
    for (int64_t k0 = 0; k0 < top_k; k0 += rows_in_flight) {
      int32_t row[rows_in_flight];
#pragma unroll
      for (int u = 0; u < rows_in_flight; ++u) {
        row[u] = k0 + u < top_k ? pos[k0 + u] : -1;
        if (row[u] >= num_rows) row[u] = -1;
      }
      float v[rows_in_flight][E] = {};
#pragma unroll
      for (int u = 0; u < rows_in_flight; ++u) {
        if (row[u] < 0) continue;  // skipped: nothing read
        if constexpr (Vectorized) {
          load16(y + int64_t{row[u]} * dim + i, v[u]);
        } else {
          v[u][0] = load(y, int64_t{row[u]} * dim + i);
        }
      }
#pragma unroll
      for (int u = 0; u < rows_in_flight; ++u) {
        if (row[u] < 0) continue;
        const float wk = w != nullptr ? w[k0 + u] : 1.0f;
        // Rounded product, then rounded sum: the host's arithmetic, not an FMA.
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wk, v[u][e]));
      }
    }
    if constexpr (Vectorized) {
      store16(out + t * dim + i, acc);
    } else {
      store(out, t * dim + i, acc[0]);
    }
  }
}

// Whether every row of a (rows, dim) matrix of T at p starts 16-byte aligned.
template <typename T>
bool rows_aligned16(const void* p, int64_t dim) {
  return detail::aligned16(p) && dim * static_cast<int64_t>(sizeof(T)) % 16 == 0;
}

template <typename T>
kernel_status launch_permute_rows(const permute_rows_args& a, cudaStream_t stream) {
  const int64_t n = a.num_tokens * a.top_k;
  const auto blocks = static_cast<unsigned>((n + warps_per_block - 1) / warps_per_block);
  const auto* x = static_cast<const T*>(a.x);
  auto* permuted = static_cast<T*>(a.permuted);
  if (rows_aligned16<T>(a.x, a.dim) && rows_aligned16<T>(a.permuted, a.dim))
    permute_rows_kernel<T, true><<<blocks, threads_per_block, 0, stream>>>(
        x, a.positions, permuted, n, a.top_k, a.dim, a.num_rows);
  else
    permute_rows_kernel<T, false><<<blocks, threads_per_block, 0, stream>>>(
        x, a.positions, permuted, n, a.top_k, a.dim, a.num_rows);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename T>
kernel_status launch_unpermute(const unpermute_args& a, cudaStream_t stream) {
  const auto tokens = static_cast<unsigned>(a.num_tokens);
  const auto* y = static_cast<const T*>(a.y);
  auto* out = static_cast<T*>(a.out);
  if (rows_aligned16<T>(a.y, a.dim) && rows_aligned16<T>(a.out, a.dim))
    unpermute_kernel<T, true><<<tokens, threads_per_block, 0, stream>>>(
        y, a.weight, a.positions, out, a.top_k, a.dim, a.num_rows);
  else
    unpermute_kernel<T, false><<<tokens, threads_per_block, 0, stream>>>(
        y, a.weight, a.positions, out, a.top_k, a.dim, a.num_rows);
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
  if (n <= small_plan_entries) {
    small_plan_kernel<<<1, small_plan_entries, 0, stream>>>(
        a.topk_idx, static_cast<int>(n), num_experts, a.expert_offsets, a.positions, a.inverse);
    return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
  }
  // With no entries the offsets are still written (all zero) by the first two steps.
  count_kernel<<<static_cast<unsigned>(num_experts), plan_threads, 0, stream>>>(a.topk_idx, n,
                                                                                a.expert_offsets);
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  scan_kernel<<<1, scan_threads, 0, stream>>>(a.expert_offsets, num_experts);
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  if (n == 0) return kernel_status::ok;
  place_kernel<<<static_cast<unsigned>(num_experts), plan_threads, 0, stream>>>(
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
