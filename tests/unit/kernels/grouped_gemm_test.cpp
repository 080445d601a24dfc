#include "kernels/cpu/grouped_gemm.hpp"

#include <climits>
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

std::vector<int32_t> offsets_of(const std::vector<int32_t>& counts) {
  std::vector<int32_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

// The definition, the slow way: for each row, find its expert by scanning the offsets, then a
// double dot product with each of the expert's weight rows.
double reference(const std::vector<float>& x, const std::vector<float>& w,
                 const std::vector<int32_t>& offsets, size_t r, size_t j, size_t n, size_t k) {
  size_t e = 0;
  while (static_cast<size_t>(offsets[e + 1]) <= r) ++e;
  double s = 0.0;
  for (size_t i = 0; i < k; ++i) s += double{x[r * k + i]} * w[(e * n + j) * k + i];
  return s;
}

TEST(grouped_gemm, matches_definition_with_uneven_experts) {
  // Empty experts (first, middle, last), a single row, and larger ones.
  const std::vector<int32_t> counts{0, 1, 7, 0, 3, 12, 0};
  const auto offsets = offsets_of(counts);
  const size_t num_experts = counts.size(), n = 5, k = 9, rows_in_use = 23, num_rows = 27;
  const auto x = random_floats(num_rows * k, 1);
  const auto w = random_floats(num_experts * n * k, 2);
  std::vector<float> y(num_rows * n, 42.0f);
  ASSERT_EQ(grouped_gemm(x.data(), offsets.data(), num_experts, w.data(), y.data(), num_rows, n, k),
            kernel_status::ok);
  for (size_t r = 0; r < rows_in_use; ++r)
    for (size_t j = 0; j < n; ++j)
      EXPECT_NEAR(y[r * n + j], reference(x, w, offsets, r, j, n, k), 1e-5) << r << "," << j;
  // Rows past offsets[num_experts] are untouched.
  for (size_t i = rows_in_use * n; i < y.size(); ++i) EXPECT_EQ(y[i], 42.0f) << i;
}

TEST(grouped_gemm, each_expert_uses_its_own_weight) {
  // Weight e is e times the identity: row r of expert e comes back multiplied by e.
  const std::vector<int32_t> counts{2, 1, 3};
  const auto offsets = offsets_of(counts);
  const size_t num_experts = 3, n = 4, k = 4, num_rows = 6;
  std::vector<float> w(num_experts * n * k, 0.0f);
  for (size_t e = 0; e < num_experts; ++e)
    for (size_t i = 0; i < n; ++i) w[(e * n + i) * k + i] = static_cast<float>(e);
  const auto x = random_floats(num_rows * k, 3);
  std::vector<float> y(num_rows * n, -1.0f);
  ASSERT_EQ(grouped_gemm(x.data(), offsets.data(), num_experts, w.data(), y.data(), num_rows, n, k),
            kernel_status::ok);
  for (size_t r = 0; r < num_rows; ++r) {
    const float e = r < 2 ? 0.0f : (r < 3 ? 1.0f : 2.0f);
    for (size_t j = 0; j < n; ++j) EXPECT_EQ(y[r * n + j], e * x[r * k + j]) << r << "," << j;
  }
}

TEST(grouped_gemm, empty_sum_writes_zeros) {
  const std::vector<int32_t> offsets{0, 2, 3};
  std::vector<float> y(4 * 3, 7.0f);
  // k == 0: x and weights are not read and may be null.
  ASSERT_EQ(grouped_gemm(nullptr, offsets.data(), 2, nullptr, y.data(), 4, 3, 0),
            kernel_status::ok);
  for (size_t i = 0; i < 9; ++i) EXPECT_EQ(y[i], 0.0f) << i;
  for (size_t i = 9; i < y.size(); ++i) EXPECT_EQ(y[i], 7.0f) << i;
}

TEST(grouped_gemm, nothing_to_compute_needs_no_buffers) {
  const std::vector<int32_t> none{0, 0, 0};
  EXPECT_EQ(grouped_gemm(nullptr, none.data(), 2, nullptr, nullptr, 5, 3, 4), kernel_status::ok);
  const std::vector<int32_t> some{0, 2, 3};
  EXPECT_EQ(grouped_gemm(nullptr, some.data(), 2, nullptr, nullptr, 5, 0, 4), kernel_status::ok);
}

TEST(grouped_gemm, refuses_bad_offsets_and_writes_nothing) {
  const size_t n = 2, k = 3, num_rows = 6;
  const auto x = random_floats(num_rows * k, 4);
  const auto w = random_floats(3 * n * k, 5);
  const std::vector<std::vector<int32_t>> bad{
      {1, 2, 3, 4},   // does not start at 0
      {0, 4, 2, 5},   // decreasing
      {0, 2, 4, 7},   // past num_rows
      {0, -1, 2, 3},  // negative
  };
  for (const auto& offsets : bad) {
    std::vector<float> y(num_rows * n, 9.0f);
    EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 3, w.data(), y.data(), num_rows, n, k),
              kernel_status::unsupported_shape)
        << offsets[0] << "," << offsets[1] << "," << offsets[2] << "," << offsets[3];
    for (float v : y) ASSERT_EQ(v, 9.0f);
  }
}

TEST(grouped_gemm, refuses_bad_arguments) {
  const std::vector<int32_t> offsets{0, 1, 2};
  std::vector<float> x(2 * 3, 1.0f), w(2 * 4 * 3, 1.0f), y(2 * 4, 0.0f);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, w.data(), y.data(), 2, 4, 3),
            kernel_status::ok);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 0, w.data(), y.data(), 2, 4, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(x.data(), nullptr, 2, w.data(), y.data(), 2, 4, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(nullptr, offsets.data(), 2, w.data(), y.data(), 2, 4, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, nullptr, y.data(), 2, 4, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, w.data(), nullptr, 2, 4, 3),
            kernel_status::unsupported_shape);
  const size_t too_big = size_t{INT_MAX} + 1;
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, w.data(), y.data(), too_big, 4, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, w.data(), y.data(), 2, too_big, 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(grouped_gemm(x.data(), offsets.data(), 2, w.data(), y.data(), 2, 4, too_big),
            kernel_status::unsupported_shape);
}

}  // namespace
}  // namespace moe::kernels::cpu
