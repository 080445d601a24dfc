// The grouped expert GEMM on the GPU (kernels/cuda/grouped_gemm.hpp) against the definition in
// double precision and against its CPU reference (kernels/cpu/grouped_gemm.hpp), at DeepSeek-V2-
// Lite's expert shapes (64 experts; gate|up k = 2048, n = 2 * 1408; down k = 1408, n = 2048) with
// uneven routings, at odd shapes (n, k not multiples of 16 or 8), and inside a CUDA graph replayed
// after the routing changed on the device. The GPU runs skip, with the reason, without a GPU;
// the can_run tests are host code and run wherever the CUDA backend is built.
//
// Tolerances, per output element, relative to S = sum_i |x_i| |w_i| over its dot product. The
// inputs are rounded to bf16 on the host first, so the double reference multiplies exactly the
// values the kernel reads: every difference is the kernel's float32 arithmetic.
//  - bf16 inputs (tensor cores): a bf16 product is exact in float32 (8 + 8 significant bits
//    < 24). An element is a chain of ceil(k / 16) MMA steps, each adding 16 exact products to a
//    float32 accumulator whose magnitude never exceeds S. We allow each step 4 units of 2^-23
//    of S: one rounding of the step's sum, one of the add to the accumulator, and up to two
//    ulps lost where the hardware aligns the addends to the largest exponent and truncates
//    (measured tensor-core behaviour; 2^-23, not 2^-24, because truncation is not to nearest).
//    So |error| <= ceil(k / 16) * 2^-21 * S: 6.1e-5 of S at k = 2048. Random signs keep real
//    errors orders of magnitude lower; a lost or doubled product (~S / k = 4.9e-4 of S) fails.
//  - bf16 outputs round once more, to nearest even: + 2^-8 of the float32 value (8 significant
//    bits), i.e. 2^-8 * (|exact| + the bound above).
//  - f32 (CUDA cores, a chain of k fmaf in k order): k roundings to nearest of running sums
//    <= S: |error| <= k * 2^-24 * S (gamma_k to first order).
//  - against the CPU reference (OpenBLAS sgemm, any order: the same k * 2^-24 * S from the exact
//    value): the sum of the two bounds.
//  - exact: every element the kernel must leave alone (rows past offsets[num_experts], a
//    canary past the end of y).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cpu/grouped_gemm.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cuda/grouped_gemm.hpp"
#include "model/dequantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using namespace cuda_testing;

// Byte-level copies at an offset (the support header copies whole vectors from the start).
[[nodiscard]] bool upload(device_buffer& d, const void* src, size_t bytes, size_t at = 0) {
  return at + bytes <= d.bytes() &&
         (bytes == 0 || cudaMemcpy(static_cast<char*>(d.get()) + at, src, bytes,
                                   cudaMemcpyHostToDevice) == cudaSuccess);
}

[[nodiscard]] std::vector<unsigned char> download(const device_buffer& d) {
  std::vector<unsigned char> v(d.bytes());
  if (!v.empty() && cudaMemcpy(v.data(), d.get(), v.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
    v.clear();
  return v;
}

// Uniform in [-1, 1), already on the bf16 grid when `on_bf16_grid`: a splitmix64 stream, fast
// enough for the 369M weights of 64 v2lite experts.
std::vector<float> random_values(size_t n, uint64_t seed, bool on_bf16_grid) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& x : v) {
    s += 0x9e3779b97f4a7c15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    x = static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
    if (on_bf16_grid) x = from_bf16(to_bf16(x));
  }
  return v;
}

// In the CUDA emulator (tests/emulator: every CUDA thread a fiber on one CPU core) the v2lite
// cases keep the 64 experts, their routing and k but take 1/16 of n (gate|up 176 columns: two
// full 64-column narrow tiles and a partial one, or a partial 256-column wide tile; down 128):
// all of it (369M weights, 4.4 GFLOP a case) would take gigabytes and many minutes there. On a
// GPU they run whole.
#ifdef MOE_CUDA_EMULATOR
constexpr int64_t v2lite_n_divisor = 16;
#else
constexpr int64_t v2lite_n_divisor = 1;
#endif

// 64 v2lite experts' weights take seconds to generate; consecutive cases of a shape share them.
const std::vector<float>& shared_random_values(size_t n, uint64_t seed, bool on_bf16_grid) {
  static size_t cached_n = 0;
  static uint64_t cached_seed = 0;
  static bool cached_grid = false;
  static std::vector<float> cached;
  if (cached.empty() || cached_n != n || cached_seed != seed || cached_grid != on_bf16_grid) {
    cached = random_values(n, seed, on_bf16_grid);
    cached_n = n;
    cached_seed = seed;
    cached_grid = on_bf16_grid;
  }
  return cached;
}

// The bytes a kernel of element type `dt` reads for these values (already on the grid for bf16).
std::vector<unsigned char> as_bytes(const std::vector<float>& v, dtype dt) {
  std::vector<unsigned char> out(v.size() * dtype_bytes(dt));
  if (dt == dtype::f32) {
    std::memcpy(out.data(), v.data(), out.size());
  } else {
    for (size_t i = 0; i < v.size(); ++i) {
      const uint16_t h = to_bf16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

float element_of(const std::vector<unsigned char>& bytes, size_t i, dtype dt) {
  if (dt == dtype::f32) {
    float f;
    std::memcpy(&f, bytes.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, bytes.data() + 2 * i, 2);
  return from_bf16(h);
}

// 64 experts routed unevenly: empty experts, single rows, experts of more than one tile of
// either bf16 tiling (16-row narrow, 128-row wide) and of the 64-row f32 tiling, the rest small.
std::vector<int32_t> v2lite_counts() {
  std::vector<int32_t> c(64);
  for (size_t e = 0; e < c.size(); ++e) c[e] = static_cast<int32_t>((e * 7) % 6);  // 0..5
  c[0] = 0;
  c[1] = 1;
  c[2] = 130;
  c[3] = 33;
  c[4] = 0;
  c[5] = 1;
  c[10] = 65;
  c[63] = 0;
  return c;
}

// The tolerance of one element, from the header's derivation.
struct tolerance {
  dtype dt, y_dt;
  int64_t k;
  [[nodiscard]] double of(double exact, double magnitude) const {
    const double kernel = dt == dtype::f32
                              ? static_cast<double>(k) * 0x1.0p-24 * magnitude
                              : static_cast<double>((k + 15) / 16) * 0x1.0p-21 * magnitude;
    const double rounding = y_dt == dtype::bf16 ? 0x1.0p-8 * (std::fabs(exact) + kernel) : 0.0;
    return kernel + rounding + 1e-30;
  }
  [[nodiscard]] double cpu_reference(double magnitude) const {
    return static_cast<double>(k) * 0x1.0p-24 * magnitude;
  }
};

constexpr unsigned char sentinel = 0x5a;  // bytes of y the kernel must not touch
constexpr size_t canary_bytes = 256;      // past the end of y

struct grouped_case {
  int64_t n = 0, k = 0;
  std::vector<int32_t> counts;
  int64_t num_rows = 0;  // the host's bound, >= sum(counts); it picks the tiling
  dtype dt = dtype::bf16, y_dt = dtype::bf16;
  size_t x_misalign_elements = 0;  // x starts this many elements into its buffer
  bool wgmma = false;              // grouped_gemm_args::wgmma
  bool tma = true;                 // grouped_gemm_args::tma (with wgmma)
  float beta = 0.0f;               // grouped_gemm_args::beta: y holds y0 in the rows in use
};

std::string describe(const grouped_case& c) {
  return "n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         " experts=" + std::to_string(c.counts.size()) + " num_rows=" + std::to_string(c.num_rows) +
         " " + std::string(to_string(c.dt)) + "->" + std::string(to_string(c.y_dt)) +
         (c.x_misalign_elements ? " misaligned x" : "") +
         (c.wgmma ? (c.tma ? " wgmma (TMA)" : " wgmma (cp.async)") : "") +
         (c.beta != 0.0f ? " beta=" + std::to_string(c.beta) : "");
}

// The kernel's arguments for a case, over its device buffers.
cuda::grouped_gemm_args args_of(const grouped_case& c, const void* x, const device_buffer& offsets,
                                const device_buffer& weights, device_buffer& y) {
  cuda::grouped_gemm_args a;
  a.x = x;
  a.expert_offsets = static_cast<const int32_t*>(offsets.get());
  a.weights = weights.get();
  a.y = y.get();
  a.num_rows = c.num_rows;
  a.num_experts = static_cast<int64_t>(c.counts.size());
  a.n = c.n;
  a.k = c.k;
  a.dt = c.dt;
  a.y_dt = c.y_dt;
  a.wgmma = c.wgmma;
  a.tma = c.tma;
  a.beta = c.beta;
  return a;
}

// Runs one case on the GPU and checks it against the double definition, the CPU reference and
// the untouched bytes.
void expect_matches_reference(const grouped_case& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const auto num_experts = static_cast<int64_t>(c.counts.size());
  const auto offsets = offsets_of(c.counts);
  const auto rows_in_use = static_cast<size_t>(offsets.back());
  ASSERT_LE(static_cast<int64_t>(rows_in_use), c.num_rows);
  const auto rows = static_cast<size_t>(c.num_rows), n = static_cast<size_t>(c.n),
             k = static_cast<size_t>(c.k);
  const bool bf16_in = c.dt == dtype::bf16;
  const auto x = random_values(rows * k, seed, bf16_in);
  const auto& w = shared_random_values(static_cast<size_t>(num_experts) * n * k, seed + 1, bf16_in);

  // The CPU reference on the same (rounded) values.
  std::vector<float> want(rows * n, 0.0f);
  ASSERT_EQ(cpu::grouped_gemm(x.data(), offsets.data(), c.counts.size(), w.data(), want.data(),
                              rows, n, k),
            kernel_status::ok);

  const size_t in_bytes = dtype_bytes(c.dt), y_bytes = dtype_bytes(c.y_dt);
  const size_t x_at = c.x_misalign_elements * in_bytes;
  device_buffer dx(x_at + rows * k * in_bytes), dw(w.size() * in_bytes), doff(offsets.size() * 4),
      dy(rows * n * y_bytes + canary_bytes);
  ASSERT_TRUE(upload(dx, as_bytes(x, c.dt).data(), rows * k * in_bytes, x_at));
  ASSERT_TRUE(upload(dw, as_bytes(w, c.dt).data(), dw.bytes()));
  ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
  ASSERT_EQ(cudaMemset(dy.get(), sentinel, dy.bytes()), cudaSuccess);
  // With beta, the rows in use start as y0 (on the bf16 grid where y is bf16: what is read).
  std::vector<float> y0;
  if (c.beta != 0.0f) {
    y0 = random_values(rows_in_use * n, seed + 2, c.y_dt == dtype::bf16);
    ASSERT_TRUE(upload(dy, as_bytes(y0, c.y_dt).data(), y0.size() * y_bytes));
  }

  auto a = args_of(c, static_cast<const char*>(dx.get()) + x_at, doff, dw, dy);
  // The kernel the call reports is the one grouped_gemm_uses_wgmma predicts, by dtype otherwise.
  const auto expected = a.num_rows == 0 || a.n == 0         ? cuda::grouped_gemm_kernel::none
                        : c.dt == dtype::f32                ? cuda::grouped_gemm_kernel::simt
                        : !cuda::grouped_gemm_uses_wgmma(a) ? cuda::grouped_gemm_kernel::wmma
                        : a.tma && a.k > 0                  ? cuda::grouped_gemm_kernel::wgmma_tma
                                                            : cuda::grouped_gemm_kernel::wgmma;
  auto launched = cuda::grouped_gemm_kernel::none;
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr, &launched), kernel_status::ok);
  EXPECT_EQ(launched, expected);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = download(dy);
  ASSERT_EQ(got.size(), dy.bytes());

  const tolerance tol{c.dt, c.y_dt, c.k};
  size_t e = 0;
  for (size_t r = 0; r < rows_in_use; ++r) {
    while (static_cast<size_t>(offsets[e + 1]) <= r) ++e;
    const float* xr = x.data() + r * k;
    for (size_t j = 0; j < n; ++j) {
      const float* wj = w.data() + (e * n + j) * k;
      double exact = 0.0, magnitude = 0.0;
      for (size_t i = 0; i < k; ++i) {
        const double p = double{xr[i]} * wj[i];
        exact += p;
        magnitude += std::fabs(p);
      }
      const double added = y0.empty() ? 0.0 : double{c.beta} * y0[r * n + j];
      exact += added;
      const double g = element_of(got, r * n + j, c.y_dt);
      const double t = tol.of(exact, magnitude);
      ASSERT_LE(std::fabs(g - exact), t)
          << "row " << r << " (expert " << e << ") col " << j << ": got " << g << ", exact "
          << exact << ", S " << magnitude;
      ASSERT_LE(std::fabs(g - (want[r * n + j] + added)), t + tol.cpu_reference(magnitude))
          << "row " << r << " col " << j << ": cpu " << want[r * n + j] << " + " << added;
    }
  }
  for (size_t b = rows_in_use * n * y_bytes; b < got.size(); ++b)
    ASSERT_EQ(got[b], sentinel) << "byte " << b << " of y past the rows in use was written";
}

// FP8 weights: random e4m3 bytes (NaN codes avoided) and block scales over the stacked
// (experts * n, k) weight. The kernel must give, bit for bit, what the bf16 kernel gives on the
// weights expanded as fp8_dequantize expands them: bf16(e4m3 * scale), model::
// dequantize_fp8_blocks rounded to bf16. The same tiling and products run on the same values
// in the same order, so any difference (a wrong scale, a byte of the wrong row or k step, a
// conversion racing the products) shows; the bf16 kernel itself is checked against the
// references above.
struct fp8_case {
  int64_t n = 0, k = 0;
  std::vector<int32_t> counts;
  int64_t num_rows = 0;
  int64_t block_rows = 128, block_cols = 128;
  int64_t scale_ld_pad = 0;  // extra floats per scale row
  dtype y_dt = dtype::bf16;
  size_t x_misalign_elements = 0;
  bool fuse_swiglu = false;  // both products with the SwiGLU fused (y: n / 2 columns)
};

void expect_fp8_matches_dequantized(const fp8_case& c, uint64_t seed) {
  SCOPED_TRACE("fp8 n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
               " rows=" + std::to_string(c.num_rows) + " blocks " + std::to_string(c.block_rows) +
               "x" + std::to_string(c.block_cols) + (c.x_misalign_elements ? " misaligned x" : "") +
               (c.fuse_swiglu ? " fused swiglu" : ""));
  const auto num_experts = static_cast<int64_t>(c.counts.size());
  const auto offsets = offsets_of(c.counts);
  const auto rows = static_cast<size_t>(c.num_rows), k = static_cast<size_t>(c.k);
  const int64_t w_rows = num_experts * c.n;
  const int64_t grid_rows = (w_rows + c.block_rows - 1) / c.block_rows;
  const int64_t grid_cols = (c.k + c.block_cols - 1) / c.block_cols;
  const int64_t scale_ld = grid_cols + c.scale_ld_pad;

  std::vector<uint8_t> q(static_cast<size_t>(w_rows) * k);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 7;
  for (auto& b : q) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    b = static_cast<uint8_t>(s >> 56);
    if ((b & 0x7f) == 0x7f) b ^= 1;  // 0x7f / 0xff are NaN
  }
  std::vector<float> scale(static_cast<size_t>(grid_rows * scale_ld), -1.0f);  // pad never read
  const auto scale_values = random_values(static_cast<size_t>(grid_rows * grid_cols), seed + 3, false);
  for (int64_t r = 0; r < grid_rows; ++r)
    for (int64_t cc = 0; cc < grid_cols; ++cc)
      scale[static_cast<size_t>(r * scale_ld + cc)] =
          std::ldexp(1.0f + std::fabs(scale_values[static_cast<size_t>(r * grid_cols + cc)]), -9);
  // The expansion, packed scales for the model's loop.
  std::vector<float> packed(static_cast<size_t>(grid_rows * grid_cols));
  for (int64_t r = 0; r < grid_rows; ++r)
    std::copy_n(scale.begin() + r * scale_ld, grid_cols, packed.begin() + r * grid_cols);
  std::vector<float> expanded(q.size());
  model::dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(q)), w_rows, c.k, packed,
                               c.block_rows, c.block_cols, expanded);
  const auto x = random_values(rows * k, seed, true);

  const size_t x_at = c.x_misalign_elements * 2;
  device_buffer dx(x_at + rows * k * 2), dq(q.size()), ds(scale.size() * 4), dw(expanded.size() * 2),
      doff(offsets.size() * 4), dy_fp8(rows * static_cast<size_t>(c.n) * dtype_bytes(c.y_dt)),
      dy_bf16(dy_fp8.bytes());
  ASSERT_TRUE(upload(dx, as_bytes(x, dtype::bf16).data(), rows * k * 2, x_at));
  ASSERT_TRUE(upload(dq, q.data(), q.size()));
  ASSERT_TRUE(upload(ds, scale.data(), ds.bytes()));
  ASSERT_TRUE(upload(dw, as_bytes(expanded, dtype::bf16).data(), dw.bytes()));
  ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
  ASSERT_EQ(cudaMemset(dy_fp8.get(), sentinel, dy_fp8.bytes()), cudaSuccess);
  ASSERT_EQ(cudaMemset(dy_bf16.get(), sentinel, dy_bf16.bytes()), cudaSuccess);

  cuda::grouped_gemm_args a;
  a.x = static_cast<const char*>(dx.get()) + x_at;
  a.expert_offsets = static_cast<const int32_t*>(doff.get());
  a.weights = dw.get();
  a.y = dy_bf16.get();
  a.num_rows = c.num_rows;
  a.num_experts = num_experts;
  a.n = c.n;
  a.k = c.k;
  a.dt = dtype::bf16;
  a.y_dt = c.y_dt;
  a.fuse_swiglu = c.fuse_swiglu;
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
  a.weights = dq.get();
  a.y = dy_fp8.get();
  a.weight_scale = static_cast<const float*>(ds.get());
  a.scale_block_rows = c.block_rows;
  a.scale_block_cols = c.block_cols;
  a.scale_ld = scale_ld;
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto want = download(dy_bf16), got = download(dy_fp8);
  ASSERT_EQ(got.size(), want.size());
  const size_t y_bytes = dtype_bytes(c.y_dt);
  const auto out_n = static_cast<size_t>(c.fuse_swiglu ? c.n / 2 : c.n);
  const size_t written = static_cast<size_t>(offsets.back()) * out_n * y_bytes;
  for (size_t b = 0; b < got.size(); b += y_bytes) {
    ASSERT_EQ(std::memcmp(got.data() + b, want.data() + b, y_bytes), 0)
        << "element " << b / y_bytes << " (row " << b / y_bytes / out_n << ")";
    if (b >= written) {
      ASSERT_EQ(got[b], sentinel) << "byte " << b << " past the rows in use";
    }
  }
  // Not all zeros: the case multiplies something.
  size_t nonzero = 0;
  for (size_t i = 0; i < written / y_bytes; ++i) nonzero += element_of(got, i, c.y_dt) != 0.0f;
  EXPECT_GT(nonzero, written / y_bytes / 2);
}

// ---------------------------------------------------------------------------------------------
// Argument checks: host code, no GPU needed.

TEST(cuda_grouped_gemm, can_run_rejects_bad_arguments) {
  char buf[16] = {};
  const int32_t offsets[5] = {};
  const cuda::grouped_gemm_args good{buf, offsets, buf, buf,         10,
                                     4,   16,      16,  dtype::bf16, dtype::bf16};
  EXPECT_EQ(cuda::grouped_gemm_can_run(good), kernel_status::ok);
  auto a = good;

  // Element types: bf16 -> bf16 or f32, f32 -> f32; nothing else.
  a.y_dt = dtype::f32;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  a.dt = dtype::f32;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  a.y_dt = dtype::bf16;  // f32 products are not narrowed
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_dtype);
  for (const dtype bad : {dtype::f16, dtype::f8_e4m3, dtype::i32}) {
    a = good;
    a.dt = bad;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_dtype);
    a = good;
    a.y_dt = bad;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_dtype);
  }
  // And the run answers the same without launching anything.
  a = good;
  a.dt = dtype::f16;
  EXPECT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::unsupported_dtype);

  // FP8 weights: bf16 x only, positive block sizes, a scale row as long as the grid's columns.
  {
    const float scale = 1.0f;
    a = good;
    a.weight_scale = &scale;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
    a.scale_block_cols = 8;  // k = 16: two grid columns
    a.scale_ld = 2;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
    a.scale_ld = 1;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
    a.scale_ld = -1;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
    a.scale_ld = 0;
    for (int64_t cuda::grouped_gemm_args::*field :
         {&cuda::grouped_gemm_args::scale_block_rows, &cuda::grouped_gemm_args::scale_block_cols}) {
      cuda::grouped_gemm_args b = a;
      b.*field = 0;
      EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape);
    }
    a.dt = a.y_dt = dtype::f32;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_dtype);
  }

  // A gather map: entries per x row in [1, INT32_MAX], x's rows counted; with fuse_swiglu too.
  {
    const int32_t entries[10] = {};
    a = good;
    a.x_entries = entries;
    a.entries_per_x_row = 6;
    a.num_x_rows = 2;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
    for (const int64_t per : {int64_t{0}, int64_t{-1}, int64_t{INT32_MAX} + 1}) {
      cuda::grouped_gemm_args b = a;
      b.entries_per_x_row = per;
      EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape) << per;
    }
    cuda::grouped_gemm_args b = a;
    b.num_x_rows = -1;
    EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape);
    b = a;
    b.num_x_rows = INT64_MAX / 8;  // k = 16: x's elements past int64
    EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape);
    b = a;
    b.wgmma = b.fuse_swiglu = true;
    EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::ok) << "fused on WMMA";
  }

  // Experts in [1, grouped_gemm_max_experts].
  for (const int64_t e : {int64_t{0}, int64_t{-1}, cuda::grouped_gemm_max_experts + 1}) {
    a = good;
    a.num_experts = e;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape) << e;
  }
  a = good;
  a.num_experts = cuda::grouped_gemm_max_experts;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);

  // Sizes: non-negative, rows and features int32, elements int64, the grid 31-bit.
  for (int64_t cuda::grouped_gemm_args::*field :
       {&cuda::grouped_gemm_args::num_rows, &cuda::grouped_gemm_args::n,
        &cuda::grouped_gemm_args::k}) {
    a = good;
    a.*field = -1;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
    a.*field = int64_t{INT32_MAX} + 1;
    EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  }
  a = good;
  a.num_experts = cuda::grouped_gemm_max_experts;
  a.n = INT32_MAX;
  a.k = INT32_MAX;  // 1024 experts' weights: 2^72 elements
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  a = good;
  a.num_rows = INT32_MAX;
  a.n = int64_t{1} << 20;  // 2^13 column tiles x 2^24 row tiles
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);

  // Odd n and k are handled, not refused.
  a = good;
  a.n = 7;
  a.k = 5;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);

  // Pointers: offsets and y whenever there is output, x and weights when k > 0 too.
  a = good;
  a.expert_offsets = nullptr;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  a = good;
  a.y = nullptr;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  a = good;
  a.x = nullptr;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  a = good;
  a.weights = nullptr;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::unsupported_shape);
  a.x = nullptr;
  a.k = 0;  // an empty sum reads neither
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  a = cuda::grouped_gemm_args{};
  a.num_experts = 1;  // no rows: nothing needed, and nothing launched
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  EXPECT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
  a.num_rows = 5;  // rows but n == 0
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  EXPECT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// GPU comparisons.

// v2lite's gate|up projection of every expert. num_rows = the rows in use (< 64 per expert on
// average: the narrow tiling), then a bound of 64 per expert (the wide tiling), which also
// leaves rows past the routing that must stay untouched.
TEST(cuda_grouped_gemm, v2lite_gate_up_matches_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto counts = v2lite_counts();
  const int64_t in_use = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  for (const int64_t num_rows : {in_use, int64_t{64 * 64}})
    for (const dtype y_dt : {dtype::bf16, dtype::f32})
      expect_matches_reference(
          {2 * 1408 / v2lite_n_divisor, 2048, counts, num_rows, dtype::bf16, y_dt}, 11);
}

TEST(cuda_grouped_gemm, v2lite_down_matches_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto counts = v2lite_counts();
  const int64_t in_use = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  for (const int64_t num_rows : {in_use, int64_t{64 * 64}})
    expect_matches_reference(
        {2048 / v2lite_n_divisor, 1408, counts, num_rows, dtype::bf16, dtype::bf16}, 12);
}

// n and k that are not multiples of 16: k % 8 != 0 takes the element-load path, k % 8 == 0 with
// a k tail the asynchronous path, and a misaligned x the element path again; both tilings. n = 300
// is a full and a partial 256-column wide tile (and four full 64-column narrow ones and a part).
TEST(cuda_grouped_gemm, odd_shapes_match_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const std::vector<int32_t> counts{0, 1, 33, 130, 17};
  for (const int64_t num_rows : {int64_t{181}, int64_t{64 * 5 + 3}}) {
    expect_matches_reference({100, 77, counts, num_rows, dtype::bf16, dtype::bf16}, 21);
    expect_matches_reference({131, 264, counts, num_rows, dtype::bf16, dtype::f32}, 22);
    expect_matches_reference({300, 264, counts, num_rows, dtype::bf16, dtype::bf16}, 25);
    grouped_case misaligned{131, 264, counts, num_rows, dtype::bf16, dtype::bf16};
    misaligned.x_misalign_elements = 1;
    expect_matches_reference(misaligned, 23);
    expect_matches_reference({7, 5, counts, num_rows, dtype::bf16, dtype::bf16}, 24);
  }
}

// Arguments asking for the wgmma kernel, with aligned stand-in pointers (for
// grouped_gemm_uses_wgmma, which reads nothing).
cuda::grouped_gemm_args wgmma_request(int64_t rows, int64_t experts, int64_t n, int64_t k) {
  cuda::grouped_gemm_args a;
  a.x = a.weights = a.y = reinterpret_cast<void*>(uintptr_t{4096});
  a.expert_offsets = reinterpret_cast<const int32_t*>(uintptr_t{4096});
  a.num_rows = rows;
  a.num_experts = experts;
  a.n = n;
  a.k = k;
  a.wgmma = true;
  return a;
}

// Hopper's wgmma kernel (sm_90 only; the emulator emulates one), which takes the wide tiling's
// cases: v2lite's shapes, experts of one row, of 130 rows (a second tile of 2 rows: the second
// warpgroup idle), n past one 256-column tile and a partial one, k with a tail of 8 (264 =
// 4 x 64 + 8) and k == 0, float32 and bf16 out, y rows not 16-byte multiples (element stores);
// fed by TMA (k == 0 then takes cp.async: a tensor map has no empty dimension) and by cp.async.
// What it must refuse (k % 8 != 0, a misaligned x, few rows per expert) takes WMMA, and says so.
TEST(cuda_grouped_gemm, wgmma_matches_reference) {
  MOE_KERNELS_SKIP_WITHOUT_SM90();
  const auto counts = v2lite_counts();
  const std::vector<int32_t> few{0, 1, 33, 130, 17};
  const int64_t rows = 64 * 5 + 3;
  for (const bool tma : {true, false}) {
    auto wide = [tma](grouped_case c) {
      c.wgmma = true;
      c.tma = tma;
      return c;
    };
    for (const dtype y_dt : {dtype::bf16, dtype::f32})
      expect_matches_reference(
          wide({2 * 1408 / v2lite_n_divisor, 2048, counts, 64 * 64, dtype::bf16, y_dt}), 13);
    expect_matches_reference(
        wide({2048 / v2lite_n_divisor, 1408, counts, 64 * 64, dtype::bf16, dtype::bf16}), 14);
    expect_matches_reference(wide({300, 264, few, rows, dtype::bf16, dtype::bf16}), 26);
    expect_matches_reference(wide({520, 64, few, rows, dtype::bf16, dtype::f32}), 27);
    expect_matches_reference(wide({131, 264, few, rows, dtype::bf16, dtype::bf16}), 28);
    expect_matches_reference(wide({40, 0, {2, 0, 3}, 192, dtype::bf16, dtype::bf16}), 29);
  }

  auto a = wgmma_request(rows, 5, 300, 264);
  EXPECT_TRUE(cuda::grouped_gemm_uses_wgmma(a));
  auto b = a;
  b.k = 77;
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(b)) << "k % 8 != 0";
  b = a;
  b.x = reinterpret_cast<void*>(uintptr_t{4098});
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(b)) << "misaligned x";
  b = a;
  b.num_rows = 181;
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(b)) << "the narrow tiling";
  b = a;
  b.wgmma = false;
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(b)) << "not asked for";
  b = a;
  b.weight_scale = reinterpret_cast<const float*>(uintptr_t{4096});
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(b)) << "FP8 weights";
  for (const grouped_case& c : {grouped_case{131, 77, few, rows, dtype::bf16, dtype::bf16},
                                grouped_case{131, 264, few, 181, dtype::bf16, dtype::bf16}}) {
    grouped_case declined = c;
    declined.wgmma = true;
    expect_matches_reference(declined, 30);
  }
}

// FP8 weights, both tilings: v2lite's expert shapes (the asynchronous path; in the emulator n is
// cut as above, with a 16-row block grid so that each expert's weight starts a grid row); k with
// a partial last block column (272 = 2 x 128 + 16: async) or not a multiple of 16 (264, 77:
// element loads), a misaligned x (element loads), block columns not a multiple of 16 (element
// loads), a padded scale row, float32 output.
TEST(cuda_grouped_gemm, fp8_weights_match_the_dequantized_product) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto counts = v2lite_counts();
  const int64_t in_use = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  const int64_t v2_rows = v2lite_n_divisor == 1 ? 128 : 16;
  for (const int64_t num_rows : {in_use, int64_t{64 * 64}}) {
    expect_fp8_matches_dequantized({2 * 1408 / v2lite_n_divisor, 2048, counts, num_rows, v2_rows, 128}, 41);
    expect_fp8_matches_dequantized({2048 / v2lite_n_divisor, 1408, counts, num_rows, 128, 128}, 42);
  }
  const std::vector<int32_t> few{0, 1, 33, 130, 17};
  for (const int64_t num_rows : {int64_t{181}, int64_t{64 * 5 + 3}}) {
    expect_fp8_matches_dequantized({160, 272, few, num_rows, 32, 128}, 43);
    expect_fp8_matches_dequantized({100, 264, few, num_rows, 128, 128, 3, dtype::f32}, 44);
    expect_fp8_matches_dequantized({131, 77, few, num_rows, 128, 128}, 45);
    fp8_case misaligned{160, 256, few, num_rows, 32, 128};
    misaligned.x_misalign_elements = 1;
    expect_fp8_matches_dequantized(misaligned, 46);
    expect_fp8_matches_dequantized({64, 256, few, num_rows, 64, 40}, 47);
    // The SwiGLU fused (each half of a tile in its own rows of the scale grid), by copies and
    // by element loads.
    fp8_case fused{300, 256, few, num_rows, 32, 128};
    fused.fuse_swiglu = true;
    expect_fp8_matches_dequantized(fused, 48);
    fused.block_cols = 40;
    expect_fp8_matches_dequantized(fused, 49);
  }
  fp8_case v2_fused{2 * 1408 / v2lite_n_divisor, 2048, counts, in_use, v2_rows, 128};
  v2_fused.fuse_swiglu = true;
  expect_fp8_matches_dequantized(v2_fused, 50);
}

TEST(cuda_grouped_gemm, f32_matches_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const std::vector<int32_t> counts{3, 0, 65, 1, 130, 0};
  expect_matches_reference({100, 77, counts, 199, dtype::f32, dtype::f32}, 31);
  expect_matches_reference({130, 300, counts, 260, dtype::f32, dtype::f32}, 32);
}

// More experts than threads per block: each thread of the tile search counts a run of experts
// (up to 8 at 1024 experts and 128 threads). Uneven small counts, many empty, in both tilings.
TEST(cuda_grouped_gemm, more_experts_than_threads_match_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (const int64_t num_experts : {int64_t{300}, cuda::grouped_gemm_max_experts}) {
    std::vector<int32_t> counts(static_cast<size_t>(num_experts));
    for (size_t e = 0; e < counts.size(); ++e)
      counts[e] = static_cast<int32_t>((e * 5 + e / 7) % 4);
    counts[7] = 40;  // more than one narrow tile, next to empty and single-row experts
    const int64_t in_use = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    for (const int64_t num_rows : {in_use, 64 * num_experts}) {
      expect_matches_reference({24, 32, counts, num_rows, dtype::bf16, dtype::bf16}, 71);
      expect_matches_reference({24, 32, counts, num_rows, dtype::f32, dtype::f32}, 72);
    }
  }
}

// Routings that need every row tile of the grid (it is sized for the worst routing of num_rows
// rows: each of min(experts, num_rows) experts with 1 row more than a whole number of tiles):
// a block short and the last tile is never computed. Narrow (16-row tiles: one row for each of
// 6 of 64 experts, a batch-1 decode's routing; 17 rows for each of 4), wide (128: 129 and 1, on
// WMMA and on wgmma) and f32 (64: 65, 1 and 1).
TEST(cuda_grouped_gemm, routings_that_need_every_tile_of_the_grid) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  std::vector<int32_t> decode(64, 0);
  for (const size_t e : {3, 9, 17, 30, 41, 63}) decode[e] = 1;
  expect_matches_reference({72, 64, decode, 6, dtype::bf16, dtype::bf16}, 81);
  expect_matches_reference({72, 64, {17, 17, 17, 17}, 68, dtype::bf16, dtype::f32}, 82);
  grouped_case wide{300, 64, {129, 1}, 130, dtype::bf16, dtype::bf16};
  expect_matches_reference(wide, 83);
  wide.wgmma = true;
  expect_matches_reference(wide, 84);
  expect_matches_reference({72, 40, {65, 1, 1}, 67, dtype::f32, dtype::f32}, 85);
}

// fuse_swiglu (on the wgmma kernel where the case asks for it, else on WMMA): y (rows, I) =
// silu(x . gate^T) * (x . up^T) of each expert's stacked (gate; up) weight, against the
// activation of the exact products. Tolerance: each
// product is off by the kernel's bound t (as above); silu's slope is within [-0.1, 1.1], so the
// result moves by at most 1.1 t |up| + |silu(gate)| t + t^2, plus silu's own float32 evaluation
// (expf within 2 ulp, a division and a product: 2^-20 of |result|) and the one rounding to y_dt.
void expect_fused_swiglu_matches(const grouped_case& c, uint64_t seed) {
  SCOPED_TRACE(describe(c) + " fused swiglu");
  const auto num_experts = static_cast<int64_t>(c.counts.size());
  const auto offsets = offsets_of(c.counts);
  const auto rows = static_cast<size_t>(c.num_rows), n = static_cast<size_t>(c.n),
             k = static_cast<size_t>(c.k), inter = n / 2;
  const auto rows_in_use = static_cast<size_t>(offsets.back());
  const auto x = random_values(rows * k, seed, true);
  const auto w = random_values(static_cast<size_t>(num_experts) * n * k, seed + 1, true);
  const size_t y_bytes = dtype_bytes(c.y_dt);
  const size_t x_at = c.x_misalign_elements * 2;
  device_buffer dx(x_at + rows * k * 2), dw(w.size() * 2), doff(offsets.size() * 4),
      dy(rows * inter * y_bytes + canary_bytes);
  ASSERT_TRUE(upload(dx, as_bytes(x, dtype::bf16).data(), rows * k * 2, x_at));
  ASSERT_TRUE(upload(dw, as_bytes(w, dtype::bf16).data(), dw.bytes()));
  ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
  ASSERT_EQ(cudaMemset(dy.get(), sentinel, dy.bytes()), cudaSuccess);
  auto a = args_of(c, static_cast<const char*>(dx.get()) + x_at, doff, dw, dy);
  a.fuse_swiglu = true;
  ASSERT_EQ(cuda::grouped_gemm_uses_wgmma(a), c.wgmma);
  auto launched = cuda::grouped_gemm_kernel::none;
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr, &launched), kernel_status::ok);
  EXPECT_EQ(launched, !c.wgmma ? cuda::grouped_gemm_kernel::wmma
                      : c.tma  ? cuda::grouped_gemm_kernel::wgmma_tma
                               : cuda::grouped_gemm_kernel::wgmma);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = download(dy);

  const tolerance tol{dtype::bf16, dtype::f32, c.k};  // a product's bound, before any rounding
  size_t e = 0;
  for (size_t r = 0; r < rows_in_use; ++r) {
    while (static_cast<size_t>(offsets[e + 1]) <= r) ++e;
    for (size_t j = 0; j < inter; ++j) {
      double gate = 0.0, up = 0.0, gate_mag = 0.0, up_mag = 0.0;
      for (size_t i = 0; i < k; ++i) {
        const double xv = x[r * k + i], gv = w[(e * n + j) * k + i],
                     uv = w[(e * n + inter + j) * k + i];
        gate += xv * gv;
        up += xv * uv;
        gate_mag += std::fabs(xv * gv);
        up_mag += std::fabs(xv * uv);
      }
      const double silu = gate / (1.0 + std::exp(-gate)), want = silu * up;
      const double tg = tol.of(gate, gate_mag), tu = tol.of(up, up_mag);
      double bound =
          1.1 * tg * std::fabs(up) + std::fabs(silu) * tu + tg * tu + 0x1.0p-20 * std::fabs(want);
      if (c.y_dt == dtype::bf16) bound += 0x1.0p-8 * (std::fabs(want) + bound);
      const double g = element_of(got, r * inter + j, c.y_dt);
      ASSERT_LE(std::fabs(g - want), bound)
          << "row " << r << " (expert " << e << ") col " << j << ": got " << g << ", want " << want;
    }
  }
  for (size_t b = rows_in_use * inter * y_bytes; b < got.size(); ++b)
    ASSERT_EQ(got[b], sentinel) << "byte " << b << " of y past the rows in use was written";
}

// fuse_swiglu on wgmma: v2lite's gate|up shapes (cut to 1/16 of the columns in the emulator),
// experts of 1, 17, 33 and 130 rows (the split tiles), I past one 128-column tile and partial
// (I = 150), bf16 and f32 out; and the refusals: n odd, beta, f32.
TEST(cuda_grouped_gemm, fused_swiglu_matches_the_activation_of_the_products) {
  MOE_KERNELS_SKIP_WITHOUT_SM90();
  for (const bool tma : {true, false}) {
    grouped_case v2lite{
        2 * 1408 / v2lite_n_divisor, 2048, v2lite_counts(), 64 * 64, dtype::bf16, dtype::bf16};
    v2lite.wgmma = true;
    v2lite.tma = tma;
    expect_fused_swiglu_matches(v2lite, 101);
    const std::vector<int32_t> few{0, 1, 33, 130, 17};
    for (const dtype y_dt : {dtype::bf16, dtype::f32}) {
      grouped_case c{300, 264, few, 64 * 5 + 3, dtype::bf16, y_dt};
      c.wgmma = true;
      c.tma = tma;
      expect_fused_swiglu_matches(c, 102);
    }
  }

  auto a = wgmma_request(64 * 5 + 3, 5, 300, 264);
  a.fuse_swiglu = true;
  EXPECT_EQ(cuda::grouped_gemm_can_run(a), kernel_status::ok);
  auto b = a;
  b.n = 301;
  EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape) << "n odd";
  b = a;
  b.beta = 1.0f;
  EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape) << "beta";
  b = a;
  b.dt = b.y_dt = dtype::f32;
  EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::unsupported_shape) << "f32";
  b = a;
  b.wgmma = false;
  EXPECT_EQ(cuda::grouped_gemm_can_run(b), kernel_status::ok) << "WMMA fuses too";
}

// fuse_swiglu on WMMA: a tile's first half reads its activations' gate rows and its second half
// their up rows (the narrow tiles' 32 + 32 of 64 columns, the wide tiles' 128 + 128 of 256, the
// halves in different warps, paired through shared memory; split k at decode). v2lite's
// gate|up shapes on both tilings (a decode's rows, a prefill's); experts of 1, 17, 33 and 130
// rows with I = 150 (a partial last tile in both halves) and I = 40 (one partial tile: whole
// warps of each half idle); bf16 and f32 out; a misaligned x (element loads).
TEST(cuda_grouped_gemm, fused_swiglu_on_wmma_matches_the_activation_of_the_products) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto counts = v2lite_counts();
  const int64_t in_use = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  for (const int64_t num_rows : {in_use, int64_t{64 * 64}})
    expect_fused_swiglu_matches(
        {2 * 1408 / v2lite_n_divisor, 2048, counts, num_rows, dtype::bf16, dtype::bf16}, 111);
  const std::vector<int32_t> few{0, 1, 33, 130, 17};
  uint64_t seed = 112;
  for (const int64_t num_rows : {int64_t{181}, int64_t{64 * 5 + 3}})
    for (const dtype y_dt : {dtype::bf16, dtype::f32}) {
      expect_fused_swiglu_matches({300, 264, few, num_rows, dtype::bf16, y_dt}, seed++);
      expect_fused_swiglu_matches({80, 136, few, num_rows, dtype::bf16, y_dt}, seed++);
      grouped_case misaligned{300, 264, few, num_rows, dtype::bf16, y_dt};
      misaligned.x_misalign_elements = 1;
      expect_fused_swiglu_matches(misaligned, seed++);
    }
}

// beta (y = x . w^T + beta * y, the residual add of a dense product run as one expert): one
// expert of 40 rows (three 16-row tiles, taken row tiles first) over 3 column tiles, bf16 and
// f32 out; the wide tiling (which wgmma then declines); f32 on CUDA cores with beta 0.5.
TEST(cuda_grouped_gemm, beta_adds_the_old_output) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (const dtype y_dt : {dtype::bf16, dtype::f32}) {
    grouped_case one{150, 96, {40}, 40, dtype::bf16, y_dt};
    one.beta = 1.0f;
    expect_matches_reference(one, 91);
  }
  grouped_case wide{300, 64, {129, 1, 70}, 200, dtype::bf16, dtype::bf16};
  wide.beta = 1.0f;
  expect_matches_reference(wide, 92);
  wide.wgmma = true;
  expect_matches_reference(wide, 93);
  grouped_case simt{72, 40, {65, 0, 3}, 68, dtype::f32, dtype::f32};
  simt.beta = 0.5f;
  expect_matches_reference(simt, 94);

  auto a = wgmma_request(200, 3, 300, 64);
  a.beta = 1.0f;
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(a)) << "beta is WMMA's";
}

// A gather map (x_entries) instead of a permuted copy of x: the same products, bit for bit, on
// every kernel that gathers (WMMA narrow and wide, with 16-byte copies and element loads, FP8
// weights both ways, CUDA cores), beta included; with `wgmma` the call runs on WMMA.
struct gather_case {
  int64_t tokens = 0, top_k = 0, experts = 0, n = 0, k = 0;
  dtype dt = dtype::bf16, y_dt = dtype::bf16;
  bool fp8 = false;
  bool wgmma = false;
  float beta = 0.0f;
  bool fuse_swiglu = false;  // both products with the SwiGLU fused
};

void expect_gather_matches_the_permuted_copy(const gather_case& c, uint64_t seed) {
  SCOPED_TRACE("gather tokens=" + std::to_string(c.tokens) + " top_k=" + std::to_string(c.top_k) +
               " experts=" + std::to_string(c.experts) + " n=" + std::to_string(c.n) +
               " k=" + std::to_string(c.k) + " " + std::string(to_string(c.dt)) +
               (c.fp8 ? " fp8" : "") + (c.wgmma ? " wgmma requested" : "") +
               (c.beta != 0.0f ? " beta" : "") + (c.fuse_swiglu ? " fused swiglu" : ""));
  const auto T = static_cast<size_t>(c.tokens), K = static_cast<size_t>(c.top_k),
             E = static_cast<size_t>(c.experts), n = static_cast<size_t>(c.n),
             k = static_cast<size_t>(c.k);
  const size_t rows = T * K;
  // Each token's top_k distinct experts, skewed towards the low ones.
  std::vector<int32_t> topk(rows);
  uint64_t s = seed;
  for (size_t t = 0; t < T; ++t)
    for (size_t j = 0; j < K; ++j) {
      int32_t e = 0;
      bool fresh = false;
      while (!fresh) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const uint64_t r = s >> 33;
        e = static_cast<int32_t>(r % 3 == 0 ? r % E : r % (E / 2 + 1));
        fresh = std::find(topk.begin() + t * K, topk.begin() + t * K + j, e) ==
                topk.begin() + t * K + j;
      }
      topk[t * K + j] = e;
    }
  std::vector<int32_t> offsets(E + 1), positions(rows), inverse(rows);
  ASSERT_EQ(
      cpu::permute_plan(topk.data(), T, K, E, offsets.data(), positions.data(), inverse.data()),
      kernel_status::ok);
  const bool bf16_in = c.dt == dtype::bf16;
  const auto x = random_values(T * k, seed + 1, bf16_in);
  std::vector<float> permuted(rows * k);
  for (size_t r = 0; r < rows; ++r)
    std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(inverse[r] / K * k), k,
                permuted.begin() + static_cast<std::ptrdiff_t>(r * k));
  const size_t in_bytes = dtype_bytes(c.dt), y_bytes = dtype_bytes(c.y_dt);
  // Weights: of the input dtype, or e4m3 bytes (NaN codes avoided) with 2^-9 block scales.
  std::vector<unsigned char> w;
  if (c.fp8) {
    w.resize(E * n * k);
    for (auto& b : w) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      b = static_cast<unsigned char>(s >> 56);
      if ((b & 0x7f) == 0x7f) b ^= 1;
    }
  } else {
    w = as_bytes(shared_random_values(E * n * k, seed + 2, bf16_in), c.dt);
  }
  const int64_t grid_rows = (c.experts * c.n + 127) / 128, grid_cols = (c.k + 127) / 128;
  const std::vector<float> scale(static_cast<size_t>(grid_rows * grid_cols), 1.0f / 512);
  std::vector<unsigned char> y0(rows * n * y_bytes, sentinel);
  if (c.beta != 0.0f) {
    const auto v = as_bytes(random_values(rows * n, seed + 3, c.y_dt == dtype::bf16), c.y_dt);
    std::copy(v.begin(), v.end(), y0.begin());
  }

  device_buffer dx(T * k * in_bytes), dp(rows * k * in_bytes), dw(w.size()), ds(scale.size() * 4),
      doff(offsets.size() * 4), dinv(rows * 4), dy_copy(y0.size()), dy_gather(y0.size());
  ASSERT_TRUE(upload(dx, as_bytes(x, c.dt).data(), dx.bytes()));
  ASSERT_TRUE(upload(dp, as_bytes(permuted, c.dt).data(), dp.bytes()));
  ASSERT_TRUE(upload(dw, w.data(), dw.bytes()));
  ASSERT_TRUE(upload(ds, scale.data(), ds.bytes()));
  ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
  ASSERT_TRUE(upload(dinv, inverse.data(), dinv.bytes()));
  ASSERT_TRUE(upload(dy_copy, y0.data(), y0.size()));
  ASSERT_TRUE(upload(dy_gather, y0.data(), y0.size()));

  cuda::grouped_gemm_args a;
  a.x = dp.get();
  a.expert_offsets = static_cast<const int32_t*>(doff.get());
  a.weights = dw.get();
  a.y = dy_copy.get();
  a.num_rows = static_cast<int64_t>(rows);
  a.num_experts = c.experts;
  a.n = c.n;
  a.k = c.k;
  a.dt = c.dt;
  a.y_dt = c.y_dt;
  a.beta = c.beta;
  a.fuse_swiglu = c.fuse_swiglu;
  if (c.fp8) a.weight_scale = static_cast<const float*>(ds.get());
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
  a.x = dx.get();
  a.x_entries = static_cast<const int32_t*>(dinv.get());
  a.entries_per_x_row = c.top_k;
  a.num_x_rows = c.tokens;
  a.y = dy_gather.get();
  a.wgmma = c.wgmma;
  EXPECT_FALSE(cuda::grouped_gemm_uses_wgmma(a));
  auto launched = cuda::grouped_gemm_kernel::none;
  ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr, &launched), kernel_status::ok);
  EXPECT_EQ(launched,
            c.dt == dtype::f32 ? cuda::grouped_gemm_kernel::simt : cuda::grouped_gemm_kernel::wmma);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto want = download(dy_copy), got = download(dy_gather);
  ASSERT_EQ(got.size(), want.size());
  size_t nonzero = 0;
  for (size_t b = 0; b < got.size(); b += y_bytes) {
    ASSERT_EQ(std::memcmp(got.data() + b, want.data() + b, y_bytes), 0)
        << "element " << b / y_bytes << " (row " << b / y_bytes / n << ")";
    nonzero += element_of(got, b / y_bytes, c.y_dt) != 0.0f;
  }
  EXPECT_GT(nonzero, got.size() / y_bytes / 2);  // the case multiplies something
}

TEST(cuda_grouped_gemm, a_gather_map_gives_the_products_of_the_permuted_copy) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  uint64_t seed = 300;
  // Decode (narrow tiles): one token, a batch; prefill (wide tiles).
  for (const dtype y_dt : {dtype::bf16, dtype::f32}) {
    expect_gather_matches_the_permuted_copy({1, 6, 64, 96, 256, dtype::bf16, y_dt}, seed++);
    expect_gather_matches_the_permuted_copy({12, 4, 16, 160, 128, dtype::bf16, y_dt}, seed++);
    expect_gather_matches_the_permuted_copy({96, 2, 3, 300, 64, dtype::bf16, y_dt}, seed++);
  }
  // Element loads (k not a multiple of 8), FP8 weights (copies, and element loads), beta,
  // CUDA cores, and wgmma asked for.
  expect_gather_matches_the_permuted_copy({9, 3, 8, 70, 45, dtype::bf16, dtype::bf16}, seed++);
  gather_case fp8{10, 4, 12, 128, 256, dtype::bf16, dtype::bf16, true};
  expect_gather_matches_the_permuted_copy(fp8, seed++);
  fp8.tokens = 100;
  fp8.k = 136;
  expect_gather_matches_the_permuted_copy(fp8, seed++);
  gather_case with_beta{7, 2, 4, 96, 128, dtype::bf16, dtype::bf16};
  with_beta.beta = 1.0f;
  expect_gather_matches_the_permuted_copy(with_beta, seed++);
  expect_gather_matches_the_permuted_copy({40, 3, 5, 72, 40, dtype::f32, dtype::f32}, seed++);
  gather_case wgmma{128, 2, 2, 256, 64, dtype::bf16, dtype::bf16};
  wgmma.wgmma = true;
  expect_gather_matches_the_permuted_copy(wgmma, seed++);
  // The SwiGLU fused (the engine's decode and prefill gate|up): narrow, wide (wgmma asked for:
  // not taken with a gather map), FP8.
  for (gather_case fused : {gather_case{1, 6, 64, 96, 256, dtype::bf16, dtype::bf16},
                            gather_case{96, 2, 3, 300, 64, dtype::bf16, dtype::f32},
                            gather_case{10, 4, 12, 128, 256, dtype::bf16, dtype::bf16, true}}) {
    fused.fuse_swiglu = true;
    fused.wgmma = true;
    expect_gather_matches_the_permuted_copy(fused, seed++);
  }
}

// k == 0: an empty sum, zeros in every row in use.
TEST(cuda_grouped_gemm, empty_sum_writes_zeros) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  expect_matches_reference({40, 0, {2, 0, 3}, 6, dtype::bf16, dtype::bf16}, 41);
  expect_matches_reference({40, 0, {2, 0, 3}, 6, dtype::f32, dtype::f32}, 42);
}

// Every expert empty: nothing written.
TEST(cuda_grouped_gemm, empty_routing_writes_nothing) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  expect_matches_reference({48, 32, std::vector<int32_t>(8, 0), 40, dtype::bf16, dtype::bf16}, 51);
}

// Offsets the host cannot check (past num_rows, negative, decreasing) are the caller's bug, but
// the kernel must stay inside x and y.
TEST(cuda_grouped_gemm, wrong_offsets_stay_inside_the_buffers) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const int64_t num_rows = 20, n = 24, k = 16;
  for (const dtype dt : {dtype::bf16, dtype::f32}) {
    SCOPED_TRACE(std::string(to_string(dt)));
    const std::vector<int32_t> offsets{-5, 12, 3, 1000, 7, 2000000000};
    const size_t bytes = dtype_bytes(dt);
    device_buffer dx(num_rows * k * bytes), dw((offsets.size() - 1) * n * k * bytes),
        doff(offsets.size() * 4), dy(num_rows * n * bytes + canary_bytes);
    ASSERT_EQ(cudaMemset(dx.get(), 0, dx.bytes()), cudaSuccess);
    ASSERT_EQ(cudaMemset(dw.get(), 0, dw.bytes()), cudaSuccess);
    ASSERT_EQ(cudaMemset(dy.get(), sentinel, dy.bytes()), cudaSuccess);
    ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
    cuda::grouped_gemm_args a{dx.get(), static_cast<const int32_t*>(doff.get()),
                              dw.get(), dy.get(),
                              num_rows, static_cast<int64_t>(offsets.size() - 1),
                              n,        k,
                              dt,       dt};
    ASSERT_EQ(cuda::grouped_gemm_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = download(dy);
    ASSERT_EQ(got.size(), dy.bytes());
    for (size_t b = static_cast<size_t>(num_rows * n) * bytes; b < got.size(); ++b)
      ASSERT_EQ(got[b], sentinel) << "canary byte " << b << " written";
  }
}

// RAII for the graph test's stream and graphs.
struct stream_owner {
  cudaStream_t s = nullptr;
  ~stream_owner() {
    if (s != nullptr) (void)cudaStreamDestroy(s);
  }
};
struct graph_owner {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~graph_owner() {
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
    if (g != nullptr) (void)cudaGraphDestroy(g);
  }
};

// The launch reads the routing only on the device: captured once, the graph replays correctly
// after the offsets change (a different number of rows per expert, and fewer rows in use).
TEST(cuda_grouped_gemm, captured_graph_follows_the_routing_on_the_device) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
#if defined(MOE_CUDA_EMULATOR) && !defined(MOE_EMU_FAKE_CUDART)
  GTEST_SKIP() << "the CUDA emulator's runtime macros have no streams or graphs";
#endif
  const int64_t num_experts = 4, num_rows = 70, n = 48, k = 64;
  const auto x = random_values(num_rows * k, 61, true);
  const auto w = random_values(num_experts * n * k, 62, true);
  device_buffer dx(x.size() * 2), dw(w.size() * 2), doff((num_experts + 1) * 4),
      dy(num_rows * n * 4);
  ASSERT_TRUE(upload(dx, as_bytes(x, dtype::bf16).data(), dx.bytes()));
  ASSERT_TRUE(upload(dw, as_bytes(w, dtype::bf16).data(), dw.bytes()));
  cuda::grouped_gemm_args a{dx.get(),    static_cast<const int32_t*>(doff.get()),
                            dw.get(),    dy.get(),
                            num_rows,    num_experts,
                            n,           k,
                            dtype::bf16, dtype::f32};
  stream_owner stream;
  ASSERT_EQ(cudaStreamCreate(&stream.s), cudaSuccess);
  graph_owner graph;
  // Global mode: the strictest, as a caller capturing a whole decode step would use it.
  ASSERT_EQ(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal), cudaSuccess);
  const kernel_status captured = cuda::grouped_gemm_run(a, stream.s);
  ASSERT_EQ(cudaStreamEndCapture(stream.s, &graph.g), cudaSuccess);
  ASSERT_EQ(captured, kernel_status::ok);
  ASSERT_EQ(cudaGraphInstantiate(&graph.exec, graph.g, 0), cudaSuccess);

  const tolerance tol{dtype::bf16, dtype::f32, k};
  for (const auto& counts :
       {std::vector<int32_t>{10, 0, 40, 20}, std::vector<int32_t>{1, 33, 0, 2}}) {
    const auto offsets = offsets_of(counts);
    ASSERT_TRUE(upload(doff, offsets.data(), doff.bytes()));
    ASSERT_EQ(cudaMemset(dy.get(), sentinel, dy.bytes()), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(graph.exec, stream.s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
    const auto got = download(dy);
    ASSERT_EQ(got.size(), dy.bytes());
    const auto rows_in_use = static_cast<size_t>(offsets.back());
    size_t e = 0;
    for (size_t r = 0; r < rows_in_use; ++r) {
      while (static_cast<size_t>(offsets[e + 1]) <= r) ++e;
      for (size_t j = 0; j < static_cast<size_t>(n); ++j) {
        double exact = 0.0, magnitude = 0.0;
        for (size_t i = 0; i < static_cast<size_t>(k); ++i) {
          const double p = double{x[r * k + i]} * w[(e * n + j) * k + i];
          exact += p;
          magnitude += std::fabs(p);
        }
        ASSERT_LE(std::fabs(element_of(got, r * n + j, dtype::f32) - exact),
                  tol.of(exact, magnitude))
            << "row " << r << " col " << j;
      }
    }
    for (size_t b = rows_in_use * n * 4; b < got.size(); ++b)
      ASSERT_EQ(got[b], sentinel) << "byte " << b;
  }
}

}  // namespace
}  // namespace moe::kernels
