#include "kernels/cpu/softmax.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

TEST(softmax, rows_match_definition) {
  const size_t rows = 3, dim = 9;
  auto x = random_floats(rows * dim, 1, -5.0f, 5.0f);
  std::vector<float> p(rows * dim), lp(rows * dim);
  ASSERT_EQ(softmax_rows(x.data(), p.data(), rows, dim), kernel_status::ok);
  ASSERT_EQ(log_softmax_rows(x.data(), lp.data(), rows, dim), kernel_status::ok);
  for (size_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (size_t i = 0; i < dim; ++i) sum += std::exp(double{x[r * dim + i]});
    for (size_t i = 0; i < dim; ++i) {
      EXPECT_NEAR(p[r * dim + i], std::exp(double{x[r * dim + i]}) / sum, 1e-7);
      EXPECT_NEAR(lp[r * dim + i], x[r * dim + i] - std::log(sum), 1e-6);
    }
  }
}

TEST(softmax, large_logits_do_not_overflow) {
  std::vector<float> x{1000.0f, 1001.0f, -std::numeric_limits<float>::infinity()};
  std::vector<float> p(3), lp(3);
  ASSERT_EQ(softmax_rows(x.data(), p.data(), 1, 3), kernel_status::ok);
  ASSERT_EQ(log_softmax_rows(x.data(), lp.data(), 1, 3), kernel_status::ok);
  const double e = std::exp(1.0);
  EXPECT_NEAR(p[0], 1.0 / (1.0 + e), 1e-7);
  EXPECT_NEAR(p[1], e / (1.0 + e), 1e-7);
  EXPECT_EQ(p[2], 0.0f);
  EXPECT_NEAR(lp[1], -std::log1p(std::exp(-1.0)), 1e-6);
  EXPECT_TRUE(std::isinf(lp[2]) && lp[2] < 0);
}

TEST(softmax, in_place_and_degenerate_rows) {
  std::vector<float> x{0.0f, 0.0f, 0.0f, 0.0f};
  ASSERT_EQ(softmax_rows(x.data(), x.data(), 1, 4), kernel_status::ok);
  for (float v : x) EXPECT_FLOAT_EQ(v, 0.25f);

  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> none{neg_inf, neg_inf};
  ASSERT_EQ(softmax_rows(none.data(), none.data(), 1, 2), kernel_status::ok);
  EXPECT_TRUE(std::isnan(none[0]));  // no distribution, as torch.softmax

  EXPECT_EQ(softmax_rows(x.data(), x.data(), 1, 0), kernel_status::unsupported_shape);
  EXPECT_EQ(log_softmax_rows(nullptr, x.data(), 1, 4), kernel_status::unsupported_shape);
  EXPECT_EQ(softmax_rows(nullptr, nullptr, 0, 4), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
