// Checks shared by the step engines' tests (gpu_step_engine_test.cpp,
// expert_parallel_step_engine_test.cpp): a step on an engine under test against the same step on
// the reference step engine.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "kernels/cpu/sampling.hpp"
#include "model/step_engine.hpp"

namespace moe::testing {

/// f32 engines against the f32 reference: gpu_engine_test.cpp derives the bound.
inline constexpr float step_logit_tolerance = 1e-3f;

// The step on both engines, with logits; the tokens: greedy rows the reference's, sampled rows
// the CPU sampler's draw from the GPU step's own logits.
inline void expect_same_step(model::step_engine& gpu, model::step_engine& ref,
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
    EXPECT_LE(worst, step_logit_tolerance) << what << ", row " << i;
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

/// One greedy step_sequence per prompt (viewing it), ids from first_id up.
inline std::vector<model::step_sequence> sequences_of(
    const std::vector<std::vector<int32_t>>& prompts, uint64_t first_id) {
  std::vector<model::step_sequence> seqs(prompts.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i].id = first_id + i;
    seqs[i].tokens = prompts[i];
  }
  return seqs;
}

/// `steps` decode steps of `seqs` on both engines, each expect_same_step. Both are fed the same
/// fixed tokens, from `ids` (a sampled row's token may legitimately differ between them near a
/// boundary, and must not change what follows); each row's sampling offset counts its steps.
inline void expect_same_decode_steps(model::step_engine& gpu, model::step_engine& ref,
                                     std::vector<model::step_sequence>& seqs,
                                     const std::vector<int32_t>& ids, int steps) {
  std::vector<int32_t> next(seqs.size());
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < seqs.size(); ++i) {
      next[i] = static_cast<int32_t>((ids[static_cast<size_t>(s) + i] + 7 * s) % 512);
      seqs[i].tokens = std::span(&next[i], 1);
      seqs[i].offset = static_cast<uint64_t>(s + 1);
    }
    expect_same_step(gpu, ref, seqs, false, "decode " + std::to_string(s));
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& q : seqs) EXPECT_EQ(gpu.cached_tokens(q.id), ref.cached_tokens(q.id));
}

}  // namespace moe::testing
