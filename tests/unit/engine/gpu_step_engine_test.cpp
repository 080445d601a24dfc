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

#include "kernels/cpu/sampling.hpp"
#include "model/model_errc.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"

using namespace moe;
using namespace moe::testing;

namespace {

constexpr float logit_tolerance = 1e-3f;  // f32 throughout: gpu_engine_test.cpp's bound

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

// The step on both engines, with logits; the tokens: greedy rows the reference's, sampled rows
// the CPU sampler's draw from the GPU step's own logits.
void expect_same_step(model::step_engine& gpu, model::step_engine& ref,
                      std::span<const model::step_sequence> seqs, bool prefill,
                      const std::string& what) {
  auto got = prefill ? gpu.prefill(seqs, true) : gpu.decode(seqs, true);
  auto want = prefill ? ref.prefill(seqs, true) : ref.decode(seqs, true);
  ASSERT_TRUE(got) << what << ": " << error_text(got.error());
  ASSERT_TRUE(want) << what << ": " << error_text(want.error());
  const size_t V = static_cast<size_t>(ref.config().vocab_size);
  ASSERT_EQ(got->tokens.size(), seqs.size()) << what;
  ASSERT_EQ(got->logits.size(), seqs.size() * V) << what;
  kernels::cpu::sampler sampler(V);
  for (size_t i = 0; i < seqs.size(); ++i) {
    float worst = 0;
    for (size_t v = 0; v < V; ++v)
      worst = std::max(worst, std::abs(got->logits[i * V + v] - want->logits[i * V + v]));
    EXPECT_LE(worst, logit_tolerance) << what << ", row " << i;
    if (seqs[i].sampling.temperature == 0.0f) {
      EXPECT_EQ(got->tokens[i], want->tokens[i]) << what << ", greedy row " << i;
    } else {
      int32_t drawn = -1;
      ASSERT_EQ(sampler.draw(got->logits.data() + i * V, seqs[i].sampling, seqs[i].seed,
                             seqs[i].offset, &drawn),
                kernels::kernel_status::ok);
      EXPECT_EQ(got->tokens[i], drawn) << what << ", sampled row " << i;
    }
  }
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
  std::vector<model::step_sequence> seqs(3);
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i].id = 10 + i;
    seqs[i].tokens = prompts[i];
  }
  seqs[1].sampling = {0.9f, 50, 0.9f};
  seqs[1].seed = 77;
  seqs[2].sampling = {1.2f, 0, 1.0f};
  seqs[2].seed = 5;
  expect_same_step(*gpu, *ref, seqs, true, "prefill");
  if (::testing::Test::HasFatalFailure()) return;

  // Decode steps feed both engines the same tokens (fixed ones: a sampled row's token may
  // legitimately differ between them near a boundary, and must not change what follows).
  std::vector<int32_t> next(seqs.size());
  for (int s = 0; s < 6; ++s) {
    for (size_t i = 0; i < seqs.size(); ++i) {
      next[i] = static_cast<int32_t>((ids[static_cast<size_t>(s) + i] + 7 * s) % 512);
      seqs[i].tokens = std::span(&next[i], 1);
      seqs[i].offset = static_cast<uint64_t>(s + 1);
    }
    expect_same_step(*gpu, *ref, seqs, false, "decode " + std::to_string(s));
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& q : seqs) EXPECT_EQ(gpu->cached_tokens(q.id), ref->cached_tokens(q.id));

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
