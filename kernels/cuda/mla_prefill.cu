#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/mla_views.cuh"
#include "kernels/cuda/mla_prefill.hpp"
#include "kernels/cuda/wmma_shared.cuh"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;
using bf16 = __nv_bfloat16;

// The CUDA-core kernel (f32, and bf16 rows wider than the tensor-core kernel takes).
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
constexpr float ln2 = 0.6931471805599453f;

// The natural log-sum-exp of a row from its online softmax state, whose running max is in
// log2 units (the scores are pre-multiplied by scale * log2(e)).
__device__ inline float natural_lse(float run_max_log2, float run_sum) {
  return run_sum > 0.0f ? run_max_log2 * ln2 + logf(run_sum) : -INFINITY;
}

static_assert(prefill_row_threads == 8, "a query's threads reduce with xor shuffles 1, 2, 4");

template <typename T>
struct prefill_params : detail::mla_qkv_views<T> {
  T* out;
  float* lse;
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
      if (p.lse != nullptr && kj == 0)
        p.lse[(q_begin + q0 + qi) * p.num_heads + h] = natural_lse(run_max, run_sum);
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

// ---------------------------------------------------------------------------------------------
// The tensor-core kernel (bf16 storage, dn + dr <= 192, dv <= 128): flash attention with WMMA.
//
// Block: 128 threads (4 warps) for one 64-query tile of one head; warp w owns query rows
// 16w..16w+15 of the tile. Per 64-key tile: S = Q K^T (bf16 in, float32 out) on tensor cores,
// stored to the warp's scratch; two lanes a row apply the causal mask and the online softmax in
// float32 (running max and sum); the probabilities, rounded to bf16, go back through scratch as
// the A operand of O += P V (float32 accumulators). Accumulator layouts are opaque in CUDA, so
// each row's rescale factor reaches the O fragments as a 16x16 tile loaded with the same
// fragment type (elementwise products of like fragments are right under any layout).
//
// Shared memory (bf16 rows padded by 8 elements, 16 bytes, so the 8 rows of each ldmatrix phase
// fall in different banks): Q (64, 200), K (64, 200) = [k_nope | k_pe | 0], V (64, 136), and per
// warp S (16, 72) float, P (16, 72) bf16 and the factor tile (16, 16) float: 98 KiB, two blocks
// an SM. Columns past dn + dr (and past dv) are zero-filled up to the next multiple of 16, as
// are the rows past the visible keys, so padding adds nothing and no poison reaches a product.
//
// Pipeline, per key tile t: V_t is requested while S_t is computed, K_{t+1} while the softmax
// and P V_t run (cp.async with 16-byte copies when every pointer and stride allows it, else
// synchronous element copies at the same points).
constexpr int tc_threads = 128;
constexpr int tc_tile_q = 64;
constexpr int tc_tile_k = 64;
constexpr int tc_max_qk = 192;
constexpr int tc_max_v = 128;
constexpr int tc_ld_qk = tc_max_qk + 8;  // bf16 elements
constexpr int tc_ld_v = tc_max_v + 8;
constexpr int tc_ld_s = tc_tile_k + 8;  // S floats and P bf16 per scratch row
constexpr int tc_qk_frags = tc_max_qk / 16;
constexpr int tc_v_frags = tc_max_v / 16;
constexpr int tc_k_frags = tc_tile_k / 16;
constexpr size_t tc_q_bytes = size_t{tc_tile_q} * tc_ld_qk * 2;
constexpr size_t tc_k_bytes = size_t{tc_tile_k} * tc_ld_qk * 2;
constexpr size_t tc_v_bytes = size_t{tc_tile_k} * tc_ld_v * 2;
constexpr size_t tc_s_bytes = size_t{16} * tc_ld_s * 4;
constexpr size_t tc_p_bytes = size_t{16} * tc_ld_s * 2;
constexpr size_t tc_f_bytes = size_t{16} * 16 * 4;
constexpr size_t tc_warp_bytes = tc_s_bytes + tc_p_bytes + tc_f_bytes;
constexpr size_t tc_shared_bytes =
    tc_q_bytes + tc_k_bytes + tc_v_bytes + size_t{tc_threads / 32} * tc_warp_bytes;

static_assert(tc_q_bytes % 32 == 0 && tc_k_bytes % 32 == 0 && tc_v_bytes % 32 == 0 &&
                  tc_s_bytes % 32 == 0 && tc_p_bytes % 32 == 0 && tc_warp_bytes % 32 == 0,
              "WMMA pointers must stay 32-byte aligned");
static_assert(tc_tile_q == 16 * (tc_threads / 32), "a warp owns 16 query rows");

struct tc_params : detail::mla_qkv_views<bf16> {
  bf16* out;
  float* lse;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t num_q_tokens, num_k_tokens;
  int num_seqs, num_heads, nope_dim, qk_dim, v_dim;
  int qk_pad, v_pad;  // dn + dr and dv rounded up to 16
  int q_tiles;        // as prefill_params::q_tiles
  bool vec16;         // every row start 16-byte aligned and dn, dr, dv multiples of 8: cp.async
  float scale_log2;
};

// Copies `rows` rows of a tile into shared memory (row stride `ld`), columns [0, width) from
// src(row, col) and zeros up to `padded`; rows at or past `live` are zeros. Every thread of the
// block calls it; with vec16 the copies are cp.async and land at the covering wait.
template <class Src>
__device__ inline void tc_load_tile(bf16* dst, int ld, int live, int width, int padded, bool vec16,
                                    const Src& src) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec16) {
    const int chunks = padded / 8;
    for (int i = tid; i < tc_tile_k * chunks; i += tc_threads) {
      const int row = i / chunks, col = (i % chunks) * 8;
      bf16* d = dst + row * ld + col;
      if (row < live && col < width)
        __pipeline_memcpy_async(d, src(row, col), 16);
      else
        __pipeline_memcpy_async(d, src(0, 0), 16, 16);  // zeros; nothing is read
    }
  } else {
    for (int i = tid; i < tc_tile_k * padded; i += tc_threads) {
      const int row = i / padded, col = i % padded;
      dst[row * ld + col] = row < live && col < width ? *src(row, col) : __float2bfloat16_rn(0.0f);
    }
  }
}

// WMMA fragments of the tensor-core kernel: bf16 operands (loaded from shared memory by
// wmma_shared.cuh's load_shared, as ldmatrix), float32 accumulators.
using frag_a = detail::wmma_a_row;
using frag_k = detail::wmma_b_col;
using frag_v = detail::wmma_b_row;
using frag_acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
using detail::load_shared;

__global__ void __launch_bounds__(tc_threads, 2) mla_prefill_tc_kernel(tc_params p) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char prefill_tc_shared[];
  bf16* sq = reinterpret_cast<bf16*>(prefill_tc_shared);
  bf16* sk = reinterpret_cast<bf16*>(prefill_tc_shared + tc_q_bytes);
  bf16* sv = reinterpret_cast<bf16*>(prefill_tc_shared + tc_q_bytes + tc_k_bytes);
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  unsigned char* scratch =
      prefill_tc_shared + tc_q_bytes + tc_k_bytes + tc_v_bytes + warp * tc_warp_bytes;
  float* ss = reinterpret_cast<float*>(scratch);                            // (16, 72)
  bf16* sp = reinterpret_cast<bf16*>(scratch + tc_s_bytes);                 // (16, 72)
  float* sf = reinterpret_cast<float*>(scratch + tc_s_bytes + tc_p_bytes);  // (16, 16)

  // The heaviest query tiles (last in their sequence) are handed out first, all sequences and
  // heads of one rank together, so the short causal tiles fill the tail of the grid.
  const int64_t block =
      int64_t{blockIdx.y} * gridDim.x + blockIdx.x;  // any bijection of the grid works
  const int64_t per_rank = int64_t{p.num_seqs} * p.num_heads;
  const int tile0 = p.q_tiles - 1 - static_cast<int>(block / per_rank);
  const int64_t seq = block % per_rank / p.num_heads;
  const int h = static_cast<int>(block % p.num_heads);
  const int64_t q_begin = p.cu_q[seq], q_end = p.cu_q[seq + 1];
  const int64_t k_begin = p.cu_k[seq], k_end = p.cu_k[seq + 1];
  if (q_begin < 0 || q_end < q_begin || q_end > p.num_q_tokens || k_begin < 0 ||
      k_end < k_begin || k_end > p.num_k_tokens || k_end - k_begin < q_end - q_begin)
    return;
  const int64_t num_q = q_end - q_begin, num_k = k_end - k_begin;
  const int64_t prefix = num_k - num_q;
  const int qk_frags = p.qk_pad / 16, v_frags = p.v_pad / 16;
  // Lane pair (2r, 2r + 1) owns scratch row r: columns 4 * half + 8 i + j (i < 8, j < 4).
  const int row = lane / 2, half = lane % 2;

  for (int64_t q0 = int64_t{tile0} * tc_tile_q; q0 < num_q; q0 += int64_t{p.q_tiles} * tc_tile_q) {
    const int rows_q = static_cast<int>(min(int64_t{tc_tile_q}, num_q - q0));
    const int64_t keys_visible = prefix + q0 + rows_q;  // keys [0, keys_visible) matter
    const int rows_w = max(0, min(16, rows_q - 16 * warp));
    const int64_t keys_visible_w = prefix + q0 + 16 * warp + rows_w;  // this warp's rows
    // The last key this lane's row sees, or -1 for a padding row (everything masked).
    const int64_t last_key = row < rows_w ? prefix + q0 + 16 * warp + row : -1;
    const int num_tiles = static_cast<int>((keys_visible + tc_tile_k - 1) / tc_tile_k);

    __syncthreads();  // the previous query tile's readers of sq, sk, sv are done
    const int64_t q_row0 = q_begin + q0;
    tc_load_tile(sq, tc_ld_qk, rows_q, p.qk_dim, p.qk_pad, p.vec16, [&](int r, int c) {
      return p.q + (q_row0 + r) * p.q_token_stride + int64_t{h} * p.q_head_stride + c;
    });
    const auto load_k = [&](int64_t k0) {
      const int live = static_cast<int>(min(int64_t{tc_tile_k}, keys_visible - k0));
      tc_load_tile(sk, tc_ld_qk, live, p.qk_dim, p.qk_pad, p.vec16, [&](int r, int c) {
        const int64_t t = k_begin + k0 + r;
        return c < p.nope_dim
                   ? p.k_nope + t * p.k_nope_token_stride + int64_t{h} * p.k_nope_head_stride + c
                   : p.k_pe + t * p.k_pe_token_stride + (c - p.nope_dim);
      });
    };
    load_k(0);
    __pipeline_commit();

    frag_acc o[tc_v_frags];
#pragma unroll
    for (int n = 0; n < tc_v_frags; ++n) wmma::fill_fragment(o[n], 0.0f);
    frag_a qf[tc_qk_frags];
    float run_max = -INFINITY, run_sum = 0.0f;

    for (int t = 0; t < num_tiles; ++t) {
      const int64_t k0 = int64_t{t} * tc_tile_k;
      const int live = static_cast<int>(min(int64_t{tc_tile_k}, keys_visible - k0));
      tc_load_tile(sv, tc_ld_v, live, p.v_dim, p.v_pad, p.vec16, [&](int r, int c) {
        return p.v + (k_begin + k0 + r) * p.v_token_stride + int64_t{h} * p.v_head_stride + c;
      });
      __pipeline_commit();
      __pipeline_wait_prior(1);  // Q and K_t are here; V_t may still fly
      __syncthreads();

      // 16-key column blocks holding a key some row of this warp sees (0 for a padding warp).
      const int key_frags =
          static_cast<int>(max(int64_t{0}, min(int64_t{tc_k_frags}, (keys_visible_w - k0 + 15) / 16)));
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < tc_qk_frags; ++kk)
          if (kk < qk_frags) load_shared(qf[kk], sq + 16 * warp * tc_ld_qk + 16 * kk, tc_ld_qk);
      }
      if (key_frags > 0) {
        frag_acc s[tc_k_frags];
#pragma unroll
        for (int n = 0; n < tc_k_frags; ++n) wmma::fill_fragment(s[n], 0.0f);
#pragma unroll
        for (int kk = 0; kk < tc_qk_frags; ++kk) {
          if (kk >= qk_frags) break;
#pragma unroll
          for (int n = 0; n < tc_k_frags; ++n) {
            if (n < key_frags) {
              frag_k b;
              load_shared(b, sk + 16 * n * tc_ld_qk + 16 * kk, tc_ld_qk);
              wmma::mma_sync(s[n], qf[kk], b, s[n]);
            }
          }
        }
#pragma unroll
        for (int n = 0; n < tc_k_frags; ++n)
          if (n < key_frags) wmma::store_matrix_sync(ss + 16 * n, s[n], tc_ld_s, wmma::mem_row_major);
      }
      __syncthreads();  // every warp is done with K_t
      const bool more = t + 1 < num_tiles;
      if (more) {
        load_k(k0 + tc_tile_k);
        __pipeline_commit();
      }

      if (key_frags > 0) {
        __syncwarp();  // S from every lane's fragment elements
        float sv_row[32];
        float tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int c = 4 * half + 8 * i;
          const float4 x = *reinterpret_cast<const float4*>(ss + row * tc_ld_s + c);
          const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            // Column blocks past key_frags hold stale scratch: every row masks them.
            const float s = k0 + c + j <= last_key ? xs[j] * p.scale_log2 : -INFINITY;
            sv_row[4 * i + j] = s;
            tile_max = fmaxf(tile_max, s);
          }
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        const float new_max = fmaxf(run_max, tile_max);
        // A row that has seen no key yet (or a padding row) adds nothing.
        const float factor = new_max == -INFINITY ? 1.0f : exp2f(run_max - new_max);
        float tile_sum = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int c = 4 * half + 8 * i;
          float prob[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            prob[j] = new_max == -INFINITY ? 0.0f : exp2f(sv_row[4 * i + j] - new_max);
            tile_sum += prob[j];
          }
          __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(sp + row * tc_ld_s + c);
          dst[0] = __nv_bfloat162(__float2bfloat16_rn(prob[0]), __float2bfloat16_rn(prob[1]));
          dst[1] = __nv_bfloat162(__float2bfloat16_rn(prob[2]), __float2bfloat16_rn(prob[3]));
        }
        // The sum is of the unrounded probabilities: out = sum_j p_j (1 + d_j) v_j / sum_j p_j
        // is then off by at most 2^-8 max|v| (mla_prefill.hpp).
        run_sum = run_sum * factor + tile_sum + __shfl_xor_sync(0xffffffff, tile_sum, 1);
        run_max = new_max;
#pragma unroll
        for (int j = 0; j < 8; ++j) sf[row * 16 + 8 * half + j] = factor;
        __syncwarp();  // P and the factors from every lane
        frag_acc f;
        wmma::load_matrix_sync(f, sf, 16, wmma::mem_row_major);
#pragma unroll
        for (int n = 0; n < tc_v_frags; ++n)
#pragma unroll
          for (int e = 0; e < f.num_elements; ++e) o[n].x[e] *= f.x[e];
      }

      __pipeline_wait_prior(more ? 1 : 0);  // V_t is here; K_{t+1} may still fly
      __syncthreads();
      if (key_frags > 0) {
#pragma unroll
        for (int kk = 0; kk < tc_k_frags; ++kk) {
          if (kk >= key_frags) break;
          frag_a pa;
          load_shared(pa, sp + 16 * kk, tc_ld_s);
#pragma unroll
          for (int n = 0; n < tc_v_frags; ++n) {
            if (n < v_frags) {
              frag_v b;
              load_shared(b, sv + 16 * kk * tc_ld_v + 16 * n, tc_ld_v);
              wmma::mma_sync(o[n], pa, b, o[n]);
            }
          }
        }
      }
      __syncthreads();  // every warp is done with V_t (and with P before the next softmax)
    }

    // The even lane of a row's pair writes it: the pair's sums may differ in the last bit (each
    // adds its own tile sum first).
    if (p.lse != nullptr && half == 0 && row < rows_w)
      p.lse[(q_row0 + 16 * warp + row) * p.num_heads + h] = natural_lse(run_max, run_sum);
    // out = O / sum, through the warp's scratch 64 columns at a time.
    const float inv = run_sum > 0.0f ? 1.0f / run_sum : 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) sf[row * 16 + 8 * half + j] = inv;
    __syncwarp();
    frag_acc f;
    wmma::load_matrix_sync(f, sf, 16, wmma::mem_row_major);
    bf16* out_rows = p.out + ((q_row0 + 16 * warp) * p.num_heads + h) * int64_t{p.v_dim};
    const int64_t out_row_stride = int64_t{p.num_heads} * p.v_dim;
#pragma unroll
    for (int c0 = 0; c0 < tc_max_v; c0 += tc_tile_k) {
      if (c0 >= p.v_pad) break;
#pragma unroll
      for (int n = 0; n < tc_k_frags; ++n) {
        if (c0 + 16 * n < p.v_pad) {
          frag_acc scaled = o[c0 / 16 + n];
#pragma unroll
          for (int e = 0; e < scaled.num_elements; ++e) scaled.x[e] *= f.x[e];
          wmma::store_matrix_sync(ss + 16 * n, scaled, tc_ld_s, wmma::mem_row_major);
        }
      }
      __syncwarp();  // the tile from every lane's elements
      for (int r = 0; r < rows_w; ++r)
        for (int c = lane; c < tc_tile_k; c += 32)
          if (c0 + c < p.v_dim) store(out_rows + r * out_row_stride, c0 + c, ss[r * tc_ld_s + c]);
      __syncwarp();  // read before the next columns overwrite the scratch
    }
  }
}

// Query tiles per sequence for the grid; can_run bounds the grid with the SIMT kernel's 16-query
// tiles, which is never fewer blocks than the tensor-core kernel's 64.
int64_t q_tiles_of(const mla_prefill_args& a, int64_t tile_q = prefill_tile_q) noexcept {
  const int64_t longest = a.max_seqlen_q > 0 ? a.max_seqlen_q : a.num_q_tokens;
  return std::max<int64_t>(1, (longest + tile_q - 1) / tile_q);
}

// bf16 rows the tensor-core kernel stages: dn + dr <= 192 and dv <= 128 (DeepSeek-V2/V3).
bool tensor_core_shape(const mla_prefill_args& a) noexcept {
  return a.dt == dtype::bf16 && a.nope_dim + a.rope_dim <= tc_max_qk && a.v_dim <= tc_max_v;
}

kernel_status launch_tensor_cores(const mla_prefill_args& a, cudaStream_t stream) {
  tc_params p{};
  const int64_t h = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  detail::set_qkv_views<bf16>(p, a);
  p.out = static_cast<bf16*>(a.out);
  p.lse = a.lse;
  p.cu_q = a.cu_seqlens_q;
  p.cu_k = a.cu_seqlens_k != nullptr ? a.cu_seqlens_k : a.cu_seqlens_q;
  p.num_q_tokens = a.num_q_tokens;
  p.num_k_tokens = a.cu_seqlens_k != nullptr ? a.num_k_tokens : a.num_q_tokens;
  p.num_seqs = static_cast<int>(a.num_seqs);
  p.num_heads = static_cast<int>(h);
  p.nope_dim = static_cast<int>(dn);
  p.qk_dim = static_cast<int>(dn + dr);
  p.v_dim = static_cast<int>(dv);
  p.qk_pad = static_cast<int>((dn + dr + 15) / 16 * 16);
  p.v_pad = static_cast<int>((dv + 15) / 16 * 16);
  p.q_tiles = static_cast<int>(q_tiles_of(a, tc_tile_q));
  p.scale_log2 = a.softmax_scale * log2e;
  // 16-byte copies need every row start 16-byte aligned (pointers, and strides of 8 elements)
  // and the nope/rope/value widths in whole 8-element chunks; the model's packed buffers are.
  p.vec16 = dn % 8 == 0 && dr % 8 == 0 && dv % 8 == 0 && detail::aligned16(p.q) &&
            detail::aligned16(p.v) && (dn == 0 || detail::aligned16(p.k_nope)) &&
            (dr == 0 || detail::aligned16(p.k_pe));
  for (int64_t stride : {p.q_token_stride, p.q_head_stride, p.k_nope_token_stride,
                         p.k_nope_head_stride, p.k_pe_token_stride, p.v_token_stride,
                         p.v_head_stride})
    p.vec16 = p.vec16 && stride % 8 == 0;
  // Two blocks an SM need 2 x 99 KiB of the 228: ask for the largest shared carveout (the
  // kernel's copies bypass L1, so little is lost there).
  if (cudaFuncSetAttribute(mla_prefill_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(tc_shared_bytes)) != cudaSuccess ||
      cudaFuncSetAttribute(mla_prefill_tc_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           static_cast<int>(cudaSharedmemCarveoutMaxShared)) != cudaSuccess)
    return kernel_status::launch_failed;
  const dim3 grid(static_cast<unsigned>(a.num_seqs * p.q_tiles), static_cast<unsigned>(h));
  mla_prefill_tc_kernel<<<grid, tc_threads, tc_shared_bytes, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <typename T>
kernel_status launch(const mla_prefill_args& a, cudaStream_t stream) {
  prefill_params<T> p{};
  const int64_t h = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  detail::set_qkv_views<T>(p, a);
  p.out = static_cast<T*>(a.out);
  p.lse = a.lse;
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
    case dtype::bf16:
      return tensor_core_shape(a) ? launch_tensor_cores(a, stream) : launch<bf16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
