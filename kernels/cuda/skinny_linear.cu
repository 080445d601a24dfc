#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/skinny_linear.hpp"

namespace moe::kernels::cuda {
namespace {

using bf16 = __nv_bfloat16;
using detail::aligned16;
using detail::bf16_high;
using detail::bf16_low;
using detail::load;
using detail::store;

constexpr int warps_per_block = 8;
constexpr int threads_per_block = warps_per_block * 32;
// Weight loads each lane has in flight before it uses the first: 16 bytes each (8 for FP8), with
// two blocks of 8 warps per SM that is 32 KiB in flight per SM, about what an H200's
// bandwidth-latency product asks for.
constexpr int unroll = 4;
// Warps that keep an H200's memory busy (132 SMs x 32): a product with fewer columns splits k
// over up to warps_per_block warps per column...
constexpr int64_t target_warps = 4096;
// ... as long as each warp keeps at least this many chunks (loads) of its column to stream.
constexpr int64_t min_chunks_per_warp = 64;

// How a chunk of a weight row (one load per lane) becomes `elements` floats. FP8 rows load 8
// bytes at a time, so that a lane covers the same 8 columns as with bf16: an FP8 weight and its
// bf16 expansion then give the same sums in the same order, bit for bit.
struct weight_f32 {
  static constexpr int elements = 4;
  static constexpr int bytes = 4;
  using chunk = uint4;
};
struct weight_bf16 {
  static constexpr int elements = 8;
  static constexpr int bytes = 2;
  using chunk = uint4;
};
struct weight_fp8 {
  static constexpr int elements = 8;
  static constexpr int bytes = 1;
  using chunk = uint2;
};

struct fp8_grid {
  const float* scale = nullptr;
  int64_t block_rows = 1;
  int64_t block_cols = 1;
  int64_t scale_ld = 0;
};

// Weights are read once: streamed past the caches (evict first), so that x, which every warp
// reads, stays in L1.
template <class Chunk>
__device__ __forceinline__ Chunk load_streaming(const void* p) {
  return __ldcs(static_cast<const Chunk*>(p));
}
__device__ __forceinline__ uint4 load_cached(const void* p) {
  return __ldg(static_cast<const uint4*>(p));
}

__device__ __forceinline__ void unpack(const uint4& u, float (&f)[4], weight_f32, const fp8_grid&,
                                       int64_t, int64_t) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[8], weight_bf16, const fp8_grid&,
                                       int64_t, int64_t) {
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bf16_low(words[i]);
    f[2 * i + 1] = bf16_high(words[i]);
  }
}
// bf16(e4m3 * scale), as fp8_dequantize_kernel expands it (block_cols is a multiple of 8, so
// the chunk's 8 elements share one scale).
__device__ __forceinline__ void unpack(const uint2& u, float (&f)[8], weight_fp8, const fp8_grid& g,
                                       int64_t row, int64_t col) {
  const float s = __ldg(g.scale + (row / g.block_rows) * g.scale_ld + col / g.block_cols);
  const uint32_t words[2] = {u.x, u.y};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    __nv_fp8_e4m3 v;
    v.__x = static_cast<__nv_fp8_storage_t>(words[i / 4] >> (8 * (i % 4)));
    f[i] = __bfloat162float(__float2bfloat16_rn(static_cast<float>(v) * s));
  }
}

// `n` consecutive elements of x from p (16-byte aligned) as floats.
template <int N>
__device__ __forceinline__ void load_x(const float* p, float (&f)[N]) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const uint4 u = load_cached(p + 4 * i);
    f[4 * i] = __uint_as_float(u.x);
    f[4 * i + 1] = __uint_as_float(u.y);
    f[4 * i + 2] = __uint_as_float(u.z);
    f[4 * i + 3] = __uint_as_float(u.w);
  }
}
template <int N>
__device__ __forceinline__ void load_x(const bf16* p, float (&f)[N]) {
  if constexpr (N == 4) {  // the four columns of an f32 weight's chunk: 8 bytes
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    f[0] = bf16_low(u.x);
    f[1] = bf16_high(u.x);
    f[2] = bf16_low(u.y);
    f[3] = bf16_high(u.y);
  } else {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
      const uint4 u = load_cached(p + 8 * i);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        f[8 * i + 2 * j] = bf16_low(words[j]);
        f[8 * i + 2 * j + 1] = bf16_high(words[j]);
      }
    }
  }
}

// Row strides and the batch's offsets, in elements (skinny_linear_args's, zeros resolved).
struct strides {
  int64_t ldx, ldw, ldy;
  int64_t batch_x, batch_w, batch_y;
};

// Rows past skinny_linear_max_rows run in passes of that many, blockIdx.z the pass, each
// streaming the whole weight again (from L2 where it is small: the router's, the absorbed
// attention's). Moves x and y to the pass's first row; its rows.
template <int R, class TX, class TY>
__device__ __forceinline__ int pass_rows(const TX*& x, TY*& y, int rows, const strides& st) {
  const int first = static_cast<int>(blockIdx.z) * static_cast<int>(skinny_linear_max_rows);
  x += first * st.ldx;
  y += first * st.ldy;
  return min(rows - first, R);
}

// n_by_k: one column (output feature) per warp, or k_split warps per column, each over a
// contiguous slice of k's chunks; R rows at most (rows at run time); blockIdx.y is the product
// of the batch. Every lane sums its chunks in order; the warp's lanes, then the column's warps
// (in order), are summed by a fixed tree. Swiglu: column j's warp streams two weight rows, j
// (gate) and n + j (up), over the same x, and stores silu(gate) * up.
template <class TX, class W, class TY, int R, bool Swiglu>
__global__ void __launch_bounds__(threads_per_block)
    skinny_linear_kernel(const TX* x, const void* w, TY* y, int rows, int64_t n, int64_t k,
                         float beta, int k_split, fp8_grid grid, strides st) {
  constexpr int V = W::elements;
  constexpr int P = Swiglu ? 2 : 1;  // weight rows per output column
  __shared__ float partial[warps_per_block][P][R];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t col = int64_t{blockIdx.x} * (warps_per_block / k_split) + warp / k_split;
  const int part = warp % k_split;
  x += blockIdx.y * st.batch_x;
  w = static_cast<const char*>(w) + blockIdx.y * st.batch_w * W::bytes;
  y += blockIdx.y * st.batch_y;
  rows = pass_rows<R>(x, y, rows, st);

  float acc[P][R];
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[q][r] = 0.0f;
  if (col < n) {
    const int64_t chunks = k / V;
    const int64_t per_part = (chunks + k_split - 1) / k_split;
    const int64_t begin = part * per_part, end = std::min(chunks, begin + per_part);
    const char* w_row[P];
#pragma unroll
    for (int q = 0; q < P; ++q)
      w_row[q] = static_cast<const char*>(w) + (col + q * n) * st.ldw * W::bytes;
    for (int64_t c0 = begin + lane; c0 < end; c0 += 32 * unroll) {
      typename W::chunk chunk[P][unroll];
#pragma unroll
      for (int u = 0; u < unroll; ++u)
        if (c0 + 32 * u < end)
#pragma unroll
          for (int q = 0; q < P; ++q)
            chunk[q][u] = load_streaming<typename W::chunk>(
                w_row[q] + (c0 + 32 * u) * sizeof(typename W::chunk));
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const int64_t c = c0 + 32 * u;
        if (c >= end) break;
        float wf[P][V];
#pragma unroll
        for (int q = 0; q < P; ++q) unpack(chunk[q][u], wf[q], W{}, grid, col + q * n, c * V);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r >= rows) break;
          float xf[V];
          load_x(x + r * st.ldx + c * V, xf);
#pragma unroll
          for (int q = 0; q < P; ++q)
#pragma unroll
            for (int v = 0; v < V; ++v) acc[q][r] = fmaf(xf[v], wf[q][v], acc[q][r]);
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      for (int offset = 16; offset > 0; offset /= 2)
        acc[q][r] += __shfl_xor_sync(0xffffffffu, acc[q][r], offset);
    }
  if (lane == 0)
#pragma unroll
    for (int q = 0; q < P; ++q)
#pragma unroll
      for (int r = 0; r < R; ++r) partial[warp][q][r] = acc[q][r];
  __syncthreads();
  if (part == 0 && col < n && lane < rows) {
    float sum[P];
#pragma unroll
    for (int q = 0; q < P; ++q) {
      sum[q] = 0.0f;
      for (int p = 0; p < k_split; ++p) sum[q] += partial[warp + p][q][lane];
    }
    const int64_t i = lane * st.ldy + col;
    float s = sum[0];
    if constexpr (Swiglu) s = __fmul_rn(detail::silu(sum[0]), sum[P - 1]);
    if (beta != 0.0f) s = __fadd_rn(s, __fmul_rn(beta, load(y, i)));
    store(y, i, s);
  }
}

// k_by_n: each lane owns one chunk of W::elements consecutive columns (one load of a weight
// row), a warp 32 chunks, the block's kn_warps warps contiguous slices of k for the same
// columns; blockIdx.y is the product of the batch. Each lane sums its slice of k in order for
// every (row, column) it owns; the warps' sums meet in a fixed tree through shared memory
// ((w0 + w4) + (w2 + w6)) + ((w1 + w5) + (w3 + w7)), so the same inputs give the same bits.
constexpr int kn_warps = warps_per_block;
constexpr int kn_unroll = 8;  // weight rows in flight per lane: a k slice of 16 in two rounds

template <class TX, class W, class TY, int R>
__global__ void __launch_bounds__(threads_per_block)
    skinny_linear_kn_kernel(const TX* x, const void* w, TY* y, int rows, int64_t n, int64_t k,
                            float beta, strides st) {
  constexpr int V = W::elements;
  // Half the warps' sums at a time: 32 KiB at 8 rows of bf16 chunks.
  __shared__ float exchange[kn_warps / 2][R][32 * V];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  x += blockIdx.y * st.batch_x;
  w = static_cast<const char*>(w) + blockIdx.y * st.batch_w * W::bytes;
  y += blockIdx.y * st.batch_y;
  rows = pass_rows<R>(x, y, rows, st);
  const int64_t col0 = (int64_t{blockIdx.x} * 32 + lane) * V;
  const bool active = col0 < n;  // n is a multiple of V: a chunk is whole or absent
  const int64_t per_warp = (k + kn_warps - 1) / kn_warps;
  const int64_t begin = std::min(k, warp * per_warp), end = std::min(k, begin + per_warp);

  float acc[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[r][v] = 0.0f;
  if (active) {
    const char* w_col = static_cast<const char*>(w) + col0 * W::bytes;
    for (int64_t d0 = begin; d0 < end; d0 += kn_unroll) {
      typename W::chunk chunk[kn_unroll];
#pragma unroll
      for (int u = 0; u < kn_unroll; ++u)
        if (d0 + u < end)
          chunk[u] = load_streaming<typename W::chunk>(w_col + (d0 + u) * st.ldw * W::bytes);
#pragma unroll
      for (int u = 0; u < kn_unroll; ++u) {
        const int64_t d = d0 + u;
        if (d >= end) break;
        float wf[V];
        unpack(chunk[u], wf, W{}, fp8_grid{}, 0, 0);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r >= rows) break;
          const float xv = load(x, r * st.ldx + d);  // the warp's lanes read one element
#pragma unroll
          for (int v = 0; v < V; ++v) acc[r][v] = fmaf(xv, wf[v], acc[r][v]);
        }
      }
    }
  }
#pragma unroll
  for (int half = kn_warps / 2; half > 0; half /= 2) {
    if (warp >= half && warp < 2 * half)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) exchange[warp - half][r][lane * V + v] = acc[r][v];
    __syncthreads();
    if (warp < half)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[r][v] += exchange[warp][r][lane * V + v];
    __syncthreads();
  }
  if (warp != 0 || !active) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t i = r * st.ldy + col0 + v;
      float s = acc[r][v];
      if (beta != 0.0f) s = __fadd_rn(s, __fmul_rn(beta, load(y, i)));
      store(y, i, s);
    }
  }
}

strides strides_of(const skinny_linear_args& a) {
  const bool kn = a.w_layout == skinny_weight_layout::k_by_n;
  return strides{a.ldx > 0 ? a.ldx : a.k,
                 a.ldw > 0 ? a.ldw : (kn ? a.n : a.k),
                 a.ldy > 0 ? a.ldy : a.n,
                 a.stride_x,
                 a.stride_w,
                 a.stride_y};
}

template <class TX, class W, class TY, int R>
kernel_status launch_rows(const skinny_linear_args& a, cudaStream_t stream) {
  const auto batch = static_cast<unsigned>(a.batch);
  const auto passes =
      static_cast<unsigned>((a.rows + skinny_linear_max_rows - 1) / skinny_linear_max_rows);
  if (a.w_layout == skinny_weight_layout::k_by_n) {
    if constexpr (W::bytes == 1) {
      return kernel_status::unsupported_dtype;  // can_run refuses FP8 with k_by_n: never reached
    } else {
      const int64_t cols_per_block = 32 * W::elements;
      const dim3 blocks(static_cast<unsigned>((a.n + cols_per_block - 1) / cols_per_block), batch,
                        passes);
      skinny_linear_kn_kernel<TX, W, TY, R><<<blocks, threads_per_block, 0, stream>>>(
          static_cast<const TX*>(a.x), a.w, static_cast<TY*>(a.y), static_cast<int>(a.rows), a.n,
          a.k, a.beta, strides_of(a));
      return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
    }
  }
  const int64_t chunks = a.k / W::elements;
  int k_split = 1;
  while (k_split < warps_per_block && a.n * a.batch * k_split < target_warps &&
         chunks / (2 * k_split) >= min_chunks_per_warp)
    k_split *= 2;
  const int64_t cols_per_block = warps_per_block / k_split;
  const dim3 blocks(static_cast<unsigned>((a.n + cols_per_block - 1) / cols_per_block), batch,
                    passes);
  fp8_grid grid;
  if constexpr (W::bytes == 1) {
    grid.scale = a.w_scale;
    grid.block_rows = a.block_rows;
    grid.block_cols = a.block_cols;
    grid.scale_ld = a.scale_ld > 0 ? a.scale_ld : (a.k + a.block_cols - 1) / a.block_cols;
  }
  auto* kernel = a.swiglu ? skinny_linear_kernel<TX, W, TY, R, true>
                          : skinny_linear_kernel<TX, W, TY, R, false>;
  kernel<<<blocks, threads_per_block, 0, stream>>>(static_cast<const TX*>(a.x), a.w,
                                                   static_cast<TY*>(a.y), static_cast<int>(a.rows),
                                                   a.n, a.k, a.beta, k_split, grid, strides_of(a));
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

// Rows rounded up to the next instantiated bound: 1, 2, 4 or 8.
template <class TX, class W, class TY>
kernel_status launch(const skinny_linear_args& a, cudaStream_t stream) {
  static_assert(skinny_linear_max_rows == 8, "instantiate the row bounds up to the maximum");
  if (a.rows <= 1) return launch_rows<TX, W, TY, 1>(a, stream);
  if (a.rows <= 2) return launch_rows<TX, W, TY, 2>(a, stream);
  if (a.rows <= 4) return launch_rows<TX, W, TY, 4>(a, stream);
  return launch_rows<TX, W, TY, 8>(a, stream);
}

template <class TX, class W>
kernel_status launch_out(const skinny_linear_args& a, cudaStream_t stream) {
  return a.y_dt == dtype::f32 ? launch<TX, W, float>(a, stream) : launch<TX, W, bf16>(a, stream);
}

}  // namespace

kernel_status skinny_linear_can_run(const skinny_linear_args& a) noexcept {
  const bool float_dt = a.x_dt == dtype::f32 || a.x_dt == dtype::bf16;
  if (!float_dt || (a.y_dt != dtype::f32 && a.y_dt != dtype::bf16))
    return kernel_status::unsupported_dtype;
  const bool fp8 = a.w_dt == dtype::f8_e4m3;
  // x and w alike, or bf16 x with an FP8 or f32 weight (the router's: its bf16 input widened).
  if (a.w_dt != a.x_dt && !((fp8 || a.w_dt == dtype::f32) && a.x_dt == dtype::bf16))
    return kernel_status::unsupported_dtype;
  const bool kn = a.w_layout == skinny_weight_layout::k_by_n;
  if (kn && fp8) return kernel_status::unsupported_dtype;
  if (a.swiglu && (kn || a.batch != 1 || a.beta != 0.0f)) return kernel_status::unsupported_shape;
  if (a.w_layout != skinny_weight_layout::n_by_k && !kn) return kernel_status::unsupported_shape;
  if (a.rows < 0 || a.n < 0 || a.k < 0 || a.rows > skinny_linear_max_rows * 65535 || a.batch < 1 ||
      a.batch > 65535 || (a.batch > 1 && (fp8 || a.stride_y == 0)))
    return kernel_status::unsupported_shape;
  if (a.ldx < 0 || a.ldw < 0 || a.ldy < 0 || a.stride_x < 0 || a.stride_w < 0 || a.stride_y < 0)
    return kernel_status::unsupported_shape;
  const strides st = strides_of(a);
  if (st.ldx < a.k || st.ldw < (kn ? a.n : a.k) || st.ldy < a.n)
    return kernel_status::unsupported_shape;
  // Every element offset (and 8 times it, a byte offset of f32 with room) fits int64: the last
  // product's last row plus a row, for each matrix.
  constexpr int64_t limit = INT64_MAX / 8;
  const auto span_fits = [&](int64_t batch_stride, int64_t rows, int64_t ld) {
    if (batch_stride > 0 && a.batch - 1 > limit / batch_stride) return false;
    if (ld > 0 && rows > limit / ld) return false;
    return (a.batch - 1) * batch_stride <= limit - rows * ld;
  };
  if (!span_fits(st.batch_x, a.rows, st.ldx) || !span_fits(st.batch_y, a.rows, st.ldy) ||
      !span_fits(st.batch_w, kn ? a.k : (a.swiglu ? 2 : 1) * a.n, st.ldw))
    return kernel_status::unsupported_shape;
  if (a.rows * a.n == 0) return kernel_status::ok;
  if (a.k == 0 || a.x == nullptr || a.w == nullptr || a.y == nullptr)
    return kernel_status::unsupported_shape;
  if (!aligned16(a.x) || !aligned16(a.w)) return kernel_status::unsupported_shape;
  // Elements per load of w: its rows, and with n_by_k x's (16 bytes of x a load, or 8 of bf16
  // beside an f32 weight), must stay aligned to them. k_by_n reads x an element at a time.
  const int64_t per_load = a.w_dt == dtype::f32 ? 4 : 8;
  const auto whole = [&](int64_t v) { return v % per_load == 0; };
  if (!whole(kn ? a.n : a.k) || !whole(st.ldw) || !whole(st.batch_w))
    return kernel_status::unsupported_shape;
  if (!kn && (!whole(st.ldx) || !whole(st.batch_x))) return kernel_status::unsupported_shape;
  if (fp8) {
    if (a.w_scale == nullptr || a.block_rows < 1 || a.block_cols < 1 || a.block_cols % 8 != 0)
      return kernel_status::unsupported_shape;
    if (a.scale_ld != 0 && a.scale_ld < (a.k + a.block_cols - 1) / a.block_cols)
      return kernel_status::unsupported_shape;
  }
  return kernel_status::ok;
}

kernel_status skinny_linear_run(const skinny_linear_args& a, cudaStream_t stream) noexcept {
  if (auto s = skinny_linear_can_run(a); s != kernel_status::ok) return s;
  if (a.rows * a.n == 0) return kernel_status::ok;
  if (a.w_dt == dtype::f8_e4m3) return launch_out<bf16, weight_fp8>(a, stream);
  if (a.w_dt == dtype::f32)
    return a.x_dt == dtype::bf16 ? launch_out<bf16, weight_f32>(a, stream)
                                 : launch_out<float, weight_f32>(a, stream);
  return launch_out<bf16, weight_bf16>(a, stream);
}

}  // namespace moe::kernels::cuda
