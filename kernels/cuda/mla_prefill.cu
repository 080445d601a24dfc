#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/mla_prefill.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

// Block: 128 threads (4 warps) for one 16-query tile of one head. Thread t owns query t / 8 and,
// with its 7 neighbours (the same warp), a row of the tile's scores and its output row:
// keys t%8 + 8m (m < 4) of each 32-key tile, and value columns t%8 + 8i.
constexpr int prefill_threads = 128;
constexpr int prefill_warps = prefill_threads / 32;
constexpr int prefill_tile_q = 16;
constexpr int prefill_tile_k = 32;
constexpr int prefill_row_threads = prefill_threads / prefill_tile_q;       // 8
constexpr int prefill_keys_per_thread = prefill_tile_k / prefill_row_threads;  // 4
constexpr float log2e = 1.4426950408889634f;

static_assert(prefill_row_threads == 8, "a query's threads reduce with xor shuffles 1, 2, 4");

template <typename T>
struct prefill_params {
  const T* q;
  int64_t q_token_stride, q_head_stride;
  const T* k_nope;
  int64_t k_nope_token_stride, k_nope_head_stride;
  const T* k_pe;
  int64_t k_pe_token_stride;
  const T* v;
  int64_t v_token_stride, v_head_stride;
  T* out;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t num_q_tokens, num_k_tokens;
  int num_heads, nope_dim, qk_dim, v_dim;
  int q_tiles;  // grid tiles per sequence; a block walks tiles tile0, tile0 + q_tiles, ...
  float scale_log2;
};

// Shared memory in floats: q and k tiles padded by one float a row so that the 4 (q) or 8 (k)
// rows a warp reads at one column fall in different banks.
constexpr size_t prefill_shared_floats(int qk_dim, int v_dim) {
  return size_t{prefill_tile_q} * (qk_dim + 1) + size_t{prefill_tile_k} * (qk_dim + 1) +
         size_t{prefill_tile_k} * v_dim + size_t{prefill_tile_q} * prefill_tile_k;
}

__device__ inline float row_reduce_max(float v) {  // over the 8 threads of a query
  for (int offset = 1; offset < prefill_row_threads; offset *= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

__device__ inline float row_reduce_sum(float v) {
  for (int offset = 1; offset < prefill_row_threads; offset *= 2)
    v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Cols: value columns per thread (dv <= 8 * Cols), a compile-time bound so the output row
// stays in registers.
template <typename T, int Cols>
__global__ void __launch_bounds__(prefill_threads) mla_prefill_kernel(prefill_params<T> p) {
  extern __shared__ float4 prefill_shared[];
  const int qk = p.qk_dim, dv = p.v_dim, dn = p.nope_dim;
  float* sq = reinterpret_cast<float*>(prefill_shared);  // (16, qk + 1), log2-scaled
  float* sk = sq + prefill_tile_q * (qk + 1);            // (32, qk + 1)
  float* sv = sk + prefill_tile_k * (qk + 1);            // (32, dv)
  float* sp = sv + prefill_tile_k * dv;                  // (16, 32) probabilities

  const int64_t seq = blockIdx.x / p.q_tiles;
  const int tile0 = static_cast<int>(blockIdx.x % p.q_tiles);
  const int h = static_cast<int>(blockIdx.y);
  const int64_t q_begin = p.cu_q[seq], q_end = p.cu_q[seq + 1];
  const int64_t k_begin = p.cu_k[seq], k_end = p.cu_k[seq + 1];
  // Offsets are device data: a sequence outside the caller's guarantee is skipped whole.
  if (q_begin < 0 || q_end < q_begin || q_end > p.num_q_tokens || k_begin < 0 ||
      k_end < k_begin || k_end > p.num_k_tokens || k_end - k_begin < q_end - q_begin)
    return;
  const int64_t num_q = q_end - q_begin, num_k = k_end - k_begin;
  const int64_t prefix = num_k - num_q;

  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int qi = static_cast<int>(threadIdx.x) / prefill_row_threads;
  const int kj = static_cast<int>(threadIdx.x) % prefill_row_threads;

  for (int64_t q0 = int64_t{tile0} * prefill_tile_q; q0 < num_q;
       q0 += int64_t{p.q_tiles} * prefill_tile_q) {
    const int rows_q = static_cast<int>(min(int64_t{prefill_tile_q}, num_q - q0));
    // Keys the tile's last query sees: [0, prefix + q0 + rows_q).
    const int64_t keys_visible = prefix + q0 + rows_q;
    __syncthreads();  // the previous tile's readers of sq are done
    for (int row = warp; row < prefill_tile_q; row += prefill_warps) {
      const T* src = p.q + (q_begin + q0 + row) * p.q_token_stride + h * p.q_head_stride;
      for (int c = lane; c < qk; c += 32)
        sq[row * (qk + 1) + c] = row < rows_q ? load(src, c) * p.scale_log2 : 0.0f;
    }

    float run_max = -INFINITY, run_sum = 0.0f;
    float acc[Cols];
#pragma unroll
    for (int i = 0; i < Cols; ++i) acc[i] = 0.0f;
    const int64_t last_key = prefix + q0 + qi;  // this thread's query sees keys [0, last_key]

    for (int64_t k0 = 0; k0 < keys_visible; k0 += prefill_tile_k) {
      __syncthreads();  // sk, sv free again (and sq written, on the first key tile)
      for (int row = warp; row < prefill_tile_k; row += prefill_warps) {
        const int64_t key = k0 + row;
        const bool live = key < keys_visible;
        const int64_t t = k_begin + key;
        const T* kn = p.k_nope + t * p.k_nope_token_stride + h * p.k_nope_head_stride;
        const T* kp = p.k_pe + t * p.k_pe_token_stride;
        for (int c = lane; c < qk; c += 32)
          sk[row * (qk + 1) + c] = live ? (c < dn ? load(kn, c) : load(kp, c - dn)) : 0.0f;
        const T* vr = p.v + t * p.v_token_stride + h * p.v_head_stride;
        for (int c = lane; c < dv; c += 32) sv[row * dv + c] = live ? load(vr, c) : 0.0f;
      }
      __syncthreads();

      float s[prefill_keys_per_thread];
#pragma unroll
      for (int m = 0; m < prefill_keys_per_thread; ++m) s[m] = 0.0f;
      const float* qrow = sq + qi * (qk + 1);
      for (int c = 0; c < qk; ++c) {
        const float x = qrow[c];
#pragma unroll
        for (int m = 0; m < prefill_keys_per_thread; ++m)
          s[m] = fmaf(x, sk[(kj + prefill_row_threads * m) * (qk + 1) + c], s[m]);
      }
      float tile_max = -INFINITY;
#pragma unroll
      for (int m = 0; m < prefill_keys_per_thread; ++m) {
        const int64_t key = k0 + kj + prefill_row_threads * m;
        if (qi >= rows_q || key > last_key) s[m] = -INFINITY;  // past the causal edge
        tile_max = fmaxf(tile_max, s[m]);
      }
      const float new_max = fmaxf(run_max, row_reduce_max(tile_max));
      // A row that has seen no key yet (or a padding row) adds nothing.
      const float factor = new_max == -INFINITY ? 1.0f : exp2f(run_max - new_max);
      float tile_sum = 0.0f;
#pragma unroll
      for (int m = 0; m < prefill_keys_per_thread; ++m) {
        const float prob = new_max == -INFINITY ? 0.0f : exp2f(s[m] - new_max);
        sp[qi * prefill_tile_k + kj + prefill_row_threads * m] = prob;
        tile_sum += prob;
      }
      run_sum = run_sum * factor + row_reduce_sum(tile_sum);
      run_max = new_max;
      __syncwarp();  // a query's probabilities come from its own warp

      const float* prow = sp + qi * prefill_tile_k;
#pragma unroll
      for (int i = 0; i < Cols; ++i) acc[i] *= factor;
      for (int j = 0; j < prefill_tile_k; ++j) {
        const float pj = prow[j];
        const float* vrow = sv + j * dv;
#pragma unroll
        for (int i = 0; i < Cols; ++i) {
          const int c = kj + prefill_row_threads * i;
          if (c < dv) acc[i] = fmaf(pj, vrow[c], acc[i]);
        }
      }
    }

    if (qi < rows_q) {
      T* dst = p.out + ((q_begin + q0 + qi) * p.num_heads + h) * dv;
#pragma unroll
      for (int i = 0; i < Cols; ++i) {
        const int c = kj + prefill_row_threads * i;
        if (c < dv) store(dst, c, run_sum > 0.0f ? acc[i] / run_sum : 0.0f);
      }
    }
  }
}

template <typename T, int Cols>
kernel_status launch_cols(const prefill_params<T>& p, int64_t num_seqs, cudaStream_t stream) {
  const size_t shared_bytes = prefill_shared_floats(p.qk_dim, p.v_dim) * sizeof(float);
  // Allow the widest rows this instance takes (at most 178 KiB of sm_90's 227), not this
  // launch's need: the same value from every caller, so concurrent launches of different widths
  // cannot lower it under each other.
  constexpr size_t max_shared_bytes =
      prefill_shared_floats(static_cast<int>(mla_prefill_max_qk_dim), 8 * Cols) * sizeof(float);
  if (cudaFuncSetAttribute(mla_prefill_kernel<T, Cols>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(max_shared_bytes)) != cudaSuccess)
    return kernel_status::launch_failed;
  const dim3 grid(static_cast<unsigned>(num_seqs * p.q_tiles), static_cast<unsigned>(p.num_heads));
  mla_prefill_kernel<T, Cols><<<grid, prefill_threads, shared_bytes, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

int64_t q_tiles_of(const mla_prefill_args& a) noexcept {
  const int64_t longest = a.max_seqlen_q > 0 ? a.max_seqlen_q : a.num_q_tokens;
  return std::max<int64_t>(1, (longest + prefill_tile_q - 1) / prefill_tile_q);
}

template <typename T>
kernel_status launch(const mla_prefill_args& a, cudaStream_t stream) {
  prefill_params<T> p{};
  const int64_t h = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  const auto or_packed = [](int64_t stride, int64_t packed) { return stride == 0 ? packed : stride; };
  p.q = static_cast<const T*>(a.q);
  p.q_token_stride = or_packed(a.q_token_stride, h * (dn + dr));
  p.q_head_stride = or_packed(a.q_head_stride, dn + dr);
  p.k_nope = static_cast<const T*>(a.k_nope);
  p.k_nope_token_stride = or_packed(a.k_nope_token_stride, h * dn);
  p.k_nope_head_stride = or_packed(a.k_nope_head_stride, dn);
  p.k_pe = static_cast<const T*>(a.k_pe);
  p.k_pe_token_stride = or_packed(a.k_pe_token_stride, dr);
  p.v = static_cast<const T*>(a.v);
  p.v_token_stride = or_packed(a.v_token_stride, h * dv);
  p.v_head_stride = or_packed(a.v_head_stride, dv);
  p.out = static_cast<T*>(a.out);
  p.cu_q = a.cu_seqlens_q;
  p.cu_k = a.cu_seqlens_k != nullptr ? a.cu_seqlens_k : a.cu_seqlens_q;
  p.num_q_tokens = a.num_q_tokens;
  p.num_k_tokens = a.cu_seqlens_k != nullptr ? a.num_k_tokens : a.num_q_tokens;
  p.num_heads = static_cast<int>(h);
  p.nope_dim = static_cast<int>(dn);
  p.qk_dim = static_cast<int>(dn + dr);
  p.v_dim = static_cast<int>(dv);
  p.q_tiles = static_cast<int>(q_tiles_of(a));
  p.scale_log2 = a.softmax_scale * log2e;
  if (dv <= 8 * 16) return launch_cols<T, 16>(p, a.num_seqs, stream);
  return launch_cols<T, static_cast<int>(mla_prefill_max_v_dim) / 8>(p, a.num_seqs, stream);
}

bool nonneg_int32(int64_t v) noexcept { return v >= 0 && v <= INT32_MAX; }

}  // namespace

kernel_status mla_prefill_can_run(const mla_prefill_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.num_heads < 1 || a.num_heads > 65535 || a.v_dim < 1 || a.v_dim > mla_prefill_max_v_dim ||
      a.nope_dim < 0 || a.rope_dim < 0 || a.nope_dim + a.rope_dim > mla_prefill_max_qk_dim)
    return kernel_status::unsupported_shape;
  for (int64_t v : {a.num_seqs, a.num_q_tokens, a.num_k_tokens, a.max_seqlen_q, a.q_token_stride,
                    a.q_head_stride, a.k_nope_token_stride, a.k_nope_head_stride,
                    a.k_pe_token_stride, a.v_token_stride, a.v_head_stride})
    if (!nonneg_int32(v)) return kernel_status::unsupported_shape;
  if (!std::isfinite(a.softmax_scale)) return kernel_status::unsupported_shape;
  // Packed strides of up to 65535 heads x 576 elements stay far inside int64 offsets.
  if (a.num_seqs == 0 || a.num_q_tokens == 0) return kernel_status::ok;
  if (a.num_seqs > INT32_MAX / q_tiles_of(a)) return kernel_status::unsupported_shape;
  if (a.q == nullptr || a.v == nullptr || a.out == nullptr || a.cu_seqlens_q == nullptr ||
      (a.nope_dim > 0 && a.k_nope == nullptr) || (a.rope_dim > 0 && a.k_pe == nullptr))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status mla_prefill_run(const mla_prefill_args& a, cudaStream_t stream) noexcept {
  if (auto s = mla_prefill_can_run(a); s != kernel_status::ok) return s;
  if (a.num_seqs == 0 || a.num_q_tokens == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
