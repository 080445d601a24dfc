#include "kernels/cpu/gemm.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

// C = alpha * op(A) op(B) + beta * C in double, straight from the definition.
std::vector<float> reference_gemm(const gemm_args& g, std::vector<float> c) {
  for (size_t i = 0; i < g.m; ++i) {
    for (size_t j = 0; j < g.n; ++j) {
      double s = 0.0;
      for (size_t p = 0; p < g.k; ++p) {
        const double a = g.trans_a == transpose::yes ? g.a[p * g.lda + i] : g.a[i * g.lda + p];
        const double b = g.trans_b == transpose::yes ? g.b[j * g.ldb + p] : g.b[p * g.ldb + j];
        s += a * b;
      }
      float& out = c[i * g.ldc + j];
      out = static_cast<float>(g.alpha * s + (g.beta == 0.0f ? 0.0 : g.beta * double{out}));
    }
  }
  return c;
}

void expect_near_all(const std::vector<float>& got, const std::vector<float>& want, float tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "at " << i;
}

TEST(gemm, linear_matches_definition) {
  const size_t rows = 5, in = 7, out = 3;
  auto x = random_floats(rows * in, 1);
  auto w = random_floats(out * in, 2);
  std::vector<float> y(rows * out, 0.0f);
  ASSERT_EQ(linear(x.data(), w.data(), y.data(), rows, in, out), kernel_status::ok);
  for (size_t r = 0; r < rows; ++r)
    for (size_t o = 0; o < out; ++o) {
      double s = 0.0;
      for (size_t i = 0; i < in; ++i) s += double{x[r * in + i]} * w[o * in + i];
      EXPECT_NEAR(y[r * out + o], s, 1e-5);
    }
}

TEST(gemm, linear_beta_one_accumulates) {
  const size_t rows = 3, in = 4, out = 2;
  auto x = random_floats(rows * in, 3);
  auto w = random_floats(out * in, 4);
  std::vector<float> fresh(rows * out), acc(rows * out, 10.0f);
  ASSERT_EQ(linear(x.data(), w.data(), fresh.data(), rows, in, out), kernel_status::ok);
  ASSERT_EQ(linear(x.data(), w.data(), acc.data(), rows, in, out, 1.0f), kernel_status::ok);
  for (size_t i = 0; i < acc.size(); ++i) EXPECT_NEAR(acc[i], fresh[i] + 10.0f, 1e-5);
}

TEST(gemm, every_transpose_with_padded_leading_dimensions) {
  const size_t m = 4, n = 5, k = 6, pad = 3;
  for (auto ta : {transpose::no, transpose::yes}) {
    for (auto tb : {transpose::no, transpose::yes}) {
      gemm_args g;
      g.trans_a = ta;
      g.trans_b = tb;
      g.m = m;
      g.n = n;
      g.k = k;
      g.alpha = 0.5f;
      g.beta = -2.0f;
      g.lda = (ta == transpose::yes ? m : k) + pad;
      g.ldb = (tb == transpose::yes ? k : n) + pad;
      g.ldc = n + pad;
      auto a = random_floats((ta == transpose::yes ? k : m) * g.lda, 5);
      auto b = random_floats((tb == transpose::yes ? n : k) * g.ldb, 6);
      auto c = random_floats(m * g.ldc, 7);
      g.a = a.data();
      g.b = b.data();
      auto want = reference_gemm(g, c);
      g.c = c.data();
      ASSERT_EQ(gemm(g), kernel_status::ok);
      expect_near_all(c, want, 1e-5f);  // padding columns must be untouched as well
    }
  }
}

TEST(gemm, beta_zero_overwrites_nan) {
  std::vector<float> a{1, 2}, b{3, 4};
  std::vector<float> c{std::numeric_limits<float>::quiet_NaN()};
  gemm_args g;
  g.m = 1;
  g.n = 1;
  g.k = 2;
  g.a = a.data();
  g.lda = 2;
  g.b = b.data();
  g.ldb = 1;
  g.c = c.data();
  g.ldc = 1;
  ASSERT_EQ(gemm(g), kernel_status::ok);
  EXPECT_FLOAT_EQ(c[0], 11.0f);
}

TEST(gemm, empty_inner_dimension_scales_c) {
  std::vector<float> c{1, 2, 3, 4};
  gemm_args g;
  g.m = 2;
  g.n = 2;
  g.k = 0;
  g.beta = 3.0f;
  g.c = c.data();
  g.ldc = 2;
  ASSERT_EQ(gemm(g), kernel_status::ok);  // a and b may be null when k == 0
  EXPECT_EQ(c, (std::vector<float>{3, 6, 9, 12}));
  g.beta = 0.0f;
  ASSERT_EQ(gemm(g), kernel_status::ok);
  EXPECT_EQ(c, (std::vector<float>{0, 0, 0, 0}));
}

TEST(gemm, empty_output_is_a_no_op) {
  gemm_args g;  // everything null and zero
  EXPECT_EQ(gemm(g), kernel_status::ok);
  g.m = 3;
  EXPECT_EQ(gemm(g), kernel_status::ok);  // n == 0
}

TEST(gemm, bad_shapes_are_refused_and_c_is_untouched) {
  std::vector<float> a(6, 1.0f), b(6, 1.0f), c(4, 7.0f);
  gemm_args g;
  g.m = 2;
  g.n = 2;
  g.k = 3;
  g.a = a.data();
  g.lda = 3;
  g.b = b.data();
  g.ldb = 2;
  g.c = c.data();
  g.ldc = 2;
  ASSERT_EQ(gemm(g), kernel_status::ok);

  auto bad = g;
  bad.lda = 2;  // < k
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);
  bad = g;
  bad.trans_a = transpose::yes;
  bad.lda = 1;  // < m
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);
  bad = g;
  bad.ldb = 1;  // < n
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);
  bad = g;
  bad.ldc = 1;  // < n
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);
  bad = g;
  bad.b = nullptr;
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);
  bad = g;
  bad.m = size_t{1} << 33;  // beyond OpenBLAS's int
  EXPECT_EQ(gemm(bad), kernel_status::unsupported_shape);

  std::fill(c.begin(), c.end(), 7.0f);
  bad = g;
  bad.ldb = 1;
  ASSERT_EQ(gemm(bad), kernel_status::unsupported_shape);
  EXPECT_EQ(c, std::vector<float>(4, 7.0f));
  EXPECT_EQ(linear(a.data(), b.data(), nullptr, 2, 3, 2), kernel_status::unsupported_shape);
}

// The per-head layout of the MLA absorption: A's heads interleaved inside rows, B one matrix per
// head, C's heads interleaved (stride_c = n, ldc = heads * n).
TEST(gemm, strided_batched_matches_per_head_products) {
  const size_t heads = 3, m = 4, n = 5, k = 2;
  auto a = random_floats(m * heads * k, 8);  // (m, heads, k)
  auto b = random_floats(heads * k * n, 9);  // (heads, k, n)
  std::vector<float> c(m * heads * n, 0.0f);
  gemm_args g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.data();
  g.lda = heads * k;
  g.b = b.data();
  g.ldb = n;
  g.c = c.data();
  g.ldc = heads * n;
  ASSERT_EQ(gemm_strided_batched(g, heads, k, k * n, n), kernel_status::ok);
  for (size_t h = 0; h < heads; ++h)
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (size_t p = 0; p < k; ++p)
          s += double{a[i * heads * k + h * k + p]} * b[h * k * n + p * n + j];
        EXPECT_NEAR(c[i * heads * n + h * n + j], s, 1e-6);
      }
}

TEST(gemm, strided_batched_shares_an_operand_with_stride_zero) {
  const size_t batch = 2, m = 2, n = 2, k = 2;
  std::vector<float> a{1, 0, 0, 1, 2, 0, 0, 2};  // I, then 2I
  std::vector<float> b{1, 2, 3, 4};              // shared
  std::vector<float> c(batch * m * n);
  gemm_args g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.data();
  g.lda = k;
  g.b = b.data();
  g.ldb = n;
  g.c = c.data();
  g.ldc = n;
  ASSERT_EQ(gemm_strided_batched(g, batch, m * k, 0, m * n), kernel_status::ok);
  EXPECT_EQ(c, (std::vector<float>{1, 2, 3, 4, 2, 4, 6, 8}));
  EXPECT_EQ(gemm_strided_batched(g, 0, m * k, 0, m * n), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
