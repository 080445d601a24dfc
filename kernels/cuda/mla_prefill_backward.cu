// mla_prefill_backward (declared in backward.hpp): the attention core's backward on CUDA cores.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/backward.hpp"
#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/mla_views.cuh"
#include "kernels/cuda/mla_prefill.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::or_packed;

using detail::load;
using detail::store;

// Block: 256 threads for one 16-token tile of one head. Thread t owns the pair (query t / 16,
// key t % 16) of a 16 x 16 tile when scores are recomputed, then strided elements of the
// accumulators, each element always by the same thread (no races, a fixed order of adds).
constexpr int bwd_threads = 256;
constexpr int bwd_tile = 16;
constexpr int delta_threads = 256;

static_assert(bwd_tile * bwd_tile == bwd_threads, "one thread per (query, key) pair of a tile");

template <typename T>
struct bwd_params : detail::mla_qkv_views<T> {
  const T* out;
  const float* lse;
  const T* dout;
  T* dq;
  T* dk_nope;
  int64_t dk_nope_token_stride, dk_nope_head_stride;
  T* dk_pe;
  int64_t dk_pe_token_stride;
  T* dv;
  int64_t dv_token_stride, dv_head_stride;
  float* delta;        // (T, H) workspace
  float* dk_pe_heads;  // (T, H, dr) workspace; null without dk_pe
  const int32_t* cu;
  int64_t num_tokens;
  int num_heads, nope_dim, rope_dim, qk_dim, v_dim;
  int tiles;  // grid tiles per sequence; a block walks tiles tile0, tile0 + tiles, ...
  float scale;
};

// Shared rows padded by one float so that the 16 rows a half-warp reads at one column fall in
// different banks.
constexpr size_t dq_shared_floats(int qk, int dv) {
  return size_t{3} * bwd_tile * (qk + 1) + size_t{2} * bwd_tile * (dv + 1) +
         size_t{bwd_tile} * bwd_tile + 2 * bwd_tile;
}
constexpr size_t dkv_shared_floats(int qk, int dv) {
  return size_t{3} * bwd_tile * (qk + 1) + size_t{3} * bwd_tile * (dv + 1) +
         size_t{2} * bwd_tile * bwd_tile + 2 * bwd_tile;
}

// This block's sequence (tokens [begin, begin + len)) and its first tile's first row within it:
// blocks (seq, tile0) walk rows tile0 * 16, (tile0 + tiles) * 16, ... False when the sequence's
// offsets break the caller's guarantee (the block skips it).
template <typename T>
__device__ inline bool block_sequence(const bwd_params<T>& p, int64_t& begin, int64_t& len,
                                      int64_t& row0) {
  const int64_t seq = blockIdx.x / p.tiles;
  row0 = int64_t{blockIdx.x % p.tiles} * bwd_tile;
  begin = p.cu[seq];
  const int64_t end = p.cu[seq + 1];
  len = end - begin;
  return begin >= 0 && end >= begin && end <= p.num_tokens;
}

// Rows [row0, row0 + rows) of a (T, H, width) view at head h into shared (16, ld); rows past
// `rows` are zeros.
template <typename T>
__device__ inline void load_rows(float* dst, int ld, const T* src, int64_t token_stride,
                                 int64_t head_offset, int64_t row0, int rows, int width) {
  for (int e = static_cast<int>(threadIdx.x); e < bwd_tile * width; e += bwd_threads) {
    const int r = e / width, c = e % width;
    dst[r * ld + c] = r < rows ? load(src + (row0 + r) * token_stride + head_offset, c) : 0.0f;
  }
}

// [k_nope | k_pe] rows of keys [row0, row0 + rows) at head h.
template <typename T>
__device__ inline void load_keys(float* dst, int ld, const bwd_params<T>& p, int h, int64_t row0,
                                 int rows) {
  const int qk = p.qk_dim, dn = p.nope_dim;
  for (int e = static_cast<int>(threadIdx.x); e < bwd_tile * qk; e += bwd_threads) {
    const int r = e / qk, c = e % qk;
    float x = 0.0f;
    if (r < rows) {
      const int64_t t = row0 + r;
      x = c < dn ? load(p.k_nope + t * p.k_nope_token_stride + h * p.k_nope_head_stride, c)
                 : load(p.k_pe + t * p.k_pe_token_stride, c - dn);
    }
    dst[r * ld + c] = x;
  }
}

// A query tile: q and dout rows, each row's lse and D (the last row's for padding rows, never
// used: their pairs are masked).
template <typename T>
__device__ inline void load_query_tile(float* sq, int lq, float* sdo, int lv, float* slse,
                                       float* sdelta, const bwd_params<T>& p, int h, int64_t row0,
                                       int rows) {
  load_rows(sq, lq, p.q, p.q_token_stride, int64_t{h} * p.q_head_stride, row0, rows, p.qk_dim);
  load_rows(sdo, lv, p.dout, int64_t{p.num_heads} * p.v_dim, int64_t{h} * p.v_dim, row0, rows,
            p.v_dim);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < bwd_tile) {
    const int64_t r = (row0 + min(tid, rows - 1)) * p.num_heads + h;
    slse[tid] = p.lse[r];
    sdelta[tid] = p.delta[r];
  }
}

// A key tile: [k_nope | k_pe] and v rows.
template <typename T>
__device__ inline void load_key_tile(float* sk, int lq, float* sv, int lv, const bwd_params<T>& p,
                                     int h, int64_t row0, int rows) {
  load_keys(sk, lq, p, h, row0, rows);
  load_rows(sv, lv, p.v, p.v_token_stride, int64_t{h} * p.v_head_stride, row0, rows, p.v_dim);
}

// D_i = dout_i . out_i per (token, head), one thread each, columns in order.
template <typename T>
__global__ void __launch_bounds__(delta_threads) mla_bwd_delta_kernel(bwd_params<T> p) {
  const int64_t rows = p.num_tokens * p.num_heads;
  for (int64_t r = blockIdx.x * int64_t{delta_threads} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * delta_threads) {
    const T* g = p.dout + r * p.v_dim;
    const T* o = p.out + r * p.v_dim;
    float d = 0.0f;
    for (int c = 0; c < p.v_dim; ++c) d = fmaf(load(g, c), load(o, c), d);
    p.delta[r] = d;
  }
}

// P and dS of the pair (query row i of sq/sdo, key row j of sk/sv); 0 and 0 when masked.
__device__ inline void recompute_pair(const float* sq, const float* sk, int ld_qk, const float* sdo,
                                      const float* sv, int ld_v, int qk, int dv, int i, int j,
                                      float lse, float delta, float scale, float& prob, float& ds) {
  float s = 0.0f, dp = 0.0f;
  for (int c = 0; c < qk; ++c) s = fmaf(sq[i * ld_qk + c], sk[j * ld_qk + c], s);
  for (int c = 0; c < dv; ++c) dp = fmaf(sdo[i * ld_v + c], sv[j * ld_v + c], dp);
  prob = expf(s * scale - lse);
  ds = prob * (dp - delta);
}

// dq for one (16-query tile, head): the keys a tile sees, 16 at a time, in order.
template <typename T>
__global__ void __launch_bounds__(bwd_threads) mla_bwd_dq_kernel(bwd_params<T> p) {
  extern __shared__ float4 bwd_shared[];
  const int qk = p.qk_dim, dv = p.v_dim, lq = qk + 1, lv = dv + 1;
  float* sq = reinterpret_cast<float*>(bwd_shared);  // (16, qk + 1)
  float* sk = sq + bwd_tile * lq;                    // (16, qk + 1)
  float* sacc = sk + bwd_tile * lq;                  // (16, qk + 1) dq, unscaled
  float* sdo = sacc + bwd_tile * lq;                 // (16, dv + 1)
  float* sv = sdo + bwd_tile * lv;                   // (16, dv + 1)
  float* sds = sv + bwd_tile * lv;                   // (16 queries, 16 keys)
  float* slse = sds + bwd_tile * bwd_tile;           // (16)
  float* sdelta = slse + bwd_tile;                   // (16)

  int64_t begin, len, first;
  if (!block_sequence(p, begin, len, first)) return;
  const int h = static_cast<int>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x);
  const int pi = tid / bwd_tile, pj = tid % bwd_tile;

  for (int64_t q0 = first; q0 < len; q0 += int64_t{p.tiles} * bwd_tile) {
    const int rows_q = static_cast<int>(min(int64_t{bwd_tile}, len - q0));
    __syncthreads();  // the previous tile's readers are done
    load_query_tile(sq, lq, sdo, lv, slse, sdelta, p, h, begin + q0, rows_q);
    for (int e = tid; e < bwd_tile * lq; e += bwd_threads) sacc[e] = 0.0f;
    // Keys [0, q0 + rows_q): the last query of the tile sees them all.
    for (int64_t k0 = 0; k0 < q0 + rows_q; k0 += bwd_tile) {
      const int rows_k = static_cast<int>(min(int64_t{bwd_tile}, q0 + rows_q - k0));
      __syncthreads();  // sk, sv, sds free again
      load_key_tile(sk, lq, sv, lv, p, h, begin + k0, rows_k);
      __syncthreads();
      float prob = 0.0f, ds = 0.0f;
      if (pi < rows_q && pj < rows_k && k0 + pj <= q0 + pi)
        recompute_pair(sq, sk, lq, sdo, sv, lv, qk, dv, pi, pj, slse[pi], sdelta[pi], p.scale, prob,
                       ds);
      sds[pi * bwd_tile + pj] = ds;
      __syncthreads();
      for (int e = tid; e < bwd_tile * qk; e += bwd_threads) {
        const int i = e / qk, c = e % qk;
        float acc = sacc[i * lq + c];
        for (int j = 0; j < bwd_tile; ++j) acc = fmaf(sds[i * bwd_tile + j], sk[j * lq + c], acc);
        sacc[i * lq + c] = acc;
      }
    }
    __syncthreads();
    for (int e = tid; e < rows_q * qk; e += bwd_threads) {
      const int i = e / qk, c = e % qk;
      store(p.dq + ((begin + q0 + i) * p.num_heads + h) * qk, c, sacc[i * lq + c] * p.scale);
    }
  }
}

// dk_nope, dv and this head's dk_pe for one (16-key tile, head): the queries that see the tile
// (from its first key on), 16 at a time, in order.
template <typename T>
__global__ void __launch_bounds__(bwd_threads) mla_bwd_dkv_kernel(bwd_params<T> p) {
  extern __shared__ float4 bwd_shared[];
  const int qk = p.qk_dim, dv = p.v_dim, dn = p.nope_dim, dr = p.rope_dim;
  const int lq = qk + 1, lv = dv + 1;
  float* sk = reinterpret_cast<float*>(bwd_shared);  // (16, qk + 1)
  float* sq = sk + bwd_tile * lq;                    // (16, qk + 1)
  float* sdk = sq + bwd_tile * lq;                   // (16, qk + 1) dk, unscaled
  float* sv = sdk + bwd_tile * lq;                   // (16, dv + 1)
  float* sdo = sv + bwd_tile * lv;                   // (16, dv + 1)
  float* sdv = sdo + bwd_tile * lv;                  // (16, dv + 1)
  float* sp = sdv + bwd_tile * lv;                   // (16 queries, 16 keys)
  float* sds = sp + bwd_tile * bwd_tile;             // (16 queries, 16 keys)
  float* slse = sds + bwd_tile * bwd_tile;           // (16)
  float* sdelta = slse + bwd_tile;                   // (16)

  int64_t begin, len, first;
  if (!block_sequence(p, begin, len, first)) return;
  const int h = static_cast<int>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x);
  const int pi = tid / bwd_tile, pj = tid % bwd_tile;

  for (int64_t k0 = first; k0 < len; k0 += int64_t{p.tiles} * bwd_tile) {
    const int rows_k = static_cast<int>(min(int64_t{bwd_tile}, len - k0));
    __syncthreads();  // the previous tile's readers are done
    load_key_tile(sk, lq, sv, lv, p, h, begin + k0, rows_k);
    for (int e = tid; e < bwd_tile * lq; e += bwd_threads) sdk[e] = 0.0f;
    for (int e = tid; e < bwd_tile * lv; e += bwd_threads) sdv[e] = 0.0f;
    for (int64_t q0 = k0; q0 < len; q0 += bwd_tile) {
      const int rows_q = static_cast<int>(min(int64_t{bwd_tile}, len - q0));
      __syncthreads();  // sq, sdo, sp, sds free again
      load_query_tile(sq, lq, sdo, lv, slse, sdelta, p, h, begin + q0, rows_q);
      __syncthreads();
      float prob = 0.0f, ds = 0.0f;
      if (pi < rows_q && pj < rows_k && k0 + pj <= q0 + pi)
        recompute_pair(sq, sk, lq, sdo, sv, lv, qk, dv, pi, pj, slse[pi], sdelta[pi], p.scale, prob,
                       ds);
      sp[pi * bwd_tile + pj] = prob;
      sds[pi * bwd_tile + pj] = ds;
      __syncthreads();
      for (int e = tid; e < bwd_tile * qk; e += bwd_threads) {
        const int j = e / qk, c = e % qk;
        float acc = sdk[j * lq + c];
        for (int i = 0; i < bwd_tile; ++i) acc = fmaf(sds[i * bwd_tile + j], sq[i * lq + c], acc);
        sdk[j * lq + c] = acc;
      }
      for (int e = tid; e < bwd_tile * dv; e += bwd_threads) {
        const int j = e / dv, c = e % dv;
        float acc = sdv[j * lv + c];
        for (int i = 0; i < bwd_tile; ++i) acc = fmaf(sp[i * bwd_tile + j], sdo[i * lv + c], acc);
        sdv[j * lv + c] = acc;
      }
    }
    __syncthreads();
    for (int e = tid; e < rows_k * qk; e += bwd_threads) {
      const int j = e / qk, c = e % qk;
      const int64_t t = begin + k0 + j;
      const float g = sdk[j * lq + c] * p.scale;
      if (c < dn) {
        if (p.dk_nope != nullptr)
          store(p.dk_nope + t * p.dk_nope_token_stride + h * p.dk_nope_head_stride, c, g);
      } else if (p.dk_pe_heads != nullptr) {
        p.dk_pe_heads[(t * p.num_heads + h) * dr + (c - dn)] = g;
      }
    }
    if (p.dv != nullptr) {
      for (int e = tid; e < rows_k * dv; e += bwd_threads) {
        const int j = e / dv, c = e % dv;
        store(p.dv + (begin + k0 + j) * p.dv_token_stride + h * p.dv_head_stride, c,
              sdv[j * lv + c]);
      }
    }
  }
}

// dk_pe = the per-head parts summed in head order, for the tokens of valid sequences only (the
// workspace rows of a skipped sequence were never written).
template <typename T>
__global__ void __launch_bounds__(bwd_threads) mla_bwd_dk_pe_kernel(bwd_params<T> p) {
  int64_t begin, len, first;
  if (!block_sequence(p, begin, len, first)) return;
  const int dr = p.rope_dim;
  for (int64_t k0 = first; k0 < len; k0 += int64_t{p.tiles} * bwd_tile) {
    const int rows = static_cast<int>(min(int64_t{bwd_tile}, len - k0));
    for (int e = static_cast<int>(threadIdx.x); e < rows * dr; e += bwd_threads) {
      const int j = e / dr, c = e % dr;
      const int64_t t = begin + k0 + j;
      const float* parts = p.dk_pe_heads + t * p.num_heads * dr + c;
      float sum = 0.0f;
      for (int h = 0; h < p.num_heads; ++h) sum += parts[int64_t{h} * dr];
      store(p.dk_pe + t * p.dk_pe_token_stride, c, sum);
    }
  }
}

size_t round_up_256(size_t bytes) noexcept {
  return (bytes + 255) / 256 * 256;
}

int64_t tiles_of(const mla_prefill_backward_args& a) noexcept {
  const int64_t longest = a.max_seqlen > 0 ? a.max_seqlen : a.num_tokens;
  return std::max<int64_t>(1, (longest + bwd_tile - 1) / bwd_tile);
}

bool nothing_to_do(const mla_prefill_backward_args& a) noexcept {
  return a.num_seqs == 0 || a.num_tokens == 0 ||
         (a.dq == nullptr && a.dk_nope == nullptr && a.dk_pe == nullptr && a.dv == nullptr);
}

bool wants_dk_pe(const mla_prefill_backward_args& a) noexcept {
  return a.dk_pe != nullptr && a.rope_dim > 0;
}

template <typename T, typename Kernel>
kernel_status launch_tiles(Kernel kernel, const bwd_params<T>& p, int64_t num_seqs,
                           size_t shared_bytes, unsigned heads, cudaStream_t stream) {
  // The widest rows can_run accepts, not this call's: the same value from every caller, so
  // concurrent launches of different widths cannot lower it under each other.
  constexpr size_t max_shared_bytes = dkv_shared_floats(static_cast<int>(mla_prefill_max_qk_dim),
                                                        static_cast<int>(mla_prefill_max_v_dim)) *
                                      sizeof(float);
  static_assert(max_shared_bytes <= 227 * 1024, "within sm_90's shared memory a block");
  if (shared_bytes > 0 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(max_shared_bytes)) != cudaSuccess)
    return kernel_status::launch_failed;
  const dim3 grid(static_cast<unsigned>(num_seqs * p.tiles), heads);
  kernel<<<grid, bwd_threads, shared_bytes, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename T>
kernel_status launch(const mla_prefill_backward_args& a, void* workspace, cudaStream_t stream) {
  bwd_params<T> p{};
  const int64_t h = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  detail::set_qkv_views<T>(p, a);
  p.out = static_cast<const T*>(a.out);
  p.lse = a.lse;
  p.dout = static_cast<const T*>(a.dout);
  p.dq = static_cast<T*>(a.dq);
  p.dk_nope = dn > 0 ? static_cast<T*>(a.dk_nope) : nullptr;
  p.dk_nope_token_stride = or_packed(a.dk_nope_token_stride, h * dn);
  p.dk_nope_head_stride = or_packed(a.dk_nope_head_stride, dn);
  p.dk_pe = wants_dk_pe(a) ? static_cast<T*>(a.dk_pe) : nullptr;
  p.dk_pe_token_stride = or_packed(a.dk_pe_token_stride, dr);
  p.dv = static_cast<T*>(a.dv);
  p.dv_token_stride = or_packed(a.dv_token_stride, h * dv);
  p.dv_head_stride = or_packed(a.dv_head_stride, dv);
  const size_t delta_bytes = round_up_256(static_cast<size_t>(a.num_tokens * h) * sizeof(float));
  p.delta = static_cast<float*>(workspace);
  p.dk_pe_heads =
      p.dk_pe != nullptr
          ? reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + delta_bytes)
          : nullptr;
  p.cu = a.cu_seqlens;
  p.num_tokens = a.num_tokens;
  p.num_heads = static_cast<int>(h);
  p.nope_dim = static_cast<int>(dn);
  p.rope_dim = static_cast<int>(dr);
  p.qk_dim = static_cast<int>(dn + dr);
  p.v_dim = static_cast<int>(dv);
  p.tiles = static_cast<int>(tiles_of(a));
  p.scale = a.softmax_scale;

  const int64_t rows = a.num_tokens * h;
  const auto delta_blocks =
      static_cast<unsigned>(std::min<int64_t>((rows + delta_threads - 1) / delta_threads, 1 << 16));
  mla_bwd_delta_kernel<T><<<delta_blocks, delta_threads, 0, stream>>>(p);
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  const auto heads = static_cast<unsigned>(h);
  if (p.dq != nullptr) {
    const size_t bytes = dq_shared_floats(p.qk_dim, p.v_dim) * sizeof(float);
    if (auto s = launch_tiles(mla_bwd_dq_kernel<T>, p, a.num_seqs, bytes, heads, stream);
        s != kernel_status::ok)
      return s;
  }
  if (p.dk_nope != nullptr || p.dk_pe != nullptr || p.dv != nullptr) {
    const size_t bytes = dkv_shared_floats(p.qk_dim, p.v_dim) * sizeof(float);
    if (auto s = launch_tiles(mla_bwd_dkv_kernel<T>, p, a.num_seqs, bytes, heads, stream);
        s != kernel_status::ok)
      return s;
  }
  if (p.dk_pe != nullptr)
    return launch_tiles(mla_bwd_dk_pe_kernel<T>, p, a.num_seqs, 0, 1u, stream);
  return kernel_status::ok;
}

bool nonneg_int32(int64_t v) noexcept {
  return v >= 0 && v <= INT32_MAX;
}

}  // namespace

size_t mla_prefill_backward_workspace_bytes(const mla_prefill_backward_args& a) noexcept {
  if (nothing_to_do(a) || a.num_tokens < 0 || a.num_heads < 0 || a.rope_dim < 0) return 0;
  const auto rows = static_cast<size_t>(a.num_tokens) * static_cast<size_t>(a.num_heads);
  size_t bytes = round_up_256(rows * sizeof(float));
  if (wants_dk_pe(a)) bytes += round_up_256(rows * static_cast<size_t>(a.rope_dim) * sizeof(float));
  return bytes;
}

kernel_status mla_prefill_backward_can_run(const mla_prefill_backward_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.num_heads < 1 || a.num_heads > 65535 || a.v_dim < 1 || a.v_dim > mla_prefill_max_v_dim ||
      a.nope_dim < 0 || a.rope_dim < 0 || a.nope_dim + a.rope_dim > mla_prefill_max_qk_dim)
    return kernel_status::unsupported_shape;
  for (int64_t v :
       {a.num_seqs, a.num_tokens, a.max_seqlen, a.q_token_stride, a.q_head_stride,
        a.k_nope_token_stride, a.k_nope_head_stride, a.k_pe_token_stride, a.v_token_stride,
        a.v_head_stride, a.dk_nope_token_stride, a.dk_nope_head_stride, a.dk_pe_token_stride,
        a.dv_token_stride, a.dv_head_stride})
    if (!nonneg_int32(v)) return kernel_status::unsupported_shape;
  if (!std::isfinite(a.softmax_scale)) return kernel_status::unsupported_shape;
  if (a.num_seqs == 0 || a.num_tokens == 0) return kernel_status::ok;
  if (a.num_seqs > INT32_MAX / tiles_of(a)) return kernel_status::unsupported_shape;
  if (a.q == nullptr || a.v == nullptr || a.out == nullptr || a.lse == nullptr ||
      a.dout == nullptr || a.cu_seqlens == nullptr || (a.nope_dim > 0 && a.k_nope == nullptr) ||
      (a.rope_dim > 0 && a.k_pe == nullptr))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status mla_prefill_backward_run(const mla_prefill_backward_args& a, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = mla_prefill_backward_can_run(a); s != kernel_status::ok) return s;
  if (nothing_to_do(a)) return kernel_status::ok;
  if (workspace == nullptr || workspace_bytes < mla_prefill_backward_workspace_bytes(a))
    return kernel_status::unsupported_shape;
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, workspace, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, workspace, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
