#include "kernels/cpu/elementwise.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace moe::kernels::cpu {
namespace {

TEST(elementwise, add_in_place_is_the_residual_add) {
  std::vector<float> residual{1, 2, 3}, delta{0.5f, -2, 10};
  ASSERT_EQ(add(residual.data(), delta.data(), residual.data(), 3), kernel_status::ok);
  EXPECT_EQ(residual, (std::vector<float>{1.5f, 0, 13}));
  std::vector<float> out(3);
  ASSERT_EQ(add(delta.data(), delta.data(), out.data(), 3), kernel_status::ok);
  EXPECT_EQ(out, (std::vector<float>{1, -4, 20}));
}

TEST(elementwise, axpy_and_scale) {
  std::vector<float> y{1, 1, 1}, x{1, 2, 3};
  ASSERT_EQ(axpy(0.5f, x.data(), y.data(), 3), kernel_status::ok);
  EXPECT_EQ(y, (std::vector<float>{1.5f, 2, 2.5f}));
  ASSERT_EQ(axpy(1.0f, y.data(), y.data(), 3), kernel_status::ok);
  EXPECT_EQ(y, (std::vector<float>{3, 4, 5}));
  ASSERT_EQ(scale(-2.0f, y.data(), 3), kernel_status::ok);
  EXPECT_EQ(y, (std::vector<float>{-6, -8, -10}));
}

TEST(elementwise, null_pointers_are_refused_unless_empty) {
  float x = 1;
  EXPECT_EQ(add(nullptr, &x, &x, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(axpy(1.0f, &x, nullptr, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(scale(1.0f, nullptr, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(add(nullptr, nullptr, nullptr, 0), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
