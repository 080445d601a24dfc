// The few-row projection (kernels/cuda/skinny_linear.hpp) against a double-precision product of
// the same stored inputs. Tolerances, from the kernel's float32 arithmetic: each lane sums about
// k / (32 * elements per load) chunks of up to 16 products in order, then 5 shuffle levels and at
// most 3 levels across warps add the partial sums, so the float32 sum is within
// (k / 32 + 24) * 2^-24 of the sum of |products| ("mag") of the exact one; twice that is the
// bound below; a bf16 output adds its one rounding (2^-9 of the value, 2^-8 allowed).
// FP8 weights are expanded as fp8_dequantize expands them (bf16(e4m3 * scale)): the reference
// takes model/'s block expansion rounded to bf16, so a misplaced scale or a mis-decoded byte
// shows at full size. The GPU cases skip without a GPU; the argument checks run everywhere (and
// the whole file in the emulator, tests/emulator).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include "kernels/cuda/skinny_linear.hpp"
#include "model/dequantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

using namespace moe;
using namespace moe::kernels;
using namespace moe::kernels::cuda_testing;
using cpu::testing::random_floats;

namespace {

struct product {
  std::vector<double> want;  // (rows, n)
  std::vector<double> mag;   // sum of |x w| per output
};

// x (rows, k) and w (n, k) as the kernel reads them; y0 the output's previous values (beta).
product reference(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t n,
                  int64_t k, float beta, const std::vector<float>& y0) {
  product p;
  p.want.resize(static_cast<size_t>(rows * n));
  p.mag.resize(p.want.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) {
      double s = 0, a = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double v =
            double{x[static_cast<size_t>(r * k + i)]} * w[static_cast<size_t>(c * k + i)];
        s += v;
        a += std::fabs(v);
      }
      const auto o = static_cast<size_t>(r * n + c);
      if (beta != 0.0f) {
        s += double{beta} * y0[o];
        a += std::fabs(double{beta} * y0[o]);
      }
      p.want[o] = s;
      p.mag[o] = a;
    }
  return p;
}

double sum_tolerance(int64_t k, double mag) {
  return 2.0 * (static_cast<double>(k) / 32.0 + 24.0) * 0x1p-24 * mag + 1e-30;
}

// The outputs (y_dt) against the reference, every element.
void expect_matches(const device_buffer& dy, dtype y_dt, const product& p, int64_t k) {
  if (y_dt == dtype::f32) {
    const auto got = fetch<float>(dy, p.want.size());
    ASSERT_EQ(got.size(), p.want.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::fabs(double{got[i]} - p.want[i]), sum_tolerance(k, p.mag[i]))
          << "output " << i << ": got " << got[i] << ", want " << p.want[i];
  } else {
    // The float32 sum's error plus one rounding to bf16 (at most 2^-9 of the value; 2^-8 covers
    // the float32 error moving the value across a power of two).
    const auto got = fetch<uint16_t>(dy, p.want.size());
    ASSERT_EQ(got.size(), p.want.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::fabs(double{from_bf16(got[i])} - p.want[i]),
                sum_tolerance(k, p.mag[i]) + 0x1p-8 * std::fabs(p.want[i]))
          << "output " << i << ": got " << from_bf16(got[i]) << ", want " << p.want[i];
  }
}

cuda::skinny_linear_args product_args(const device_buffer& x, const device_buffer& w,
                                      const device_buffer& y, int64_t rows, int64_t n, int64_t k,
                                      dtype dt, dtype y_dt, float beta) {
  return cuda::skinny_linear_desc(x.get(), w.get(), y.get(), rows, k, n, dt, y_dt, beta);
}

struct float_case {
  int64_t rows, n, k;
  dtype dt;  // x and w
  dtype y_dt;
  float beta;
};

void check_float_case(const float_case& c) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << c.rows << " n " << c.n << " k " << c.k
               << (c.dt == dtype::f32 ? " f32" : " bf16")
               << (c.y_dt == dtype::f32 ? " -> f32" : " -> bf16") << " beta " << c.beta);
  const auto seed = static_cast<uint64_t>(c.rows * 1000003 + c.n * 1009 + c.k);
  const auto x = stored(random_floats(static_cast<size_t>(c.rows * c.k), seed), c.dt);
  const auto w = stored(random_floats(static_cast<size_t>(c.n * c.k), seed + 1), c.dt);
  const auto y0 =
      stored(random_floats(static_cast<size_t>(c.rows * c.n), seed + 2, -4.0f, 4.0f), c.y_dt);
  const auto p = reference(x, w, c.rows, c.n, c.k, c.beta, y0);
  auto dx = to_device(x, c.dt), dw = to_device(w, c.dt), dy = to_device(y0, c.y_dt);
  auto a = product_args(*dx, *dw, *dy, c.rows, c.n, c.k, c.dt, c.y_dt, c.beta);
  ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_matches(*dy, c.y_dt, p, c.k);
}

}  // namespace

TEST(cuda_skinny_linear, can_run_rejects_bad_arguments) {
  alignas(16) static char storage[64];
  cuda::skinny_linear_args good;
  good.x = storage;
  good.w = storage;
  good.y = storage + 32;
  good.rows = 3;
  good.n = 5;
  good.k = 64;
  // FP8: bf16 x only, scales present, a grid whose column blocks hold whole 8-byte loads.
  auto fp8 = good;
  fp8.w_dt = dtype::f8_e4m3;
  fp8.w_scale = fake<float>();
  fp8.k = 256;
  using args = cuda::skinny_linear_args;
  struct change {
    const char* what;
    const args& base;
    std::function<void(args&)> apply;
    kernel_status want;
  };
  const auto shape = kernel_status::unsupported_shape, type = kernel_status::unsupported_dtype,
             ok = kernel_status::ok;
  const change changes[] = {
      {"as given", good, [](args&) {}, ok},
      {"rows past one pass", good, [](args& a) { a.rows = cuda::skinny_linear_max_rows + 1; }, ok},
      {"65535 passes", good, [](args& a) { a.rows = cuda::skinny_linear_max_rows * 65535; }, ok},
      {"too many rows", good, [](args& a) { a.rows = cuda::skinny_linear_max_rows * 65535 + 1; },
       shape},
      {"k not a multiple of 8 bf16", good, [](args& a) { a.k = 60; }, shape},
      {"x misaligned", good, [](args& a) { a.x = storage + 2; }, shape},
      {"w misaligned", good, [](args& a) { a.w = storage + 8; }, shape},
      {"no y", good, [](args& a) { a.y = nullptr; }, shape},
      {"k 0", good, [](args& a) { a.k = 0; }, shape},
      {"negative n", good, [](args& a) { a.n = -1; }, shape},
      {"n * k overflows", good, [](args& a) { a.n = INT64_MAX / 4; }, shape},
      {"nothing to compute", good, [](args& a) { a.rows = 0, a.x = a.w = a.y = nullptr; }, ok},
      {"bf16 x, f32 w (the router's)", good, [](args& a) { a.w_dt = dtype::f32; }, ok},
      {"f32 x, bf16 w", good, [](args& a) { a.x_dt = dtype::f32; }, type},
      {"integer y", good, [](args& a) { a.y_dt = dtype::i32; }, type},
      {"f16", good, [](args& a) { a.x_dt = a.w_dt = dtype::f16; }, type},
      {"f32, k % 4 == 0", good, [](args& a) { a.x_dt = a.w_dt = dtype::f32, a.k = 12; }, ok},
      {"f32, k % 4 != 0", good, [](args& a) { a.x_dt = a.w_dt = dtype::f32, a.k = 14; }, shape},
      {"FP8 as given", fp8, [](args&) {}, ok},
      {"FP8, k % 8 != 0", fp8, [](args& a) { a.k = 260; }, shape},
      {"FP8 without scales", fp8, [](args& a) { a.w_scale = nullptr; }, shape},
      {"FP8 blocks 20 wide", fp8, [](args& a) { a.block_cols = 20; }, shape},
      {"FP8 blocks 0 high", fp8, [](args& a) { a.block_rows = 0; }, shape},
      {"two column blocks, one scale a row", fp8, [](args& a) { a.scale_ld = 1; }, shape},
      {"FP8 with f32 x", fp8, [](args& a) { a.x_dt = dtype::f32; }, type},
      // Batches, strides and the (k, n) layout (the absorbed attention's products).
      {"two products", good, [](args& a) { a.batch = 2, a.stride_y = 5; }, ok},
      {"no product", good, [](args& a) { a.batch = 0; }, shape},
      {"65536 products", good, [](args& a) { a.batch = 65536, a.stride_y = 5; }, shape},
      {"two products into one y", good, [](args& a) { a.batch = 2; }, shape},
      {"FP8, two products", fp8, [](args& a) { a.batch = 2, a.stride_y = 5; }, shape},
      {"negative stride", good, [](args& a) { a.stride_x = -8; }, shape},
      {"x rows overlap", good, [](args& a) { a.ldx = 56; }, shape},
      {"y rows overlap", good, [](args& a) { a.ldy = 4; }, shape},
      {"x rows 72 apart", good, [](args& a) { a.ldx = 72; }, ok},
      {"x rows 68 apart (misaligned)", good, [](args& a) { a.ldx = 68; }, shape},
      {"w rows 68 apart (misaligned)", good, [](args& a) { a.ldw = 68; }, shape},
      {"x products 4 apart (misaligned)", good,
       [](args& a) { a.batch = 2, a.stride_x = 4, a.stride_y = 5; }, shape},
      {"products pass int64", good,
       [](args& a) { a.batch = 3, a.stride_w = INT64_MAX / 128 * 8, a.stride_y = 5; }, shape},
      {"k_by_n, n a whole load", good,
       [](args& a) { a.w_layout = cuda::skinny_weight_layout::k_by_n, a.n = 16, a.k = 7; }, ok},
      {"k_by_n, x rows 7 apart", good,
       [](args& a) {
         a.w_layout = cuda::skinny_weight_layout::k_by_n, a.n = 16, a.k = 7, a.ldx = 7;
       },
       ok},
      {"k_by_n, n not a whole load", good,
       [](args& a) { a.w_layout = cuda::skinny_weight_layout::k_by_n; }, shape},
      {"k_by_n, w rows shorter than n", good,
       [](args& a) { a.w_layout = cuda::skinny_weight_layout::k_by_n, a.n = 16, a.ldw = 8; },
       shape},
      {"k_by_n with FP8", fp8,
       [](args& a) { a.w_layout = cuda::skinny_weight_layout::k_by_n, a.n = 16; }, type},
      {"unknown layout", good,
       [](args& a) { a.w_layout = static_cast<cuda::skinny_weight_layout>(7); }, shape},
      {"SwiGLU fused", good, [](args& a) { a.swiglu = true; }, ok},
      {"SwiGLU fused, FP8", fp8, [](args& a) { a.swiglu = true; }, ok},
      {"SwiGLU fused with beta", good, [](args& a) { a.swiglu = true, a.beta = 1.0f; }, shape},
      {"SwiGLU fused, two products", good,
       [](args& a) { a.swiglu = true, a.batch = 2, a.stride_y = 5; }, shape},
      {"SwiGLU fused, k_by_n", good,
       [](args& a) { a.swiglu = true, a.w_layout = cuda::skinny_weight_layout::k_by_n, a.n = 16; },
       shape},
      {"SwiGLU fused, 2n rows pass int64", good,
       [](args& a) { a.swiglu = true, a.n = INT64_MAX / 8 / 64 / 2 + 1; }, shape},
  };
  for (const auto& c : changes) {
    auto a = c.base;
    c.apply(a);
    EXPECT_EQ(cuda::skinny_linear_can_run(a), c.want) << c.what;
  }
}

// Row counts across the instantiated bounds (1, 2, 4, 8: 3, 5 and 8 exercise the masks) and
// past one pass (16, 19), widths
// that give one warp per column and k split over 2, 4 and 8 warps (a k of 1024 bf16 with few
// columns splits in two, 4096 in four, f32 4096 over 8 columns in eight), both output dtypes, and
// beta 1 (the residual add of o_proj and the MLP's down projection).
TEST(cuda_skinny_linear, bf16_and_f32_products_match_the_exact_sum) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const float_case cases[] = {
      {1, 300, 64, dtype::bf16, dtype::bf16, 0.0f},
      {3, 37, 1024, dtype::bf16, dtype::bf16, 0.0f},
      {8, 40, 256, dtype::bf16, dtype::f32, 0.0f},
      {2, 24, 4096, dtype::bf16, dtype::f32, 1.0f},
      {5, 96, 512, dtype::bf16, dtype::bf16, 1.0f},
      {1, 8, 4096, dtype::f32, dtype::f32, 0.0f},
      {4, 130, 128, dtype::f32, dtype::f32, 1.0f},
      {7, 17, 48, dtype::f32, dtype::bf16, 0.0f},
      // Past one pass of 8 rows: a whole second pass, and a last pass of 3.
      {16, 40, 256, dtype::bf16, dtype::bf16, 1.0f},
      {19, 24, 4096, dtype::bf16, dtype::f32, 0.0f},
  };
  for (const auto& c : cases) check_float_case(c);
}

// A batch of products laid out as the absorbed attention's (decode): product h reads its rows
// of x as a column slice of wider rows (x[r, h k .. h k + k)), its weight from a stack whose
// slices sit `pad` rows apart (kv_b_proj's W_UK and W_UV of head h), and writes a column slice
// of y; both weight layouts, rows across the bounds, both dtypes, beta 0 and 1. Every element
// between the slices is NaN, in x, in w (where a misread would reach a sum) and in y (where a
// stray write would show and beta would read it).
struct batch_case {
  cuda::skinny_weight_layout layout;
  int64_t batch, rows, n, k, pad;
  dtype dt, y_dt;
  float beta;
};

void check_batch_case(const batch_case& c) {
  const bool kn = c.layout == cuda::skinny_weight_layout::k_by_n;
  SCOPED_TRACE(::testing::Message()
               << (kn ? "k_by_n" : "n_by_k") << " batch " << c.batch << " rows " << c.rows << " n "
               << c.n << " k " << c.k << (c.dt == dtype::f32 ? " f32" : " bf16")
               << (c.y_dt == dtype::f32 ? " -> f32" : " -> bf16") << " beta " << c.beta);
  const int64_t ldx = c.batch * c.k, ldy = c.batch * c.n;
  const int64_t w_rows = kn ? c.k : c.n, ldw = kn ? c.n : c.k;
  const int64_t stride_w = (w_rows + c.pad) * ldw;
  const float nan = std::nanf("");
  const auto seed = static_cast<uint64_t>(c.batch * 7919 + c.rows * 104729 + c.n * 31 + c.k);
  auto x = stored(random_floats(static_cast<size_t>(c.rows * ldx), seed), c.dt);
  auto w = stored(random_floats(static_cast<size_t>(c.batch * stride_w), seed + 1), c.dt);
  auto y0 = stored(random_floats(static_cast<size_t>(c.rows * ldy), seed + 2, -4.0f, 4.0f), c.y_dt);
  for (int64_t h = 0; h < c.batch; ++h)
    for (int64_t i = w_rows * ldw; i < stride_w; ++i)
      w[static_cast<size_t>(h * stride_w + i)] = nan;
  // Each product's operands, packed, for the reference; y0's slices keep their random values.
  std::vector<double> want(static_cast<size_t>(c.rows * ldy)), mag(want.size());
  for (int64_t h = 0; h < c.batch; ++h) {
    std::vector<float> xh(static_cast<size_t>(c.rows * c.k)), wh(static_cast<size_t>(c.n * c.k)),
        yh(static_cast<size_t>(c.rows * c.n));
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t i = 0; i < c.k; ++i)
        xh[static_cast<size_t>(r * c.k + i)] = x[static_cast<size_t>(r * ldx + h * c.k + i)];
    for (int64_t j = 0; j < c.n; ++j)
      for (int64_t i = 0; i < c.k; ++i)
        wh[static_cast<size_t>(j * c.k + i)] =
            w[static_cast<size_t>(h * stride_w + (kn ? i * ldw + j : j * ldw + i))];
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t j = 0; j < c.n; ++j)
        yh[static_cast<size_t>(r * c.n + j)] = y0[static_cast<size_t>(r * ldy + h * c.n + j)];
    const auto p = reference(xh, wh, c.rows, c.n, c.k, c.beta, yh);
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t j = 0; j < c.n; ++j) {
        want[static_cast<size_t>(r * ldy + h * c.n + j)] = p.want[static_cast<size_t>(r * c.n + j)];
        mag[static_cast<size_t>(r * ldy + h * c.n + j)] = p.mag[static_cast<size_t>(r * c.n + j)];
      }
  }
  auto dx = to_device(x, c.dt), dw = to_device(w, c.dt), dy = to_device(y0, c.y_dt);
  cuda::skinny_linear_args a = cuda::skinny_linear_desc(dx->get(), dw->get(), dy->get(), c.rows,
                                                        c.k, c.n, c.dt, c.y_dt, c.beta);
  a.w_layout = c.layout;
  a.batch = c.batch;
  a.ldx = ldx;
  a.ldy = ldy;
  a.stride_x = c.k;
  a.stride_w = stride_w;
  a.stride_y = c.n;
  ASSERT_EQ(cuda::skinny_linear_can_run(a), kernel_status::ok);
  ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_matches(*dy, c.y_dt, product{want, mag}, c.k);
}

TEST(cuda_skinny_linear, batched_strided_products_in_both_weight_layouts) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  using enum cuda::skinny_weight_layout;
  const batch_case cases[] = {
      // v2-lite's absorbed products, scaled down in heads: q . W_UK (k_by_n) and o . W_UV^T.
      {k_by_n, 3, 1, 512, 128, 128, dtype::bf16, dtype::bf16, 0.0f},
      {n_by_k, 3, 1, 128, 512, 128, dtype::bf16, dtype::bf16, 0.0f},
      {k_by_n, 2, 8, 64, 40, 3, dtype::bf16, dtype::f32, 1.0f},
      {n_by_k, 2, 8, 40, 64, 3, dtype::bf16, dtype::f32, 1.0f},
      // A k that leaves some warps of a k_by_n block no rows; columns past the last whole warp.
      {k_by_n, 4, 3, 264, 5, 0, dtype::bf16, dtype::bf16, 0.0f},
      {k_by_n, 1, 5, 36, 300, 1, dtype::f32, dtype::f32, 1.0f},
      {n_by_k, 5, 2, 7, 1024, 2, dtype::f32, dtype::bf16, 0.0f},
      {k_by_n, 2, 4, 8, 1, 0, dtype::f32, dtype::bf16, 1.0f},
      // Past one pass of 8 rows (a batch-32 decode's absorbed products; a last pass of 5).
      {k_by_n, 3, 32, 512, 128, 128, dtype::bf16, dtype::bf16, 0.0f},
      {n_by_k, 3, 21, 128, 512, 128, dtype::bf16, dtype::bf16, 0.0f},
  };
  for (const auto& c : cases) check_batch_case(c);
}

// The SwiGLU fused: y (rows, n) = silu(x . gate^T) * (x . up^T) of a stacked (2 n, k) gate|up
// weight, against the activation of the exact products. Tolerance as in the grouped GEMM's
// fused test: each product within its bound t above; silu's slope lies in [-0.1, 1.1], so the
// result moves by at most 1.1 t_g |up| + |silu(gate)| t_u + t_g t_u, plus silu's own float32
// evaluation (2^-20 of the result) and the one rounding to y_dt.
TEST(cuda_skinny_linear, fused_swiglu_is_the_activation_of_the_two_products) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const float_case cases[] = {
      {1, 300, 64, dtype::bf16, dtype::bf16, 0.0f}, {3, 37, 1024, dtype::bf16, dtype::f32, 0.0f},
      {8, 40, 256, dtype::bf16, dtype::bf16, 0.0f}, {2, 12, 4096, dtype::f32, dtype::f32, 0.0f},
      {5, 96, 512, dtype::f32, dtype::bf16, 0.0f},  {11, 20, 256, dtype::bf16, dtype::bf16, 0.0f},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " n " << c.n << " k " << c.k
                                      << (c.dt == dtype::f32 ? " f32" : " bf16")
                                      << (c.y_dt == dtype::f32 ? " -> f32" : " -> bf16"));
    const auto seed = static_cast<uint64_t>(c.rows * 7 + c.n * 1009 + c.k);
    const auto x = stored(random_floats(static_cast<size_t>(c.rows * c.k), seed), c.dt);
    const auto w = stored(random_floats(static_cast<size_t>(2 * c.n * c.k), seed + 1), c.dt);
    const auto p = reference(x, w, c.rows, 2 * c.n, c.k, 0.0f, {});
    auto dx = to_device(x, c.dt), dw = to_device(w, c.dt);
    device_buffer dy(static_cast<size_t>(c.rows * c.n) * 4);
    auto a = product_args(*dx, *dw, dy, c.rows, c.n, c.k, c.dt, c.y_dt, 0.0f);
    a.swiglu = true;
    ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = c.y_dt == dtype::f32 ? fetch<float>(dy, static_cast<size_t>(c.rows * c.n))
                                          : std::vector<float>{};
    const auto got16 = c.y_dt == dtype::bf16
                           ? fetch<uint16_t>(dy, static_cast<size_t>(c.rows * c.n))
                           : std::vector<uint16_t>{};
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t j = 0; j < c.n; ++j) {
        const auto g = static_cast<size_t>(r * 2 * c.n + j), u = g + static_cast<size_t>(c.n);
        const double gate = p.want[g], up = p.want[u];
        const double silu = gate / (1.0 + std::exp(-gate)), want = silu * up;
        const double tg = sum_tolerance(c.k, p.mag[g]), tu = sum_tolerance(c.k, p.mag[u]);
        double bound =
            1.1 * tg * std::fabs(up) + std::fabs(silu) * tu + tg * tu + 0x1.0p-20 * std::fabs(want);
        if (c.y_dt == dtype::bf16) bound += 0x1.0p-8 * (std::fabs(want) + bound);
        const auto i = static_cast<size_t>(r * c.n + j);
        const double v = c.y_dt == dtype::f32 ? double{got[i]} : double{from_bf16(got16[i])};
        ASSERT_LE(std::fabs(v - want), bound) << "row " << r << " col " << j;
      }
  }
}

// bf16 x with an f32 weight (the router's product on its bf16 input): x widened exactly, the
// same bits as the f32 product on x converted to f32 first.
TEST(cuda_skinny_linear, bf16_input_with_f32_weight_is_the_f32_product_of_its_widening) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (const int64_t rows : {int64_t{1}, int64_t{3}, int64_t{8}}) {
    const int64_t n = 64, k = 2048;
    SCOPED_TRACE(::testing::Message() << "rows " << rows);
    const auto x = stored(random_floats(static_cast<size_t>(rows * k), 41 + rows), dtype::bf16);
    const auto w = random_floats(static_cast<size_t>(n * k), 42);
    auto dx16 = to_device(x, dtype::bf16), dx32 = to_device(x, dtype::f32), dw = to_device(w, dtype::f32);
    device_buffer y16(rows * n * 4), y32(rows * n * 4);
    auto a = product_args(*dx32, *dw, y32, rows, n, k, dtype::f32, dtype::f32, 0.0f);
    ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
    a.x = dx16->get();
    a.x_dt = dtype::bf16;
    a.y = y16.get();
    ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = fetch<float>(y16, rows * n), want = fetch<float>(y32, rows * n);
    EXPECT_EQ(got, want);
    const auto p = reference(x, w, rows, n, k, 0.0f, {});
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::fabs(double{got[i]} - p.want[i]), sum_tolerance(k, p.mag[i])) << "output " << i;
  }
}

// The same inputs give the same bits: each lane's order and the reduction trees are fixed.
TEST(cuda_skinny_linear, repeated_launches_give_identical_bits) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const int64_t rows = 2, n = 48, k = 2048;
  const auto x = stored(random_floats(static_cast<size_t>(rows * k), 5), dtype::bf16);
  const auto w = stored(random_floats(static_cast<size_t>(n * k), 6), dtype::bf16);
  auto dx = to_device(x, dtype::bf16), dw = to_device(w, dtype::bf16);
  device_buffer y1(rows * n * 4), y2(rows * n * 4);
  auto a = product_args(*dx, *dw, y1, rows, n, k, dtype::bf16, dtype::f32, 0.0f);
  ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
  a.y = y2.get();
  ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(fetch<float>(y1, rows * n), fetch<float>(y2, rows * n));
}

// FP8 weights: e4m3 codes (no NaN) with scales over a few octaves, on DeepSeek's 128 x 128 grid
// with each scale row padded (NaN in the padding: a misread scale poisons its output) and on
// finer grids whose blocks split rows and columns elsewhere; bf16 and f32 outputs, beta 0 and 1;
// and the same bits as the kernel on the weight's bf16 expansion.
TEST(cuda_skinny_linear, fp8_weights_match_their_bf16_expansion) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  struct fp8_case {
    int64_t rows, n, k, block_rows, block_cols, scale_ld;
    dtype y_dt;
    float beta;
  };
  const fp8_case cases[] = {
      {1, 200, 384, 128, 128, 4, dtype::bf16, 0.0f}, {4, 40, 2048, 128, 128, 16, dtype::f32, 1.0f},
      {8, 33, 96, 8, 32, 0, dtype::f32, 0.0f},       {3, 70, 160, 16, 16, 12, dtype::bf16, 1.0f},
      {2, 19, 1024, 5, 8, 0, dtype::f32, 0.0f},      {5, 64, 256, 16, 32, 0, dtype::bf16, 0.0f},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " n " << c.n << " k " << c.k
                                      << " blocks " << c.block_rows << "x" << c.block_cols);
    const auto seed = static_cast<uint64_t>(c.n * 31 + c.k);
    std::mt19937_64 rng(seed);
    std::vector<uint8_t> codes(static_cast<size_t>(c.n * c.k));
    for (auto& b : codes) {
      do b = static_cast<uint8_t>(rng());
      while ((b & 0x7f) == 0x7f || (b & 0x7f) > 0x70);  // no NaN, |w| <= 256
    }
    const int64_t srows = (c.n + c.block_rows - 1) / c.block_rows;
    const int64_t scols = (c.k + c.block_cols - 1) / c.block_cols;
    const int64_t ld = c.scale_ld > 0 ? c.scale_ld : scols;
    std::vector<float> packed(static_cast<size_t>(srows * scols));
    for (auto& s : packed)
      s = std::ldexp(1.0f + static_cast<float>(rng() % 1024) / 1024.0f,
                     -10 - static_cast<int>(rng() % 4));
    std::vector<float> padded(static_cast<size_t>(srows * ld), nan_f);
    for (int64_t r = 0; r < srows; ++r)
      for (int64_t j = 0; j < scols; ++j)
        padded[static_cast<size_t>(r * ld + j)] = packed[static_cast<size_t>(r * scols + j)];
    std::vector<float> w(codes.size());
    model::dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(codes)), c.n, c.k, packed,
                                 c.block_rows, c.block_cols, w);
    w = bf16_rounded(w);

    const auto x = bf16_rounded(random_floats(static_cast<size_t>(c.rows * c.k), seed + 1));
    const auto y0 =
        stored(random_floats(static_cast<size_t>(c.rows * c.n), seed + 2, -4.0f, 4.0f), c.y_dt);
    const auto p = reference(x, w, c.rows, c.n, c.k, c.beta, y0);
    auto dx = to_device(x, dtype::bf16), dy = to_device(y0, c.y_dt);
    auto dw = to_device(codes), ds = to_device(padded);
    auto a = product_args(*dx, *dw, *dy, c.rows, c.n, c.k, dtype::bf16, c.y_dt, c.beta);
    a.w_dt = dtype::f8_e4m3;
    a.w_scale = ds->as<float>();
    a.block_rows = c.block_rows;
    a.block_cols = c.block_cols;
    a.scale_ld = c.scale_ld;
    ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_matches(*dy, c.y_dt, p, c.k);

    // The bf16 expansion of the same weight through the kernel: the same bits (the engine's
    // `expand` products rely on it).
    auto dw16 = to_device(w, dtype::bf16), dy16 = to_device(y0, c.y_dt);
    a.w = dw16->get();
    a.w_dt = dtype::bf16;
    a.y = dy16->get();
    ASSERT_EQ(cuda::skinny_linear_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const size_t bytes = p.want.size() * dtype_bytes(c.y_dt);
    EXPECT_EQ(fetch<uint8_t>(*dy, bytes), fetch<uint8_t>(*dy16, bytes));

    // With the SwiGLU fused (the weight as a stacked gate|up of n / 2 each; the up half's
    // scales in their own grid rows): the FP8 and the bf16 weight again give the same bits.
    if (c.beta != 0.0f || c.n % 2 != 0) continue;
    auto fused = a;
    fused.swiglu = true;
    fused.n = c.n / 2;
    auto f8 = to_device(y0, c.y_dt), f16 = to_device(y0, c.y_dt);
    fused.y = f16->get();
    ASSERT_EQ(cuda::skinny_linear_run(fused, nullptr), kernel_status::ok);
    fused.w = dw->get();
    fused.w_dt = dtype::f8_e4m3;
    fused.y = f8->get();
    ASSERT_EQ(cuda::skinny_linear_run(fused, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(fetch<uint8_t>(*f8, bytes / 2), fetch<uint8_t>(*f16, bytes / 2));
  }
}

#ifndef MOE_CUDA_EMULATOR
// v2lite's decode shapes at one and eight rows (too slow for the emulator's fibers): q_proj,
// o_proj with the residual, the shared experts' gate|up and down, and the LM head in float32.
TEST(cuda_skinny_linear, v2lite_decode_shapes) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (const int64_t rows : {int64_t{1}, int64_t{8}}) {
    const float_case cases[] = {
        {rows, 3072, 2048, dtype::bf16, dtype::bf16, 0.0f},
        {rows, 2048, 2048, dtype::bf16, dtype::bf16, 1.0f},
        {rows, 5632, 2048, dtype::bf16, dtype::bf16, 0.0f},
        {rows, 2048, 2816, dtype::bf16, dtype::bf16, 1.0f},
        {rows, 102400, 2048, dtype::bf16, dtype::f32, 0.0f},
    };
    for (const auto& c : cases) check_float_case(c);
  }
}
#endif
