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

TEST(all_to_all_plan, explicit_starts_place_each_peers_rows_and_reverse_with_the_counts) {
  // A slice of each peer's rows (expert_parallel_moe's chunks): rows 4..5 for rank 0, 9 for
  // rank 1, packed on arrival; the way back lands the outputs where the inputs were.
  const all_to_all_plan p{{2, 1}, {2, 2}, 8, {4, 9}, {}};
  EXPECT_FALSE(check_all_to_all_plan(p, 2, 10, 4));
  const auto back = p.reversed();
  EXPECT_EQ(back.recv_at, (std::vector<int64_t>{4, 9}));
  EXPECT_TRUE(back.send_at.empty());
  EXPECT_FALSE(check_all_to_all_plan(back, 2, 4, 10));
  // Ranges past the buffer, overlapping ranges and a start per rank missing are refused.
  auto err = check_all_to_all_plan({{2, 1}, {0, 0}, 8, {9, 0}, {}}, 2, 10, 0);
  EXPECT_TRUE(is_bad_plan(err));
  EXPECT_NE(
      error_text(err).find("rank 0: 2 rows to send from row 9 do not fit a buffer of 10 rows"),
      std::string::npos)
      << error_text(err);
  err = check_all_to_all_plan({{0, 0}, {3, 2}, 8, {}, {0, 2}}, 2, 0, 10);
  EXPECT_TRUE(is_bad_plan(err));
  EXPECT_NE(error_text(err).find("receive ranges overlap: [0, 2] starts for [3, 2] rows"),
            std::string::npos)
      << error_text(err);
  err = check_all_to_all_plan({{1, 1}, {0, 0}, 8, {0}, {}}, 2, 10, 0);
  EXPECT_NE(error_text(err).find("1 send starts for a world of 2"), std::string::npos)
      << error_text(err);
  err = check_all_to_all_plan({{1, 1}, {0, 0}, 8, {-1, 3}, {}}, 2, 10, 0);
  EXPECT_TRUE(is_bad_plan(err)) << "a negative start";
  // Explicit starts may leave gaps and go in any order; empty peers' starts do not matter (a
  // late chunk's start for a peer whose rows ran out lies past the buffer).
  EXPECT_FALSE(check_all_to_all_plan({{0, 0, 0}, {2, 0, 3}, 8, {}, {7, 0, 0}}, 3, 0, 9));
  EXPECT_TRUE(
      is_bad_plan(check_all_to_all_plan({{0, 0, 0}, {2, 0, 3}, 8, {}, {7, 40, -3}}, 3, 0, 9)))
      << "rank 2 has rows from a negative start";
  EXPECT_FALSE(check_all_to_all_plan({{0, 0, 0}, {2, 0, 3}, 8, {}, {7, 40, 0}}, 3, 0, 9));
}
