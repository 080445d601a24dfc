// The all-to-all plan checks (nccl_all_to_all.hpp): host logic, no GPU. The NCCL exchange itself
// runs on a world of one in gpu_test.cpp.
#include "runtime/nccl_all_to_all.hpp"

#include <gtest/gtest.h>

using namespace moe;
using namespace moe::runtime;

namespace {

bool is_bad_plan(const caf::error& e) {
  return e.category() == caf::atom("collective") && e.code() == static_cast<uint8_t>(collective_errc::bad_plan);
}

}  // namespace

TEST(all_to_all_plan, a_consistent_plan_passes_and_reverses_for_the_combine) {
  all_to_all_plan p{{3, 0, 5}, {1, 2, 0}, 4096};
  EXPECT_EQ(p.total_send_rows(), 8);
  EXPECT_EQ(p.total_recv_rows(), 3);
  EXPECT_FALSE(check_all_to_all_plan(p, 3, 8, 3));
  const auto back = p.reversed();
  EXPECT_EQ(back.send_rows, (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(back.recv_rows, (std::vector<int64_t>{3, 0, 5}));
  EXPECT_EQ(back.row_bytes, 4096u);
  EXPECT_FALSE(check_all_to_all_plan(back, 3, 3, 8));
  // Nothing to move at all is a valid step (no token routed off this rank).
  EXPECT_FALSE(check_all_to_all_plan({{0, 0}, {0, 0}, 2}, 2, 0, 0));
}

TEST(all_to_all_plan, wrong_counts_sizes_and_buffers_are_refused_with_the_reason) {
  auto err = check_all_to_all_plan({{1, 1}, {1, 1}, 4}, 3, 10, 10);
  EXPECT_TRUE(is_bad_plan(err));
  EXPECT_NE(error_text(err).find("2 send and 2 receive counts for a world of 3"), std::string::npos) << error_text(err);
  err = check_all_to_all_plan({{1, -1}, {1, 1}, 4}, 2, 10, 10);
  EXPECT_TRUE(is_bad_plan(err));
  EXPECT_NE(error_text(err).find("rank 1: -1 rows to send, 1 to receive"), std::string::npos) << error_text(err);
  err = check_all_to_all_plan({{6, 5}, {1, 1}, 4}, 2, 10, 10);
  EXPECT_TRUE(is_bad_plan(err));
  EXPECT_NE(error_text(err).find("[6, 5] rows to send and [1, 1] to receive do not fit buffers of 10 and 10 rows"), std::string::npos) << error_text(err);
  err = check_all_to_all_plan({{1, 1}, {1, 1}, 0}, 2, 10, 10);
  EXPECT_NE(error_text(err).find("rows of 0 bytes"), std::string::npos) << error_text(err);
  err = check_all_to_all_plan({{INT64_MAX, INT64_MAX}, {0, 0}, 1}, 2, INT64_MAX, 0);
  EXPECT_TRUE(is_bad_plan(err)) << "the sum must not wrap into a small number";
  EXPECT_TRUE(is_bad_plan(check_all_to_all_plan({{}, {}, 1}, 0, 0, 0)));
}
