#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/mla_decode.hpp"
#include "kernels/cuda/wmma_shared.cuh"

namespace moe::kernels::cuda {
namespace {

using detail::aligned16;
using detail::load;
using detail::store;

// ---------------------------------------------------------------------------------------------
// mla_cache_append

constexpr int append_threads = 256;
constexpr int append_tokens_per_block = append_threads / 32;  // one warp per token

// A plain element copy: append is a scatter of a few KiB per token, bound by the row count, not
// by the copy's width. Each lane loads copy_in_flight elements before it stores them: one at a
// time, each load waited behind the store before it (the pool may alias the sources as far as
// the compiler knows), which took ~8 us a launch for one 576-wide bf16 entry on an H200.
constexpr int copy_in_flight = 8;

// dst[i] = src[i] for i < n, by the 32 lanes of a warp.
template <typename T>
__device__ void warp_copy(T* dst, const T* src, int n, int lane) {
  for (int base = 0; base < n; base += 32 * copy_in_flight) {
    T v[copy_in_flight];
#pragma unroll
    for (int u = 0; u < copy_in_flight; ++u) {
      const int i = base + u * 32 + lane;
      if (i < n) v[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < copy_in_flight; ++u) {
      const int i = base + u * 32 + lane;
      if (i < n) dst[i] = v[u];
    }
  }
}

// The latent normed on the way in: a warp's sum of squares (lanes, then a butterfly), then
// rmsnorm's out = weight * (v * rsqrt(mean + eps)), rounded once to T, into the entry (when it
// has one) and into latent_out.
template <typename T>
__device__ void warp_norm_latent(T* entry, T* latent_out, const T* latent, const float* weight,
                                 float eps, int n, int lane) {
  float sum_sq = 0.0f;
  for (int base = 0; base < n; base += 32 * copy_in_flight) {
    float v[copy_in_flight];
#pragma unroll
    for (int u = 0; u < copy_in_flight; ++u) {
      const int i = base + u * 32 + lane;
      v[u] = i < n ? load(latent, i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < copy_in_flight; ++u) sum_sq += v[u] * v[u];
  }
  for (int offset = 16; offset > 0; offset /= 2)
    sum_sq += __shfl_xor_sync(0xffffffff, sum_sq, offset);
  const float inv = rsqrtf(sum_sq / static_cast<float>(n) + eps);
  for (int i = lane; i < n; i += 32) {
    const float y = weight[i] * (load(latent, i) * inv);
    if (entry != nullptr) store(entry, i, y);
    store(latent_out, i, y);
  }
}

template <typename T>
__global__ void mla_cache_append_kernel(T* pool, const T* latent, int64_t latent_stride,
                                        const T* k_pe, int64_t k_pe_stride,
                                        const int64_t* slot_mapping, int64_t num_tokens,
                                        int64_t num_slots, int latent_dim, int rope_dim,
                                        const float* norm_weight, float eps, T* latent_out) {
  const int64_t t = int64_t{blockIdx.x} * append_tokens_per_block + threadIdx.x / 32;
  if (t >= num_tokens) return;
  const int64_t slot = slot_mapping[t];
  // padding, or outside the caller's guarantee: no entry (a normed latent is still written out)
  const bool has_entry = slot >= 0 && slot < num_slots;
  T* entry = has_entry ? pool + slot * (latent_dim + rope_dim) : nullptr;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (norm_weight != nullptr)
    warp_norm_latent(entry, latent_out + t * latent_dim, latent + t * latent_stride, norm_weight,
                     eps, latent_dim, lane);
  if (!has_entry) return;
  if (norm_weight == nullptr) warp_copy(entry, latent + t * latent_stride, latent_dim, lane);
  warp_copy(entry + latent_dim, k_pe + t * k_pe_stride, rope_dim, lane);
}

template <typename T>
kernel_status launch_append(const mla_cache_append_args& a, cudaStream_t stream) {
  const auto r = static_cast<int64_t>(a.layout.latent_dim);
  const auto dr = static_cast<int64_t>(a.layout.rope_dim);
  const auto blocks = (a.num_tokens + append_tokens_per_block - 1) / append_tokens_per_block;
  mla_cache_append_kernel<T><<<static_cast<unsigned>(blocks), append_threads, 0, stream>>>(
      static_cast<T*>(a.pool), static_cast<const T*>(a.latent),
      a.latent_stride == 0 ? r : a.latent_stride, static_cast<const T*>(a.k_pe),
      a.k_pe_stride == 0 ? dr : a.k_pe_stride, a.slot_mapping, a.num_tokens,
      static_cast<int64_t>(a.layout.num_blocks * a.layout.block_size), static_cast<int>(r),
      static_cast<int>(dr), a.latent_norm, a.latent_norm_eps, static_cast<T*>(a.latent_out));
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

// The layout both entry points share: every size positive (dr may be 0), within the CPU's
// limits, and the pool's elements countable in int64.
bool layout_ok(const cpu::mla_cache_layout& l) noexcept {
  if (l.num_blocks == 0 || l.block_size == 0 || l.latent_dim == 0) return false;
  if (l.latent_dim > cpu::mla_max_dim || l.rope_dim > cpu::mla_max_dim) return false;
  const size_t entry = l.latent_dim + l.rope_dim;
  constexpr size_t max_elements = size_t{INT64_MAX} / 4;
  if (l.num_blocks > max_elements / l.block_size) return false;
  return l.num_blocks * l.block_size <= max_elements / entry;
}

// ---------------------------------------------------------------------------------------------
// mla_decode
//
// Block: 256 threads (8 warps) for one (sequence b, split, head group of up to 16 heads). Per
// 32-token tile:
//  1. each warp stages 4 of the tile's entries into shared memory as float32, rows padded to a
//     multiple of 4 floats (zeros for a token past the split or with a bad block id, which is
//     also flagged invalid);
//  2. scores: warp w owns the group's heads 2w and 2w+1, their queries spread over its lanes in
//     registers (lane l holds the float4s at columns 4l, 4l + 128, ...): a dot product per
//     token is a lane-parallel pass over the entry and a warp sum; lane j keeps token j's
//     score. Then the warp's online softmax step for the tile: new max, rescale factor,
//     probabilities p (to shared memory, (token, head));
//  3. values: thread t owns heads 4(t/64)..+3 and the latent columns 4(t%64) + 256i + 0..3
//     (i < 2): rescales its accumulators and adds p . c over the tile.
// Each staged entry is read from memory once and from shared memory by every warp; the tile is
// reused by 16 heads, which is what makes decode cheaper than a per-head kernel. Shared memory
// is read as float4 throughout: a warp reads 512 contiguous bytes (no bank conflict) with a
// quarter of the instructions, which matters because the kernel runs on CUDA cores: at 16
// heads each staged byte costs ~15 FMAs, so instruction issue, not memory, is the bound on
// H200 (about half the copy bandwidth at best; bench/gpu_kernels_bench.cpp measures it).
// This kernel serves f32 storage and the shapes the tensor-core kernel below does not take.

constexpr int decode_threads = 256;
constexpr int decode_warps = decode_threads / 32;
constexpr int decode_tile = 32;  // tokens per tile: one per lane in the softmax step
constexpr int decode_group_heads = 16;
constexpr int decode_heads_per_warp = decode_group_heads / decode_warps;  // 2
constexpr int decode_value_heads = 4;  // heads per thread in the value step (one float4)
constexpr int decode_col_threads = decode_threads / (decode_group_heads / decode_value_heads);  // 64
constexpr int decode_col_vecs =  // float4 column groups per thread: 2
    static_cast<int>(mla_decode_max_latent_dim) / (4 * decode_col_threads);
constexpr int decode_chunks = static_cast<int>(mla_decode_max_entry_dim + 127) / 128;  // 5 float4s
constexpr int64_t decode_target_blocks = 264;  // 2 per SM on H100/H200 (132 SMs)
constexpr float log2e = 1.4426950408889634f;

static_assert(decode_tile == 32, "the softmax step gives each lane one token");
static_assert(decode_heads_per_warp * decode_warps == decode_group_heads);
static_assert(decode_col_threads * 4 * decode_col_vecs == mla_decode_max_latent_dim);

template <typename T>
struct decode_params {
  const T* pool;
  int64_t num_blocks;
  int64_t block_size;
  int latent_dim;  // R
  int entry_dim;   // R + dr
  int row_floats;  // entry_dim rounded up to a multiple of 4: a staged row
  const T* q_latent;
  const T* q_pe;
  int64_t q_pe_token_stride;
  int64_t q_pe_head_stride;
  const int32_t* block_table;
  int64_t max_blocks_per_seq;
  const int32_t* seq_lens;
  T* out;             // with one split
  float* part_out;    // (B, splits, H, R): unnormalised sums, with more than one split
  float* part_max;    // (B, splits, H): running max of log2-scaled scores
  float* part_sum;    // (B, splits, H): sum of exp2(score - max)
  int num_heads;
  int num_groups;
  int num_splits;
  int64_t split_len;
  float scale_log2;   // softmax_scale * log2(e): the kernel works in exp2
  bool vector_loads;  // entries are 16-byte aligned and a whole number of 16-byte vectors
  bool q_vector;      // q_latent and q_pe rows are 16-byte aligned whole 16-byte vectors
};

// Shared memory of one decode block, in floats (every part a multiple of 4: float4-aligned).
constexpr size_t decode_shared_floats(int row_floats) {
  return size_t{decode_tile} * row_floats    // the staged tile
         + decode_tile * decode_group_heads  // probabilities, (token, head)
         + 3 * decode_group_heads            // rescale factors, final max, final sum
         + decode_tile;                      // validity flags (0/1)
}

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

// 16 bytes of storage widened to float32 into shared memory.
__device__ inline void widen16(const float* src, float* dst) {
  *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
}
__device__ inline void widen16(const __nv_bfloat16* src, float* dst) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
  const float2 f0 = __bfloat1622float2(pairs[0]), f1 = __bfloat1622float2(pairs[1]);
  const float2 f2 = __bfloat1622float2(pairs[2]), f3 = __bfloat1622float2(pairs[3]);
  reinterpret_cast<float4*>(dst)[0] = make_float4(f0.x, f0.y, f1.x, f1.y);
  reinterpret_cast<float4*>(dst)[1] = make_float4(f2.x, f2.y, f3.x, f3.y);
}

__device__ inline float dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// What one block of the decode grid computes: sequence b's tokens [begin, end) (its split) for
// the heads [head0, head0 + group_heads) (its head group); part_row indexes the split's partial
// results of head0. Head groups vary fastest, so the blocks reading the same tokens run together
// and share L2.
struct decode_block {
  int64_t b = 0, begin = 0, end = 0, part_row = 0;
  int head0 = 0, group_heads = 0;
};

template <typename T>
__device__ inline decode_block locate_block(const decode_params<T>& p, int heads_per_group) {
  const int64_t linear = blockIdx.x;
  const int group = static_cast<int>(linear % p.num_groups);
  const int split = static_cast<int>(linear / p.num_groups % p.num_splits);
  decode_block k;
  k.b = linear / p.num_groups / p.num_splits;
  k.head0 = group * heads_per_group;
  k.group_heads = min(heads_per_group, p.num_heads - k.head0);
  const int64_t capacity = p.max_blocks_per_seq * p.block_size;
  const int64_t seq_len = min(max(int64_t{p.seq_lens[k.b]}, int64_t{0}), capacity);
  k.begin = split * p.split_len;
  k.end = split == p.num_splits - 1 ? seq_len : min(seq_len, k.begin + p.split_len);
  k.part_row = (k.b * p.num_splits + split) * p.num_heads + k.head0;
  return k;
}

// A block with nothing cached in its split: zeros when there is one split, or an empty partial
// the combine skips. Every thread of the block calls it.
template <typename T>
__device__ inline void finish_empty(const decode_params<T>& p, const decode_block& k, int threads) {
  const int r = p.latent_dim, tid = static_cast<int>(threadIdx.x);
  if (p.num_splits == 1) {
    for (int i = tid; i < k.group_heads * r; i += threads)
      store(p.out, (k.b * p.num_heads + k.head0) * r + i, 0.0f);
  } else if (tid < k.group_heads) {
    p.part_max[k.part_row + tid] = -INFINITY;
    p.part_sum[k.part_row + tid] = 0.0f;
  }
}

// Two blocks per SM (<= 128 registers a thread): one block's staging overlaps the other's math.
template <typename T>
__global__ void __launch_bounds__(decode_threads, 2) mla_decode_kernel(decode_params<T> p) {
  extern __shared__ float4 decode_shared[];
  const int r = p.latent_dim, e = p.entry_dim, row_floats = p.row_floats;
  float* tile = reinterpret_cast<float*>(decode_shared);       // (decode_tile, row_floats)
  float* probs = tile + decode_tile * row_floats;              // (decode_tile, 16)
  float* rescale = probs + decode_tile * decode_group_heads;   // (16)
  float* final_max = rescale + decode_group_heads;             // (16)
  float* final_sum = final_max + decode_group_heads;           // (16)
  float* valid = final_sum + decode_group_heads;               // (decode_tile)

  const decode_block blk = locate_block(p, decode_group_heads);
  const int64_t b = blk.b, begin = blk.begin, end = blk.end, part_row = blk.part_row;
  const int head0 = blk.head0, group_heads = blk.group_heads;
  if (begin >= end) return finish_empty(p, blk, decode_threads);

  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int warp_head0 = warp * decode_heads_per_warp;  // within the group
  const bool warp_has_heads = warp_head0 < group_heads;

  // The warp's queries, pre-scaled so that a dot product is already a log2-domain score; zero
  // past the entry, where the staged rows are zero-padded too.
  float4 q[decode_heads_per_warp][decode_chunks];
#pragma unroll
  for (int a = 0; a < decode_heads_per_warp; ++a) {
    const int h = head0 + warp_head0 + a;
    const bool present = warp_head0 + a < group_heads;
    const T* ql = p.q_latent + (b * p.num_heads + h) * r;
    const T* qp = p.q_pe + b * p.q_pe_token_stride + h * p.q_pe_head_stride;
#pragma unroll
    for (int i = 0; i < decode_chunks; ++i) {
      float v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int k = 4 * (lane + 32 * i) + c;
        v[c] = 0.0f;
        if (present && k < e) v[c] = (k < r ? load(ql, k) : load(qp, k - r)) * p.scale_log2;
      }
      q[a][i] = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
  float run_max[decode_heads_per_warp], run_sum[decode_heads_per_warp];
#pragma unroll
  for (int a = 0; a < decode_heads_per_warp; ++a) {
    run_max[a] = -INFINITY;
    run_sum[a] = 0.0f;
  }

  const int value_head0 = static_cast<int>(threadIdx.x / decode_col_threads) * decode_value_heads;
  const int col0 = 4 * static_cast<int>(threadIdx.x % decode_col_threads);
  float4 acc[decode_value_heads][decode_col_vecs];
#pragma unroll
  for (int a = 0; a < decode_value_heads; ++a)
#pragma unroll
    for (int i = 0; i < decode_col_vecs; ++i) acc[a][i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

  const int32_t* table_row = p.block_table + b * p.max_blocks_per_seq;
  const int vec = 16 / static_cast<int>(sizeof(T));
  for (int64_t tile_begin = begin; tile_begin < end; tile_begin += decode_tile) {
    // 1. Stage the tile. The barrier at the end of the previous tile freed the buffer.
    for (int row = warp; row < decode_tile; row += decode_warps) {
      const int64_t token = tile_begin + row;
      const T* entry = nullptr;
      if (token < end) {
        const int32_t id = table_row[token / p.block_size];
        if (id >= 0 && id < p.num_blocks)
          entry = p.pool + (int64_t{id} * p.block_size + token % p.block_size) * e;
      }
      float* dst = tile + row * row_floats;
      if (entry == nullptr) {
        for (int k = lane; k < row_floats; k += 32) dst[k] = 0.0f;  // p = 0 must not meet NaN
      } else if (p.vector_loads) {  // row_floats == e here
        for (int k = lane * vec; k < e; k += 32 * vec) widen16(entry + k, dst + k);
      } else {
        for (int k = lane; k < row_floats; k += 32) dst[k] = k < e ? load(entry, k) : 0.0f;
      }
      if (lane == 0) valid[row] = entry != nullptr ? 1.0f : 0.0f;
    }
    __syncthreads();

    // 2. Scores and the online softmax step of the warp's two heads.
    float score[decode_heads_per_warp];
#pragma unroll
    for (int a = 0; a < decode_heads_per_warp; ++a) score[a] = 0.0f;
    if (warp_has_heads) {  // warp-uniform: the shuffles below see all 32 lanes
      for (int j = 0; j < decode_tile; ++j) {
        const float4* c = reinterpret_cast<const float4*>(tile + j * row_floats);
        float dot[decode_heads_per_warp] = {};
#pragma unroll
        for (int i = 0; i < decode_chunks; ++i) {
          if (4 * (lane + 32 * i) < row_floats) {
            const float4 x = c[lane + 32 * i];
#pragma unroll
            for (int a = 0; a < decode_heads_per_warp; ++a) dot[a] = dot4(q[a][i], x, dot[a]);
          }
        }
#pragma unroll
        for (int a = 0; a < decode_heads_per_warp; ++a) {
          const float s = warp_sum(dot[a]);
          if (lane == j) score[a] = s;
        }
      }
    }
    const bool token_valid = valid[lane] != 0.0f;
#pragma unroll
    for (int a = 0; a < decode_heads_per_warp; ++a) {
      const int h = warp_head0 + a;
      const float s = (h < group_heads && token_valid) ? score[a] : -INFINITY;
      const float new_max = fmaxf(run_max[a], warp_max(s));
      // Nothing seen yet: keep the (zero) accumulators as they are and add nothing.
      const float factor = new_max == -INFINITY ? 1.0f : exp2f(run_max[a] - new_max);
      const float prob = new_max == -INFINITY ? 0.0f : exp2f(s - new_max);
      run_sum[a] = run_sum[a] * factor + warp_sum(prob);
      run_max[a] = new_max;
      probs[lane * decode_group_heads + h] = prob;
      if (lane == 0) rescale[h] = factor;
    }
    __syncthreads();

    // 3. Values: the latents themselves.
    const float4 f = *reinterpret_cast<const float4*>(rescale + value_head0);
    const float factors[decode_value_heads] = {f.x, f.y, f.z, f.w};
#pragma unroll
    for (int a = 0; a < decode_value_heads; ++a)
#pragma unroll
      for (int i = 0; i < decode_col_vecs; ++i) {
        acc[a][i].x *= factors[a];
        acc[a][i].y *= factors[a];
        acc[a][i].z *= factors[a];
        acc[a][i].w *= factors[a];
      }
    for (int j = 0; j < decode_tile; ++j) {
      const float4 pv = *reinterpret_cast<const float4*>(probs + j * decode_group_heads + value_head0);
      const float pj[decode_value_heads] = {pv.x, pv.y, pv.z, pv.w};
      const float* c = tile + j * row_floats;
#pragma unroll
      for (int i = 0; i < decode_col_vecs; ++i) {
        const int col = col0 + 4 * decode_col_threads * i;
        // A float4 that starts below R may reach into k_pe or the zero padding: those sums are
        // never stored.
        if (col < r) {
          const float4 x = *reinterpret_cast<const float4*>(c + col);
#pragma unroll
          for (int a = 0; a < decode_value_heads; ++a) {
            acc[a][i].x = fmaf(pj[a], x.x, acc[a][i].x);
            acc[a][i].y = fmaf(pj[a], x.y, acc[a][i].y);
            acc[a][i].z = fmaf(pj[a], x.z, acc[a][i].z);
            acc[a][i].w = fmaf(pj[a], x.w, acc[a][i].w);
          }
        }
      }
    }
    __syncthreads();
  }

  // The warps own the softmax state, the value threads the sums: meet in shared memory.
  if (lane == 0) {
#pragma unroll
    for (int a = 0; a < decode_heads_per_warp; ++a) {
      final_max[warp_head0 + a] = run_max[a];
      final_sum[warp_head0 + a] = run_sum[a];
    }
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < decode_value_heads; ++a) {
    const int h = value_head0 + a;
    if (h >= group_heads) continue;
    const float sum = final_sum[h];
#pragma unroll
    for (int i = 0; i < decode_col_vecs; ++i) {
      const float sums[4] = {acc[a][i].x, acc[a][i].y, acc[a][i].z, acc[a][i].w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = col0 + 4 * decode_col_threads * i + c;
        if (col >= r) continue;
        if (p.num_splits == 1) {
          store(p.out, (b * p.num_heads + head0 + h) * r + col, sum > 0.0f ? sums[c] / sum : 0.0f);
        } else {
          p.part_out[(part_row + h) * r + col] = sums[c];
        }
      }
    }
  }
  if (p.num_splits > 1 && threadIdx.x < group_heads) {
    p.part_max[part_row + threadIdx.x] = final_max[threadIdx.x];
    p.part_sum[part_row + threadIdx.x] = final_sum[threadIdx.x];
  }
}

// ---------------------------------------------------------------------------------------------
// mla_decode on tensor cores (bf16 storage; R a multiple of 128, R + dr a multiple of 16)
//
// Same block decomposition and the same partial results as mla_decode_kernel, so the plan, the
// workspace and the combine kernel are shared. Block: 256 threads (8 warps) for one (sequence b,
// split, group of up to 16 heads); the group's queries sit in shared memory as bf16 (16 x E, the
// rows of absent heads zero). Tiles of 32 tokens x E are copied from the pool with cp.async,
// double buffered: the next tile is in flight while this one is used. Per tile:
//  1. scores S (16 x 32) = Q (16 x E) . K^T on tensor cores (WMMA bf16, float32 accumulators):
//     warp w does the 16 tokens (w % 2) over a quarter (w / 2) of E; the four partial sums meet
//     in shared memory (float32);
//  2. the online softmax step in float32: 16 threads per head, 2 tokens each (exp2 of the
//     log2(e)-scaled scores, invalid tokens -inf, so p = 0). P goes to shared memory split in
//     two bf16 terms, hi = bf16(p) and lo = bf16(p - hi), so that hi + lo carries p to ~2^-17:
//     the product P . V then keeps float32-class accuracy (a single bf16 P would move outputs by
//     up to 2^-9 of the weights, past the tests' bf16 bound where outputs cancel);
//  3. O (16 x R) = diag(factor) O + P_hi . V + P_lo . V on tensor cores: warp w owns R / 128
//     16-column tiles of O as float32 accumulators in registers. The per-head factor is applied
//     through a 16 x 16 accumulator fragment loaded from a (head, 16) matrix of factors, so no
//     fragment layout is assumed.
// Four barriers per tile. The accumulators go through shared memory once at the end.

constexpr int tc_threads = 256;
constexpr int tc_warps = tc_threads / 32;
constexpr int tc_tile = 32;  // tokens per tile; split_len is a multiple of it
constexpr int tc_heads = 16;
constexpr int tc_score_ntiles = tc_tile / 16;              // 2 token tiles of the scores
constexpr int tc_score_kparts = tc_warps / tc_score_ntiles;  // 4 parts of E
constexpr int tc_max_row = static_cast<int>(mla_decode_max_entry_dim) + 8;  // padded: no bank conflicts
constexpr int tc_p_ld = tc_tile + 8;  // bf16 elements per row of P
constexpr int tc_max_ntiles_per_warp = static_cast<int>(mla_decode_max_latent_dim) / (16 * tc_warps);  // 4

constexpr size_t tc_align(size_t n) { return (n + 127) / 128 * 128; }
// Byte offsets of the shared memory regions (sized for the widest entry).
constexpr size_t tc_kv_stage_bytes = tc_align(size_t{tc_tile} * tc_max_row * 2);
constexpr size_t tc_kv_off = 0;                                              // 2 stages
constexpr size_t tc_q_off = tc_kv_off + 2 * tc_kv_stage_bytes;               // (16, row) bf16
constexpr size_t tc_s_off = tc_q_off + tc_align(size_t{tc_heads} * tc_max_row * 2);  // (kparts, 16, tile) f32
constexpr size_t tc_p_off = tc_s_off + tc_align(size_t{tc_score_kparts} * tc_heads * tc_tile * 4);  // hi, lo
constexpr size_t tc_f_off = tc_p_off + tc_align(size_t{2} * tc_heads * tc_p_ld * 2);  // (16, 16) f32
constexpr size_t tc_valid_off = tc_f_off + tc_align(size_t{tc_heads} * 16 * 4);      // (2, tile) f32
constexpr size_t tc_final_off = tc_valid_off + tc_align(size_t{2} * tc_tile * 4);     // max, sum
constexpr size_t tc_shared_bytes = tc_final_off + tc_align(size_t{2} * tc_heads * 4);
static_assert(size_t{tc_heads} * mla_decode_max_latent_dim * 4 <= 2 * tc_kv_stage_bytes,
              "the output staging reuses the tile buffers");
static_assert(tc_shared_bytes <= 113 * 1024, "two blocks per SM");

bool tc_supported(const mla_decode_args& a) {
  const auto r = static_cast<int64_t>(a.layout.latent_dim);
  const auto e = r + static_cast<int64_t>(a.layout.rope_dim);
  return a.dt == dtype::bf16 && r % (16 * tc_warps) == 0 && e % 16 == 0 && aligned16(a.pool);
}

__global__ void __launch_bounds__(tc_threads, 2)
    mla_decode_tc_kernel(decode_params<__nv_bfloat16> p) {
  using namespace nvcuda;
  using bf16 = __nv_bfloat16;
  extern __shared__ float4 tc_shared[];
  unsigned char* base = reinterpret_cast<unsigned char*>(tc_shared);
  const int r = p.latent_dim, e = p.entry_dim, row = e + 8;
  // Stage s of the tile buffer: (tc_tile, row) bf16.
  const auto kv = [&](int s) {
    return reinterpret_cast<bf16*>(base + tc_kv_off + s * tc_kv_stage_bytes);
  };
  bf16* q_s = reinterpret_cast<bf16*>(base + tc_q_off);
  float* s_part = reinterpret_cast<float*>(base + tc_s_off);
  bf16* p_hi = reinterpret_cast<bf16*>(base + tc_p_off);
  bf16* p_lo = p_hi + tc_heads * tc_p_ld;
  float* factor_s = reinterpret_cast<float*>(base + tc_f_off);
  float* valid = reinterpret_cast<float*>(base + tc_valid_off);
  float* final_max = reinterpret_cast<float*>(base + tc_final_off);
  float* final_sum = final_max + tc_heads;

  const decode_block blk = locate_block(p, tc_heads);
  const int64_t b = blk.b, begin = blk.begin, end = blk.end, part_row = blk.part_row;
  const int head0 = blk.head0, group_heads = blk.group_heads;
  const int tid = static_cast<int>(threadIdx.x);
  if (begin >= end) return finish_empty(p, blk, tc_threads);

  const int32_t* table_row = p.block_table + b * p.max_blocks_per_seq;
  const int chunks_per_row = e / 8;  // 16-byte copies
  const int lane = tid % 32;
  // Each lane looks up the cache slot of one token of a tile: its entry's offset in the pool, or
  // -1 for a token past the split or a block id outside the pool. One load per lane, all in
  // flight together (looked up row by row, each copy waited on its table load: ~1 us a tile on
  // an H200). Token positions fit int32 (mla_decode_can_run bounds the table's capacity), so
  // the divisions are 32-bit.
  const int block_size = static_cast<int>(p.block_size);
  const auto slot_of = [&](int64_t tile_begin) -> int64_t {
    const int64_t token = tile_begin + lane;
    if (token >= end) return -1;
    const int t = static_cast<int>(token);
    const int32_t id = table_row[t / block_size];
    if (id < 0 || id >= p.num_blocks) return -1;
    return (int64_t{id} * block_size + t % block_size) * e;
  };
  // Issues the copies of a tile into stage `s`, `slot` from slot_of: zeros (and valid = 0) for a
  // token without an entry, so p = 0 never meets NaN. A warp per row, its lanes over the row's
  // 16-byte chunks.
  const auto issue = [&](int64_t slot, int s) {
#pragma unroll
    for (int i = 0; i < tc_tile / tc_warps; ++i) {
      const int j = tid / 32 + i * tc_warps;
      const int64_t at = __shfl_sync(0xffffffffu, slot, j);
      bf16* dst = kv(s) + j * row;
      for (int k = lane; k < chunks_per_row; k += 32) {
        if (at >= 0)
          __pipeline_memcpy_async(dst + 8 * k, p.pool + at + 8 * k, 16);
        else
          __pipeline_memcpy_async(dst + 8 * k, p.pool, 16, 16);  // zero fill, nothing read
      }
      if (lane == 0) valid[s * tc_tile + j] = at >= 0 ? 1.0f : 0.0f;
    }
  };
  issue(slot_of(begin), 0);

  // The group's queries, raw bf16 (the scale is applied to the float32 scores): copied with the
  // first tile (one commit group) where their rows are whole 16-byte vectors, so that every
  // load is in flight at once; element by element otherwise.
  if (p.q_vector) {
    const int q_chunks = e / 8, r_chunks = r / 8;
    for (int i = tid; i < tc_heads * q_chunks; i += tc_threads) {
      const int h = i / q_chunks, c = i % q_chunks;
      bf16* dst = q_s + h * row + 8 * c;
      if (h >= group_heads) {
        __pipeline_memcpy_async(dst, p.q_latent, 16, 16);  // zero fill
        continue;
      }
      const int hh = head0 + h;
      const bf16* src = c < r_chunks ? p.q_latent + (b * p.num_heads + hh) * r + 8 * c
                                     : p.q_pe + b * p.q_pe_token_stride + hh * p.q_pe_head_stride +
                                           8 * (c - r_chunks);
      __pipeline_memcpy_async(dst, src, 16);
    }
  } else {
    for (int i = tid; i < tc_heads * e; i += tc_threads) {
      const int h = i / e, k = i % e;
      bf16 v = __float2bfloat16_rn(0.0f);
      if (h < group_heads) {
        const int hh = head0 + h;
        v = k < r ? p.q_latent[(b * p.num_heads + hh) * r + k]
                  : p.q_pe[b * p.q_pe_token_stride + hh * p.q_pe_head_stride + (k - r)];
      }
      q_s[h * row + k] = v;
    }
  }
  __pipeline_commit();
  // The next tile's slots, looked up a tile ahead: the load is in flight over this tile's work.
  int64_t next_slot = slot_of(begin + tc_tile);

  const int warp = tid / 32;
  // Scores: this warp's token tile and part of E.
  const int score_nt = warp % tc_score_ntiles, score_kp = warp / tc_score_ntiles;
  const int ksteps = e / 16;
  const int k_first = score_kp * ksteps / tc_score_kparts;
  const int k_last = (score_kp + 1) * ksteps / tc_score_kparts;
  // Values: this warp's 16-column tiles of O.
  const int ntiles_per_warp = r / (16 * tc_warps);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[tc_max_ntiles_per_warp];
#pragma unroll
  for (int i = 0; i < tc_max_ntiles_per_warp; ++i) wmma::fill_fragment(acc[i], 0.0f);
  // Softmax: head sh, tokens 2 * sc and 2 * sc + 1; the 16 threads of a head hold its state.
  const int sh = tid / 16, sc = tid % 16;
  float run_max = -INFINITY, run_sum = 0.0f;

  int stage = 0;
  for (int64_t tile_begin = begin; tile_begin < end; tile_begin += tc_tile, stage ^= 1) {
    // The other stage was last read before the previous tile's final barrier.
    if (tile_begin + tc_tile < end) issue(next_slot, stage ^ 1);
    __pipeline_commit();
    next_slot = slot_of(tile_begin + 2 * tc_tile);
    __pipeline_wait_prior(1);
    __syncthreads();
    const bf16* tile = kv(stage);

    // 1. Scores.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc;
      wmma::fill_fragment(s_acc, 0.0f);
      detail::wmma_a_row qa;
      detail::wmma_b_col kb;
      for (int ks = k_first; ks < k_last; ++ks) {
        detail::load_shared(qa, q_s + 16 * ks, row);
        detail::load_shared(kb, tile + score_nt * 16 * row + 16 * ks, row);
        wmma::mma_sync(s_acc, qa, kb, s_acc);
      }
      wmma::store_matrix_sync(s_part + score_kp * tc_heads * tc_tile + score_nt * 16, s_acc,
                              tc_tile, wmma::mem_row_major);
    }
    __syncthreads();

    // 2. The online softmax step.
    {
      float s[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int j = 2 * sc + t;
        float v = 0.0f;
#pragma unroll
        for (int kp = 0; kp < tc_score_kparts; ++kp) v += s_part[(kp * tc_heads + sh) * tc_tile + j];
        s[t] = valid[stage * tc_tile + j] != 0.0f ? v * p.scale_log2 : -INFINITY;
      }
      float m = fmaxf(s[0], s[1]);
#pragma unroll
      for (int off = 8; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      const float new_max = fmaxf(run_max, m);
      const float factor = new_max == -INFINITY ? 1.0f : exp2f(run_max - new_max);
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const float prob = new_max == -INFINITY ? 0.0f : exp2f(s[t] - new_max);
        const bf16 hi = __float2bfloat16_rn(prob);
        const bf16 lo = __float2bfloat16_rn(prob - __bfloat162float(hi));
        p_hi[sh * tc_p_ld + 2 * sc + t] = hi;
        p_lo[sh * tc_p_ld + 2 * sc + t] = lo;
        sum += prob;
      }
#pragma unroll
      for (int off = 8; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      run_sum = run_sum * factor + sum;
      run_max = new_max;
      factor_s[sh * 16 + sc] = factor;
    }
    __syncthreads();

    // 3. O = diag(factor) O + (P_hi + P_lo) . V.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
      wmma::load_matrix_sync(f, factor_s, 16, wmma::mem_row_major);
#pragma unroll
      for (int i = 0; i < tc_max_ntiles_per_warp; ++i)
        if (i < ntiles_per_warp)
#pragma unroll
          for (int k = 0; k < f.num_elements; ++k) acc[i].x[k] *= f.x[k];
      detail::wmma_a_row ph, pl;
      detail::wmma_b_row vb;
#pragma unroll
      for (int ks = 0; ks < tc_tile / 16; ++ks) {
        detail::load_shared(ph, p_hi + 16 * ks, tc_p_ld);
        detail::load_shared(pl, p_lo + 16 * ks, tc_p_ld);
#pragma unroll
        for (int i = 0; i < tc_max_ntiles_per_warp; ++i) {
          if (i < ntiles_per_warp) {
            const int n0 = (warp * ntiles_per_warp + i) * 16;
            detail::load_shared(vb, tile + 16 * ks * row + n0, row);
            wmma::mma_sync(acc[i], pl, vb, acc[i]);
            wmma::mma_sync(acc[i], ph, vb, acc[i]);
          }
        }
      }
    }
    __syncthreads();  // frees this stage, the scores, P and the factors
  }

  // The sums go through shared memory (the tile buffers, free now) to the output.
  float* o_s = reinterpret_cast<float*>(base + tc_kv_off);
#pragma unroll
  for (int i = 0; i < tc_max_ntiles_per_warp; ++i)
    if (i < ntiles_per_warp)
      wmma::store_matrix_sync(o_s + (warp * ntiles_per_warp + i) * 16, acc[i], r,
                              wmma::mem_row_major);
  if (sc == 0) {
    final_max[sh] = run_max;
    final_sum[sh] = run_sum;
  }
  __syncthreads();
  for (int i = tid; i < group_heads * r; i += tc_threads) {
    const int h = i / r;
    const float v = o_s[i];
    if (p.num_splits == 1) {
      const float sum = final_sum[h];
      store(p.out, (b * p.num_heads + head0) * r + i, sum > 0.0f ? v / sum : 0.0f);
    } else {
      p.part_out[part_row * r + i] = v;
    }
  }
  if (p.num_splits > 1 && tid < group_heads) {
    p.part_max[part_row + tid] = final_max[tid];
    p.part_sum[part_row + tid] = final_sum[tid];
  }
}

constexpr int combine_threads = 128;

// One block per (sequence, head): weights each split by exp2(its max - the overall max) and
// normalises by the weighted sum of the splits' sums. A split with nothing (sum 0, or a weight
// that underflows) is skipped, so its never-written partial is never read.
template <typename T>
__global__ void mla_decode_combine_kernel(const float* part_out, const float* part_max,
                                          const float* part_sum, T* out, int num_splits,
                                          int num_heads, int latent_dim) {
  __shared__ float weight[mla_decode_max_splits];
  __shared__ float total;
  const int64_t b = blockIdx.x / num_heads;
  const int h = static_cast<int>(blockIdx.x % num_heads);
  const int64_t first = b * num_splits * num_heads + h;  // split s at first + s * num_heads
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int s = static_cast<int>(threadIdx.x); s < num_splits; s += 32)
      if (part_sum[first + s * num_heads] > 0.0f) m = fmaxf(m, part_max[first + s * num_heads]);
    m = warp_max(m);
    float l = 0.0f;
    for (int s = static_cast<int>(threadIdx.x); s < num_splits; s += 32) {
      const float sum = part_sum[first + s * num_heads];
      const float w = sum > 0.0f ? exp2f(part_max[first + s * num_heads] - m) : 0.0f;
      weight[s] = w;
      l += sum * w;
    }
    l = warp_sum(l);
    if (threadIdx.x == 0) total = l;
  }
  __syncthreads();
  const float l = total;
  // The partials are loaded combine_batch at a time before they are summed, so their loads are
  // in flight together (one at a time, each behind its split's test, the loop was a chain of
  // memory latencies as long as the splits). A skipped split's partial may be stale: it is
  // loaded but never added, so the sum is the same as adding only the others, in split order.
  constexpr int combine_batch = 8;
  for (int col = static_cast<int>(threadIdx.x); col < latent_dim; col += combine_threads) {
    const float* column = part_out + first * latent_dim + col;
    const int64_t split_stride = int64_t{num_heads} * latent_dim;
    float o = 0.0f;
    int s = 0;
    for (; s + combine_batch <= num_splits; s += combine_batch) {
      float v[combine_batch];
#pragma unroll
      for (int u = 0; u < combine_batch; ++u) v[u] = column[(s + u) * split_stride];
#pragma unroll
      for (int u = 0; u < combine_batch; ++u)
        if (weight[s + u] > 0.0f) o = fmaf(weight[s + u], v[u], o);
    }
    for (; s < num_splits; ++s)
      if (weight[s] > 0.0f) o = fmaf(weight[s], column[s * split_stride], o);
    store(out, (b * num_heads + h) * latent_dim + col, l > 0.0f ? o / l : 0.0f);
  }
}

template <typename T>
kernel_status launch_decode(const mla_decode_args& a, const mla_decode_plan& plan,
                            void* workspace, cudaStream_t stream) {
  decode_params<T> p{};
  p.pool = static_cast<const T*>(a.pool);
  p.num_blocks = static_cast<int64_t>(a.layout.num_blocks);
  p.block_size = static_cast<int64_t>(a.layout.block_size);
  p.latent_dim = static_cast<int>(a.layout.latent_dim);
  p.entry_dim = static_cast<int>(a.layout.latent_dim + a.layout.rope_dim);
  p.row_floats = (p.entry_dim + 3) / 4 * 4;
  p.q_latent = static_cast<const T*>(a.q_latent);
  p.q_pe = static_cast<const T*>(a.q_pe);
  const auto dr = static_cast<int64_t>(a.layout.rope_dim);
  p.q_pe_token_stride = a.q_pe_token_stride == 0 ? a.num_heads * dr : a.q_pe_token_stride;
  p.q_pe_head_stride = a.q_pe_head_stride == 0 ? dr : a.q_pe_head_stride;
  p.block_table = a.block_table;
  p.max_blocks_per_seq = a.max_blocks_per_seq;
  p.seq_lens = a.seq_lens;
  p.out = static_cast<T*>(a.out_latent);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_groups = static_cast<int>(plan.num_head_groups);
  p.num_splits = static_cast<int>(plan.num_splits);
  p.split_len = plan.split_len;
  p.scale_log2 = a.softmax_scale * log2e;
  p.vector_loads = (p.entry_dim * sizeof(T)) % 16 == 0 && aligned16(a.pool);
  constexpr int64_t per16 = 16 / sizeof(T);
  p.q_vector = aligned16(a.q_latent) && aligned16(a.q_pe) && p.latent_dim % per16 == 0 &&
               dr % per16 == 0 && p.q_pe_token_stride % per16 == 0 &&
               p.q_pe_head_stride % per16 == 0;
  const int64_t rows = a.batch * plan.num_splits * a.num_heads;
  if (plan.num_splits > 1) {
    p.part_out = static_cast<float*>(workspace);
    p.part_max = p.part_out + rows * p.latent_dim;
    p.part_sum = p.part_max + rows;
  }

  const int64_t blocks = a.batch * plan.num_splits * plan.num_head_groups;
  bool launched = false;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (tc_supported(a)) {
      if (cudaFuncSetAttribute(mla_decode_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(tc_shared_bytes)) != cudaSuccess)
        return kernel_status::launch_failed;
      mla_decode_tc_kernel<<<static_cast<unsigned>(blocks), tc_threads, tc_shared_bytes, stream>>>(p);
      launched = true;
    }
  }
  if (!launched) {
  const size_t shared_bytes = decode_shared_floats(p.row_floats) * sizeof(float);
  // Allow the widest entry's need (76 KiB), not this launch's: the same value from every caller,
  // so concurrent launches of different widths cannot lower it under each other.
  constexpr size_t max_shared_bytes =
      decode_shared_floats(static_cast<int>(mla_decode_max_entry_dim)) * sizeof(float);
  if (cudaFuncSetAttribute(mla_decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(max_shared_bytes)) != cudaSuccess)
    return kernel_status::launch_failed;
  mla_decode_kernel<T><<<static_cast<unsigned>(blocks), decode_threads, shared_bytes, stream>>>(p);
  }
  if (cudaGetLastError() != cudaSuccess) return kernel_status::launch_failed;
  if (plan.num_splits == 1) return kernel_status::ok;
  mla_decode_combine_kernel<T>
      <<<static_cast<unsigned>(a.batch * a.num_heads), combine_threads, 0, stream>>>(
          p.part_out, p.part_max, p.part_sum, p.out, p.num_splits, p.num_heads, p.latent_dim);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status mla_cache_append_can_run(const mla_cache_append_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (!layout_ok(a.layout)) return kernel_status::unsupported_shape;
  const auto r = static_cast<int64_t>(a.layout.latent_dim);
  const auto dr = static_cast<int64_t>(a.layout.rope_dim);
  if (a.num_tokens < 0 || a.num_tokens > INT32_MAX) return kernel_status::unsupported_shape;
  if (a.latent_stride < 0 || (a.latent_stride != 0 && a.latent_stride < r) ||
      a.k_pe_stride < 0 || (a.k_pe_stride != 0 && a.k_pe_stride < dr) ||
      a.latent_stride > INT32_MAX || a.k_pe_stride > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (a.num_tokens == 0) return kernel_status::ok;
  if (a.pool == nullptr || a.latent == nullptr || a.slot_mapping == nullptr ||
      (dr > 0 && a.k_pe == nullptr))
    return kernel_status::unsupported_shape;
  if (a.latent_norm != nullptr &&
      (a.latent_out == nullptr || !std::isfinite(a.latent_norm_eps) || a.latent_norm_eps < 0.0f))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status mla_cache_append_run(const mla_cache_append_args& a, cudaStream_t stream) noexcept {
  if (auto s = mla_cache_append_can_run(a); s != kernel_status::ok) return s;
  if (a.num_tokens == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch_append<float>(a, stream);
    case dtype::bf16: return launch_append<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

mla_decode_plan mla_decode_make_plan(const mla_decode_args& a) noexcept {
  mla_decode_plan plan;
  plan.num_head_groups = (a.num_heads + decode_group_heads - 1) / decode_group_heads;
  const int64_t capacity = a.max_blocks_per_seq * static_cast<int64_t>(a.layout.block_size);
  const int64_t max_len = a.max_seq_len > 0 ? std::min(a.max_seq_len, capacity) : capacity;
  if (max_len <= 0) {
    plan.num_splits = 1;
    plan.split_len = decode_tile;
    return plan;
  }
  const int64_t base_blocks = std::max<int64_t>(1, a.batch * plan.num_head_groups);
  // Rounded down: a few blocks past the target would make a second, nearly empty wave.
  const int64_t wanted = std::max<int64_t>(1, decode_target_blocks / base_blocks);
  const int64_t min_split =
      a.min_split_tokens > 0 ? a.min_split_tokens : mla_decode_default_min_split_tokens;
  const int64_t by_length = (max_len + min_split - 1) / min_split;
  const int64_t splits = std::clamp<int64_t>(std::min(wanted, by_length), 1, mla_decode_max_splits);
  const int64_t per_split = (max_len + splits - 1) / splits;
  plan.split_len = (per_split + decode_tile - 1) / decode_tile * decode_tile;
  plan.num_splits = (max_len + plan.split_len - 1) / plan.split_len;
  return plan;
}

kernel_status mla_decode_can_run(const mla_decode_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (!layout_ok(a.layout)) return kernel_status::unsupported_shape;
  const auto r = static_cast<int64_t>(a.layout.latent_dim);
  const auto dr = static_cast<int64_t>(a.layout.rope_dim);
  if (r > mla_decode_max_latent_dim || r + dr > mla_decode_max_entry_dim)
    return kernel_status::unsupported_shape;
  if (a.num_heads < 1 || a.num_heads > INT32_MAX / mla_decode_max_latent_dim || a.batch < 0 ||
      a.batch > INT32_MAX || a.max_blocks_per_seq < 0 || a.max_blocks_per_seq > INT32_MAX ||
      a.max_seq_len < 0 || a.min_split_tokens < 0 || a.q_pe_token_stride < 0 ||
      a.q_pe_head_stride < 0 || a.q_pe_token_stride > INT32_MAX || a.q_pe_head_stride > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (!std::isfinite(a.softmax_scale)) return kernel_status::unsupported_shape;
  // seq_lens are int32: a table row longer than that could not be used anyway.
  if (a.max_blocks_per_seq > 0 &&
      a.layout.block_size > static_cast<size_t>(INT32_MAX / a.max_blocks_per_seq))
    return kernel_status::unsupported_shape;
  if (a.batch == 0) return kernel_status::ok;
  const mla_decode_plan plan = mla_decode_make_plan(a);
  if (a.batch > INT32_MAX / plan.num_splits / plan.num_head_groups ||
      a.batch > INT32_MAX / a.num_heads)
    return kernel_status::unsupported_shape;
  if (a.pool == nullptr || a.q_latent == nullptr || a.out_latent == nullptr ||
      a.seq_lens == nullptr || (dr > 0 && a.q_pe == nullptr) ||
      (a.max_blocks_per_seq > 0 && a.block_table == nullptr))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

size_t mla_decode_workspace_bytes(const mla_decode_args& a) noexcept {
  if (a.batch <= 0) return 0;
  const mla_decode_plan plan = mla_decode_make_plan(a);
  if (plan.num_splits <= 1) return 0;
  const auto rows = static_cast<size_t>(a.batch * plan.num_splits * a.num_heads);
  return rows * (a.layout.latent_dim + 2) * sizeof(float);
}

kernel_status mla_decode_run(const mla_decode_args& a, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) noexcept {
  if (auto s = mla_decode_can_run(a); s != kernel_status::ok) return s;
  if (a.batch == 0) return kernel_status::ok;
  const size_t needed = mla_decode_workspace_bytes(a);
  if (needed > 0 && (workspace == nullptr || workspace_bytes < needed))
    return kernel_status::unsupported_shape;
  const mla_decode_plan plan = mla_decode_make_plan(a);
  switch (a.dt) {
    case dtype::f32: return launch_decode<float>(a, plan, workspace, stream);
    case dtype::bf16: return launch_decode<__nv_bfloat16>(a, plan, workspace, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
