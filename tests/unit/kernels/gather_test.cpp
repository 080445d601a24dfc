#include "kernels/cpu/gather.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace moe::kernels::cpu {
namespace {

const std::vector<float> table{0, 1, 10, 11, 20, 21, 30, 31};  // (4 rows, dim 2)

TEST(gather, rows_by_int64_and_int32_ids) {
  const int64_t ids64[] = {3, 0, 3};
  const int32_t ids32[] = {3, 0, 3};
  std::vector<float> a(6), b(6);
  ASSERT_EQ(gather_rows(table.data(), 4, 2, ids64, 3, a.data()), kernel_status::ok);
  ASSERT_EQ(gather_rows(table.data(), 4, 2, ids32, 3, b.data()), kernel_status::ok);
  EXPECT_EQ(a, (std::vector<float>{30, 31, 0, 1, 30, 31}));
  EXPECT_EQ(a, b);
}

TEST(gather, out_of_range_ids_are_refused_and_out_is_untouched) {
  std::vector<float> out(4, -1.0f);
  const int64_t too_big[] = {0, 4};
  const int64_t negative[] = {1, -1};
  const int32_t too_big32[] = {2, 7};
  EXPECT_EQ(gather_rows(table.data(), 4, 2, too_big, 2, out.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(gather_rows(table.data(), 4, 2, negative, 2, out.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(gather_rows(table.data(), 4, 2, too_big32, 2, out.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(out, std::vector<float>(4, -1.0f));  // the valid first id was not copied either
  EXPECT_EQ(gather_rows(nullptr, 4, 2, too_big, 2, out.data()), kernel_status::unsupported_shape);
  EXPECT_EQ(gather_rows(table.data(), 4, 2, too_big, 0, out.data()), kernel_status::ok);
}

TEST(gather, scatter_add_weighs_and_accumulates_repeated_rows) {
  const std::vector<float> src{1, 2, 3, 4, 5, 6};  // 3 rows of dim 2
  const int32_t ids[] = {2, 0, 2};
  const float weights[] = {0.5f, 2.0f, 1.0f};
  std::vector<float> out(6, 1.0f);  // 3 rows
  ASSERT_EQ(scatter_add_rows(src.data(), 2, ids, weights, 3, out.data(), 3), kernel_status::ok);
  EXPECT_EQ(out, (std::vector<float>{7, 9, 1, 1, 1.5f + 5, 2 + 6}));
  ASSERT_EQ(scatter_add_rows(src.data(), 2, ids, nullptr, 1, out.data(), 3), kernel_status::ok);
  EXPECT_EQ(out[4], 7.5f);

  const auto before = out;
  const int32_t bad[] = {0, 3};
  EXPECT_EQ(scatter_add_rows(src.data(), 2, bad, nullptr, 2, out.data(), 3),
            kernel_status::unsupported_shape);
  EXPECT_EQ(out, before);
}

}  // namespace
}  // namespace moe::kernels::cpu
