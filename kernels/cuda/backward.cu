#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/backward.hpp"
#include "kernels/cuda/element_access.cuh"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::store;

constexpr int threads_per_block = 256;
constexpr int warps_per_block = threads_per_block / 32;
// Enough blocks to fill an H200 many times over; grid-stride loops cover the rest.
constexpr int64_t max_blocks = int64_t{1} << 16;
// rmsnorm's dweight: rows per first-stage chunk. A constant, not a function of the device, so
// the order of the float32 sum (and thus its bits) is fixed by the shapes alone.
constexpr int64_t rmsnorm_rows_per_chunk = 64;
// The y dimension of a grid (columns in blocks of threads_per_block) is limited to 65535.
constexpr int64_t max_grid_y = 65535;

size_t round_up_256(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

unsigned flat_blocks(int64_t n) {
  return static_cast<unsigned>(std::min((n + threads_per_block - 1) / threads_per_block, max_blocks));
}

kernel_status launched() {
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

bool aligned_for_floats(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(float) == 0;
}

// rows * dim (and the offsets below it) must not overflow int64; the factor 4 leaves room for
// the sums of offsets the kernels form.
bool product_fits(int64_t a, int64_t b) {
  return a >= 0 && b >= 0 && (b == 0 || a <= INT64_MAX / 4 / b);
}

struct sum_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct max_op {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// A block-wide reduction every thread receives. The butterfly within each warp, then every warp
// reduces the same per-warp partials the same way, so the result depends on blockDim alone (a
// constant here): deterministic. `partial` is __shared__ storage of 32 values; the leading
// barrier lets a caller reuse it for the next reduction.
template <class T, class Op>
__device__ T block_reduce(T v, T identity, T* partial, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffff, v, offset));
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T s = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : identity;
  for (int offset = 16; offset > 0; offset /= 2) s = op(s, __shfl_xor_sync(0xffffffff, s, offset));
  return s;
}

// The index of the lowest set bit of a non-zero ballot.
__device__ int lowest_lane(unsigned bits) {
  return __popc((bits & (0u - bits)) - 1u);
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

// One block per row: the row's inverse rms and coef = inv^2 * dot(dout * weight, x) / dim, so
// that dx = inv * (dout * weight - x * coef) (cpu::rmsnorm_backward's algebra).
template <typename T>
__global__ void rmsnorm_backward_stats_kernel(const T* x, const float* weight, const T* dout,
                                              float* stats, int64_t dim, float eps) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  const T* dr = dout + row * dim;
  float sum_sq = 0.0f, g_dot_x = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = load(xr, i);
    sum_sq += v * v;
    g_dot_x += load(dr, i) * weight[i] * v;
  }
  sum_sq = block_reduce(sum_sq, 0.0f, partial, sum_op{});
  g_dot_x = block_reduce(g_dot_x, 0.0f, partial, sum_op{});
  if (threadIdx.x == 0) {
    const float inv = rsqrtf(sum_sq / static_cast<float>(dim) + eps);
    stats[2 * row] = inv;
    stats[2 * row + 1] = inv * inv * g_dot_x / static_cast<float>(dim);
  }
}

// First stage of dweight: block (chunk, column block); each thread one column of one chunk of
// rows, summed in row order. Reads are coalesced along the row.
template <typename T>
__global__ void rmsnorm_backward_partial_kernel(const T* x, const T* dout, const float* stats,
                                                float* partials, int64_t rows, int64_t dim) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (col >= dim) return;
  const int64_t begin = chunk * rmsnorm_rows_per_chunk;
  const int64_t end = min(begin + rmsnorm_rows_per_chunk, rows);
  float acc = 0.0f;
  for (int64_t r = begin; r < end; ++r)
    acc += load(dout, r * dim + col) * load(x, r * dim + col) * stats[2 * r];
  partials[chunk * dim + col] = acc;
}

// Second stage: each column adds its chunks' partials in chunk order.
__global__ void rmsnorm_backward_dweight_kernel(const float* partials, float* dweight,
                                                int64_t num_chunks, int64_t dim) {
  const int64_t col = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (col >= dim) return;
  float acc = 0.0f;
  for (int64_t c = 0; c < num_chunks; ++c) acc += partials[c * dim + col];
  dweight[col] += acc;
}

// Elementwise, one thread per element: it reads x[i] and dout[i] before writing dx[i], so dx may
// be either. Runs after the dweight stages, which read both.
template <typename T>
__global__ void rmsnorm_backward_dx_kernel(const T* x, const float* weight, const T* dout,
                                           const float* stats, T* dx, int64_t dim, int64_t n,
                                           bool accumulate) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / dim, c = i - r * dim;
    const float inv = stats[2 * r], coef = stats[2 * r + 1];
    const float d = inv * (load(dout, i) * weight[c] - load(x, i) * coef);
    store(dx, i, accumulate ? load(static_cast<const T*>(dx), i) + d : d);
  }
}

int64_t rmsnorm_num_chunks(int64_t rows) {
  return (rows + rmsnorm_rows_per_chunk - 1) / rmsnorm_rows_per_chunk;
}

template <typename T>
kernel_status rmsnorm_backward_launch(const rmsnorm_backward_args& a, float* workspace,
                                      cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* dout = static_cast<const T*>(a.dout);
  float* stats = workspace;
  float* partials = workspace + round_up_256(2 * static_cast<size_t>(a.rows) * sizeof(float)) / sizeof(float);
  rmsnorm_backward_stats_kernel<T><<<static_cast<unsigned>(a.rows), threads_per_block, 0, stream>>>(
      x, a.weight, dout, stats, a.dim, a.eps);
  if (auto s = launched(); s != kernel_status::ok) return s;
  if (a.dweight != nullptr) {
    const int64_t num_chunks = rmsnorm_num_chunks(a.rows);
    const dim3 grid(static_cast<unsigned>(num_chunks),
                    static_cast<unsigned>((a.dim + threads_per_block - 1) / threads_per_block));
    rmsnorm_backward_partial_kernel<T><<<grid, threads_per_block, 0, stream>>>(
        x, dout, stats, partials, a.rows, a.dim);
    if (auto s = launched(); s != kernel_status::ok) return s;
    rmsnorm_backward_dweight_kernel<<<static_cast<unsigned>((a.dim + threads_per_block - 1) / threads_per_block),
                                      threads_per_block, 0, stream>>>(partials, a.dweight, num_chunks,
                                                                      a.dim);
    if (auto s = launched(); s != kernel_status::ok) return s;
  }
  if (a.dx != nullptr) {
    const int64_t n = a.rows * a.dim;
    rmsnorm_backward_dx_kernel<T><<<flat_blocks(n), threads_per_block, 0, stream>>>(
        x, a.weight, dout, stats, static_cast<T*>(a.dx), a.dim, n, a.accumulate);
    if (auto s = launched(); s != kernel_status::ok) return s;
  }
  return kernel_status::ok;
}

// ---------------------------------------------------------------------------------------------
// swiglu

template <typename T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* dout, T* dgate, T* dup,
                                       int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    // Every input of element i is read before either output is written: outputs may alias them.
    const float g = load(gate, i), u = load(up, i), d = load(dout, i);
    // exp(-g) overflows to inf for g < -88: s = 0, dsilu = 0, no NaN (as on the host).
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
    const float silu = __fmul_rn(g, s);
    const float dsilu = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
    if (dgate != nullptr) store(dgate, i, __fmul_rn(__fmul_rn(d, u), dsilu));
    if (dup != nullptr) store(dup, i, __fmul_rn(d, silu));
  }
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

enum : int32_t { target_ignored = 0, target_counted = 1, target_bad = 2 };

// One block: how many rows count, and whether any target is past the vocabulary. Integer sums,
// exact in any order.
__global__ void cross_entropy_count_kernel(const int32_t* targets, int64_t rows, int64_t vocab,
                                           int32_t* counts) {
  __shared__ int32_t partial[32];
  int32_t counted = 0, bad = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int32_t t = targets[r];
    counted += (t >= 0 && t < vocab) ? 1 : 0;
    bad += t >= vocab ? 1 : 0;
  }
  counted = block_reduce(counted, 0, partial, sum_op{});
  bad = block_reduce(bad, 0, partial, sum_op{});
  if (threadIdx.x == 0) {
    counts[0] = counted;
    counts[1] = bad;
  }
}

// One block per row: max, then the sum of exp(x - max), then the row's loss and dlogits row.
template <typename T>
__global__ void cross_entropy_rows_kernel(const T* logits, const int32_t* targets,
                                          const int32_t* counts, float* row_loss, T* dlogits,
                                          int64_t vocab) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * vocab;
  T* dr = dlogits != nullptr ? dlogits + row * vocab : nullptr;
  const int32_t target = targets[row];
  if (target < 0 || target >= vocab) {  // uniform over the block
    if (threadIdx.x == 0) row_loss[row] = 0.0f;
    if (dr != nullptr)
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) store(dr, i, 0.0f);
    return;
  }
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, load(xr, i));
  m = block_reduce(m, -INFINITY, partial, max_op{});
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(load(xr, i) - m);
  sum = block_reduce(sum, 0.0f, partial, sum_op{});
  const float x_target = load(xr, target);
  if (threadIdx.x == 0) row_loss[row] = m + logf(sum) - x_target;
  if (dr == nullptr) return;
  const float inv_counted = 1.0f / static_cast<float>(counts[0]);  // >= 1: this row counts
  const float scale = inv_counted / sum;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float p = expf(load(xr, i) - m) * scale;
    store(dr, i, i == target ? p - inv_counted : p);
  }
}

// One block: the mean of the row losses, summed in an order fixed by rows and blockDim.
__global__ void cross_entropy_mean_kernel(const float* row_loss, const int32_t* counts,
                                          int64_t rows, float* loss) {
  __shared__ float partial[32];
  float total = 0.0f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) total += row_loss[r];
  total = block_reduce(total, 0.0f, partial, sum_op{});
  if (threadIdx.x == 0) {
    const int32_t counted = counts[0];
    *loss = counts[1] > 0 ? NAN : counted > 0 ? total / static_cast<float>(counted) : 0.0f;
  }
}

// Workspace: two int32 counts, then the row losses (256-byte aligned each).
size_t cross_entropy_losses_offset() {
  return 256;
}

template <typename T>
kernel_status cross_entropy_launch(const cross_entropy_args& a, unsigned char* workspace,
                                   cudaStream_t stream) {
  auto* counts = reinterpret_cast<int32_t*>(workspace);
  auto* row_loss = reinterpret_cast<float*>(workspace + cross_entropy_losses_offset());
  cross_entropy_count_kernel<<<1, threads_per_block, 0, stream>>>(a.targets, a.rows, a.vocab, counts);
  if (auto s = launched(); s != kernel_status::ok) return s;
  if (a.rows > 0) {
    cross_entropy_rows_kernel<T><<<static_cast<unsigned>(a.rows), threads_per_block, 0, stream>>>(
        static_cast<const T*>(a.logits), a.targets, counts, row_loss, static_cast<T*>(a.dlogits),
        a.vocab);
    if (auto s = launched(); s != kernel_status::ok) return s;
  }
  cross_entropy_mean_kernel<<<1, threads_per_block, 0, stream>>>(row_loss, counts, a.rows, a.loss);
  return launched();
}

// ---------------------------------------------------------------------------------------------
// embedding

// One warp per row r: next[r] = the smallest r' > r with the same id (or -1), first[r] = 1 when
// no r' < r has it. An id outside the vocabulary links nowhere and heads nothing. Every loop's
// bounds are uniform over the warp (they depend on r alone), so each ballot has all 32 lanes.
__global__ void embedding_backward_link_kernel(const int32_t* ids, int64_t rows, int64_t vocab,
                                               int32_t* next, int32_t* first) {
  const int64_t r = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (r >= rows) return;
  const int32_t id = ids[r];
  if (id < 0 || id >= vocab) {
    if (lane == 0) {
      next[r] = -1;
      first[r] = 0;
    }
    return;
  }
  bool is_first = true;
  for (int64_t base = 0; base < r; base += 32) {
    const int64_t j = base + lane;
    if (__ballot_sync(0xffffffff, j < r && ids[j] == id) != 0u) {
      is_first = false;
      break;
    }
  }
  int64_t link = -1;
  for (int64_t base = r + 1; base < rows; base += 32) {
    const int64_t j = base + lane;
    const unsigned hits = __ballot_sync(0xffffffff, j < rows && ids[j] == id);
    if (hits != 0u) {
      link = base + lowest_lane(hits);
      break;
    }
  }
  if (lane == 0) {
    next[r] = static_cast<int32_t>(link);
    first[r] = is_first ? 1 : 0;
  }
}

// Block (r, column block): a first occurrence adds its chain's rows into dtable in r order,
// starting from dtable's value: the CPU's sequence of float32 additions exactly.
template <typename T>
__global__ void embedding_backward_add_kernel(const int32_t* ids, const T* dout, float* dtable,
                                              const int32_t* next, const int32_t* first,
                                              int64_t dim) {
  const int64_t r = blockIdx.x;
  if (first[r] == 0) return;
  const int64_t col = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (col >= dim) return;
  float* out = dtable + int64_t{ids[r]} * dim + col;
  float v = *out;
  for (int64_t j = r; j >= 0; j = next[j]) v += load(dout, j * dim + col);
  *out = v;
}

// ---------------------------------------------------------------------------------------------
// rope (layout and warp scheme of rope.cu's rope_kernel)

constexpr int max_pairs_per_lane = static_cast<int>(rope_max_head_dim / 2 / 32);

template <typename T>
__global__ void rope_backward_kernel(T* x, int64_t num_vectors, int64_t num_heads,
                                     int64_t token_stride, int64_t head_stride, int half,
                                     const int32_t* positions, const float* cos, const float* sin,
                                     int64_t table_positions) {
  const int64_t vector = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (vector >= num_vectors) return;
  const int64_t t = vector / num_heads, h = vector - t * num_heads;
  const int32_t position = positions[t];
  if (position < 0 || position >= table_positions) return;  // uniform over the warp
  T* v = x + t * token_stride + h * head_stride;
  const float* c = cos + int64_t{position} * half;
  const float* s = sin + int64_t{position} * half;

  // All reads before the warp barrier, all writes after: lane l writes v[2i], v[2i+1] that
  // other lanes read as v[i'] or v[i' + half].
  float firsts[max_pairs_per_lane] = {};
  float seconds[max_pairs_per_lane] = {};
#pragma unroll
  for (int j = 0; j < max_pairs_per_lane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      firsts[j] = load(v, i);
      seconds[j] = load(v, i + half);
    }
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < max_pairs_per_lane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      const float ci = c[i], si = s[i];
      store(v, 2 * i, __fadd_rn(__fmul_rn(firsts[j], ci), __fmul_rn(seconds[j], si)));
      store(v, 2 * i + 1, __fsub_rn(__fmul_rn(seconds[j], ci), __fmul_rn(firsts[j], si)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the combine and the dispatch copy

// Flat over (entries, dim): row positions[j] of dy from entry j. Positions are distinct (the
// plan's guarantee), so no two threads write one element.
template <typename T>
__global__ void unpermute_backward_dy_kernel(const float* weight, const int32_t* positions,
                                             const T* dout, T* dy, int64_t top_k, int64_t dim,
                                             int64_t num_rows, int64_t n, bool accumulate) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t j = i / dim, c = i - j * dim;
    const int32_t p = positions[j];
    if (p < 0 || p >= num_rows) continue;
    const float w = weight != nullptr ? weight[j] : 1.0f;
    const float d = __fmul_rn(w, load(dout, (j / top_k) * dim + c));
    const int64_t o = int64_t{p} * dim + c;
    store(dy, o, accumulate ? __fadd_rn(load(static_cast<const T*>(dy), o), d) : d);
  }
}

// One warp per entry: dot(dout[t], y[positions[j]]), lane-strided then a butterfly.
template <typename T>
__global__ void unpermute_backward_dweight_kernel(const T* y, const int32_t* positions,
                                                  const T* dout, float* dweight, int64_t num_entries,
                                                  int64_t top_k, int64_t dim, int64_t num_rows,
                                                  bool accumulate) {
  const int64_t j = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (j >= num_entries) return;
  const int32_t p = positions[j];
  if (p < 0 || p >= num_rows) {  // uniform over the warp
    if (lane == 0 && !accumulate) dweight[j] = 0.0f;
    return;
  }
  const T* d = dout + (j / top_k) * dim;
  const T* src = y + int64_t{p} * dim;
  float acc = 0.0f;
  for (int64_t i = lane; i < dim; i += 32) acc += load(d, i) * load(src, i);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
  if (lane == 0) dweight[j] = accumulate ? dweight[j] + acc : acc;
}

template <typename T>
__global__ void permute_rows_backward_kernel(const T* dpermuted, const int32_t* positions, T* dx,
                                             int64_t top_k, int64_t dim, int64_t num_rows,
                                             int64_t n, bool accumulate) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t t = i / dim, c = i - t * dim;
    float s = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t p = positions[t * top_k + k];
      if (p >= 0 && p < num_rows) s = __fadd_rn(s, load(dpermuted, int64_t{p} * dim + c));
    }
    store(dx, i, accumulate ? __fadd_rn(load(static_cast<const T*>(dx), i), s) : s);
  }
}

bool storage_dtype(dtype dt) {
  return dt == dtype::f32 || dt == dtype::bf16;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// rmsnorm

size_t rmsnorm_backward_workspace_bytes(const rmsnorm_backward_args& a) noexcept {
  if (a.rows <= 0 || a.dim <= 0 || !product_fits(a.rows, a.dim)) return 0;
  return round_up_256(2 * static_cast<size_t>(a.rows) * sizeof(float)) +
         round_up_256(static_cast<size_t>(rmsnorm_num_chunks(a.rows)) * static_cast<size_t>(a.dim) *
                      sizeof(float));
}

kernel_status rmsnorm_backward_can_run(const rmsnorm_backward_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.dim <= 0 || a.rows > INT32_MAX || !product_fits(a.rows, a.dim))
    return kernel_status::unsupported_shape;
  if ((a.dim + threads_per_block - 1) / threads_per_block > max_grid_y)
    return kernel_status::unsupported_shape;
  if (a.rows == 0) return kernel_status::ok;
  if (a.x == nullptr || a.weight == nullptr || a.dout == nullptr) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status rmsnorm_backward_run(const rmsnorm_backward_args& a, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = rmsnorm_backward_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0 || (a.dx == nullptr && a.dweight == nullptr)) return kernel_status::ok;
  if (workspace == nullptr || !aligned_for_floats(workspace) ||
      workspace_bytes < rmsnorm_backward_workspace_bytes(a))
    return kernel_status::unsupported_shape;
  auto* ws = static_cast<float*>(workspace);
  switch (a.dt) {
    case dtype::f32: return rmsnorm_backward_launch<float>(a, ws, stream);
    case dtype::bf16: return rmsnorm_backward_launch<__nv_bfloat16>(a, ws, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

// ---------------------------------------------------------------------------------------------
// swiglu

kernel_status swiglu_backward_can_run(const swiglu_backward_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (!product_fits(a.rows, a.dim)) return kernel_status::unsupported_shape;
  if (a.rows == 0 || a.dim == 0) return kernel_status::ok;
  if (a.gate == nullptr || a.up == nullptr || a.dout == nullptr) return kernel_status::unsupported_shape;
  if (a.dgate != nullptr && a.dgate == a.dup) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status swiglu_backward_run(const swiglu_backward_args& a, cudaStream_t stream) noexcept {
  if (auto s = swiglu_backward_can_run(a); s != kernel_status::ok) return s;
  const int64_t n = a.rows * a.dim;
  if (n == 0 || (a.dgate == nullptr && a.dup == nullptr)) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32:
      swiglu_backward_kernel<float><<<flat_blocks(n), threads_per_block, 0, stream>>>(
          static_cast<const float*>(a.gate), static_cast<const float*>(a.up),
          static_cast<const float*>(a.dout), static_cast<float*>(a.dgate), static_cast<float*>(a.dup), n);
      return launched();
    case dtype::bf16:
      swiglu_backward_kernel<__nv_bfloat16><<<flat_blocks(n), threads_per_block, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(a.gate), static_cast<const __nv_bfloat16*>(a.up),
          static_cast<const __nv_bfloat16*>(a.dout), static_cast<__nv_bfloat16*>(a.dgate),
          static_cast<__nv_bfloat16*>(a.dup), n);
      return launched();
    default: return kernel_status::unsupported_dtype;
  }
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

size_t cross_entropy_workspace_bytes(const cross_entropy_args& a) noexcept {
  const size_t rows = a.rows > 0 ? static_cast<size_t>(a.rows) : 0;
  return cross_entropy_losses_offset() + round_up_256(rows * sizeof(float));
}

kernel_status cross_entropy_can_run(const cross_entropy_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.rows > INT32_MAX || a.vocab < 0 || a.vocab > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (!product_fits(a.rows, a.vocab) || a.loss == nullptr) return kernel_status::unsupported_shape;
  if (a.rows == 0) return kernel_status::ok;
  if (a.vocab == 0 || a.logits == nullptr || a.targets == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status cross_entropy_run(const cross_entropy_args& a, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = cross_entropy_can_run(a); s != kernel_status::ok) return s;
  if (workspace == nullptr || !aligned_for_floats(workspace) ||
      workspace_bytes < cross_entropy_workspace_bytes(a))
    return kernel_status::unsupported_shape;
  auto* ws = static_cast<unsigned char*>(workspace);
  switch (a.dt) {
    case dtype::f32: return cross_entropy_launch<float>(a, ws, stream);
    case dtype::bf16: return cross_entropy_launch<__nv_bfloat16>(a, ws, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

// ---------------------------------------------------------------------------------------------
// embedding

size_t embedding_backward_workspace_bytes(const embedding_backward_args& a) noexcept {
  const size_t rows = a.rows > 0 ? static_cast<size_t>(a.rows) : 0;
  return 2 * round_up_256(rows * sizeof(int32_t)) + (rows == 0 ? 256 : 0);
}

kernel_status embedding_backward_can_run(const embedding_backward_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.vocab < 0 || a.dim < 0 || a.rows > INT32_MAX || a.vocab > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (!product_fits(a.rows, a.dim) || !product_fits(a.vocab, a.dim))
    return kernel_status::unsupported_shape;
  if ((a.dim + threads_per_block - 1) / threads_per_block > max_grid_y)
    return kernel_status::unsupported_shape;
  if (a.rows == 0 || a.dim == 0) return kernel_status::ok;
  if (a.ids == nullptr || a.dout == nullptr || a.dtable == nullptr) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status embedding_backward_run(const embedding_backward_args& a, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = embedding_backward_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0 || a.dim == 0) return kernel_status::ok;
  if (workspace == nullptr || !aligned_for_floats(workspace) ||
      workspace_bytes < embedding_backward_workspace_bytes(a))
    return kernel_status::unsupported_shape;
  auto* next = static_cast<int32_t*>(workspace);
  int32_t* first = next + round_up_256(static_cast<size_t>(a.rows) * sizeof(int32_t)) / sizeof(int32_t);
  const auto link_blocks = static_cast<unsigned>((a.rows + warps_per_block - 1) / warps_per_block);
  embedding_backward_link_kernel<<<link_blocks, threads_per_block, 0, stream>>>(a.ids, a.rows, a.vocab,
                                                                               next, first);
  if (auto s = launched(); s != kernel_status::ok) return s;
  const dim3 grid(static_cast<unsigned>(a.rows),
                  static_cast<unsigned>((a.dim + threads_per_block - 1) / threads_per_block));
  switch (a.dt) {
    case dtype::f32:
      embedding_backward_add_kernel<float><<<grid, threads_per_block, 0, stream>>>(
          a.ids, static_cast<const float*>(a.dout), a.dtable, next, first, a.dim);
      return launched();
    case dtype::bf16:
      embedding_backward_add_kernel<__nv_bfloat16><<<grid, threads_per_block, 0, stream>>>(
          a.ids, static_cast<const __nv_bfloat16*>(a.dout), a.dtable, next, first, a.dim);
      return launched();
    default: return kernel_status::unsupported_dtype;
  }
}

// ---------------------------------------------------------------------------------------------
// rope

kernel_status rope_backward_can_run(const rope_args& a) noexcept {
  return rope_can_run(a);  // the same layout, limits and pointers as the forward
}

kernel_status rope_backward_run(const rope_args& a, cudaStream_t stream) noexcept {
  if (auto s = rope_backward_can_run(a); s != kernel_status::ok) return s;
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  const int64_t num_vectors = a.num_tokens * a.num_heads;
  const auto blocks = static_cast<unsigned>((num_vectors + warps_per_block - 1) / warps_per_block);
  const int half = static_cast<int>(a.head_dim / 2);
  switch (a.dt) {
    case dtype::f32:
      rope_backward_kernel<float><<<blocks, threads_per_block, 0, stream>>>(
          static_cast<float*>(a.x), num_vectors, a.num_heads, a.token_stride, a.head_stride, half,
          a.positions, a.cos, a.sin, a.table_positions);
      return launched();
    case dtype::bf16:
      rope_backward_kernel<__nv_bfloat16><<<blocks, threads_per_block, 0, stream>>>(
          static_cast<__nv_bfloat16*>(a.x), num_vectors, a.num_heads, a.token_stride, a.head_stride,
          half, a.positions, a.cos, a.sin, a.table_positions);
      return launched();
    default: return kernel_status::unsupported_dtype;
  }
}

// ---------------------------------------------------------------------------------------------
// the combine and the dispatch copy

kernel_status unpermute_backward_can_run(const unpermute_backward_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (a.num_tokens < 0 || a.top_k < 0 || a.dim < 0 || a.num_rows < 0)
    return kernel_status::unsupported_shape;
  if (a.top_k > 0 && a.num_tokens > INT32_MAX / a.top_k) return kernel_status::unsupported_shape;
  if (!product_fits(a.num_tokens * a.top_k, a.dim) || !product_fits(a.num_rows, a.dim))
    return kernel_status::unsupported_shape;
  if (a.num_tokens == 0 || a.top_k == 0) return kernel_status::ok;
  if (a.positions == nullptr || a.dout == nullptr || (a.dweight != nullptr && a.y == nullptr))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status unpermute_backward_run(const unpermute_backward_args& a, cudaStream_t stream) noexcept {
  if (auto s = unpermute_backward_can_run(a); s != kernel_status::ok) return s;
  const int64_t num_entries = a.num_tokens * a.top_k;
  if (num_entries == 0) return kernel_status::ok;
  const int64_t n = num_entries * a.dim;
  const auto warp_blocks = static_cast<unsigned>((num_entries + warps_per_block - 1) / warps_per_block);
  const auto run = [&](auto* type_tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(type_tag)>>;
    if (a.dy != nullptr && n > 0) {
      unpermute_backward_dy_kernel<T><<<flat_blocks(n), threads_per_block, 0, stream>>>(
          a.weight, a.positions, static_cast<const T*>(a.dout), static_cast<T*>(a.dy), a.top_k,
          a.dim, a.num_rows, n, a.accumulate);
      if (auto s = launched(); s != kernel_status::ok) return s;
    }
    if (a.dweight != nullptr) {
      unpermute_backward_dweight_kernel<T><<<warp_blocks, threads_per_block, 0, stream>>>(
          static_cast<const T*>(a.y), a.positions, static_cast<const T*>(a.dout), a.dweight,
          num_entries, a.top_k, a.dim, a.num_rows, a.accumulate);
      if (auto s = launched(); s != kernel_status::ok) return s;
    }
    return kernel_status::ok;
  };
  switch (a.dt) {
    case dtype::f32: return run(static_cast<float*>(nullptr));
    case dtype::bf16: return run(static_cast<__nv_bfloat16*>(nullptr));
    default: return kernel_status::unsupported_dtype;
  }
}

kernel_status permute_rows_backward_can_run(const permute_rows_backward_args& a) noexcept {
  if (!storage_dtype(a.dt)) return kernel_status::unsupported_dtype;
  if (a.num_tokens < 0 || a.top_k < 0 || a.dim < 0 || a.num_rows < 0)
    return kernel_status::unsupported_shape;
  if (a.top_k > 0 && a.num_tokens > INT32_MAX / a.top_k) return kernel_status::unsupported_shape;
  if (!product_fits(a.num_tokens * std::max<int64_t>(a.top_k, 1), a.dim) ||
      !product_fits(a.num_rows, a.dim))
    return kernel_status::unsupported_shape;
  if (a.num_tokens == 0 || a.dim == 0) return kernel_status::ok;
  if (a.dx == nullptr || (a.top_k > 0 && (a.dpermuted == nullptr || a.positions == nullptr)))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status permute_rows_backward_run(const permute_rows_backward_args& a,
                                        cudaStream_t stream) noexcept {
  if (auto s = permute_rows_backward_can_run(a); s != kernel_status::ok) return s;
  const int64_t n = a.num_tokens * a.dim;
  if (n == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32:
      permute_rows_backward_kernel<float><<<flat_blocks(n), threads_per_block, 0, stream>>>(
          static_cast<const float*>(a.dpermuted), a.positions, static_cast<float*>(a.dx), a.top_k,
          a.dim, a.num_rows, n, a.accumulate);
      return launched();
    case dtype::bf16:
      permute_rows_backward_kernel<__nv_bfloat16><<<flat_blocks(n), threads_per_block, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(a.dpermuted), a.positions,
          static_cast<__nv_bfloat16*>(a.dx), a.top_k, a.dim, a.num_rows, n, a.accumulate);
      return launched();
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
