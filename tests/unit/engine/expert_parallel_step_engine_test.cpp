// An expert-parallel group as one step engine (engine/expert_parallel_step_engine.hpp), what an
// engine shard serves with `moe serve --engine gpu --expert-parallel N`, against the reference
// step engine on tiny-v3 in f32, in groups of 1, 2 and 4 GPUs: sequences of different lengths,
// greedy and sampled, spread over the ranks, prefilled together (in several rounds where a rank's
// share passes max_tokens_per_rank) and decoded together, give the reference's greedy tokens,
// the reference sampler's draws from the step's own logits for sampled rows, and logits within
// the f32 engines' bound (step_engine_checks.hpp). Refused steps (before anything runs, or by one
// rank's engine) leave nothing cached on any rank, a kernel failing on one rank makes that rank's
// error the step's, and a full cache is found before a step runs.
//
// Built against the emulator (label unit, CI: groups of up to four emulated devices over the
// stand-in for NCCL) and against the real runtime (label gpu), where a group larger than the
// machine's GPU count is skipped with the reason (one H200 runs the group of one).
#include <gtest/gtest.h>

#ifdef MOE_HAVE_CUDA
#include <set>
#include <string>
#include <vector>

#include "engine/expert_parallel_step_engine.hpp"
#include "model/model_errc.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/engine/step_engine_checks.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/runtime/nccl_world.hpp"
#ifdef MOE_EMU_FAKE_CUDART
#include "tests/emulator/fake_cudart.hpp"
#endif

using namespace moe;
using namespace moe::testing;
using moe::test_support::cannot_form;

namespace {

model::model_errc code_of(const caf::error& e) {
  return static_cast<model::model_errc>(e.code());
}

std::vector<int> first_devices(int n) {
  std::vector<int> d;
  for (int i = 0; i < n; ++i) d.push_back(i);
  return d;
}

caf::expected<std::unique_ptr<engine::expert_parallel_step_engine>> make_group(
    const std::shared_ptr<const model::checkpoint>& ckpt, int ranks, int64_t max_tokens,
    int64_t num_blocks = 32, int64_t recv_rows = 0) {
  engine::expert_parallel_group_options o;
  o.recv_rows_per_rank = recv_rows;
  o.engine.dtype = kernels::dtype::f32;
  o.engine.cache.num_blocks = num_blocks;
  o.engine.cache.block_size = 8;
  o.devices = first_devices(ranks);
  o.max_tokens_per_rank = max_tokens;
  return engine::expert_parallel_step_engine::create(ckpt, o);
}

class expert_parallel_step_engine_test : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    MOE_KERNELS_SKIP_WITHOUT_GPU();
    if (const auto why = cannot_form(GetParam()); !why.empty()) GTEST_SKIP() << why;
    ckpt_ = load_fixture("tiny-v3");
    ASSERT_TRUE(ckpt_);
    ids_ = golden_file::open(fixture_dir("tiny-v3") / "golden.safetensors").ids("input_ids");
  }
  std::vector<int32_t> prompt(size_t begin, size_t length) const {
    return {ids_.begin() + static_cast<std::ptrdiff_t>(begin),
            ids_.begin() + static_cast<std::ptrdiff_t>(begin + length)};
  }
  std::shared_ptr<const model::checkpoint> ckpt_;
  std::vector<int32_t> ids_;
};

/// Five sequences prefilled and decoded `decode_steps` times on a group of `world` whose ranks
/// receive at most `recv_rows` rows of an exchange at once (0: the worst routing), against the
/// reference step engine.
void expect_the_reference_steps(const std::shared_ptr<const model::checkpoint>& ckpt,
                                const std::vector<int32_t>& ids, int world, int64_t recv_rows,
                                int decode_steps) {
  const auto prompt = [&](size_t begin, size_t length) {
    return std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(begin),
                                ids.begin() + static_cast<std::ptrdiff_t>(begin + length));
  };
  // 35 prompt tokens, at most 12 a rank and round: a group of one runs the prefill in 4 rounds.
  auto group = make_group(ckpt, world, 12, 32, recv_rows);
  ASSERT_TRUE(group) << error_text(group.error());
  auto reference = model::reference_engine::create(ckpt);
  ASSERT_TRUE(reference) << error_text(reference.error());
  model::reference_step_engine ref(std::move(*reference));
  EXPECT_EQ((*group)->world_size(), world);
  EXPECT_NE((*group)->device().find("experts split over " + std::to_string(world) + " GPUs"),
            std::string::npos)
      << (*group)->device();

  const std::vector<std::vector<int32_t>> prompts = {prompt(0, 11), prompt(3, 2), prompt(16, 7),
                                                     prompt(5, 9), prompt(9, 6)};
  std::vector<model::step_sequence> seqs = sequences_of(prompts, 10);
  seqs[1].sampling = {0.9f, 50, 0.9f};
  seqs[1].seed = 77;
  seqs[3].sampling = {1.2f, 0, 1.0f};
  seqs[3].seed = 5;
  const int64_t free_before = (*group)->free_cache_blocks();
  expect_same_step(**group, ref, seqs, true, "prefill");
  if (::testing::Test::HasFatalFailure()) return;
  // Five sequences over the ranks, each rank some (one rank holds them all in a group of one).
  std::set<int> holders;
  for (const auto& q : seqs) holders.insert((*group)->rank_of(q.id));
  EXPECT_EQ(static_cast<int>(holders.size()), std::min(world, 5));
  EXPECT_EQ(*holders.begin(), 0);
  EXPECT_EQ(free_before - (*group)->free_cache_blocks(), 7);  // 2 + 1 + 1 + 2 + 1 blocks of 8
  if (world == 1) {
    EXPECT_EQ((*group)->rounds(), 4u);  // 11 | 2 + 7 | 9 | 6
  }

  expect_same_decode_steps(**group, ref, seqs, ids, decode_steps);
  if (::testing::Test::HasFatalFailure()) return;
  // Every rank ran each MoE layer of each round, whether it had sequences or not; in one
  // exchange a layer, or (small receive buffers) in more.
  uint64_t layers = 0, chunks = 0;
  for (int r = 0; r < world; ++r) {
    const auto stats = (*group)->rank_engine(r).kernel_stats();
    EXPECT_GT(stats.experts_parallel, 0u) << "rank " << r;
    if (recv_rows == 0) {
      EXPECT_EQ(stats.experts_parallel_chunks, stats.experts_parallel) << "rank " << r;
    }
    layers += stats.experts_parallel;
    chunks += stats.experts_parallel_chunks;
  }
  if (recv_rows > 0) {
    EXPECT_GT(chunks, layers);
  }
  for (const auto& q : seqs) (*group)->release(q.id);
  EXPECT_EQ((*group)->free_cache_blocks(), free_before);
  EXPECT_EQ((*group)->rank_of(10), -1);
}

TEST_P(expert_parallel_step_engine_test, steps_give_the_reference_step_engines_tokens) {
  expect_the_reference_steps(ckpt_, ids_, GetParam(), 0, 5);
}

TEST_P(expert_parallel_step_engine_test, small_receive_buffers_give_the_same_tokens_in_chunks) {
  // Two rows a pair of ranks and chunk: a 12-token round of top-k rows takes many chunks.
  expect_the_reference_steps(ckpt_, ids_, GetParam(), 2 * GetParam(), 2);
}

TEST_P(expert_parallel_step_engine_test, refused_steps_leave_nothing_cached_on_any_rank) {
  const int world = GetParam();
  auto made = make_group(ckpt_, world, 12, /*num_blocks=*/2);
  ASSERT_TRUE(made) << error_text(made.error());
  auto& group = **made;
  const int64_t all_free = group.free_cache_blocks();
  EXPECT_EQ(all_free, 2 * world);
  const std::vector<int32_t> good = prompt(0, 5), outside{4, 512}, long_prompt = prompt(0, 13);
  auto refused = [&](std::vector<model::step_sequence> seqs, bool decode, model::model_errc code,
                     const std::string& says) {
    auto r = decode ? group.decode(seqs, false) : group.prefill(seqs, false);
    ASSERT_FALSE(r) << says;
    EXPECT_EQ(code_of(r.error()), code) << error_text(r.error());
    EXPECT_NE(error_text(r.error()).find(says), std::string::npos) << error_text(r.error());
  };
  // Refused by the group before anything runs.
  refused({{1, good}, {2, long_prompt}}, false, model::model_errc::bad_input,
          "above the 12 a rank takes");
  refused({{1, good}, {1, good}}, false, model::model_errc::bad_input, "already in the batch");
  refused({{7, std::span(good.data(), 1)}}, true, model::model_errc::bad_input, "has no prefill");
  // Refused by the engine of the rank holding the bad prompt, after the other rank (in groups
  // of two or more) ran its own: released again.
  refused({{1, good}, {3, outside}}, false, model::model_errc::bad_input, "outside the vocabulary");
  for (const uint64_t id : {1, 3}) EXPECT_EQ(group.cached_tokens(id), 0) << id;
  EXPECT_EQ(group.free_cache_blocks(), all_free);
  // Two 8-token blocks a rank: more prompts than that is a full cache, found before they run.
  std::vector<model::step_sequence> fill;
  for (int i = 0; i <= 2 * world; ++i) fill.push_back({static_cast<uint64_t>(20 + i), good});
  refused(fill, false, model::model_errc::cache_full, "blocks sequence");
  EXPECT_EQ(group.free_cache_blocks(), all_free);
  fill.pop_back();
  ASSERT_TRUE(group.prefill(fill, false));
  EXPECT_EQ(group.free_cache_blocks(), 0);
  // Each sequence has 5 of its block's 8 tokens: three more decode steps fit, the fourth does not.
  const int32_t token = 7;
  std::vector<model::step_sequence> step;
  for (const auto& q : fill) step.push_back({q.id, std::span(&token, 1)});
  for (int s = 0; s < 3; ++s) ASSERT_TRUE(group.decode(step, false)) << "decode " << s;
  refused(step, true, model::model_errc::cache_full, "free cache blocks");
  for (const auto& q : fill) EXPECT_EQ(group.cached_tokens(q.id), 8);
  for (const auto& q : fill) group.release(q.id);
  EXPECT_EQ(group.free_cache_blocks(), all_free);
}

// A kernel failing on one rank while it sorts its rows (before the exchange) is that rank's
// refusal; its peers hear of it (peer_refused). The step's error is the failing rank's own, the
// highest rank here, whose peers' notices come first in rank order; the step's sequences are
// released on every rank, and the same prefill then goes through. Only the emulator can fail a
// launch on purpose (tests/emulator/fake_cudart.hpp).
TEST_P(expert_parallel_step_engine_test, a_ranks_failed_kernel_is_the_steps_error) {
#ifndef MOE_EMU_FAKE_CUDART
  GTEST_SKIP() << "needs the emulator's launch failures (engine_expert_parallel_emulated)";
#else
  const int world = GetParam();
  auto made = make_group(ckpt_, world, 12);
  ASSERT_TRUE(made) << error_text(made.error());
  auto& group = **made;
  const int64_t all_free = group.free_cache_blocks();
  const std::vector<int32_t> good = prompt(0, 5);
  std::vector<model::step_sequence> seqs;  // one a rank
  for (int r = 0; r < world; ++r) seqs.push_back({static_cast<uint64_t>(10 + r), good});
  const int failing = world - 1;  // on device world - 1 (first_devices)
  // A few rows take the permute plan's one-block kernel.
  emu::fail_launches(failing, 1, cudaErrorInvalidConfiguration, "small_plan_kernel");
  auto r = group.prefill(seqs, false);
  emu::fail_launches(failing, 0, cudaSuccess);  // disarmed, should it not have been spent
  ASSERT_FALSE(r) << "the failed launch went unnoticed";
  const std::string text = error_text(r.error());
  EXPECT_EQ(code_of(r.error()), model::model_errc::kernel_failed) << text;
  EXPECT_EQ(text.rfind("rank " + std::to_string(failing) + ": ", 0), 0u) << text;
  EXPECT_NE(text.find("permute plan"), std::string::npos) << text;
  for (const auto& q : seqs) EXPECT_EQ(group.cached_tokens(q.id), 0) << q.id;
  EXPECT_EQ(group.free_cache_blocks(), all_free);
  auto again = group.prefill(seqs, false);
  ASSERT_TRUE(again) << error_text(again.error());
  EXPECT_EQ(again->tokens.size(), seqs.size());
#endif
}

INSTANTIATE_TEST_SUITE_P(groups, expert_parallel_step_engine_test, ::testing::Values(1, 2, 4),
                         [](const auto& info) { return "of_" + std::to_string(info.param); });

TEST(expert_parallel_step_engine, groups_it_cannot_form_are_refused_with_the_reason) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto ckpt = load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  engine::expert_parallel_group_options o;
  o.engine.cache.num_blocks = 4;
  o.engine.cache.block_size = 8;
  auto says = [&](const engine::expert_parallel_group_options& opts, const std::string& text) {
    auto g = engine::expert_parallel_step_engine::create(ckpt, opts);
    ASSERT_FALSE(g) << text;
    EXPECT_NE(error_text(g.error()).find(text), std::string::npos) << error_text(g.error());
  };
  says(o, "no device");
  o.devices = {0, 0};
  says(o, "listed twice");
  o.devices = {0};
  o.max_tokens_per_rank = 0;
  says(o, "max_tokens_per_rank must be positive");
  o.max_tokens_per_rank = 8;
  o.engine.wgmma_experts = true;
  says(o, "wgmma_experts must be off");
  if (const auto why = cannot_form(3); !why.empty()) GTEST_SKIP() << why;
  o.engine.wgmma_experts = false;
  o.devices = {0, 1, 2};  // tiny-v3's 16 experts
  says(o, "do not split evenly over a world of 3");
}

}  // namespace

#else
TEST(expert_parallel_step_engine, needs_the_cuda_backend) {
  GTEST_SKIP() << "built without MOE_CUDA";
}
#endif
