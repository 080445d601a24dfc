#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/rope.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

constexpr int warps_per_block = 8;
constexpr int max_pairs_per_lane = static_cast<int>(rope_max_head_dim / 2 / 32);

// One warp per rotary vector. The rotation is in place and lane l writes x[i] that another
// lane read as x[2i'] or x[2i'+1], so every lane first reads all of its pairs into registers,
// then the warp synchronises (which orders the memory accesses of its lanes), then all write.
// Both early returns are uniform across the warp (a warp has one vector and one position), so
// the full-mask __syncwarp is reached by all 32 lanes or by none.
//
// A launch rotates one or two sets of vectors (q's heads and k_pe: one launch a layer instead of
// two); a warp's vector lies in one set, so the choice between them is warp-uniform too.
template <typename T>
struct vector_set {
  T* x;
  int64_t num_vectors, num_heads, token_stride, head_stride;
};

template <typename T>
__global__ void rope_kernel(vector_set<T> first, vector_set<T> second, int half,
                            const int32_t* positions, const float* cos, const float* sin,
                            int64_t table_positions) {
  int64_t vector = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (vector >= first.num_vectors + second.num_vectors) return;
  const bool in_first = vector < first.num_vectors;
  const vector_set<T>& set = in_first ? first : second;
  if (!in_first) vector -= first.num_vectors;
  const int64_t t = vector / set.num_heads, h = vector - t * set.num_heads;
  // The vector's elements and its position are loaded together, then the position's cos and sin:
  // two memory latencies before the stores, not three (the vector waited on the position).
  T* v = set.x + t * set.token_stride + h * set.head_stride;
  float evens[max_pairs_per_lane] = {};
  float odds[max_pairs_per_lane] = {};
#pragma unroll
  for (int j = 0; j < max_pairs_per_lane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      evens[j] = load(v, 2 * i);
      odds[j] = load(v, 2 * i + 1);
    }
  }
  const int32_t position = positions[t];
  // The caller's guarantee, not checkable on the host: an outside position leaves x as it was.
  // Warp-uniform (one vector per warp), so the whole warp leaves.
  if (position < 0 || position >= table_positions) return;
  const float* c = cos + int64_t{position} * half;
  const float* s = sin + int64_t{position} * half;
  float cs[max_pairs_per_lane] = {}, sn[max_pairs_per_lane] = {};
#pragma unroll
  for (int j = 0; j < max_pairs_per_lane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      cs[j] = c[i];
      sn[j] = s[i];
    }
  }
  __syncwarp();  // every lane's loads before any lane's stores (the vector is rewritten in place)
#pragma unroll
  for (int j = 0; j < max_pairs_per_lane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      const float ci = cs[j], si = sn[j];
      // Separately rounded products: what the host computes, and no FMA contraction.
      store(v, i, __fsub_rn(__fmul_rn(evens[j], ci), __fmul_rn(odds[j], si)));
      store(v, i + half, __fadd_rn(__fmul_rn(odds[j], ci), __fmul_rn(evens[j], si)));
    }
  }
}

template <typename T>
vector_set<T> set_of(const rope_args* a) {
  if (a == nullptr) return {nullptr, 0, 1, 0, 0};
  return {static_cast<T*>(a->x), a->num_tokens * a->num_heads, a->num_heads, a->token_stride,
          a->head_stride};
}

// a's vectors, then b's (when set: it shares a's positions, tables, head_dim and dt).
template <typename T>
kernel_status launch(const rope_args& a, const rope_args* b, cudaStream_t stream) {
  const vector_set<T> first = set_of<T>(&a), second = set_of<T>(b);
  const int64_t num_vectors = first.num_vectors + second.num_vectors;
  if (num_vectors == 0) return kernel_status::ok;
  const auto blocks = static_cast<unsigned>((num_vectors + warps_per_block - 1) / warps_per_block);
  rope_kernel<T>
      <<<blocks, warps_per_block * 32, 0, stream>>>(first, second, static_cast<int>(a.head_dim / 2),
                                                    a.positions, a.cos, a.sin, a.table_positions);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

kernel_status dispatch(const rope_args& a, const rope_args* b, cudaStream_t stream) {
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, b, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, b, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace

kernel_status rope_can_run(const rope_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > rope_max_head_dim)
    return kernel_status::unsupported_shape;
  if (a.num_tokens < 0 || a.num_heads < 0 || a.token_stride < 0 || a.head_stride < 0 ||
      a.table_positions < 0)
    return kernel_status::unsupported_shape;
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  // One warp per vector, and the grid is counted in 32-bit blocks.
  if (a.num_heads > INT32_MAX || a.num_tokens > INT32_MAX / a.num_heads)
    return kernel_status::unsupported_shape;
  // Element offsets (t * token_stride + h * head_stride + head_dim) must not overflow int64.
  if (a.head_stride > INT64_MAX / 4 / a.num_heads || a.token_stride > INT64_MAX / 4 / a.num_tokens)
    return kernel_status::unsupported_shape;
  // The layout rule of cpu::rope_check_layout: vectors must not overlap.
  if (a.num_heads > 1 && a.head_stride < a.head_dim) return kernel_status::unsupported_shape;
  if (a.num_tokens > 1 && a.token_stride < (a.num_heads - 1) * a.head_stride + a.head_dim)
    return kernel_status::unsupported_shape;
  if (a.x == nullptr || a.positions == nullptr || a.cos == nullptr || a.sin == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status rope_run(const rope_args& a, cudaStream_t stream) noexcept {
  if (auto s = rope_can_run(a); s != kernel_status::ok) return s;
  return dispatch(a, nullptr, stream);
}

kernel_status rope_pair_can_run(const rope_args& a, const rope_args& b) noexcept {
  if (auto s = rope_can_run(a); s != kernel_status::ok) return s;
  if (auto s = rope_can_run(b); s != kernel_status::ok) return s;
  if (b.dt != a.dt) return kernel_status::unsupported_dtype;
  if (b.num_tokens != a.num_tokens || b.head_dim != a.head_dim || b.positions != a.positions ||
      b.cos != a.cos || b.sin != a.sin || b.table_positions != a.table_positions)
    return kernel_status::unsupported_shape;
  // Both sets' vectors count in the one grid.
  const int64_t heads = a.num_heads + b.num_heads;
  if (heads > INT32_MAX || (heads > 0 && a.num_tokens > INT32_MAX / heads))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status rope_pair_run(const rope_args& a, const rope_args& b, cudaStream_t stream) noexcept {
  if (auto s = rope_pair_can_run(a, b); s != kernel_status::ok) return s;
  return dispatch(a, &b, stream);
}

}  // namespace moe::kernels::cuda
