// The FP8 (e4m3) encoder and the per-token-group activation quantization (kernels/cpu/fp8.hpp)
// against model/dequantize.hpp's decoder: the encoder inverts it on every finite byte, picks the
// nearest value (ties to the even code) and saturates; the quantization's scales and codes follow
// the formulas in the header, in both scale layouts.
#include "kernels/cpu/fp8.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "model/dequantize.hpp"

namespace moe::kernels::cpu {
namespace {

bool finite_code(int b) {
  return (b & 0x7f) != 0x7f;
}

TEST(fp8_encode, inverts_the_decoder_on_every_finite_byte) {
  for (int b = 0; b < 256; ++b) {
    if (!finite_code(b)) continue;
    EXPECT_EQ(float_to_e4m3(model::e4m3_to_float(static_cast<uint8_t>(b))), b) << b;
  }
}

TEST(fp8_encode, rounds_to_the_nearest_code_ties_to_even) {
  // Brute force: the decoded result is at least as close as every other finite code, and on a tie
  // the chosen code's last bit is 0.
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> mag(-12.0f, 9.0f);
  std::vector<float> values;
  for (int i = 0; i < 20000; ++i)
    values.push_back((rng() & 1 ? 1.0f : -1.0f) * std::exp2(mag(rng)));
  // Every midpoint between neighbouring positive codes: the ties themselves.
  for (int b = 0; b < 0x7e; ++b)
    values.push_back(0.5f * (model::e4m3_to_float(static_cast<uint8_t>(b)) +
                             model::e4m3_to_float(static_cast<uint8_t>(b + 1))));
  for (const float v : values) {
    if (std::fabs(v) > e4m3_max) continue;
    const uint8_t got = float_to_e4m3(v);
    const double err = std::fabs(static_cast<double>(model::e4m3_to_float(got)) - v);
    for (int b = 0; b < 256; ++b) {
      if (!finite_code(b)) continue;
      const double other =
          std::fabs(static_cast<double>(model::e4m3_to_float(static_cast<uint8_t>(b))) - v);
      ASSERT_LE(err, other) << v << " -> " << int{got} << ", but " << b << " is closer";
      if (other == err &&
          model::e4m3_to_float(static_cast<uint8_t>(b)) != model::e4m3_to_float(got)) {
        ASSERT_EQ(got & 1, 0) << v << ": a tie must go to the even code";
      }
    }
  }
}

TEST(fp8_encode, saturates_and_keeps_nan_and_signed_zero) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float v : {448.0f, 449.0f, 464.0f, 480.0f, 1e9f, inf}) {
    EXPECT_EQ(float_to_e4m3(v), 0x7e) << v;
    EXPECT_EQ(float_to_e4m3(-v), 0xfe) << v;
  }
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  // The subnormal steps: 2^-9 is code 1; half of it ties to 0, 1.5 steps to 2 (even).
  EXPECT_EQ(float_to_e4m3(0x1p-9f), 0x01);
  EXPECT_EQ(float_to_e4m3(0x1p-10f), 0x00);
  EXPECT_EQ(float_to_e4m3(3 * 0x1p-10f), 0x02);
  EXPECT_EQ(float_to_e4m3(1e-30f), 0x00);
}

TEST(fp8_quantize_groups, scales_are_amax_over_448_and_codes_round_x_over_scale) {
  const int64_t rows = 5, k = 300;  // groups of 128, 128, 44
  const int64_t groups = 3;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> d(-2.0f, 2.0f);
  std::vector<float> x(static_cast<size_t>(rows * k));
  for (auto& v : x) v = d(rng);
  for (int64_t c = 128; c < 256; ++c)
    x[static_cast<size_t>(2 * k + c)] = 0.0f;      // row 2, group 1: all zero
  x[static_cast<size_t>(4 * k + 290)] = -1000.0f;  // a large outlier, last group
  std::vector<uint8_t> q(x.size()), q_rm(x.size());
  std::vector<float> s(static_cast<size_t>(rows * groups)), s_rm(s.size());
  ASSERT_EQ(
      fp8_quantize_groups(x.data(), rows, k, q.data(), s.data(), fp8_scale_layout::group_major),
      kernel_status::ok);
  ASSERT_EQ(
      fp8_quantize_groups(x.data(), rows, k, q_rm.data(), s_rm.data(), fp8_scale_layout::row_major),
      kernel_status::ok);
  EXPECT_EQ(q, q_rm);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = s[static_cast<size_t>(g * rows + r)];
      ASSERT_EQ(scale, s_rm[static_cast<size_t>(r * groups + g)]);
      float amax = 0.0f;
      for (int64_t c = g * 128; c < std::min(k, (g + 1) * 128); ++c)
        amax = std::fmax(amax, std::fabs(x[static_cast<size_t>(r * k + c)]));
      ASSERT_EQ(scale, amax == 0.0f ? 1.0f : amax / 448.0f) << r << ", " << g;
      bool reaches_max = false;
      for (int64_t c = g * 128; c < std::min(k, (g + 1) * 128); ++c) {
        const size_t i = static_cast<size_t>(r * k + c);
        ASSERT_EQ(q[i], float_to_e4m3(x[i] / scale)) << i;
        reaches_max = reaches_max || (q[i] & 0x7f) == 0x7e;
        // Dequantized: within half a step of e4m3 (2^-4 relative for normals, 2^-10 * scale below).
        const double back = static_cast<double>(model::e4m3_to_float(q[i])) * scale;
        ASSERT_LE(std::fabs(back - x[i]), std::fabs(x[i]) * 0x1p-4 + 0x1p-10 * scale + 1e-30) << i;
      }
      if (amax > 0.0f) {
        EXPECT_TRUE(reaches_max) << "the group's largest element maps to 448";
      }
    }
  EXPECT_EQ(s[static_cast<size_t>(1 * rows + 2)], 1.0f);
}

TEST(fp8_quantize_groups, refuses_bad_arguments) {
  float x = 1.0f, s = 0.0f;
  uint8_t q = 0;
  EXPECT_EQ(fp8_quantize_groups(&x, -1, 1, &q, &s, fp8_scale_layout::row_major),
            kernel_status::unsupported_shape);
  EXPECT_EQ(fp8_quantize_groups(nullptr, 1, 1, &q, &s, fp8_scale_layout::row_major),
            kernel_status::unsupported_shape);
  EXPECT_EQ(fp8_quantize_groups(nullptr, 0, 1, nullptr, nullptr, fp8_scale_layout::row_major),
            kernel_status::ok);
  EXPECT_EQ(fp8_quantize_groups(&x, 2, 1, &q, &s, fp8_scale_layout::group_major, 1),
            kernel_status::unsupported_shape);  // two rows' scales cannot be 1 float apart
  ASSERT_EQ(fp8_quantize_groups(&x, 1, 1, &q, &s, fp8_scale_layout::row_major), kernel_status::ok);
  EXPECT_EQ(q, 0x7e);
  EXPECT_EQ(s, 1.0f / 448.0f);
}

}  // namespace
}  // namespace moe::kernels::cpu
