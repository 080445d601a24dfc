// The GPU engine as a step engine (engine/gpu_step_engine.hpp), what an engine shard serves,
// against the reference engine's (model::reference_step_engine) on tiny-v3 in f32: a batch of
// sequences of different lengths, greedy and sampled, prefilled together and decoded together,
// gives the reference's greedy tokens (tiny-v3's top-1 margins on these paths are far above the
// f32 engines' ~1e-6 logit differences: gpu_engine_test.cpp derives the bound) and, for sampled
// rows, the reference sampler's draw from the step's own logits (the device draws exactly that,
// except within float rounding of a boundary; kernels/cuda/sampling.hpp); logits come back only
// when asked for; refused steps leave nothing cached. Skipped without a GPU; CI runs it in the
// emulator (tests/emulator/engine).
#include "engine/gpu_step_engine.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "model/model_errc.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/engine/step_engine_checks.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"

using namespace moe;
using namespace moe::testing;

namespace {

std::unique_ptr<engine::gpu_step_engine> make_gpu(
    const std::shared_ptr<const model::checkpoint>& ckpt) {
  engine::gpu_engine_options o;
  o.dtype = kernels::dtype::f32;
  o.cache.num_blocks = 32;
  o.cache.block_size = 8;
  auto e = engine::gpu_engine::create(ckpt, o);
  EXPECT_TRUE(e) << error_text(e.error());
  if (!e) return nullptr;
  return std::make_unique<engine::gpu_step_engine>(std::move(*e), o.device);
}

std::unique_ptr<model::reference_step_engine> make_reference(
    const std::shared_ptr<const model::checkpoint>& ckpt) {
  auto e = model::reference_engine::create(ckpt);
  EXPECT_TRUE(e) << error_text(e.error());
  if (!e) return nullptr;
  return std::make_unique<model::reference_step_engine>(std::move(*e));
}

}  // namespace

TEST(gpu_step_engine, steps_give_the_reference_step_engines_tokens) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto ckpt = load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  auto gpu = make_gpu(ckpt);
  auto ref = make_reference(ckpt);
  ASSERT_TRUE(gpu && ref);
  EXPECT_EQ(gpu->device(), "cuda:0 f32");
  const auto ids =
      golden_file::open(fixture_dir("tiny-v3") / "golden.safetensors").ids("input_ids");
  std::vector<std::vector<int32_t>> prompts = {{ids.begin(), ids.begin() + 11},
                                               {ids.begin() + 3, ids.begin() + 5},
                                               {ids.begin() + 16, ids.begin() + 23}};
  std::vector<model::step_sequence> seqs = sequences_of(prompts, 10);
  seqs[1].sampling = {0.9f, 50, 0.9f};
  seqs[1].seed = 77;
  seqs[2].sampling = {1.2f, 0, 1.0f};
  seqs[2].seed = 5;
  expect_same_step(*gpu, *ref, seqs, true, "prefill");
  if (::testing::Test::HasFatalFailure()) return;

  expect_same_decode_steps(*gpu, *ref, seqs, ids, 6);
  if (::testing::Test::HasFatalFailure()) return;

  // Without logits, the same tokens (greedy rows: the device's choice either way).
  gpu->release(10);
  ref->release(10);
  const model::step_sequence again{10, prompts[0]};
  auto with = ref->prefill(std::span(&again, 1), false);
  auto without = gpu->prefill(std::span(&again, 1), false);
  ASSERT_TRUE(with && without);
  EXPECT_TRUE(without->logits.empty());
  EXPECT_EQ(without->tokens, with->tokens);
}

TEST(gpu_step_engine, refused_steps_leave_nothing_cached) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto ckpt = load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  auto gpu = make_gpu(ckpt);
  ASSERT_TRUE(gpu);
  const std::vector<int32_t> good{1, 2, 3}, outside{4, 512};
  std::vector<model::step_sequence> seqs{{1, good}, {2, outside}};
  auto r = gpu->prefill(seqs, false);
  ASSERT_FALSE(r);
  EXPECT_EQ(static_cast<model::model_errc>(r.error().code()), model::model_errc::bad_input);
  EXPECT_EQ(gpu->cached_tokens(1), 0);
  seqs = {{3, good}};
  seqs[0].sampling.top_p = 1.5f;
  r = gpu->prefill(seqs, false);
  ASSERT_FALSE(r);
  EXPECT_NE(error_text(r.error()).find("top_p"), std::string::npos) << error_text(r.error());
  EXPECT_EQ(gpu->cached_tokens(3), 0);
  EXPECT_EQ(gpu->free_cache_blocks(), 32);
  seqs = {{1, good}};
  ASSERT_TRUE(gpu->prefill(seqs, false));
  EXPECT_EQ(gpu->free_cache_blocks(), 31);           // three tokens in one 8-token block
  std::vector<model::step_sequence> two{{1, good}};  // three tokens where a decode takes one
  r = gpu->decode(two, false);
  ASSERT_FALSE(r);
  EXPECT_EQ(gpu->cached_tokens(1), 3);
  gpu->release(1);
  EXPECT_EQ(gpu->free_cache_blocks(), 32);
}
