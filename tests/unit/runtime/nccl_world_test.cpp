// The expert exchange of runtime/nccl_all_to_all.hpp in worlds of two to four ranks: each rank a
// thread on a device of its own, joined through one unique id (join_nccl_comm), as the ranks of
// a multi-GPU node would be. Dispatch sends each peer the rows routed to its experts with counts
// that differ per pair (zeros included), the experts change the rows they got, and the combine
// (the plan reversed) brings every row home in place; the attention gradients' all-reduce sums
// over every rank.
//
// Built twice: against the emulator's stand-ins for the CUDA runtime and NCCL (label unit, CI:
// tests/emulator/fake_nccl.cpp with MOE_EMU_DEVICES=4), and against the real ones (label gpu),
// where a world larger than the machine's GPU count is skipped with the reason: a card run on one
// H200 only ever formed a world of one (tests/unit/runtime/gpu_test.cpp), and NCCL refuses two
// ranks of one world on one device.
#include <gtest/gtest.h>

#ifdef MOE_HAVE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <string>
#include <vector>

#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_all_to_all.hpp"
#include "runtime/nccl_comm.hpp"
#include "tests/unit/runtime/nccl_world.hpp"

using namespace moe;
using moe::test_support::cannot_form;
using moe::test_support::rank_ctx;
using moe::test_support::run_world;

namespace {

/// Rows rank `from` routes to the experts of rank `to`: differs per pair, 0 for some.
int64_t rows_routed(int from, int to) {
  return (from * 3 + to * 5 + 1) % 4;
}

constexpr int64_t row_floats = 3;
constexpr size_t row_bytes = row_floats * sizeof(float);

/// Element j of the i-th row `from` sends `to`.
float row_value(int from, int to, int64_t i, int64_t j) {
  return static_cast<float>(from * 1000 + to * 100 + i * 4) + static_cast<float>(j) * 0.25f;
}

class nccl_world : public ::testing::TestWithParam<int> {};

TEST_P(nccl_world, dispatch_and_combine_move_every_row_to_its_experts_rank_and_home) {
  const int n = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  run_world(n, [](const rank_ctx& c) {
    std::vector<int64_t> send_counts;
    std::vector<float> rows;
    for (int p = 0; p < c.world; ++p) {
      send_counts.push_back(rows_routed(c.rank, p));
      for (int64_t i = 0; i < send_counts.back(); ++i)
        for (int64_t j = 0; j < row_floats; ++j) rows.push_back(row_value(c.rank, p, i, j));
    }
    auto scratch =
        runtime::device_buffer::allocate(2 * static_cast<size_t>(c.world) * sizeof(int64_t));
    ASSERT_TRUE(scratch);
    auto recv_counts = runtime::exchange_row_counts(c.comm, send_counts, scratch->data(), c.stream);
    ASSERT_TRUE(recv_counts) << error_text(recv_counts.error());
    for (int p = 0; p < c.world; ++p)
      EXPECT_EQ((*recv_counts)[static_cast<size_t>(p)], rows_routed(p, c.rank))
          << "rank " << c.rank << " from " << p;

    const runtime::all_to_all_plan plan{send_counts, *recv_counts, row_bytes};
    // Room for a few rows more than the plan needs: the capacities are checked, not assumed.
    const int64_t capacity = 4 * c.world;
    auto send = runtime::device_buffer::allocate(static_cast<size_t>(capacity) * row_bytes);
    auto recv = runtime::device_buffer::allocate(static_cast<size_t>(capacity) * row_bytes);
    auto home = runtime::device_buffer::allocate(static_cast<size_t>(capacity) * row_bytes);
    ASSERT_TRUE(send && recv && home);
    if (!rows.empty()) {
      ASSERT_FALSE(send->copy_from_host(rows.data(), rows.size() * sizeof(float)));
    }
    ASSERT_FALSE(runtime::all_to_all_rows(c.comm, plan, send->data(), capacity, recv->data(),
                                          capacity, c.stream));
    ASSERT_FALSE(runtime::cuda_error(cudaStreamSynchronize(c.stream), "dispatch"));

    // Every peer's rows, peer by peer, each peer's in the order it sent them.
    std::vector<float> got(static_cast<size_t>(plan.total_recv_rows() * row_floats));
    if (!got.empty()) {
      ASSERT_FALSE(recv->copy_to_host(got.data(), got.size() * sizeof(float)));
    }
    size_t at = 0;
    for (int p = 0; p < c.world; ++p)
      for (int64_t i = 0; i < rows_routed(p, c.rank); ++i)
        for (int64_t j = 0; j < row_floats; ++j, ++at) {
          ASSERT_EQ(got[at], row_value(p, c.rank, i, j))
              << "rank " << c.rank << ", row " << i << " from " << p;
        }

    // The experts: each row scaled by its holder's rank + 2.
    for (auto& v : got) v *= static_cast<float>(c.rank + 2);
    if (!got.empty()) {
      ASSERT_FALSE(recv->copy_from_host(got.data(), got.size() * sizeof(float)));
    }
    ASSERT_FALSE(runtime::all_to_all_rows(c.comm, plan.reversed(), recv->data(), capacity,
                                          home->data(), capacity, c.stream));
    ASSERT_FALSE(runtime::cuda_error(cudaStreamSynchronize(c.stream), "combine"));
    std::vector<float> back(rows.size());
    if (!back.empty()) {
      ASSERT_FALSE(home->copy_to_host(back.data(), back.size() * sizeof(float)));
    }
    at = 0;
    for (int p = 0; p < c.world; ++p)
      for (int64_t i = 0; i < rows_routed(c.rank, p); ++i)
        for (int64_t j = 0; j < row_floats; ++j, ++at) {
          ASSERT_EQ(back[at], rows[at] * static_cast<float>(p + 2))
              << "rank " << c.rank << ", row " << i << " it sent rank " << p;
        }
  });
}

TEST_P(nccl_world, a_plan_that_does_not_fit_is_refused_on_every_rank_and_the_world_goes_on) {
  const int n = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  run_world(n, [](const rank_ctx& c) {
    auto buf = runtime::device_buffer::allocate(static_cast<size_t>(c.world) * 2 * sizeof(float));
    auto out = runtime::device_buffer::allocate(static_cast<size_t>(c.world) * 2 * sizeof(float));
    ASSERT_TRUE(buf && out);
    // Two rows for every peer where the buffers hold one each: refused before NCCL sees it, so
    // no rank is left waiting for the others.
    const std::vector<int64_t> two(static_cast<size_t>(c.world), 2),
        one(static_cast<size_t>(c.world), 1);
    auto err = runtime::all_to_all_rows(c.comm, {two, two, 2 * sizeof(float)}, buf->data(), c.world,
                                        out->data(), c.world, c.stream);
    EXPECT_EQ(err.category(), caf::atom("collective")) << error_text(err);
    EXPECT_NE(error_text(err).find("do not fit"), std::string::npos) << error_text(err);
    // A count for each rank and one more: refused too.
    auto extra = two;
    extra.push_back(0);
    err = runtime::all_to_all_rows(c.comm, {extra, extra, 4}, buf->data(), c.world, out->data(),
                                   c.world, c.stream);
    EXPECT_EQ(err.category(), caf::atom("collective")) << error_text(err);

    // One float per peer: the world still exchanges.
    std::vector<float> mine(static_cast<size_t>(c.world));
    for (int p = 0; p < c.world; ++p)
      mine[static_cast<size_t>(p)] = static_cast<float>(c.rank * 10 + p);
    ASSERT_FALSE(buf->copy_from_host(mine.data(), mine.size() * sizeof(float)));
    ASSERT_FALSE(runtime::all_to_all_rows(c.comm, {one, one, sizeof(float)}, buf->data(), c.world,
                                          out->data(), c.world, c.stream));
    ASSERT_FALSE(runtime::cuda_error(cudaStreamSynchronize(c.stream), "exchange"));
    std::vector<float> got(mine.size());
    ASSERT_FALSE(out->copy_to_host(got.data(), got.size() * sizeof(float)));
    for (int p = 0; p < c.world; ++p)
      EXPECT_EQ(got[static_cast<size_t>(p)], static_cast<float>(p * 10 + c.rank))
          << "rank " << c.rank;
  });
}

TEST_P(nccl_world, gradient_all_reduce_sums_every_rank_in_f32_and_bf16) {
  const int n = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  constexpr size_t count = 1000;
  run_world(n, [](const rank_ctx& c) {
    // Rank r holds (r + 1) * (i % 7) / 2: every partial sum is a small multiple of 0.5, exact in
    // bf16 as in float32, so the result does not depend on NCCL's order of summation.
    const auto value = [](int rank, size_t i) {
      return static_cast<float>(rank + 1) * static_cast<float>(i % 7) * 0.5f;
    };
    const auto expected = [&](size_t i) {
      return static_cast<float>(c.world * (c.world + 1) / 2) * value(0, i);
    };
    std::vector<float> f(count);
    for (size_t i = 0; i < count; ++i) f[i] = value(c.rank, i);
    auto buf = runtime::device_buffer::allocate(count * sizeof(float));
    ASSERT_TRUE(buf);
    ASSERT_FALSE(buf->copy_from_host(f.data(), count * sizeof(float)));
    ASSERT_FALSE(runtime::all_reduce_sum(c.comm, buf->data(), count, false, c.stream));
    ASSERT_FALSE(runtime::cuda_error(cudaStreamSynchronize(c.stream), "all-reduce f32"));
    ASSERT_FALSE(buf->copy_to_host(f.data(), count * sizeof(float)));
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(f[i], expected(i)) << "rank " << c.rank << ", f32 element " << i;
    }

    std::vector<__nv_bfloat16> h(count);
    for (size_t i = 0; i < count; ++i) h[i] = __float2bfloat16(value(c.rank, i));
    ASSERT_FALSE(buf->copy_from_host(h.data(), count * sizeof(__nv_bfloat16)));
    ASSERT_FALSE(runtime::all_reduce_sum(c.comm, buf->data(), count, true, c.stream));
    ASSERT_FALSE(runtime::cuda_error(cudaStreamSynchronize(c.stream), "all-reduce bf16"));
    ASSERT_FALSE(buf->copy_to_host(h.data(), count * sizeof(__nv_bfloat16)));
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(__bfloat162float(h[i]), expected(i)) << "rank " << c.rank << ", bf16 element " << i;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(ranks, nccl_world, ::testing::Values(2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "world_of_" + std::to_string(info.param);
                         });

#ifdef MOE_EMU_FAKE_NCCL
// Only the emulator's NCCL can say so: the real one hangs (or reads past the rows) when the ranks
// disagree on a pair's count, which is what a dispatch planned from stale counts would do.
TEST(nccl_world_emulated, counts_the_ranks_disagree_on_fail_the_receive_and_name_both_sizes) {
  if (auto why = cannot_form(2); !why.empty()) GTEST_SKIP() << why;
  run_world(2, [](const rank_ctx& c) {
    auto buf = runtime::device_buffer::allocate(8 * sizeof(float));
    auto out = runtime::device_buffer::allocate(8 * sizeof(float));
    ASSERT_TRUE(buf && out);
    // Rank 0 sends rank 1 two rows; rank 1 expects three from it.
    const runtime::all_to_all_plan plan =
        c.rank == 0 ? runtime::all_to_all_plan{{1, 2}, {1, 1}, sizeof(float)}
                    : runtime::all_to_all_plan{{1, 1}, {3, 1}, sizeof(float)};
    auto err = runtime::all_to_all_rows(c.comm, plan, buf->data(), 8, out->data(), 8, c.stream);
    if (c.rank == 0) {
      EXPECT_FALSE(err) << error_text(err);
    } else {
      ASSERT_TRUE(err);
      EXPECT_NE(error_text(err).find("ncclGroupEnd"), std::string::npos) << error_text(err);
      EXPECT_NE(error_text(err).find("receives 12 bytes (type 1) from rank 0, which sent 8"),
                std::string::npos)
          << error_text(err);
    }
  });
}
#endif

}  // namespace

#else

TEST(nccl_world, skipped) {
  GTEST_SKIP() << "no GPU: built without CUDA";
}

#endif  // MOE_HAVE_CUDA
