#include "kernels/cpu/swiglu.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

double silu(double x) { return x / (1.0 + std::exp(-x)); }

TEST(swiglu, matches_definition) {
  const size_t rows = 3, dim = 7;
  auto gate = random_floats(rows * dim, 1, -6.0f, 6.0f);
  auto up = random_floats(rows * dim, 2);
  std::vector<float> out(rows * dim);
  ASSERT_EQ(swiglu(gate.data(), up.data(), out.data(), rows, dim), kernel_status::ok);
  for (size_t i = 0; i < out.size(); ++i)
    EXPECT_NEAR(out[i], silu(gate[i]) * up[i], 1e-6) << i;
}

TEST(swiglu, hand_values_and_extremes) {
  const float gate[] = {0.0f, 1.0f, -100.0f, 100.0f, -1000.0f};
  const float up[] = {5.0f, 2.0f, 3.0f, 0.5f, 1.0f};
  float out[5];
  ASSERT_EQ(swiglu(gate, up, out, 1, 5), kernel_status::ok);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_NEAR(out[1], 2.0 / (1.0 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(out[2], 0.0f, 1e-30);  // silu(-100) is ~-4e-42
  EXPECT_NEAR(out[3], 50.0f, 1e-5);
  EXPECT_FALSE(std::isnan(out[4]));  // exp(1000) = inf, x / inf = -0, not NaN
  EXPECT_EQ(out[4], 0.0f);
}

TEST(swiglu, fused_equals_separate_and_works_in_place) {
  const size_t rows = 4, dim = 5;
  auto gate_up = random_floats(rows * 2 * dim, 3, -4.0f, 4.0f);
  std::vector<float> gate(rows * dim), up(rows * dim);
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < dim; ++i) {
      gate[r * dim + i] = gate_up[r * 2 * dim + i];
      up[r * dim + i] = gate_up[r * 2 * dim + dim + i];
    }
  std::vector<float> separate(rows * dim), fused(rows * dim);
  ASSERT_EQ(swiglu(gate.data(), up.data(), separate.data(), rows, dim), kernel_status::ok);
  ASSERT_EQ(swiglu_fused(gate_up.data(), fused.data(), rows, dim), kernel_status::ok);
  EXPECT_EQ(fused, separate);

  ASSERT_EQ(swiglu_fused(gate_up.data(), gate_up.data(), rows, dim), kernel_status::ok);
  for (size_t i = 0; i < rows * dim; ++i) EXPECT_EQ(gate_up[i], separate[i]);

  ASSERT_EQ(swiglu(gate.data(), up.data(), gate.data(), rows, dim), kernel_status::ok);  // alias
  EXPECT_EQ(gate, separate);
}

TEST(swiglu, bad_arguments) {
  float x[2] = {1, 2};
  EXPECT_EQ(swiglu(nullptr, x, x, 1, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(swiglu_fused(x, nullptr, 1, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(swiglu(nullptr, nullptr, nullptr, 0, 2), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
