#include "model/dequantize.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

namespace moe::model {
namespace {

// float8_e4m3fn by its definition (as reference.py's table): sign, 4-bit exponent with bias 7,
// 3-bit mantissa, subnormals at exponent 0, NaN at S.1111.111, no infinities.
double e4m3_by_definition(int b) {
  double sign = (b & 0x80) ? -1.0 : 1.0;
  int e = (b >> 3) & 0xf;
  int m = b & 0x7;
  if (e == 0xf && m == 0x7) return std::nan("");
  if (e == 0) return sign * std::ldexp(m / 8.0, -6);
  return sign * std::ldexp(1.0 + m / 8.0, e - 7);
}

TEST(dequantize, e4m3_every_code_is_exact) {
  for (int b = 0; b < 256; ++b) {
    double want = e4m3_by_definition(b);
    float got = e4m3_to_float(static_cast<uint8_t>(b));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << b;
    } else {
      EXPECT_EQ(static_cast<double>(got), want) << b;
      EXPECT_EQ(std::signbit(got), (b & 0x80) != 0) << b;
    }
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0xfe), -448.0f);
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_float(0x01), 0x1p-9f);
  EXPECT_EQ(e4m3_to_float(0x08), 0x1p-6f);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));
  EXPECT_TRUE(std::isinf(e4m3_to_float(0x78)) == false);  // 0x78 = 256, not infinity
}

TEST(dequantize, f16_and_bf16) {
  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(f16_to_float(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(f16_to_float(0x0400), 0x1p-14f);
  EXPECT_TRUE(std::isinf(f16_to_float(0x7c00)));
  EXPECT_TRUE(std::isinf(f16_to_float(0xfc00)) && f16_to_float(0xfc00) < 0);
  EXPECT_TRUE(std::isnan(f16_to_float(0x7e00)));
  EXPECT_TRUE(std::signbit(f16_to_float(0x8000)));

  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xc040), -3.0f);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(INFINITY))));
  for (float v : {0.1f, -123.456f, 3e-30f, 6e37f}) {
    float r = bf16_to_float(float_to_bf16(v));
    EXPECT_LE(std::fabs(r - v), std::fabs(v) * 0x1p-8f) << v;
  }
}

TEST(dequantize, decode_to_f32_handles_unaligned_input) {
  std::vector<std::byte> raw(1 + 3 * 2);
  const uint16_t halves[] = {0x3c00, 0x4000, 0xbc00};  // 1, 2, -1 in f16
  std::memcpy(raw.data() + 1, halves, sizeof(halves));
  std::vector<float> out(3);
  decode_to_f32(kernels::dtype::f16, std::span(raw).subspan(1), out);
  EXPECT_EQ(out, (std::vector<float>{1.0f, 2.0f, -1.0f}));
  const uint16_t bf[] = {0x3f80, 0x4040, 0xbf00};
  std::memcpy(raw.data() + 1, bf, sizeof(bf));
  decode_to_f32(kernels::dtype::bf16, std::span(raw).subspan(1), out);
  EXPECT_EQ(out, (std::vector<float>{1.0f, 3.0f, -0.5f}));
  EXPECT_TRUE(is_float_type(kernels::dtype::f8_e4m3));
  EXPECT_FALSE(is_float_type(kernels::dtype::i64));
}

TEST(dequantize, fp8_blocks_with_partial_edges) {
  // 130 x 3 with 128 x 2 blocks: scale is 2 x 2; the last row block has 2 rows, the last column
  // block 1 column.
  const int64_t rows = 130, cols = 3;
  std::vector<std::byte> q(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) q[i] = static_cast<std::byte>(0x38 + (i % 8));
  const std::vector<float> scale = {0.5f, 2.0f, 4.0f, 0.25f};
  std::vector<float> out(rows * cols);
  dequantize_fp8_blocks(q, rows, cols, scale, 128, 2, out);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float s = scale[(r / 128) * 2 + c / 2];
      float want = e4m3_to_float(static_cast<uint8_t>(q[r * cols + c])) * s;
      ASSERT_EQ(out[r * cols + c], want) << r << "," << c;
    }
  }
  EXPECT_EQ(out[0], 0.5f);               // 0x38 = 1.0 in block (0, 0)
  EXPECT_EQ(out[129 * 3 + 2], 0.25f * e4m3_to_float(static_cast<uint8_t>(q[129 * 3 + 2])));
}

}  // namespace
}  // namespace moe::model
