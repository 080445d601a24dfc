#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mma.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/grouped_gemm.hpp"

namespace moe::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using detail::store;

// ---------------------------------------------------------------------------------------------
// Which tile a block computes.
//
// Blocks are numbered n tile fastest, so the blocks in flight together share their rows of x
// (read once from memory, then from L2) and sweep one expert's weight at a time. Expert e's rows
// are cut into ceil(count_e / BM) tiles of BM rows; the tiles of all experts are numbered in
// expert order. sum_e ceil(count_e / BM) < num_rows / BM + num_experts, so a grid of
// ceil(num_rows / BM) + num_experts row tiles covers every routing of num_rows rows.

// Expert e's rows, clamped into [0, num_rows] so that no offset, however wrong, sends a block
// outside x or y. For valid offsets the clamp changes nothing.
__device__ inline void expert_rows(const int32_t* offsets, int e, int32_t num_rows, int32_t& lo,
                                   int32_t& hi) {
  lo = std::min(std::max(offsets[e], 0), num_rows);
  hi = std::min(std::max(offsets[e + 1], lo), num_rows);
}

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
// WarpsM x WarpsN grid, each holding (BM / WarpsM, BN / WarpsN) of float32 accumulators as 16x16
// WMMA fragments. The weight tile read as (n, k) rows is exactly WMMA's column-major B (k, n).
template <int BM, int BN, int BK, int WarpsM, int WarpsN, int Stages>
struct mma_tiles {
  static constexpr int bm = BM, bn = BN, bk = BK, warps_n = WarpsN, stages = Stages;
  static constexpr int threads = 32 * WarpsM * WarpsN;
  // 8 elements (16 bytes) of padding per row: the 16-byte pieces of 8 consecutive rows (what
  // one phase of a fragment load reads) then fall in 8 different groups of 4 banks, for BK = 32
  // and 64 alike, and each 16-row fragment stays 32-byte aligned as WMMA requires
  // (16 * (BK + 8) * 2 bytes is a multiple of 32 for BK % 8 == 0).
  static constexpr int ld = BK + 8;
  static constexpr int warp_rows = BM / WarpsM, warp_cols = BN / WarpsN;
  static constexpr int frags_m = warp_rows / 16, frags_n = warp_cols / 16;
  static constexpr size_t stage_elements = size_t{BM + BN} * ld;
  static constexpr size_t smem_bytes = Stages * stage_elements * sizeof(bf16);
  static_assert(BM % (16 * WarpsM) == 0 && BN % (16 * WarpsN) == 0 && BK % 16 == 0);
  static_assert(Stages >= 2);
  // The epilogue reuses the stages as one 16x16 float32 scratch per warp.
  static_assert(smem_bytes >= size_t{WarpsM} * WarpsN * 256 * sizeof(float));
};

// Many rows per expert (prefill, training): 128x128 tiles, 8 warps of 64x32.
using wide_tiles = mma_tiles<128, 128, 32, 2, 4, 4>;
// Few rows per expert (decode): the weight is what costs, so every block streams a 128-column
// slice of one expert's weight once, over a 32-row tile; 4 warps of 32x32, deeper k steps.
using narrow_tiles = mma_tiles<32, 128, 64, 1, 4, 4>;

// Queues one k step of the tiles into stage `stage`. Rows past the tile's rows (x) or past n
// (weights) are not loaded at all: an output element depends only on its own row of x and its
// own row of the weight, and those outputs are never stored. Columns past k are zero-filled in
// both operands, so they add exact zeros to the stored outputs.
// Async: 16-byte cp.async copies (k % 8 == 0 and 16-byte aligned rows, so each 8-element chunk
// is wholly inside or wholly past k); otherwise element loads and plain shared stores.
template <class Tiles, bool Async>
__device__ void load_stage(bf16* stage, const bf16* a_src, int32_t a_rows, const bf16* b_src,
                           int32_t b_rows, int32_t k, int32_t k0) {
  bf16* as = stage;
  bf16* bs = stage + Tiles::bm * Tiles::ld;
  const int tid = static_cast<int>(threadIdx.x);
  if constexpr (Async) {
    constexpr int chunks = Tiles::bk / 8;
    for (int c = tid; c < (Tiles::bm + Tiles::bn) * chunks; c += Tiles::threads) {
      const int r = c / chunks, kc = (c % chunks) * 8;
      const bool is_a = r < Tiles::bm;
      const int row = is_a ? r : r - Tiles::bm;
      if (row >= (is_a ? a_rows : b_rows)) continue;
      const bf16* src = (is_a ? a_src : b_src) + int64_t{row} * k;
      bf16* dst = (is_a ? as : bs) + row * Tiles::ld + kc;
      // Past k: a 0-byte copy of the row start (a valid address) and 16 bytes of zeros.
      if (k0 + kc < k)
        __pipeline_memcpy_async(dst, src + k0 + kc, 16);
      else
        __pipeline_memcpy_async(dst, src, 16, 16);
    }
  } else {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = tid; i < (Tiles::bm + Tiles::bn) * Tiles::bk; i += Tiles::threads) {
      const int r = i / Tiles::bk, kk = i % Tiles::bk;
      const bool is_a = r < Tiles::bm;
      const int row = is_a ? r : r - Tiles::bm;
      if (row >= (is_a ? a_rows : b_rows)) continue;
      const bf16* src = (is_a ? a_src : b_src) + int64_t{row} * k;
      (is_a ? as : bs)[row * Tiles::ld + kk] = k0 + kk < k ? src[k0 + kk] : zero;
    }
  }
}

template <class Tiles, class TOut, bool Async>
__global__ void __launch_bounds__(Tiles::threads)
    grouped_gemm_mma_kernel(const bf16* x, const int32_t* offsets, const bf16* w, TOut* y,
                            int32_t num_rows, int num_experts, int32_t n, int32_t k,
                            int32_t n_tiles) {
  extern __shared__ __align__(128) unsigned char grouped_gemm_smem[];
  __shared__ int64_t scan[Tiles::threads];
  __shared__ int32_t found[3];
  const int64_t block = blockIdx.x;
  find_tile<Tiles::bm, Tiles::threads>(offsets, num_experts, num_rows, block / n_tiles, scan,
                                       found);
  const int32_t expert = found[0];
  if (expert < 0) return;  // the whole block: past the last tile of this routing
  const int32_t row0 = found[1], rows = found[2];
  const int32_t col0 = static_cast<int32_t>(block % n_tiles) * Tiles::bn;
  const int32_t cols = std::min(int32_t{Tiles::bn}, n - col0);
  const bf16* a_src = x + int64_t{row0} * k;
  const bf16* b_src = w + (int64_t{expert} * n + col0) * k;

  auto* stages = reinterpret_cast<bf16*>(grouped_gemm_smem);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_row0 = (warp / Tiles::warps_n) * Tiles::warp_rows;
  const int warp_col0 = (warp % Tiles::warps_n) * Tiles::warp_cols;

  // Fragments wholly past the tile's rows or past n are skipped (warp-uniform conditions, so
  // the warp-wide WMMA calls stay converged): a decode tile holds a few rows of 32 or 128.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tiles::frags_m][Tiles::frags_n];
#pragma unroll
  for (int i = 0; i < Tiles::frags_m; ++i)
#pragma unroll
    for (int j = 0; j < Tiles::frags_n; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // The pipeline: stage s % Stages holds k step s. Every thread commits one group per step
  // (empty past the last), so "all but the newest Stages - 2 groups" is always "up to this step".
  const int32_t k_steps = (k + Tiles::bk - 1) / Tiles::bk;
  for (int s = 0; s < Tiles::stages - 1; ++s) {
    if (s < k_steps)
      load_stage<Tiles, Async>(stages + s * Tiles::stage_elements, a_src, rows, b_src, cols, k,
                               s * Tiles::bk);
    __pipeline_commit();
  }
  for (int32_t step = 0; step < k_steps; ++step) {
    __pipeline_wait_prior(Tiles::stages - 2);
    // Makes every thread's copies of this step visible, and tells the loads below that every
    // warp is done with the stage they overwrite (read in the previous step).
    __syncthreads();
    const int32_t next = step + Tiles::stages - 1;
    if (next < k_steps)
      load_stage<Tiles, Async>(stages + (next % Tiles::stages) * Tiles::stage_elements, a_src, rows,
                               b_src, cols, k, next * Tiles::bk);
    __pipeline_commit();

    const bf16* as = stages + (step % Tiles::stages) * Tiles::stage_elements;
    const bf16* bs = as + Tiles::bm * Tiles::ld;
#pragma unroll
    for (int kk = 0; kk < Tiles::bk; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b[Tiles::frags_n];
#pragma unroll
      for (int j = 0; j < Tiles::frags_n; ++j)
        if (warp_col0 + j * 16 < cols)
          wmma::load_matrix_sync(b[j], bs + (warp_col0 + j * 16) * Tiles::ld + kk, Tiles::ld);
#pragma unroll
      for (int i = 0; i < Tiles::frags_m; ++i) {
        if (warp_row0 + i * 16 < rows) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
          wmma::load_matrix_sync(a, as + (warp_row0 + i * 16) * Tiles::ld + kk, Tiles::ld);
#pragma unroll
          for (int j = 0; j < Tiles::frags_n; ++j)
            if (warp_col0 + j * 16 < cols) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
        }
      }
    }
  }

  // Epilogue: each fragment goes through a per-warp 16x16 float32 scratch (fragment layouts are
  // opaque), then out with bounds and the one rounding to TOut. The stages are free once every
  // warp is past its last step.
  __pipeline_wait_prior(0);
  __syncthreads();
  float* scratch = reinterpret_cast<float*>(grouped_gemm_smem) + warp * 256;
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
        for (int e = lane; e < 256; e += 32) {
          const int r = r0 + e / 16, c = c0 + e % 16;
          if (r < rows && c < cols) store(y, int64_t{row0 + r} * n + col0 + c, scratch[e]);
        }
        __syncwarp();  // the next fragment overwrites the scratch
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// f32 on CUDA cores: 64x64 tiles, 16 x 16 threads of 4 x 4 outputs each (rows ty + 16 i,
// columns tx + 16 j, so a warp's shared reads are broadcasts or conflict-free). Every output is
// a chain of fmaf over k in order, from 0.

constexpr int simt_bm = 64, simt_bn = 64, simt_bk = 16, simt_threads = 256;

__global__ void __launch_bounds__(simt_threads)
    grouped_gemm_simt_kernel(const float* x, const int32_t* offsets, const float* w, float* y,
                             int32_t num_rows, int num_experts, int32_t n, int32_t k,
                             int32_t n_tiles) {
  // k-major, so the inner loop reads a row of each; +4 keeps the transposing stores from all
  // landing in one bank.
  __shared__ float as[simt_bk][simt_bm + 4];
  __shared__ float bs[simt_bk][simt_bn + 4];
  __shared__ int64_t scan[simt_threads];
  __shared__ int32_t found[3];
  const int64_t block = blockIdx.x;
  find_tile<simt_bm, simt_threads>(offsets, num_experts, num_rows, block / n_tiles, scan, found);
  const int32_t expert = found[0];
  if (expert < 0) return;
  const int32_t row0 = found[1], rows = found[2];
  const int32_t col0 = static_cast<int32_t>(block % n_tiles) * simt_bn;
  const int32_t cols = std::min(int32_t{simt_bn}, n - col0);
  const float* a_src = x + int64_t{row0} * k;
  const float* b_src = w + (int64_t{expert} * n + col0) * k;
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;

  float acc[4][4] = {};
  for (int32_t k0 = 0; k0 < k; k0 += simt_bk) {
    for (int i = tid; i < simt_bm * simt_bk; i += simt_threads) {
      const int r = i / simt_bk, kk = i % simt_bk;
      const bool in_k = k0 + kk < k;
      as[kk][r] = r < rows && in_k ? a_src[int64_t{r} * k + k0 + kk] : 0.0f;
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
      if (r < rows && c < cols) y[int64_t{row0 + r} * n + col0 + c] = acc[i][j];
    }
}
static_assert(simt_bm == simt_bn, "the tile loader fills as and bs in one loop");

// ---------------------------------------------------------------------------------------------
// Host side.

struct grid_shape {
  int bm = 0, bn = 0;
  int64_t n_tiles = 0, blocks = 0;
};

// Fewer than 64 rows per expert on average: decode-like, the narrow tiles. The choice depends
// only on host values, so a captured graph replays the same kernel for any routing.
bool narrow(const grouped_gemm_args& a) noexcept {
  return a.num_rows < 64 * a.num_experts;
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
  g.blocks = g.n_tiles * ((a.num_rows + g.bm - 1) / g.bm + a.num_experts);
  return g;
}

bool aligned16(const void* p) noexcept {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <class Tiles, class TOut, bool Async>
kernel_status launch_mma(const grouped_gemm_args& a, cudaStream_t stream) {
  auto* kernel = grouped_gemm_mma_kernel<Tiles, TOut, Async>;
  // Past 48 KiB of dynamic shared memory a kernel must opt in. A host-side attribute, not a
  // stream operation.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(Tiles::smem_bytes)) != cudaSuccess) {
    (void)cudaGetLastError();
    return kernel_status::launch_failed;
  }
  const grid_shape g = grid_of(a);
  kernel<<<static_cast<unsigned>(g.blocks), Tiles::threads, Tiles::smem_bytes, stream>>>(
      static_cast<const bf16*>(a.x), a.expert_offsets, static_cast<const bf16*>(a.weights),
      static_cast<TOut*>(a.y), static_cast<int32_t>(a.num_rows), static_cast<int>(a.num_experts),
      static_cast<int32_t>(a.n), static_cast<int32_t>(a.k), static_cast<int32_t>(g.n_tiles));
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

template <class Tiles, class TOut>
kernel_status launch_mma(const grouped_gemm_args& a, cudaStream_t stream) {
  if (a.k % 8 == 0 && aligned16(a.x) && aligned16(a.weights))
    return launch_mma<Tiles, TOut, true>(a, stream);
  return launch_mma<Tiles, TOut, false>(a, stream);
}

template <class TOut>
kernel_status launch_bf16(const grouped_gemm_args& a, cudaStream_t stream) {
  return narrow(a) ? launch_mma<narrow_tiles, TOut>(a, stream)
                   : launch_mma<wide_tiles, TOut>(a, stream);
}

kernel_status launch_f32(const grouped_gemm_args& a, cudaStream_t stream) {
  const grid_shape g = grid_of(a);
  grouped_gemm_simt_kernel<<<static_cast<unsigned>(g.blocks), simt_threads, 0, stream>>>(
      static_cast<const float*>(a.x), a.expert_offsets, static_cast<const float*>(a.weights),
      static_cast<float*>(a.y), static_cast<int32_t>(a.num_rows), static_cast<int>(a.num_experts),
      static_cast<int32_t>(a.n), static_cast<int32_t>(a.k), static_cast<int32_t>(g.n_tiles));
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status grouped_gemm_can_run(const grouped_gemm_args& a) noexcept {
  const bool types_ok = (a.dt == dtype::bf16 && (a.y_dt == dtype::bf16 || a.y_dt == dtype::f32)) ||
                        (a.dt == dtype::f32 && a.y_dt == dtype::f32);
  if (!types_ok) return kernel_status::unsupported_dtype;
  if (a.num_experts < 1 || a.num_experts > grouped_gemm_max_experts)
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

kernel_status grouped_gemm_run(const grouped_gemm_args& a, cudaStream_t stream) noexcept {
  if (auto s = grouped_gemm_can_run(a); s != kernel_status::ok) return s;
  if (a.num_rows == 0 || a.n == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::bf16:
      return a.y_dt == dtype::bf16 ? launch_bf16<bf16>(a, stream) : launch_bf16<float>(a, stream);
    case dtype::f32: return launch_f32(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
