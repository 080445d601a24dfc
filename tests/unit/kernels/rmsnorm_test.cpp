#include "kernels/cpu/rmsnorm.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

TEST(rmsnorm, matches_definition) {
  const size_t rows = 3, dim = 16;
  auto x = random_floats(rows * dim, 1, -3.0f, 3.0f);
  auto w = random_floats(dim, 2);
  std::vector<float> out(rows * dim);
  ASSERT_EQ(rmsnorm(x.data(), w.data(), out.data(), rows, dim, 1e-6f), kernel_status::ok);
  for (size_t r = 0; r < rows; ++r) {
    double sq = 0.0;
    for (size_t i = 0; i < dim; ++i) sq += double{x[r * dim + i]} * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(sq / dim + 1e-6);
    for (size_t i = 0; i < dim; ++i)
      EXPECT_NEAR(out[r * dim + i], w[i] * x[r * dim + i] * inv, 1e-5);
  }
}

TEST(rmsnorm, in_place_and_empty_dim) {
  std::vector<float> x{3.0f, 4.0f};
  const float w[] = {1.0f, 2.0f};
  ASSERT_EQ(rmsnorm(x.data(), w, x.data(), 1, 2, 0.0f), kernel_status::ok);
  const double rms = std::sqrt(12.5);
  EXPECT_NEAR(x[0], 3.0 / rms, 1e-6);
  EXPECT_NEAR(x[1], 8.0 / rms, 1e-6);
  EXPECT_EQ(rmsnorm(x.data(), w, x.data(), 1, 0, 1e-6f), kernel_status::unsupported_shape);
}

}  // namespace
}  // namespace moe::kernels::cpu
