#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mma.h>
#include <optional>

#include "kernels/cuda/device_arch.hpp"
#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/grouped_gemm.hpp"
#include "kernels/cuda/tensor_map.hpp"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/wgmma.cuh"
#include "kernels/cuda/wmma_shared.cuh"

namespace moe::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using detail::aligned16;
using detail::load;
using detail::store;

// ---------------------------------------------------------------------------------------------
// Which tile a block computes.
//
// Blocks are numbered n tile fastest, so the blocks in flight together share their rows of x
// (read once from memory, then from L2) and sweep one expert's weight at a time. Expert e's rows
// are cut into ceil(count_e / BM) tiles of BM rows; the tiles of all experts are numbered in
// expert order; the grid has as many row tiles as the worst routing of num_rows rows can need
// (row_tiles_bound, below), and blocks past this routing's last tile exit.

// Expert e's rows, clamped into [0, num_rows] so that no offset, however wrong, sends a block
// outside x or y. For valid offsets the clamp changes nothing.
__device__ inline void expert_rows(const int32_t* offsets, int e, int32_t num_rows, int32_t& lo,
                                   int32_t& hi) {
  lo = std::min(std::max(offsets[e], 0), num_rows);
  hi = std::min(std::max(offsets[e + 1], lo), num_rows);
}

// Which (row tile, column tile) block b computes. Column tiles vary fastest, except with one
// expert (a dense product run through this kernel): there the row tiles of one column slice
// run together, so its slice of the weight comes from memory once and from L2 for the other
// row tiles (column-first, a weight wider than L2 would be streamed once per row tile).
struct tile_order {
  int32_t n_tiles = 1, m_tiles = 1;
  bool m_fastest = false;
  __device__ int64_t m_tile(int64_t b) const { return m_fastest ? b % m_tiles : b / n_tiles; }
  __device__ int32_t n_tile(int64_t b) const {
    return static_cast<int32_t>(m_fastest ? b / m_tiles : b % n_tiles);
  }
};

// y[i] = v + beta * y[i], the old y read only where beta != 0, the sum rounded once.
template <class T>
__device__ inline void store_beta(T* y, int64_t i, float v, float beta) {
  store(y, i, beta == 0.0f ? v : fmaf(beta, load(y, i), v));
}

// Where a tile's rows of x come from: row0 + r of x, or with a gather map (x_entries) the row
// entries[row0 + r] / per_row of the unpermuted x (permute_plan's inverse and top_k: the token
// of each expert row), so that no permuted copy of x is made.
template <class T>
struct x_source {
  const T* x;
  const int32_t* entries;  // null: x is already grouped by expert
  int32_t per_row;
  int32_t row0;
  int32_t k;
  __device__ __forceinline__ const T* row(int32_t r) const {
    const int64_t at =
        entries == nullptr ? int64_t{row0} + r : int64_t{entries[row0 + r] / per_row};
    return x + at * k;
  }
};

// Finds row tile `m_tile` of a BM-row tiling: each thread counts the tiles of a contiguous run
// of experts, a block-wide scan turns the counts into each run's first tile, and the thread
// whose run holds m_tile walks it. Writes found = {expert, first row, rows} or expert = -1 when
// m_tile is past the last tile. The counts are int64: with wrong offsets they need not fit int32.
// Every thread of the block must call it (it has barriers).
template <int BM, int Threads>
__device__ void find_tile(const int32_t* offsets, int num_experts, int32_t num_rows, int64_t m_tile,
                          int64_t* scan, int32_t* found) {
  const int tid = static_cast<int>(threadIdx.x);
  const int per_thread = (num_experts + Threads - 1) / Threads;
  const int e_begin = std::min(tid * per_thread, num_experts);
  const int e_end = std::min(e_begin + per_thread, num_experts);
  int64_t tiles = 0;
  for (int e = e_begin; e < e_end; ++e) {
    int32_t lo, hi;
    expert_rows(offsets, e, num_rows, lo, hi);
    tiles += (int64_t{hi} - lo + BM - 1) / BM;
  }
  scan[tid] = tiles;
  if (tid == 0) found[0] = -1;
  __syncthreads();
  for (int d = 1; d < Threads; d *= 2) {  // Hillis-Steele inclusive scan
    const int64_t add = tid >= d ? scan[tid - d] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  int64_t first = scan[tid] - tiles;
  if (m_tile >= first && m_tile < first + tiles) {
    for (int e = e_begin; e < e_end; ++e) {
      int32_t lo, hi;
      expert_rows(offsets, e, num_rows, lo, hi);
      const int64_t count = (int64_t{hi} - lo + BM - 1) / BM;
      if (m_tile < first + count) {
        const auto row0 = static_cast<int32_t>(lo + (m_tile - first) * BM);
        found[0] = e;
        found[1] = row0;
        found[2] = std::min(BM, hi - row0);
        break;
      }
      first += count;
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// bf16 on tensor cores.

// A block computes a (BM, BN) tile of y from `Stages` shared-memory stages of (BM, BK) rows of x
// and (BN, BK) rows of the expert's weight, both k-contiguous as in memory; the warps form a
// WarpsK x WarpsM x WarpsN grid, each holding (BM / WarpsM, BN / WarpsN) of float32 accumulators
// as 16x16 WMMA fragments over its own 1 / WarpsK of each stage's k columns (WarpsK > 1 splits a
// stage's k between warps: few rows and many bytes per stage, as at decode; the partial sums are
// added in warp_k order at the end, so the result stays deterministic). The weight tile read as
// (n, k) rows is exactly WMMA's column-major B (k, n).
template <int BM, int BN, int BK, int WarpsM, int WarpsN, int WarpsK, int Stages, int MinBlocks,
          bool SkipFragments>
struct mma_tiles {
  static constexpr int bm = BM, bn = BN, bk = BK, warps_n = WarpsN, warps_k = WarpsK,
                       stages = Stages, min_blocks = MinBlocks;
  // Whether products of fragments wholly past the tile's rows or past n are skipped (warp-uniform
  // conditions, so the warp-wide WMMA calls stay converged). Worth it where most of a tile is
  // empty (decode: a few rows of 16); in full tiles the branches only break up the schedule of
  // the loads and products, and a product of rows that were never loaded is never stored.
  static constexpr bool skip_fragments = SkipFragments;
  static constexpr int mn_warps = WarpsM * WarpsN;
  static constexpr int threads = 32 * mn_warps * WarpsK;
  // 8 elements (16 bytes) of padding per row: the 16-byte pieces of 8 consecutive rows (what
  // one phase of a fragment load reads) then fall in 8 different groups of 4 banks, for BK = 32,
  // 64 and 128 alike, and each 16-row fragment stays 32-byte aligned as WMMA requires
  // (16 * (BK + 8) * 2 bytes is a multiple of 32 for BK % 8 == 0).
  static constexpr int ld = BK + 8;
  static constexpr int warp_rows = BM / WarpsM, warp_cols = BN / WarpsN, warp_k = BK / WarpsK;
  static constexpr int frags_m = warp_rows / 16, frags_n = warp_cols / 16;
  static constexpr size_t stage_elements = size_t{BM + BN} * ld;
  static constexpr size_t smem_bytes = Stages * stage_elements * sizeof(bf16);
  // The epilogue reuses the stages: one 16x16 float32 scratch per (m, n) warp first, then the
  // partial accumulators of the warps with warp_k > 0.
  static constexpr size_t scratch_floats = size_t{mn_warps} * 256;
  static constexpr size_t partial_floats = size_t{WarpsK - 1} * mn_warps * frags_m * frags_n * 256;
  static_assert(BM % (16 * WarpsM) == 0 && BN % (16 * WarpsN) == 0 && BK % (16 * WarpsK) == 0);
  static_assert(Stages >= 2);
  static_assert(smem_bytes >= (scratch_floats + partial_floats) * sizeof(float));
  // min_blocks blocks per SM fit in its 228 KB of shared memory (each also holds the tile search's
  // static arrays and 1 KB the system reserves); one block may take at most 227 KB.
  static_assert(smem_bytes <= 227 * 1024 &&
                MinBlocks * (smem_bytes + threads * sizeof(int64_t) + 16 + 1024) <= 228 * 1024);
};

// Many rows per expert (prefill, training): 128x256 tiles, 8 warps of 64x64 (4 x 4 fragments:
// each A fragment is used 4 times and each B fragment 4 times, half the shared-memory reads per
// product of 64x32 warps), 32-wide k steps in 4 stages (123 KB, one block per SM).
using wide_tiles = mma_tiles<128, 256, 32, 2, 4, 1, 4, 1, false>;
// Few rows per expert (decode: 1-8): the weight is what costs, so a block streams a 64-column
// slice of one expert's weight once, over a 16-row tile, in k steps of 128 (256-byte runs of each
// weight row; the slice, 64 whole rows, is one contiguous range of memory). 5 stages (106 KB, two
// blocks per SM): up to 4 x 16 KB of weight in flight per block, 128 KB per SM, several times
// what the SM's share of HBM needs over its latency, so that a block starting up (tile search,
// first copies) or finishing leaves the other enough in flight. 8 warps: 4 of 16x16 columns
// times 2 halves of each k step.
using narrow_tiles = mma_tiles<16, 64, 128, 1, 4, 2, 5, 2, true>;

// FP8 weights' block scales: the grid of the stacked (num_experts * n, k) weight.
struct fp8_scales {
  const float* scale = nullptr;
  int32_t block_rows = 128, block_cols = 128;
  int64_t ld = 0;
};

// Every loader answers where a stage's tiles are: x's (BM, ld) bf16 rows at the stage's start,
// and the weight's (BN, ld) bf16 rows that the products read (b_tile). async_loader and
// element_loader put the weight's rows right after x's, in the stage; fp8_async_loader
// copies raw bytes into the stage and converts them into one of two bf16 buffers after the
// stages (`converts`).
// The weight rows a tile reads: tile row t is row first + t of the stacked (experts * n, k)
// weight; with a fused SwiGLU the tile's second half (t >= bn / 2) holds the up rows of the
// first half's gate rows instead: row first + t + jump (jump = I - bn / 2). `valid`: the rows of
// the tile (of each half, fused) that are inside the weight, i.e. the tile's columns of y.
struct weight_rows {
  int64_t first = 0;
  int64_t jump = 0;
  int32_t valid = 0;
};

// Tile row t's place in its run (the tile, or its half with Swiglu), and its weight row.
template <bool Swiglu, int Split>
__device__ __forceinline__ int run_index(int t) {
  return Swiglu && t >= Split ? t - Split : t;
}
template <bool Swiglu, int Split>
__device__ __forceinline__ int64_t weight_row(const weight_rows& wr, int t) {
  return wr.first + t + (Swiglu && t >= Split ? wr.jump : 0);
}

template <class Tiles>
struct bf16_stage_layout {
  static constexpr bool converts = false;
  static constexpr size_t stage_bytes = Tiles::stage_elements * sizeof(bf16);
  static constexpr size_t smem_bytes = Tiles::smem_bytes;
  __device__ __forceinline__ static const bf16* b_tile(unsigned char* stage, unsigned char*, int) {
    return reinterpret_cast<const bf16*>(stage) + Tiles::bm * Tiles::ld;
  }
};

// Queues this thread's 16-byte chunk of up to Passes rows, RowsPerPass rows apart (dst_ld
// elements in the stage, src_stride in memory), for the rows the tile still has (left); past k
// (in_k false) a 0-byte copy of the row start (a valid, aligned address) and 16 bytes of zeros.
// Passes from the tile's row Split on read `jump` elements further and count their rows from
// Split (a fused SwiGLU's up half); Split = Passes * RowsPerPass: one run.
template <int Passes, int RowsPerPass, int Split, class T>
__device__ __forceinline__ void copy_chunks(T* dst, int dst_ld, const T* src, int64_t src_stride,
                                            int64_t jump, int32_t left, bool in_k) {
  static_assert(Split % RowsPerPass == 0, "a pass's rows lie in one run");
#pragma unroll
  for (int p = 0; p < Passes; ++p)
    if (run_index<true, Split>(p * RowsPerPass) < left) {
      T* d = dst + p * RowsPerPass * dst_ld;
      const T* from = src + p * src_stride + (p * RowsPerPass >= Split ? jump : 0);
      if (in_k)
        __pipeline_memcpy_async(d, from, 16);
      else
        __pipeline_memcpy_async(d, from, 16, 16);
    }
}

// The same for rows each at its own address (x's rows through a gather map): src[p] is pass p's
// row at this thread's chunk, `at` the step's offset into it.
template <int Passes, int RowsPerPass, class T>
__device__ __forceinline__ void copy_rows(T* dst, int dst_ld, const T* const (&src)[Passes],
                                          int32_t at, int32_t left, bool in_k) {
#pragma unroll
  for (int p = 0; p < Passes; ++p)
    if (p * RowsPerPass < left) {
      T* d = dst + p * RowsPerPass * dst_ld;
      if (in_k)
        __pipeline_memcpy_async(d, src[p] + at, 16);
      else
        __pipeline_memcpy_async(d, src[p] + at, 16, 16);
    }
}

// Queues k steps of the tiles into a stage. Rows past the tile's rows (x) or past n (weights)
// are not loaded at all: an output element depends only on its own row of x and its own row of
// the weight, and those outputs are never stored. Columns past k are zero-filled in both
// operands, so they add exact zeros to the stored outputs.
//
// async_loader (k % 8 == 0 and 16-byte aligned rows, so each 8-element chunk is wholly inside
// or wholly past k): 16-byte cp.async copies. Consecutive threads take consecutive chunks of a row, so a
// warp reads whole runs; each thread keeps the same chunk column and rows `rows_per_pass` apart
// in every step, so its addresses are worked out once per block and a step adds only k0.
template <class Tiles, bool Swiglu>
struct async_loader : bf16_stage_layout<Tiles> {
  static constexpr bool swiglu = Swiglu;
  static constexpr int split = Swiglu ? Tiles::bn / 2 : Tiles::bn;
  static constexpr int chunks = Tiles::bk / 8;
  static constexpr int rows_per_pass = Tiles::threads / chunks;
  static constexpr int a_passes = Tiles::bm / rows_per_pass, b_passes = Tiles::bn / rows_per_pass;
  static_assert(Tiles::threads % chunks == 0 && Tiles::bm % rows_per_pass == 0 &&
                Tiles::bn % rows_per_pass == 0);
  const bf16* a[a_passes];  // this thread's rows of x, at its chunk column
  const bf16* b;            // and its first row of the weight
  int64_t stride;           // rows_per_pass rows of the weight
  int64_t jump;             // Swiglu: from a gate row to its up row, past the tile's half
  int32_t a_left, b_left;   // rows of the tile (of a half) from this thread's first row on
  int32_t kc, k;
  int dst;  // offset of this thread's first chunk in a stage's x tile

  __device__ __forceinline__ async_loader(const x_source<bf16>& xs, int32_t a_rows, const void* w,
                                          const weight_rows& wr, int32_t k_, const fp8_scales&)
      : k(k_) {
    const bf16* b_src = static_cast<const bf16*>(w) + wr.first * k_;
    const int tid = static_cast<int>(threadIdx.x);
    const int row = tid / chunks;
    kc = (tid % chunks) * 8;
    a_left = a_rows - row;
#pragma unroll
    for (int p = 0; p < a_passes; ++p)  // rows past the tile are never copied
      a[p] = (p * rows_per_pass < a_left ? xs.row(row + p * rows_per_pass) : xs.x) + kc;
    b = b_src + int64_t{row} * k + kc;
    stride = int64_t{rows_per_pass} * k;
    jump = wr.jump * k;
    b_left = wr.valid - row;
    dst = row * Tiles::ld + kc;
  }

  __device__ __forceinline__ void operator()(unsigned char* stage_bytes, int32_t k0) const {
    bf16* stage = reinterpret_cast<bf16*>(stage_bytes);
    const bool in_k = k0 + kc < k;
    const int32_t at = in_k ? k0 : -kc;
    copy_rows<a_passes, rows_per_pass>(stage + dst, Tiles::ld, a, at, a_left, in_k);
    copy_chunks<b_passes, rows_per_pass, split>(stage + dst + Tiles::bm * Tiles::ld, Tiles::ld,
                                                b + at, stride, jump, b_left, in_k);
  }
};

// FP8 weights. A weight element becomes bf16(e4m3 * scale): one float32 product rounded once,
// as fp8_dequantize_kernel computes it.
__device__ __forceinline__ bf16 dequantize_e4m3(uint8_t bits, float scale) {
  __nv_fp8_e4m3 v;
  v.__x = bits;
  return __float2bfloat16_rn(static_cast<float>(v) * scale);
}

__device__ __forceinline__ uint32_t bf16_bits(bf16 v) {
  uint16_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

// Element loads and plain shared stores (k % 8 != 0 or unaligned pointers; with FP8 weights
// also k % 16 != 0, or block columns that 16-element chunks would straddle), FP8 weight elements
// converted on the way.
template <class Tiles, bool Fp8, bool Swiglu>
struct element_loader : bf16_stage_layout<Tiles> {
  static constexpr bool swiglu = Swiglu;
  static constexpr int split = Swiglu ? Tiles::bn / 2 : Tiles::bn;
  x_source<bf16> xs;
  const void* w;
  weight_rows wr;
  int32_t a_rows, k;
  fp8_scales sc;

  __device__ __forceinline__ element_loader(const x_source<bf16>& xs_, int32_t a_rows_,
                                            const void* w_, const weight_rows& wr_, int32_t k_,
                                            const fp8_scales& sc_)
      : xs(xs_), w(w_), wr(wr_), a_rows(a_rows_), k(k_), sc(sc_) {}

  // Element c of the weight's row `row` of the tile.
  __device__ __forceinline__ bf16 weight(int row, int32_t c) const {
    const int64_t r = weight_row<Swiglu, split>(wr, row);
    if constexpr (Fp8) {
      const float s = sc.scale[r / sc.block_rows * sc.ld + c / sc.block_cols];
      return dequantize_e4m3(static_cast<const uint8_t*>(w)[r * k + c], s);
    } else {
      return static_cast<const bf16*>(w)[r * k + c];
    }
  }

  __device__ __forceinline__ void operator()(unsigned char* stage_bytes, int32_t k0) const {
    bf16* stage = reinterpret_cast<bf16*>(stage_bytes);
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = static_cast<int>(threadIdx.x); i < (Tiles::bm + Tiles::bn) * Tiles::bk;
         i += Tiles::threads) {
      const int r = i / Tiles::bk, kk = i % Tiles::bk;
      const bool is_a = r < Tiles::bm;
      const int row = is_a ? r : r - Tiles::bm;
      if (is_a ? row >= a_rows : run_index<Swiglu, split>(row) >= wr.valid) continue;
      const int32_t c = k0 + kk;
      stage[r * Tiles::ld + kk] = c >= k ? zero : is_a ? xs.row(row)[c] : weight(row, c);
    }
  }
};

// Asynchronous copies (k % 16 == 0, 16-byte aligned rows, block columns a multiple of 16): x's
// rows as the bf16 loader copies them, the weight's raw bytes (16 elements a copy) into the
// stage; once a step's copies have landed, each thread converts the very bytes it copied (its
// own copies need no barrier to be visible to it) into one of two bf16 tiles, before the step's
// barrier publishes them. Two suffice: the barrier of step s comes after every warp's products of
// step s - 1, so converting step s + 1 cannot overwrite a tile still being read.
template <class Tiles, bool Swiglu>
struct fp8_async_loader {
  static constexpr bool swiglu = Swiglu;
  static constexpr int split = Swiglu ? Tiles::bn / 2 : Tiles::bn;
  static constexpr bool converts = true;
  static constexpr size_t x_bytes = size_t{Tiles::bm} * Tiles::ld * sizeof(bf16);
  static constexpr size_t stage_bytes = x_bytes + size_t{Tiles::bn} * Tiles::bk;
  static constexpr size_t b_bytes = size_t{Tiles::bn} * Tiles::ld * sizeof(bf16);
  static constexpr size_t smem_bytes = Tiles::stages * stage_bytes + 2 * b_bytes;
  // WMMA wants 32-byte aligned fragments; the 16-byte copies and conversions want 16.
  static_assert(x_bytes % 32 == 0 && stage_bytes % 32 == 0 && b_bytes % 32 == 0);
  static_assert(smem_bytes >= (Tiles::scratch_floats + Tiles::partial_floats) * sizeof(float));
  static_assert(smem_bytes <= 227 * 1024 &&
                Tiles::min_blocks * (smem_bytes + Tiles::threads * sizeof(int64_t) + 16 + 1024) <=
                    228 * 1024);

  static constexpr int a_chunks = Tiles::bk / 8, b_chunks = Tiles::bk / 16;
  static constexpr int a_rows_per_pass = Tiles::threads / a_chunks;
  static constexpr int b_rows_per_pass = Tiles::threads / b_chunks;
  static constexpr int a_passes = Tiles::bm / a_rows_per_pass;
  static constexpr int b_passes = Tiles::bn / b_rows_per_pass;
  static_assert(Tiles::bk % 16 == 0 && Tiles::threads % a_chunks == 0 &&
                Tiles::threads % b_chunks == 0 && Tiles::bm % a_rows_per_pass == 0 &&
                Tiles::bn % b_rows_per_pass == 0);

  const bf16* a[a_passes];  // this thread's rows of x, at its chunk column
  const uint8_t* b;         // and its first row of the weight
  int64_t b_stride;
  int64_t b_jump;  // Swiglu: from a gate row to its up row, past the tile's half
  int32_t a_left, b_left;
  int32_t a_kc, b_kc, k;
  int a_dst, b_row;
  fp8_scales sc;
  int64_t scale_row[b_passes];  // offset of each pass's row of the scale grid

  __device__ __forceinline__ static const bf16* b_tile(unsigned char*, unsigned char* smem,
                                                       int step) {
    return reinterpret_cast<const bf16*>(smem + Tiles::stages * stage_bytes + (step & 1) * b_bytes);
  }

  __device__ __forceinline__ fp8_async_loader(const x_source<bf16>& xs, int32_t a_rows,
                                              const void* w, const weight_rows& wr, int32_t k_,
                                              const fp8_scales& sc_)
      : k(k_), sc(sc_) {
    const int tid = static_cast<int>(threadIdx.x);
    const int a_row = tid / a_chunks;
    a_kc = (tid % a_chunks) * 8;
    a_left = a_rows - a_row;
#pragma unroll
    for (int p = 0; p < a_passes; ++p)  // rows past the tile are never copied
      a[p] = (p * a_rows_per_pass < a_left ? xs.row(a_row + p * a_rows_per_pass) : xs.x) + a_kc;
    a_dst = a_row * Tiles::ld + a_kc;
    b_row = tid / b_chunks;
    b_kc = (tid % b_chunks) * 16;
    b = static_cast<const uint8_t*>(w) + (wr.first + b_row) * k + b_kc;
    b_stride = int64_t{b_rows_per_pass} * k;
    b_jump = wr.jump * k;
    b_left = wr.valid - b_row;
#pragma unroll
    for (int p = 0; p < b_passes; ++p)
      scale_row[p] =
          weight_row<Swiglu, split>(wr, b_row + p * b_rows_per_pass) / sc.block_rows * sc.ld;
  }

  __device__ __forceinline__ void operator()(unsigned char* stage, int32_t k0) const {
    const bool a_in_k = k0 + a_kc < k, b_in_k = k0 + b_kc < k;
    copy_rows<a_passes, a_rows_per_pass>(reinterpret_cast<bf16*>(stage) + a_dst, Tiles::ld, a,
                                         a_in_k ? k0 : -a_kc, a_left, a_in_k);
    copy_chunks<b_passes, b_rows_per_pass, split>(stage + x_bytes + b_row * Tiles::bk + b_kc,
                                                  Tiles::bk, b + (b_in_k ? k0 : -b_kc), b_stride,
                                                  b_jump, b_left, b_in_k);
  }

  // After this thread's copies of step k0 have landed: its 16-byte pieces of the weight, as bf16.
  __device__ __forceinline__ void convert(unsigned char* stage, bf16* tile, int32_t k0) const {
    const unsigned char* ws = stage + x_bytes;
    const bool in_k = k0 + b_kc < k;
    // Past k the scale grid has no column: the bytes there are zeros, and so are the values.
    const int64_t scale_col = in_k ? (k0 + b_kc) / sc.block_cols : 0;
#pragma unroll
    for (int p = 0; p < b_passes; ++p)
      if (run_index<true, split>(p * b_rows_per_pass) < b_left) {
        const int row = b_row + p * b_rows_per_pass;
        const uint4 bytes = *reinterpret_cast<const uint4*>(ws + row * Tiles::bk + b_kc);
        const float s = in_k ? sc.scale[scale_row[p] + scale_col] : 0.0f;
        const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
        uint32_t pairs[8];  // two bf16 each, the lower element in the lower half
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t word = words[i / 2] >> (16 * (i % 2));
          pairs[i] = bf16_bits(dequantize_e4m3(static_cast<uint8_t>(word), s)) |
                     (bf16_bits(dequantize_e4m3(static_cast<uint8_t>(word >> 8), s)) << 16);
        }
        uint4* d = reinterpret_cast<uint4*>(tile + row * Tiles::ld + b_kc);
        d[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
        d[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
      }
  }
};

template <class Tiles, class TOut, class Loader>
__global__ void __launch_bounds__(Tiles::threads, Tiles::min_blocks)
    grouped_gemm_mma_kernel(const bf16* x, const int32_t* x_entries, int32_t entries_per_row,
                            const int32_t* offsets, const void* w, fp8_scales sc, TOut* y,
                            int32_t num_rows, int num_experts, int32_t n, int32_t k,
                            tile_order order, float beta) {
  extern __shared__ __align__(128) unsigned char grouped_gemm_smem[];
  __shared__ int64_t scan[Tiles::threads];
  __shared__ int32_t found[3];
  const int64_t block = blockIdx.x;
  find_tile<Tiles::bm, Tiles::threads>(offsets, num_experts, num_rows, order.m_tile(block), scan,
                                       found);
  const int32_t expert = found[0];
  if (expert < 0) return;  // the whole block: past the last tile of this routing
  const int32_t row0 = found[1], rows = found[2];
  // Without Swiglu the tile's bn columns of y are weight rows col0 .. col0 + bn - 1 of the
  // expert. With it, y has n / 2 columns (the activations), of which the tile computes bn / 2
  // from col0: its first half reads their gate rows, its second half their up rows.
  constexpr bool swiglu = Loader::swiglu;
  constexpr int split = swiglu ? Tiles::bn / 2 : Tiles::bn;
  const int32_t out_n = swiglu ? n / 2 : n;
  const int32_t col0 = order.n_tile(block) * split;
  const int32_t cols = std::min(int32_t{split}, out_n - col0);  // of each half with Swiglu
  weight_rows wr;
  wr.first = int64_t{expert} * n + col0;
  wr.jump = swiglu ? out_n - split : 0;
  wr.valid = cols;
  // Whether tile column c (or a 16-column fragment starting there) has a column of y.
  const auto col_in_use = [cols](int c) { return run_index<swiglu, split>(c) < cols; };
  const x_source<bf16> xs{x, x_entries, entries_per_row, row0, k};
  unsigned char* smem = grouped_gemm_smem;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int mn_warp = warp % Tiles::mn_warps, warp_k = warp / Tiles::mn_warps;
  const int warp_row0 = (mn_warp / Tiles::warps_n) * Tiles::warp_rows;
  const int warp_col0 = (mn_warp % Tiles::warps_n) * Tiles::warp_cols;
  const int warp_k0 = warp_k * Tiles::warp_k;

  // Fragments wholly past the tile's rows or past n are skipped where Tiles::skip_fragments, and
  // a warp whose whole share is past them skips the products altogether (one uniform branch per
  // step: a small expert's last wide tile).
  const bool warp_busy = warp_row0 < rows && col_in_use(warp_col0);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tiles::frags_m][Tiles::frags_n];
#pragma unroll
  for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
    for (int j = 0; j < Tiles::frags_n; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // The pipeline: stage s % Stages holds k step s. Every thread commits one group per step
  // (empty past the last), so "all but the newest Stages - 2 groups" is always "up to this step".
  const int32_t k_steps = (k + Tiles::bk - 1) / Tiles::bk;
  const Loader load(xs, rows, w, wr, k, sc);
  auto stage = [smem](int s) { return smem + static_cast<size_t>(s) * Loader::stage_bytes; };
  for (int s = 0; s < Tiles::stages - 1; ++s) {
    if (s < k_steps) load(stage(s), s * Tiles::bk);
    __pipeline_commit();
  }
  int read_stage = 0, write_stage = Tiles::stages - 1;
  for (int32_t step = 0; step < k_steps; ++step) {
    __pipeline_wait_prior(Tiles::stages - 2);
    unsigned char* current = stage(read_stage);
    if constexpr (Loader::converts)
      load.convert(current, const_cast<bf16*>(Loader::b_tile(current, smem, step)), step * Tiles::bk);
    // Makes every thread's copies (or conversions) of this step visible, and tells the loads
    // below that every warp is done with the stage they overwrite (read in the previous step).
    __syncthreads();
    const int32_t next = step + Tiles::stages - 1;
    if (next < k_steps) load(stage(write_stage), next * Tiles::bk);
    __pipeline_commit();

    const bf16* as = reinterpret_cast<const bf16*>(current);
    const bf16* bs = Loader::b_tile(current, smem, step);
    read_stage = read_stage + 1 == Tiles::stages ? 0 : read_stage + 1;
    write_stage = write_stage + 1 == Tiles::stages ? 0 : write_stage + 1;
    if (!warp_busy) continue;
#pragma unroll
    for (int kq = 0; kq < Tiles::warp_k; kq += 16) {
      const int kk = warp_k0 + kq;
      detail::wmma_b_col b[Tiles::frags_n];
#pragma unroll
      for (int j = 0; j < Tiles::frags_n; ++j)
        if (!Tiles::skip_fragments || col_in_use(warp_col0 + j * 16))
          detail::load_shared(b[j], bs + (warp_col0 + j * 16) * Tiles::ld + kk, Tiles::ld);
#pragma unroll
      for (int i = 0; i < Tiles::frags_m; ++i) {
        if (!Tiles::skip_fragments || warp_row0 + i * 16 < rows) {
          detail::wmma_a_row a;
          detail::load_shared(a, as + (warp_row0 + i * 16) * Tiles::ld + kk, Tiles::ld);
#pragma unroll
          for (int j = 0; j < Tiles::frags_n; ++j)
            if (!Tiles::skip_fragments || col_in_use(warp_col0 + j * 16))
              wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
        }
      }
    }
  }

  // The stages are free once every warp is past its last step.
  __pipeline_wait_prior(0);
  __syncthreads();
  float* smem_floats = reinterpret_cast<float*>(grouped_gemm_smem);
  // Split k: the warps with warp_k > 0 leave their partial sums after the scratches; the warp_k
  // == 0 warp of the same (m, n) place adds them in warp_k order (fragment elements correspond
  // one to one whatever the layout, as both sides use the same one).
  if constexpr (Tiles::warps_k > 1) {
    constexpr size_t per_warp = size_t{Tiles::frags_m} * Tiles::frags_n * 256;
    float* partials = smem_floats + Tiles::scratch_floats;
    if (warp_k > 0) {
      float* mine = partials + (size_t(warp_k - 1) * Tiles::mn_warps + mn_warp) * per_warp;
#pragma unroll
      for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
        for (int j = 0; j < Tiles::frags_n; ++j)
          if (warp_row0 + i * 16 < rows && col_in_use(warp_col0 + j * 16))
            wmma::store_matrix_sync(mine + (i * Tiles::frags_n + j) * 256, acc[i][j], 16,
                                    wmma::mem_row_major);
    }
    __syncthreads();
    if (warp_k == 0) {
#pragma unroll
      for (int kw = 1; kw < Tiles::warps_k; ++kw) {
        const float* theirs = partials + (size_t(kw - 1) * Tiles::mn_warps + mn_warp) * per_warp;
#pragma unroll
        for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
          for (int j = 0; j < Tiles::frags_n; ++j)
            if (warp_row0 + i * 16 < rows && col_in_use(warp_col0 + j * 16)) {
              wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
              wmma::load_matrix_sync(part, theirs + (i * Tiles::frags_n + j) * 256, 16,
                                     wmma::mem_row_major);
#pragma unroll
              for (int t = 0; t < part.num_elements; ++t) acc[i][j].x[t] += part.x[t];
            }
      }
    }
    if (!swiglu && warp_k > 0) return;  // after the block's last barrier
  }

  // Fused SwiGLU: the warps of the tile's up half (warp_col0 >= split) hand their sums through
  // shared memory to the warp of the same rows and gate columns, which keeps
  // silu(gate) * up and stores it below. The two fragments have the same (opaque) layout, so
  // their elements pair one to one.
  if constexpr (swiglu) {
    constexpr size_t per_warp = size_t{Tiles::frags_m} * Tiles::frags_n * 256;
    constexpr int half_warps_n = Tiles::warps_n / 2;
    static_assert(Tiles::warps_n % 2 == 0 && Tiles::warp_cols * half_warps_n == split,
                  "each warp's columns lie in one half");
    static_assert((Tiles::scratch_floats + Tiles::mn_warps / 2 * per_warp) * sizeof(float) <=
                      Loader::smem_bytes,
                  "the up halves fit beside the epilogue's scratches");
    const bool up_half = warp_col0 >= split;
    // The pair's slot: its warp row and its column among the gate half's warps.
    const int pair =
        mn_warp / Tiles::warps_n * half_warps_n + mn_warp % Tiles::warps_n % half_warps_n;
    float* ups = smem_floats + Tiles::scratch_floats + pair * per_warp;
    if constexpr (Tiles::warps_k > 1) __syncthreads();  // the partials are read: reuse them
    if (warp_k == 0 && up_half)
#pragma unroll
      for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
        for (int j = 0; j < Tiles::frags_n; ++j)
          if (warp_row0 + i * 16 < rows && col_in_use(warp_col0 + j * 16))
            wmma::store_matrix_sync(ups + (i * Tiles::frags_n + j) * 256, acc[i][j], 16,
                                    wmma::mem_row_major);
    __syncthreads();
    if (warp_k > 0 || up_half) return;  // after the block's last barrier
#pragma unroll
    for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
      for (int j = 0; j < Tiles::frags_n; ++j)
        if (warp_row0 + i * 16 < rows && col_in_use(warp_col0 + j * 16)) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> up;
          wmma::load_matrix_sync(up, ups + (i * Tiles::frags_n + j) * 256, 16, wmma::mem_row_major);
#pragma unroll
          for (int t = 0; t < up.num_elements; ++t)
            acc[i][j].x[t] = __fmul_rn(detail::silu(acc[i][j].x[t]), up.x[t]);
        }
  }

  // Epilogue: each fragment goes through a per-warp 16x16 float32 scratch (fragment layouts are
  // opaque), then out with bounds and the one rounding to TOut.
  float* scratch = smem_floats + mn_warp * 256;
  // Fully unrolled with guards rather than early exits, as everywhere acc is indexed: constant
  // indices keep the accumulators in registers.
#pragma unroll
  for (int i = 0; i < Tiles::frags_m; ++i) {
    const int r0 = warp_row0 + i * 16;
#pragma unroll
    for (int j = 0; j < Tiles::frags_n; ++j) {
      const int c0 = warp_col0 + j * 16;
      if (r0 < rows && c0 < cols) {
        wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        // Two rows of 16 columns per pass: each half-warp writes one contiguous row segment.
#pragma unroll
        for (int e = lane; e < 256; e += 32) {
          const int r = r0 + e / 16, c = c0 + e % 16;
          if (r < rows && c < cols)
            store_beta(y, int64_t{row0 + r} * out_n + col0 + c, scratch[e], beta);
        }
        __syncwarp();  // the next fragment overwrites the scratch
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 on Hopper's warpgroup MMA (sm_90): the wide tiles' work, many rows per expert, on wgmma.
//
// A block of two warpgroups computes a (128, 256) tile of y, warpgroup g its rows 64 g .. 64 g
// + 63 over all 256 columns (m64n256k16: 128 float32 accumulators a thread). A k step of 64 is
// one stage, x's (128, 64) and the weight's (256, 64) rows, K-major with the 128-byte swizzle of
// wgmma.cuh (48 KiB), filled by cp.async, 4 stages (192 KiB: one block per SM). A step waits for
// its copies, fences them for the async proxy (which wgmma reads through), meets the block's
// barrier, issues its 4 k16 products and waits for those of the step before (one group stays in
// flight), meets a second barrier (every warpgroup is then done with step - 1's stage) and
// queues the copies of step + 3 into that stage. The products of a step (~1000 cycles) thus
// run over both barriers, the copies' issue and the next step's wait: the tensor cores idle
// only where a step's copies arrive late. A tile of at most 64 rows splits its columns between
// the warpgroups instead of its rows (below).
struct wgmma_tiles {
  static constexpr int bm = 128, bn = 256, bk = 64, stages = 4, threads = 256;
  static constexpr int a_bytes = bm * bk * 2, b_bytes = bn * bk * 2;
  static constexpr int stage_bytes = a_bytes + b_bytes;
  // + 1024: the stages start at the first 1024-byte aligned shared address (the swizzle's unit).
  static constexpr size_t smem_bytes = size_t{stages} * stage_bytes + 1024;
  // The epilogue stages the tile in TOut, rows of bn + 8 (a warp's 8 rows of a column block then
  // fall on different banks).
  static constexpr int out_ld = bn + 8;
  // The copies: thread t moves 16-byte chunk t % 8 of rows t / 8 + 32 i.
  static constexpr int rows_per_pass = threads / 8;
  static_assert(size_t{bm} * out_ld * sizeof(float) <= size_t{stages} * stage_bytes);
  static_assert(bm == wide_tiles::bm && bn == wide_tiles::bn,
                "grid_of sizes the grid of both wide kernels alike");
};

// Queues one k step's copies into a stage. Rows past the tile's rows (x) or past n (weights), and
// chunks past k, are zero-filled (src-size 0: nothing is read). Thread t copies chunk t % 8 of
// the tile rows t / 8 + 32 i; weight tile row r is the weight's row col0 + r, or with a fused
// SwiGLU (`Swiglu`) the tile holds 64-row runs of gate and up rows in turn (gate 0-63, up 0-63,
// gate 64-127, up 64-127 of the block's 128 columns), so that any 128 consecutive tile rows a
// warpgroup multiplies hold the gate and the up rows of the same columns.
template <bool Swiglu>
struct wgmma_loader {
  const bf16* a;      // this thread's first row of x, at its chunk
  const bf16* b;      // this thread's first weight row (gate row, with Swiglu), at its chunk
  const bf16* dummy;  // a valid, aligned address for the zero fills
  int64_t stride;     // elements between this thread's rows (32 rows)
  int64_t up;         // Swiglu: elements from a gate row to the up row of the same column
  int32_t a_rows;     // this thread's rows of x that exist: the first a_rows of 4
  uint32_t b_valid;   // bit i: pass i's weight row exists
  int32_t chunk, k;
  uint32_t dst;  // byte offset of this thread's first chunk in a tile

  // Pass i's weight row, in units of 32 columns from the thread's first (and whether an up row).
  __device__ static constexpr int column_run(int i) { return Swiglu ? 2 * (i >> 2) + (i & 1) : i; }
  __device__ static constexpr bool up_row(int i) { return Swiglu && (i & 2) != 0; }

  __device__ void operator()(unsigned char* stage, int32_t k0) const {
    const bool in_k = k0 + 8 * chunk < k;
#pragma unroll
    for (int i = 0; i < wgmma_tiles::bm / wgmma_tiles::rows_per_pass; ++i) {
      const bool ok = in_k && i < a_rows;
      __pipeline_memcpy_async(stage + dst + i * wgmma_tiles::rows_per_pass * 128,
                              ok ? a + i * stride + k0 : dummy, 16, ok ? 0 : 16);
    }
#pragma unroll
    for (int i = 0; i < wgmma_tiles::bn / wgmma_tiles::rows_per_pass; ++i) {
      const bool ok = in_k && (b_valid >> i & 1u) != 0;
      const bf16* src = b + (up_row(i) ? up : 0) + column_run(i) * stride + k0;
      __pipeline_memcpy_async(
          stage + wgmma_tiles::a_bytes + dst + i * wgmma_tiles::rows_per_pass * 128,
          ok ? src : dummy, 16, ok ? 0 : 16);
    }
  }
};

__device__ inline void store_pair(bf16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ inline void store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// Where a wgmma block works (both wgmma kernels): row tile order.m_tile(block) of the routing
// (find_tile), rows row0.. of expert `expert`, and output columns col0.. of out_n (256 of y's n,
// or with Swiglu 128 of its I = n / 2). false: the block is past the routing's last tile.
struct wgmma_tile {
  int32_t expert, row0, rows, col0, cols, out_n;
};
template <bool Swiglu, int Threads>
__device__ bool locate_wgmma_tile(const int32_t* offsets, int num_experts, int32_t num_rows,
                                  int32_t n, tile_order order, wgmma_tile& t) {
  __shared__ int64_t scan[Threads];
  __shared__ int32_t found[3];
  const int64_t block = blockIdx.x;
  find_tile<wgmma_tiles::bm, Threads>(offsets, num_experts, num_rows, order.m_tile(block), scan,
                                      found);
  t.expert = found[0];
  if (t.expert < 0) return false;
  t.row0 = found[1];
  t.rows = found[2];
  constexpr int32_t out_bn = Swiglu ? wgmma_tiles::bn / 2 : wgmma_tiles::bn;
  t.out_n = Swiglu ? n / 2 : n;
  t.col0 = order.n_tile(block) * out_bn;
  t.cols = std::min(out_bn, t.out_n - t.col0);
  return true;
}

// The dynamic buffer's first 1024-byte aligned byte, as a shared address and a pointer (the
// swizzle is a function of the address bits: the stages start there).
struct stage_base {
  uint32_t at;
  unsigned char* p;
};
__device__ inline stage_base aligned_stages(unsigned char* smem) {
  const uint32_t base = detail::shared_offset(smem);
  const uint32_t at = (base + 1023u) / 1024u * 1024u;
  return {at, smem + (at - base)};
}

// Warpgroup g's products of one stage (x's rows at a_at, the weight's at b_at), one commit
// group, then the wait for all but that group: the products of the stage before are done
// after it. A tile of at most 64 rows (`split`) multiplies its 64 rows by weight tile rows
// 128 g .. 128 g + 127 (m64n128k16 into the first 64 accumulators); otherwise warpgroup g's
// rows 64 g .. 64 g + 63 by all 256 (m64n256k16). Each branch commits its own group: a commit
// after the branches join made ptxas close each branch's group and add an empty one at the
// join, so that waiting for all but the newest group waited for the products too.
__device__ inline void wgmma_stage(float (&acc)[128], uint32_t a_at, uint32_t b_at, uint32_t g,
                                   bool split) {
  using T = wgmma_tiles;
  float(&half)[64] = *reinterpret_cast<float(*)[64]>(acc);
  detail::fence_operands(acc);
  detail::wgmma_fence();
  if (!split) {
#pragma unroll
    for (int j = 0; j < T::bk / 16; ++j)
      detail::wgmma_m64n256k16_bf16(acc, detail::sw128_descriptor(a_at + g * 64 * 128 + 32 * j),
                                    detail::sw128_descriptor(b_at + 32 * j));
    detail::wgmma_commit();
  } else {
#pragma unroll
    for (int j = 0; j < T::bk / 16; ++j)
      detail::wgmma_m64n128k16_bf16(half, detail::sw128_descriptor(a_at + 32 * j),
                                    detail::sw128_descriptor(b_at + g * 128 * 128 + 32 * j));
    detail::wgmma_commit();
  }
  detail::wgmma_wait<1>();
  detail::fence_operands(acc);
}

// The epilogue both wgmma kernels share. Warpgroup `group`'s accumulators (thread t of it) into
// the tile `out` in TOut, rows wgmma_tiles::out_ld apart, rounded once: thread (warp w, lane l)
// holds column blocks j of rows 16 w + l / 4 (+ 8) of its warpgroup's 64 rows (split: both
// warpgroups' rows 0-63, warpgroup g's columns from 128 g, or 64 g with Swiglu).
template <class TOut, bool Swiglu>
__device__ void stage_accumulators(const float (&acc)[128], TOut* out, int group, int t,
                                   bool split) {
  using T = wgmma_tiles;
  const int warp = t / 32, lane = t % 32;
  const int r = (split ? 0 : group * 64) + warp * 16 + lane / 4;
  if constexpr (Swiglu) {
    // Output column block j's gate is accumulator column block j + 8 (j / 8) (the tile's
    // 64-row runs), its up the block 8 further (split: blocks j and j + 8 of the 16). Two
    // loops, so that every accumulator index is a constant (a computed one would put the
    // accumulators in local memory).
    const auto activate = [&](int j, int h, int gate_block, int c) {
      const int gate = 4 * gate_block + 2 * h, up = gate + 32;
      store_pair(out + (r + 8 * h) * T::out_ld + 8 * j + c,
                 __fmul_rn(detail::silu(acc[gate]), acc[up]),
                 __fmul_rn(detail::silu(acc[gate + 1]), acc[up + 1]));
    };
    if (split) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) activate(j, h, j, group * 64 + 2 * (lane % 4));
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) activate(j, h, j + 8 * (j / 8), 2 * (lane % 4));
    }
  } else {
    const int c = (split ? group * 128 : 0) + 2 * (lane % 4);
    const int column_blocks = split ? 16 : 32;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (j < column_blocks) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          store_pair(out + (r + 8 * h) * T::out_ld + 8 * j + c, acc[4 * j + 2 * h],
                     acc[4 * j + 2 * h + 1]);
      }
  }
}

// The staged tile's rows x cols out to y_tile (rows out_n apart), by `threads` threads: 16-byte
// stores where vector_out (y and out_n 16-byte multiples), else element by element.
template <class TOut>
__device__ void store_tile(const TOut* out, TOut* y_tile, int rows, int cols, int32_t out_n,
                           bool vector_out, int tid, int threads) {
  using T = wgmma_tiles;
  if (vector_out) {
    constexpr int per = 16 / sizeof(TOut);
    const int chunks = (cols + per - 1) / per;  // cols % per == 0 here (out_n % per == 0)
    for (int i = tid; i < rows * chunks; i += threads) {
      const int r = i / chunks, c = (i % chunks) * per;
      *reinterpret_cast<uint4*>(y_tile + int64_t{r} * out_n + c) =
          *reinterpret_cast<const uint4*>(out + r * T::out_ld + c);
    }
  } else {
    for (int i = tid; i < rows * cols; i += threads) {
      const int r = i / cols, c = i % cols;
      y_tile[int64_t{r} * out_n + c] = out[r * T::out_ld + c];
    }
  }
}

// Swiglu: each expert's weight is its stacked (gate; up) projection of n = 2 I rows, and y (rows,
// I) gets silu(x . gate^T) * (x . up^T) from the float32 products, rounded once: a block's 256
// weight rows are the gate and up rows of its 128 output columns, in 64-row runs (the loader), so
// the products are the unfused kernel's and a thread's accumulators hold the gate and the up of
// the same output columns 8 column blocks apart.
template <class TOut, bool Swiglu>
__global__ void __launch_bounds__(wgmma_tiles::threads, 1)
    grouped_gemm_wgmma_kernel(const bf16* x, const int32_t* offsets, const bf16* w, TOut* y,
                              int32_t num_rows, int num_experts, int32_t n, int32_t k,
                              tile_order order, bool vector_out) {
  using T = wgmma_tiles;
  extern __shared__ __align__(128) unsigned char grouped_gemm_smem[];
  wgmma_tile tile;
  if (!locate_wgmma_tile<Swiglu, T::threads>(offsets, num_experts, num_rows, n, order, tile))
    return;  // the whole block: past the last tile of this routing
  const auto [expert, row0, rows, col0, cols, out_n] = tile;
  const int tid = static_cast<int>(threadIdx.x);
  const auto [tiles_at, tiles] = aligned_stages(grouped_gemm_smem);
  auto stage = [tiles](int s) { return tiles + static_cast<size_t>(s) * T::stage_bytes; };

  wgmma_loader<Swiglu> load;
  {
    const int chunk = tid % 8, first = tid / 8;
    load.stride = int64_t{T::rows_per_pass} * k;
    load.a = x + (int64_t{row0} + first) * k + 8 * chunk;
    load.b = w + (int64_t{expert} * n + col0 + first) * k + 8 * chunk;
    load.dummy = x;
    load.a_rows = (rows - first + T::rows_per_pass - 1) / T::rows_per_pass;
    load.up = int64_t{out_n} * k;  // Swiglu: the up rows follow the I gate rows
    load.b_valid = 0;
    for (int i = 0; i < T::bn / T::rows_per_pass; ++i)
      if (first + T::rows_per_pass * load.column_run(i) < cols) load.b_valid |= 1u << i;
    load.chunk = chunk;
    load.k = k;
    load.dst = static_cast<uint32_t>(first * 128 + ((chunk ^ (first % 8)) * 16));
  }

  // A tile of at most 64 rows (an expert's last or only one) splits the columns between the
  // warpgroups instead of the rows (wgmma_stage), so that both warpgroups' products count: output
  // columns 128 g.., or with Swiglu 64 g... One whose columns are all past n skips its products
  // (warpgroup-uniform, as wgmma requires).
  const int group = tid / 128;
  const bool split = rows <= 64;
  const bool busy = !split || group * (Swiglu ? 64 : 128) < cols;
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

  const int32_t k_steps = (k + T::bk - 1) / T::bk;
  for (int s = 0; s < T::stages - 1; ++s) {
    if (s < k_steps) load(stage(s), s * T::bk);
    __pipeline_commit();
  }
  for (int32_t step = 0; step < k_steps; ++step) {
    __pipeline_wait_prior(T::stages - 2);
    detail::fence_proxy_async_shared();
    __syncthreads();  // step's stage, copied by every thread, is complete
    if (busy) {
      // step's products keep the tensor cores busy over the barrier and the copies' issue below.
      const uint32_t a_at = tiles_at + static_cast<uint32_t>(step % T::stages) * T::stage_bytes;
      wgmma_stage(acc, a_at, a_at + T::a_bytes, static_cast<uint32_t>(group), split);
    }
    __syncthreads();  // every warpgroup is past its products of step - 1: their stage is free
    const int32_t next = step + T::stages - 1;
    if (next < k_steps) load(stage(next % T::stages), next * T::bk);
    __pipeline_commit();
  }
  detail::wgmma_wait<0>();
  detail::fence_operands(acc);

  // Epilogue: the tile through shared memory in TOut (rounded once), then out in 16-byte rows.
  __pipeline_wait_prior(0);
  __syncthreads();  // every warpgroup is past its last products: the stages are free
  TOut* out = reinterpret_cast<TOut*>(tiles);
  stage_accumulators<TOut, Swiglu>(acc, out, group, tid % 128, split);
  __syncthreads();
  store_tile(out, y + int64_t{row0} * out_n + col0, rows, cols, out_n, vector_out, tid, T::threads);
}

// ---------------------------------------------------------------------------------------------
// The same wgmma tiles fed by TMA (tma.cuh), warp-specialized: warpgroup 0 is the producer, one
// of its threads issuing each stage's copies (x's 128 rows in one box, the weight's 256 rows in
// four 64-row boxes: the Swiglu runs of wgmma_loader, or plain consecutive rows); warpgroups 1
// and 2 multiply, exactly as in grouped_gemm_wgmma_kernel. Stage s has two barriers: `full`,
// whose phase completes when the producer has armed it and the copies' bytes have landed, and
// `empty`, which each of the 8 consumer warps arrives on once its products of the stage are done
// (wgmma.wait_group 1 at the next step), and which the producer waits for before refilling the
// stage. The consumer warps issue no copies and meet no block barrier in the main loop: the
// tensor cores wait only for data. Rows of a box past the tile's rows or columns (another
// expert's, or past the matrix: zeros) give outputs no one stores; k past the matrix reads zeros.
struct tma_tiles {
  static constexpr int threads = 384;
  static constexpr int stages = wgmma_tiles::stages;
  static constexpr int w_box_rows = 64;
  // The stages, then the barriers: full[stages], empty[stages].
  static constexpr size_t barriers_at = size_t{stages} * wgmma_tiles::stage_bytes;
  static constexpr size_t smem_bytes = barriers_at + 2 * stages * 8 + 1024;
};

template <class TOut, bool Swiglu>
__global__ void __launch_bounds__(tma_tiles::threads, 1)
    grouped_gemm_tma_kernel(const __grid_constant__ CUtensorMap x_map,
                            const __grid_constant__ CUtensorMap w_map, const int32_t* offsets,
                            TOut* y, int32_t num_rows, int num_experts, int32_t n, int32_t k,
                            tile_order order, bool vector_out) {
  using T = wgmma_tiles;
  using M = tma_tiles;
  extern __shared__ __align__(128) unsigned char grouped_gemm_smem[];
  wgmma_tile tile;
  if (!locate_wgmma_tile<Swiglu, M::threads>(offsets, num_experts, num_rows, n, order, tile))
    return;  // the whole block: past the last tile of this routing
  const auto [expert, row0, rows, col0, cols, out_n] = tile;
  const int tid = static_cast<int>(threadIdx.x);
  const auto [tiles_at, tiles] = aligned_stages(grouped_gemm_smem);
  const auto stage_at = [tiles_at](int s) {
    return tiles_at + static_cast<uint32_t>(s) * T::stage_bytes;
  };
  const auto full = [tiles_at](int s) {
    return tiles_at + static_cast<uint32_t>(M::barriers_at) + 8u * static_cast<uint32_t>(s);
  };
  const auto empty = [full](int s) { return full(M::stages + s); };
  if (tid == 0) {
    for (int s = 0; s < M::stages; ++s) {
      detail::mbarrier_init(full(s), 1);
      detail::mbarrier_init(empty(s), 8);  // the consumer warps
    }
    detail::fence_mbarrier_init();
  }
  __syncthreads();

  const int32_t k_steps = (k + T::bk - 1) / T::bk;
  const int wg = tid / 128;
  const bool split = rows <= 64;
  float acc[128];
  if (wg == 0) {
    if (tid == 0) {
      // Weight tile row run i (64 rows) comes from the expert's row: plain, col0 + 64 i; with
      // Swiglu, gate and up rows of the block's columns in turn (wgmma_loader's layout).
      const int64_t w_row0 = int64_t{expert} * n + col0;
      for (int32_t step = 0; step < k_steps; ++step) {
        const int s = step % M::stages;
        if (step >= M::stages)
          detail::mbarrier_wait(empty(s), static_cast<uint32_t>((step / M::stages - 1) & 1));
        detail::mbarrier_arrive_expect_tx(full(s), T::stage_bytes);
        const int32_t k0 = step * T::bk;
        detail::tma_load_2d(stage_at(s), &x_map, full(s), k0, row0);
#pragma unroll
        for (int i = 0; i < T::bn / M::w_box_rows; ++i) {
          const int64_t w_row =
              Swiglu ? w_row0 + (i & 1) * int64_t{out_n} + 64 * (i >> 1) : w_row0 + 64 * i;
          detail::tma_load_2d(stage_at(s) + T::a_bytes + i * M::w_box_rows * 128, &w_map, full(s),
                              k0, static_cast<int32_t>(w_row));
        }
      }
    }
    // Warp 0's other lanes wait here for the producing lane, so that the warp meets the block's
    // barrier below converged (an aligned barrier with a warp's lanes diverged is undefined).
    __syncwarp();
  } else {
    const int group = wg - 1;
    const bool busy = !split || group * (Swiglu ? 64 : 128) < cols;
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    const auto g = static_cast<uint32_t>(group);
    for (int32_t step = 0; step < k_steps; ++step) {
      const int s = step % M::stages;
      detail::mbarrier_wait(full(s), static_cast<uint32_t>((step / M::stages) & 1));
      if (busy) wgmma_stage(acc, stage_at(s), stage_at(s) + T::a_bytes, g, split);
      // One arrival per warp, once every lane of it is past its wait (which the .aligned wait
      // implies on the card; the emulator's lanes are separate fibers).
      __syncwarp();
      if (step > 0 && tid % 32 == 0) detail::mbarrier_arrive(empty((step - 1) % M::stages));
    }
    detail::wgmma_wait<0>();
    detail::fence_operands(acc);
  }

  __syncthreads();  // every product is done: the stages are free for the epilogue
  TOut* out = reinterpret_cast<TOut*>(tiles);
  if (wg > 0) stage_accumulators<TOut, Swiglu>(acc, out, wg - 1, tid % 128, split);
  __syncthreads();
  store_tile(out, y + int64_t{row0} * out_n + col0, rows, cols, out_n, vector_out, tid, M::threads);
}

// ---------------------------------------------------------------------------------------------
// f32 on CUDA cores: 64x64 tiles, 16 x 16 threads of 4 x 4 outputs each (rows ty + 16 i,
// columns tx + 16 j, so a warp's shared reads are broadcasts or conflict-free). Every output is
// a chain of fmaf over k in order, from 0.

constexpr int simt_bm = 64, simt_bn = 64, simt_bk = 16, simt_threads = 256;

__global__ void __launch_bounds__(simt_threads)
    grouped_gemm_simt_kernel(const float* x, const int32_t* x_entries, int32_t entries_per_row,
                             const int32_t* offsets, const float* w, float* y, int32_t num_rows,
                             int num_experts, int32_t n, int32_t k, tile_order order, float beta) {
  // k-major, so the inner loop reads a row of each; +4 keeps the transposing stores from all
  // landing in one bank.
  __shared__ float as[simt_bk][simt_bm + 4];
  __shared__ float bs[simt_bk][simt_bn + 4];
  __shared__ int64_t scan[simt_threads];
  __shared__ int32_t found[3];
  const int64_t block = blockIdx.x;
  find_tile<simt_bm, simt_threads>(offsets, num_experts, num_rows, order.m_tile(block), scan,
                                   found);
  const int32_t expert = found[0];
  if (expert < 0) return;
  const int32_t row0 = found[1], rows = found[2];
  const int32_t col0 = order.n_tile(block) * simt_bn;
  const int32_t cols = std::min(int32_t{simt_bn}, n - col0);
  const x_source<float> xs{x, x_entries, entries_per_row, row0, k};
  const float* b_src = w + (int64_t{expert} * n + col0) * k;
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;

  float acc[4][4] = {};
  for (int32_t k0 = 0; k0 < k; k0 += simt_bk) {
    for (int i = tid; i < simt_bm * simt_bk; i += simt_threads) {
      const int r = i / simt_bk, kk = i % simt_bk;
      const bool in_k = k0 + kk < k;
      as[kk][r] = r < rows && in_k ? xs.row(r)[k0 + kk] : 0.0f;
      bs[kk][r] = r < cols && in_k ? b_src[int64_t{r} * k + k0 + kk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < simt_bk; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next step overwrites the tiles
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = ty + 16 * i, c = tx + 16 * j;
      if (r < rows && c < cols) store_beta(y, int64_t{row0 + r} * n + col0 + c, acc[i][j], beta);
    }
}
static_assert(simt_bm == simt_bn, "the tile loader fills as and bs in one loop");

// ---------------------------------------------------------------------------------------------
// Host side.

struct grid_shape {
  int bm = 0, bn = 0;
  int64_t n_tiles = 0, m_tiles = 0, blocks = 0;
  // The kernels' view (grouped_gemm_can_run bounds the grid to int32 blocks).
  [[nodiscard]] tile_order order(const grouped_gemm_args& a) const noexcept {
    return {static_cast<int32_t>(n_tiles), static_cast<int32_t>(m_tiles), a.num_experts == 1};
  }
};

// Fewer than 64 rows per expert on average: decode-like, the narrow tiles. The choice depends
// only on host values, so a captured graph replays the same kernel for any routing.
bool narrow(const grouped_gemm_args& a) noexcept {
  return a.num_rows < 64 * a.num_experts;
}

// The most row tiles any routing of num_rows rows over num_experts experts needs: expert e's
// ceil(c_e / bm) <= (c_e + bm - 1) / bm where c_e > 0, and at most min(num_experts, num_rows)
// experts have rows, so the sum is at most (num_rows + min(num_experts, num_rows) (bm - 1)) / bm.
// At decode (a few rows over many experts) that is a few tiles where ceil(num_rows / bm) +
// num_experts was dozens: every block past the routing's tiles still searched the offsets and
// held its shared memory before exiting.
int64_t row_tiles_bound(int64_t num_rows, int64_t num_experts, int64_t bm) noexcept {
  return (num_rows + std::min(num_experts, num_rows) * (bm - 1)) / bm;
}

grid_shape grid_of(const grouped_gemm_args& a) noexcept {
  grid_shape g;
  if (a.dt == dtype::f32) {
    g.bm = simt_bm;
    g.bn = simt_bn;
  } else if (narrow(a)) {
    g.bm = narrow_tiles::bm;
    g.bn = narrow_tiles::bn;
  } else {
    g.bm = wide_tiles::bm;
    g.bn = wide_tiles::bn;
  }
  g.n_tiles = (a.n + g.bn - 1) / g.bn;
  g.m_tiles = row_tiles_bound(a.num_rows, a.num_experts, g.bm);
  g.blocks = g.n_tiles * g.m_tiles;
  return g;
}

// Past 48 KiB of dynamic shared memory a kernel must opt in. A host-side attribute, not a
// stream operation; false (the error cleared) where CUDA refuses it.
template <class Kernel>
bool opt_in_shared_memory(Kernel* kernel, size_t bytes) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) == cudaSuccess)
    return true;
  (void)cudaGetLastError();
  return false;
}

template <class Tiles, class TOut, class Loader>
kernel_status launch_mma(const grouped_gemm_args& a, cudaStream_t stream) {
  auto* kernel = grouped_gemm_mma_kernel<Tiles, TOut, Loader>;
  if (!opt_in_shared_memory(kernel, Loader::smem_bytes)) return kernel_status::launch_failed;
  // All of the SM's unified memory as shared memory, so that min_blocks blocks fit (two narrow
  // ones take 219 KB with their static arrays). A hint: a refusal only costs occupancy.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    (void)cudaGetLastError();
  const grid_shape g = grid_of(a);
  fp8_scales sc;
  if (a.weight_scale != nullptr) {
    sc.scale = a.weight_scale;
    sc.block_rows = static_cast<int32_t>(a.scale_block_rows);
    sc.block_cols = static_cast<int32_t>(a.scale_block_cols);
    sc.ld = a.scale_ld > 0 ? a.scale_ld : (a.k + a.scale_block_cols - 1) / a.scale_block_cols;
  }
  kernel<<<static_cast<unsigned>(g.blocks), Tiles::threads, Loader::smem_bytes, stream>>>(
      static_cast<const bf16*>(a.x), a.x_entries, static_cast<int32_t>(a.entries_per_x_row),
      a.expert_offsets, a.weights, sc, static_cast<TOut*>(a.y), static_cast<int32_t>(a.num_rows),
      static_cast<int>(a.num_experts), static_cast<int32_t>(a.n), static_cast<int32_t>(a.k),
      g.order(a), a.beta);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <class Tiles, class TOut, bool Swiglu>
kernel_status launch_mma(const grouped_gemm_args& a, cudaStream_t stream) {
  const bool aligned = aligned16(a.x) && aligned16(a.weights);
  if (a.weight_scale != nullptr) {
    if (a.k % 16 == 0 && aligned && a.scale_block_cols % 16 == 0)
      return launch_mma<Tiles, TOut, fp8_async_loader<Tiles, Swiglu>>(a, stream);
    return launch_mma<Tiles, TOut, element_loader<Tiles, true, Swiglu>>(a, stream);
  }
  if (a.k % 8 == 0 && aligned)
    return launch_mma<Tiles, TOut, async_loader<Tiles, Swiglu>>(a, stream);
  return launch_mma<Tiles, TOut, element_loader<Tiles, false, Swiglu>>(a, stream);
}

template <class TOut, bool Swiglu>
kernel_status launch_mma(const grouped_gemm_args& a, cudaStream_t stream) {
  return narrow(a) ? launch_mma<narrow_tiles, TOut, Swiglu>(a, stream)
                   : launch_mma<wide_tiles, TOut, Swiglu>(a, stream);
}

// Whether a call the host checks passed takes a wgmma kernel: its own conditions
// (grouped_gemm.hpp's wgmma) on an sm_90 card.
bool takes_wgmma(const grouped_gemm_args& a) noexcept {
  return a.wgmma && a.dt == dtype::bf16 && a.weight_scale == nullptr && a.beta == 0.0f &&
         a.x_entries == nullptr && !narrow(a) && a.k % 8 == 0 && aligned16(a.x) &&
         aligned16(a.weights) && detail::current_device_is_sm90();
}

// The TMA kernel's maps for a call, when it can take it: every weight row a TMA coordinate
// (int32), and maps the driver encodes (k == 0 has none: a map has no empty dimension).
struct tma_maps {
  CUtensorMap x, w;
};
std::optional<tma_maps> tma_maps_of(const grouped_gemm_args& a) noexcept {
  if (!a.tma || a.num_experts * a.n > INT32_MAX) return std::nullopt;
  const auto x = detail::bf16_tensor_map(a.x, a.num_rows, a.k, wgmma_tiles::bm);
  const auto w =
      detail::bf16_tensor_map(a.weights, a.num_experts * a.n, a.k, tma_tiles::w_box_rows);
  if (!x || !w) return std::nullopt;
  return tma_maps{*x, *w};
}

// The wgmma kernel by TMA where `maps` is given, else by cp.async.
template <class TOut, bool Swiglu>
kernel_status launch_wgmma(const grouped_gemm_args& a, const tma_maps* maps, cudaStream_t stream) {
  // With Swiglu a block's 128 output columns are its 256 weight rows: the same grid.
  const grid_shape g = grid_of(a);
  const auto blocks = static_cast<unsigned>(g.blocks);
  const int64_t out_n = Swiglu ? a.n / 2 : a.n;
  const bool vector_out = aligned16(a.y) && out_n % (16 / sizeof(TOut)) == 0;
  auto* y = static_cast<TOut*>(a.y);
  const auto rows = static_cast<int32_t>(a.num_rows), n = static_cast<int32_t>(a.n),
             k = static_cast<int32_t>(a.k);
  const auto experts = static_cast<int>(a.num_experts);
  if (maps != nullptr) {
    auto* kernel = grouped_gemm_tma_kernel<TOut, Swiglu>;
    if (!opt_in_shared_memory(kernel, tma_tiles::smem_bytes)) return kernel_status::launch_failed;
    kernel<<<blocks, tma_tiles::threads, tma_tiles::smem_bytes, stream>>>(
        maps->x, maps->w, a.expert_offsets, y, rows, experts, n, k, g.order(a), vector_out);
  } else {
    auto* kernel = grouped_gemm_wgmma_kernel<TOut, Swiglu>;
    if (!opt_in_shared_memory(kernel, wgmma_tiles::smem_bytes)) return kernel_status::launch_failed;
    kernel<<<blocks, wgmma_tiles::threads, wgmma_tiles::smem_bytes, stream>>>(
        static_cast<const bf16*>(a.x), a.expert_offsets, static_cast<const bf16*>(a.weights), y,
        rows, experts, n, k, g.order(a), vector_out);
  }
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <class TOut>
kernel_status launch_bf16(const grouped_gemm_args& a, grouped_gemm_kernel kernel,
                          const tma_maps* maps, cudaStream_t stream) {
  if (kernel == grouped_gemm_kernel::wgmma || kernel == grouped_gemm_kernel::wgmma_tma)
    return a.fuse_swiglu ? launch_wgmma<TOut, true>(a, maps, stream)
                         : launch_wgmma<TOut, false>(a, maps, stream);
  return a.fuse_swiglu ? launch_mma<TOut, true>(a, stream) : launch_mma<TOut, false>(a, stream);
}

kernel_status launch_f32(const grouped_gemm_args& a, cudaStream_t stream) {
  const grid_shape g = grid_of(a);
  grouped_gemm_simt_kernel<<<static_cast<unsigned>(g.blocks), simt_threads, 0, stream>>>(
      static_cast<const float*>(a.x), a.x_entries, static_cast<int32_t>(a.entries_per_x_row),
      a.expert_offsets, static_cast<const float*>(a.weights), static_cast<float*>(a.y),
      static_cast<int32_t>(a.num_rows), static_cast<int>(a.num_experts), static_cast<int32_t>(a.n),
      static_cast<int32_t>(a.k), g.order(a), a.beta);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status grouped_gemm_can_run(const grouped_gemm_args& a) noexcept {
  const bool types_ok = (a.dt == dtype::bf16 && (a.y_dt == dtype::bf16 || a.y_dt == dtype::f32)) ||
                        (a.dt == dtype::f32 && a.y_dt == dtype::f32);
  if (!types_ok) return kernel_status::unsupported_dtype;
  if (a.weight_scale != nullptr) {
    if (a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
    // The device indexes the grid with int32 block sizes.
    if (a.scale_block_rows < 1 || a.scale_block_cols < 1 || a.scale_block_rows > INT32_MAX ||
        a.scale_block_cols > INT32_MAX)
      return kernel_status::unsupported_shape;
    if (a.scale_ld != 0 && (a.scale_ld < 0 || a.scale_ld < (a.k + a.scale_block_cols - 1) / a.scale_block_cols))
      return kernel_status::unsupported_shape;
  }
  if (a.num_experts < 1 || a.num_experts > grouped_gemm_max_experts)
    return kernel_status::unsupported_shape;
  if (a.fuse_swiglu && (a.n % 2 != 0 || a.dt != dtype::bf16 || a.beta != 0.0f))
    return kernel_status::unsupported_shape;
  if (a.x_entries != nullptr && (a.entries_per_x_row < 1 || a.entries_per_x_row > INT32_MAX ||
                                 a.num_x_rows < 0 || (a.k > 0 && a.num_x_rows > INT64_MAX / a.k)))
    return kernel_status::unsupported_shape;
  // Rows and columns are int32 on the device (the offsets are); elements are int64.
  if (a.num_rows < 0 || a.n < 0 || a.k < 0 || a.num_rows > INT32_MAX || a.n > INT32_MAX ||
      a.k > INT32_MAX)
    return kernel_status::unsupported_shape;
  const int64_t rows_or_experts = std::max(a.num_rows, a.num_experts);
  if (a.k > 0 && std::max(a.n, int64_t{1}) > INT64_MAX / a.k / rows_or_experts)
    return kernel_status::unsupported_shape;
  if (a.n > 0 && a.num_rows > INT64_MAX / a.n) return kernel_status::unsupported_shape;
  if (a.num_rows == 0 || a.n == 0) return kernel_status::ok;
  if (grid_of(a).blocks > INT32_MAX) return kernel_status::unsupported_shape;
  if (a.expert_offsets == nullptr || a.y == nullptr) return kernel_status::unsupported_shape;
  if (a.k > 0 && (a.x == nullptr || a.weights == nullptr)) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

bool grouped_gemm_uses_wgmma(const grouped_gemm_args& a) noexcept {
  return grouped_gemm_can_run(a) == kernel_status::ok && a.num_rows > 0 && a.n > 0 &&
         takes_wgmma(a);
}

kernel_status grouped_gemm_run(const grouped_gemm_args& a, cudaStream_t stream,
                               grouped_gemm_kernel* launched) noexcept {
  grouped_gemm_kernel took = grouped_gemm_kernel::none;
  kernel_status s = grouped_gemm_can_run(a);
  if (s == kernel_status::ok && a.num_rows > 0 && a.n > 0) {
    if (a.dt == dtype::bf16) {
      std::optional<tma_maps> maps;
      took = grouped_gemm_kernel::wmma;
      if (takes_wgmma(a)) {
        maps = tma_maps_of(a);
        took = maps ? grouped_gemm_kernel::wgmma_tma : grouped_gemm_kernel::wgmma;
      }
      const tma_maps* m = maps ? &*maps : nullptr;
      s = a.y_dt == dtype::bf16 ? launch_bf16<bf16>(a, took, m, stream)
                                : launch_bf16<float>(a, took, m, stream);
    } else {
      took = grouped_gemm_kernel::simt;
      s = launch_f32(a, stream);
    }
  }
  if (launched != nullptr) *launched = s == kernel_status::ok ? took : grouped_gemm_kernel::none;
  return s;
}

}  // namespace moe::kernels::cuda
