// A MoE layer's routed experts cut across a world of ranks (engine/expert_parallel.hpp): each
// rank holds its share of the experts and its own tokens (one rank none), and every token's
// output must be the same, bit for bit, as in a world of one holding every expert and every
// token, and within float32 rounding of a plain host reference. A refusal on one rank fails the
// call on every rank, and the world goes on.
//
// Built against the emulator's CUDA runtime, kernels and NCCL (label unit, CI: worlds of up to
// four emulated devices) and against the real ones (label gpu), where a world larger than the
// machine's GPU count is skipped with the reason (one H200 runs the world of one).
#include <gtest/gtest.h>

#ifdef MOE_HAVE_CUDA
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <ostream>
#include <string>
#include <vector>

#include "engine/expert_parallel.hpp"
#include "model/model_errc.hpp"
#include "runtime/cuda_memory.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/runtime/nccl_world.hpp"
#ifdef MOE_EMU_FAKE_CUDART
#include "tests/emulator/fake_cudart.hpp"
#endif

using namespace moe;
using kernels::dtype;
using kernels::cuda_testing::device_buffer;
using kernels::cuda_testing::fetch;
using kernels::cuda_testing::from_bf16;
using kernels::cuda_testing::to_device;
using moe::test_support::cannot_form;
using moe::test_support::rank_ctx;
using moe::test_support::run_world;

namespace {

constexpr int64_t E = 12, D = 32, I = 16, K = 3, max_tokens = 16;

/// Tokens rank r of a world of n holds: rank 1 none, the others a few of different counts.
int64_t tokens_of(int rank) {
  return rank == 1 ? 0 : 3 + 2 * rank;
}

/// Every expert's weights, all ranks' (each uploads its share): small values of both signs.
struct layer {
  std::vector<float> gate_up;  // (E, 2 I, D)
  std::vector<float> down;     // (E, D, I)
  layer() : gate_up(static_cast<size_t>(E * 2 * I * D)), down(static_cast<size_t>(E * D * I)) {
    for (size_t i = 0; i < gate_up.size(); ++i)
      gate_up[i] = 0.2f * std::sin(0.37f * static_cast<float>(i) + 0.1f);
    for (size_t i = 0; i < down.size(); ++i)
      down[i] = 0.2f * std::cos(0.53f * static_cast<float>(i) + 0.3f);
  }
};

/// One rank's tokens: activations, routing (distinct experts per token; the last token of rank
/// 2 has a skipped entry, -1) and the gate's weights.
struct batch {
  int64_t tokens = 0;
  std::vector<float> x;       // (tokens, D)
  std::vector<int32_t> idx;   // (tokens, K)
  std::vector<float> weight;  // (tokens, K)
};

batch batch_of(int rank) {
  batch b;
  b.tokens = tokens_of(rank);
  for (int64_t t = 0; t < b.tokens; ++t) {
    for (int64_t d = 0; d < D; ++d)
      b.x.push_back(std::sin(static_cast<float>(rank * 131 + t * 17 + d) * 0.29f));
    const int64_t first = (rank * 5 + t * 7) % E;
    for (int64_t j = 0; j < K; ++j) {
      b.idx.push_back(static_cast<int32_t>((first + j * 4 + (j > 0 ? t % 3 : 0)) % E));
      b.weight.push_back(0.25f + 0.125f * static_cast<float>(j + t % 2));
    }
    if (rank == 2 && t == b.tokens - 1) b.idx.back() = -1;
  }
  return b;
}

/// Rank r's tokens of every rank, one after another: the world of one's batch.
batch concatenated(int n) {
  batch all;
  for (int r = 0; r < n; ++r) {
    const batch b = batch_of(r);
    all.tokens += b.tokens;
    all.x.insert(all.x.end(), b.x.begin(), b.x.end());
    all.idx.insert(all.idx.end(), b.idx.begin(), b.idx.end());
    all.weight.insert(all.weight.end(), b.weight.begin(), b.weight.end());
  }
  return all;
}

/// Every rank all tokens of ranks 0..3, routed mostly to the experts of rank 0 of a world of n
/// (n >= 2): each token's first K - 1 entries there, its last on rank n - 1's experts. Rank
/// n - 1's rows then start late in each sender's rows, and rank 0's many rows set the chunks.
batch skewed(int n) {
  batch b = concatenated(4);
  const int64_t L = E / n;
  for (int64_t t = 0; t < b.tokens; ++t)
    for (int64_t j = 0; j < K; ++j)
      b.idx[static_cast<size_t>(t * K + j)] =
          static_cast<int32_t>(j < K - 1 ? (t + j) % L : E - 1 - t % L);
  return b;
}

/// Which tokens each rank of a world of n passes.
enum class layout { own, all, skewed };

batch tokens_for(layout l, int rank, int n) {
  switch (l) {
    case layout::own: return batch_of(rank);
    case layout::all: return concatenated(4);
    case layout::skewed: return skewed(n);
  }
  return {};
}

float silu(float v) {
  return v / (1.0f + std::exp(-v));
}

/// The layer on the host, in double: each token's weighted sum over its experts.
std::vector<float> reference(const layer& w, const batch& b) {
  std::vector<float> out(static_cast<size_t>(b.tokens * D), 0.0f);
  for (int64_t t = 0; t < b.tokens; ++t) {
    std::vector<double> acc(static_cast<size_t>(D), 0.0);
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = b.idx[static_cast<size_t>(t * K + j)];
      if (e < 0 || e >= E) continue;
      std::vector<double> act(static_cast<size_t>(I));
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t d = 0; d < D; ++d) {
          const double xv = b.x[static_cast<size_t>(t * D + d)];
          g += xv * w.gate_up[static_cast<size_t>((e * 2 * I + i) * D + d)];
          u += xv * w.gate_up[static_cast<size_t>((e * 2 * I + I + i) * D + d)];
        }
        act[static_cast<size_t>(i)] = static_cast<double>(silu(static_cast<float>(g))) * u;
      }
      for (int64_t d = 0; d < D; ++d) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i)
          y += act[static_cast<size_t>(i)] * w.down[static_cast<size_t>((e * D + d) * I + i)];
        acc[static_cast<size_t>(d)] += b.weight[static_cast<size_t>(t * K + j)] * y;
      }
    }
    for (int64_t d = 0; d < D; ++d)
      out[static_cast<size_t>(t * D + d)] = static_cast<float>(acc[static_cast<size_t>(d)]);
  }
  return out;
}

/// One rank's layer on the device: its experts' weights and its tokens.
struct rank_layer {
  std::unique_ptr<engine::expert_parallel_moe> moe;
  std::unique_ptr<device_buffer> gate_up, down, x, idx, weight, out;
  int64_t tokens = 0;
};

/// Makes rank c's layer for `b` (the layer's experts [first, first + L) of `w`), with receive
/// buffers of `recv_rows` rows (0: the worst routing).
void make_rank_layer(const rank_ctx& c, const layer& w, const batch& b, dtype dt, rank_layer& r,
                     int64_t recv_rows = 0) {
  engine::expert_parallel_shape shape{E,  D,        I, K, std::max<int64_t>(max_tokens, b.tokens),
                                      dt, recv_rows};
  auto moe = engine::expert_parallel_moe::create(c.comm, shape);
  ASSERT_TRUE(moe) << error_text(moe.error());
  r.moe = std::move(*moe);
  const int64_t L = r.moe->local_experts(), first = r.moe->first_expert();
  ASSERT_EQ(L, E / c.world);
  ASSERT_EQ(first, c.rank * L);
  const std::vector<float> gu(w.gate_up.begin() + first * 2 * I * D,
                              w.gate_up.begin() + (first + L) * 2 * I * D);
  const std::vector<float> dn(w.down.begin() + first * D * I, w.down.begin() + (first + L) * D * I);
  r.gate_up = to_device(gu, dt);
  r.down = to_device(dn, dt);
  r.x = to_device(b.x, dt);
  r.idx = to_device(b.idx);
  r.weight = to_device(b.weight);
  r.out = std::make_unique<device_buffer>(static_cast<size_t>(std::max<int64_t>(b.tokens, 1) * D) *
                                          kernels::dtype_bytes(dt));
  ASSERT_NE(r.out->get(), nullptr);
  r.tokens = b.tokens;
}

caf::error forward(rank_layer& r, int64_t tokens, cudaStream_t s) {
  return r.moe->forward(r.x->get(), r.idx->as<int32_t>(), r.weight->as<float>(), tokens,
                        {r.gate_up->get(), r.down->get()}, r.out->get(), s);
}

std::vector<float> result(const rank_layer& r, dtype dt, cudaStream_t s) {
  EXPECT_FALSE(runtime::cuda_error(cudaStreamSynchronize(s), "forward"));
  const auto n = static_cast<size_t>(r.tokens * D);
  return dt == dtype::f32 ? fetch<float>(*r.out, n) : from_bf16(fetch<uint16_t>(*r.out, n));
}

/// Runs rank c's layer on its batch and holds its output to the host reference (1e-5 in f32,
/// 3e-2 in bf16: the world test below says why).
void expect_a_call_matches_the_reference(const rank_ctx& c, const layer& w, const batch& b,
                                         dtype dt, rank_layer& r) {
  const auto err = forward(r, b.tokens, c.stream);
  ASSERT_FALSE(err) << "rank " << c.rank << ": " << error_text(err);
  const auto got = result(r, dt, c.stream);
  const auto ref = reference(w, b);
  const double tol = dt == dtype::f32 ? 1e-5 : 3e-2;
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(got[i], ref[i], tol * (1.0 + std::fabs(ref[i]))) << "rank " << c.rank;
}

/// Every rank's output in a world of n, rank by rank, each rank's per-expert rows, the chunks
/// its call ran and the bytes its layer's buffers hold.
struct world_result {
  std::vector<std::vector<float>> out;
  std::vector<std::vector<int64_t>> expert_rows;
  std::vector<int64_t> chunks;
  std::vector<size_t> device_bytes;
};

world_result run_layer(int n, dtype dt, const layer& w, layout tokens, int64_t recv_rows = 0) {
  world_result res;
  res.out.resize(static_cast<size_t>(n));
  res.expert_rows.resize(static_cast<size_t>(n));
  res.chunks.resize(static_cast<size_t>(n));
  res.device_bytes.resize(static_cast<size_t>(n));
  std::mutex mu;
  run_world(n, [&](const rank_ctx& c) {
    const batch b = tokens_for(tokens, c.rank, n);
    rank_layer r;
    make_rank_layer(c, w, b, dt, r, recv_rows);
    if (!r.moe) return;
    auto err = forward(r, b.tokens, c.stream);
    ASSERT_FALSE(err) << "rank " << c.rank << ": " << error_text(err);
    auto out = result(r, dt, c.stream);
    std::lock_guard<std::mutex> lk(mu);
    const auto at = static_cast<size_t>(c.rank);
    res.out[at] = std::move(out);
    res.expert_rows[at] = r.moe->last_expert_rows();
    res.chunks[at] = r.moe->last_chunks();
    res.device_bytes[at] = r.moe->device_bytes();
  });
  return res;
}

struct world_and_dtype {
  int world;
  dtype dt;
};

void PrintTo(const world_and_dtype& p, std::ostream* os) {
  *os << "world of " << p.world << (p.dt == dtype::f32 ? ", f32" : ", bf16");
}

class expert_parallel : public ::testing::TestWithParam<world_and_dtype> {};

TEST_P(expert_parallel, every_token_gets_the_world_of_ones_output_bit_for_bit) {
  const auto [n, dt] = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  const layer w;
  const world_result split = run_layer(n, dt, w, layout::own);
  if (::testing::Test::HasFatalFailure()) return;

  // The world of one: every expert and the tokens of ranks 0..3 on one rank (those of ranks
  // past n-1 included, so every world compares against the same run).
  const world_result one = run_layer(1, dt, w, layout::all);
  ASSERT_EQ(one.out.size(), 1u);
  const batch all = concatenated(4);
  const std::vector<float> ref = reference(w, all);
  ASSERT_EQ(one.out[0].size(), ref.size());
  // float32: the kernels' sums against the host's in double; bf16: the rounding of the inputs,
  // the activation and the output (2^-8 relative each) over sums of a few dozen terms.
  const double tol = dt == dtype::f32 ? 1e-5 : 3e-2;
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(one.out[0][i], ref[i], tol * (1.0 + std::fabs(ref[i]))) << "element " << i;

  size_t at = 0;
  for (int r = 0; r < n; ++r) {
    const auto& got = split.out[static_cast<size_t>(r)];
    ASSERT_EQ(static_cast<int64_t>(got.size()), tokens_of(r) * D) << "rank " << r;
    for (size_t i = 0; i < got.size(); ++i, ++at) {
      // Bit for bit: the same products and sums, whichever rank ran them.
      ASSERT_EQ(std::memcmp(&got[i], &one.out[0][at], sizeof(float)), 0)
          << "rank " << r << ", element " << i << ": " << got[i] << " vs " << one.out[0][at];
    }
  }

  // Every routed entry of every rank, counted once, by the rank holding its expert.
  std::vector<int64_t> routed(static_cast<size_t>(E), 0);
  for (int r = 0; r < n; ++r)
    for (int32_t e : batch_of(r).idx)
      if (e >= 0) ++routed[static_cast<size_t>(e)];
  for (int r = 0; r < n; ++r) {
    const auto& rows = split.expert_rows[static_cast<size_t>(r)];
    ASSERT_EQ(static_cast<int64_t>(rows.size()), E / n);
    for (int64_t j = 0; j < E / n; ++j)
      EXPECT_EQ(rows[static_cast<size_t>(j)], routed[static_cast<size_t>(r * (E / n) + j)])
          << "rank " << r << ", local expert " << j;
  }
}

TEST_P(expert_parallel, smaller_receive_buffers_run_in_chunks_and_change_no_bit) {
  const auto [n, dt] = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  const layer w;
  // Each rank its own tokens, every rank all of them, and (worlds of 2 or more) all of them routed
  // mostly to rank 0: the last rank's rows then start late in each sender's rows, so a late
  // chunk's start for that pair, whose rows ran out, lies past the send buffer.
  for (const layout tokens : {layout::own, layout::all, layout::skewed}) {
    if (tokens == layout::skewed && n < 2) continue;
    SCOPED_TRACE(tokens == layout::own   ? "each rank its own tokens"
                 : tokens == layout::all ? "every rank all tokens"
                                         : "every rank all tokens, mostly to rank 0");
    const world_result whole = run_layer(n, dt, w, tokens);
    if (::testing::Test::HasFatalFailure()) return;
    for (int r = 0; r < n; ++r) EXPECT_EQ(whole.chunks[static_cast<size_t>(r)], 1) << "rank " << r;

    // The busiest pair of ranks: what bounds the chunks a call needs.
    int64_t busiest = 0;
    for (int from = 0; from < n; ++from) {
      std::vector<int64_t> to(static_cast<size_t>(n), 0);
      for (int32_t e : tokens_for(tokens, from, n).idx)
        if (e >= 0) ++to[static_cast<size_t>(e / (E / n))];
      for (int64_t rows : to) busiest = std::max(busiest, rows);
    }
    EXPECT_GT(busiest, 3) << "the routing must need several chunks of 3 rows";
    // One row a pair and chunk (the most chunks), then a few: the outputs, bit for bit, and
    // each expert's rows are the whole exchange's, on every rank, in fewer bytes.
    for (const int64_t per_pair : {int64_t{1}, int64_t{3}}) {
      SCOPED_TRACE("rows a pair and chunk: " + std::to_string(per_pair));
      const world_result chunked = run_layer(n, dt, w, tokens, per_pair * n);
      if (::testing::Test::HasFatalFailure()) return;
      for (int r = 0; r < n; ++r) {
        const auto at = static_cast<size_t>(r);
        EXPECT_EQ(chunked.chunks[at], (busiest + per_pair - 1) / per_pair) << "rank " << r;
        EXPECT_LT(chunked.device_bytes[at], whole.device_bytes[at]) << "rank " << r;
        EXPECT_EQ(chunked.expert_rows[at], whole.expert_rows[at]) << "rank " << r;
        ASSERT_EQ(chunked.out[at].size(), whole.out[at].size()) << "rank " << r;
        for (size_t i = 0; i < whole.out[at].size(); ++i)
          ASSERT_EQ(std::memcmp(&chunked.out[at][i], &whole.out[at][i], sizeof(float)), 0)
              << "rank " << r << ", element " << i << ": " << chunked.out[at][i] << " vs "
              << whole.out[at][i];
      }
    }
  }
}

TEST_P(expert_parallel, one_ranks_refusal_fails_the_call_on_every_rank_and_the_world_goes_on) {
  const auto [n, dt] = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  const layer w;
  const int refuser = n - 1;
  run_world(n, [&](const rank_ctx& c) {
    const batch b = batch_of(c.rank);
    rank_layer r;
    make_rank_layer(c, w, b, dt, r);
    if (!r.moe) return;
    // The refuser passes more tokens than the layer takes: no rank is left waiting for it.
    auto err = forward(r, c.rank == refuser ? max_tokens + 1 : b.tokens, c.stream);
    ASSERT_TRUE(err) << "rank " << c.rank;
    EXPECT_EQ(err.category(), caf::atom("model"));
    EXPECT_EQ(err.code(), static_cast<uint8_t>(c.rank == refuser ? model::model_errc::bad_input
                                                                 : model::model_errc::peer_refused))
        << error_text(err);
    const std::string text = error_text(err);
    if (c.rank == refuser) {
      EXPECT_NE(text.find("17 tokens (this layer takes up to 16 a rank)"), std::string::npos)
          << text;
    } else {
      EXPECT_NE(text.find("rank " + std::to_string(refuser) + " refused"), std::string::npos)
          << text;
    }
    // The next call goes through on every rank.
    expect_a_call_matches_the_reference(c, w, b, dt, r);
  });
}

// A kernel that fails while a rank sorts its rows (before the header exchange) is that rank's
// refusal: it returns the kernel's error, its peers peer_refused naming it, and nobody waits in
// NCCL. Only the emulator can make a launch fail on purpose (tests/emulator/fake_cudart.hpp).
TEST_P(expert_parallel, a_kernel_failing_before_the_exchange_is_that_ranks_refusal) {
#ifndef MOE_EMU_FAKE_CUDART
  GTEST_SKIP() << "needs the emulator's launch failures (engine_expert_parallel_emulated)";
#else
  const auto [n, dt] = GetParam();
  if (auto why = cannot_form(n); !why.empty()) GTEST_SKIP() << why;
  const layer w;
  const int failing = 0;  // rank 0 has tokens to sort (rank 1 has none)
  run_world(n, [&](const rank_ctx& c) {
    const batch b = batch_of(c.rank);
    rank_layer r;
    make_rank_layer(c, w, b, dt, r);
    if (!r.moe) return;
    // Its few rows take the permute plan's one-block kernel.
    if (c.rank == failing)
      emu::fail_launches(c.rank, 1, cudaErrorInvalidConfiguration, "small_plan_kernel");
    auto err = forward(r, b.tokens, c.stream);
    // Disarmed, should the failure not have been spent (a later launch must not meet it).
    if (c.rank == failing) emu::fail_launches(c.rank, 0, cudaSuccess);
    ASSERT_TRUE(err) << "rank " << c.rank;
    const std::string text = error_text(err);
    EXPECT_EQ(err.category(), caf::atom("model"));
    if (c.rank == failing) {
      EXPECT_EQ(err.code(), static_cast<uint8_t>(model::model_errc::kernel_failed)) << text;
      EXPECT_NE(text.find("permute plan"), std::string::npos) << text;
    } else {
      EXPECT_EQ(err.code(), static_cast<uint8_t>(model::model_errc::peer_refused)) << text;
      EXPECT_NE(text.find("rank " + std::to_string(failing) + " refused"), std::string::npos)
          << text;
    }
    // The next call goes through on every rank.
    expect_a_call_matches_the_reference(c, w, b, dt, r);
  });
#endif
}

INSTANTIATE_TEST_SUITE_P(
    worlds, expert_parallel,
    ::testing::Values(world_and_dtype{1, dtype::f32}, world_and_dtype{2, dtype::f32},
                      world_and_dtype{3, dtype::f32}, world_and_dtype{4, dtype::f32},
                      world_and_dtype{1, dtype::bf16}, world_and_dtype{4, dtype::bf16}),
    [](const ::testing::TestParamInfo<world_and_dtype>& info) {
      return "world_of_" + std::to_string(info.param.world) +
             (info.param.dt == dtype::f32 ? "_f32" : "_bf16");
    });

TEST(expert_parallel_shape, shapes_the_layer_cannot_take_are_refused_before_any_buffer) {
  if (auto why = cannot_form(2); !why.empty()) GTEST_SKIP() << why;
  run_world(2, [](const rank_ctx& c) {
    const auto refused = [&](engine::expert_parallel_shape s, const std::string& words) {
      auto m = engine::expert_parallel_moe::create(c.comm, s);
      ASSERT_FALSE(m);
      EXPECT_EQ(m.error().category(), caf::atom("model"));
      EXPECT_NE(error_text(m.error()).find(words), std::string::npos) << error_text(m.error());
    };
    refused({7, D, I, K, max_tokens, dtype::f32},
            "7 experts do not split evenly over a world of 2");
    refused({E, D, I, E + 1, max_tokens, dtype::f32}, "top_k");
    refused({E, D, 0, K, max_tokens, dtype::f32}, "must be positive");
    refused({E, D, I, K, max_tokens, dtype::f8_e4m3}, "f32 or bf16");
    refused({2048, D, I, K, max_tokens, dtype::f32}, "2048 experts (from 1 to 1024)");
    refused({E, D, I, K, INT64_MAX / 2, dtype::f32},
            "receive rows are past the kernels' int32 rows");
    refused({E, D, I, K, INT32_MAX / 4, dtype::f32}, "2 ranks x 536870911 tokens x top_k 3");
    refused({E, D, I, K, max_tokens, dtype::f32, 1},
            "receive buffers of 1 rows (0 for the worst routing, else at least a row for each of "
            "the 2 ranks)");
    refused({E, D, I, K, max_tokens, dtype::f32, -4}, "receive buffers of -4 rows");
    // A budget above the worst routing is the worst routing.
    auto roomy = engine::expert_parallel_moe::create(
        c.comm, {E, D, I, K, max_tokens, dtype::f32, 1'000'000});
    ASSERT_TRUE(roomy) << error_text(roomy.error());
    EXPECT_EQ((*roomy)->recv_capacity(), 2 * max_tokens * K);
    auto none = engine::expert_parallel_moe::create(nullptr, {E, D, I, K, max_tokens, dtype::f32});
    EXPECT_FALSE(none);
  });
}

}  // namespace

#else

TEST(expert_parallel, skipped) {
  GTEST_SKIP() << "no GPU: built without CUDA";
}

#endif  // MOE_HAVE_CUDA
