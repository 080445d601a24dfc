// The tiny-v3 fixture (tests/data/tiny-v3) as the actor tests use it: its directory, its golden
// token ids, its checkpoint, and a controller job as the request the reference engine runs alone
// (what the tests hold the actors' tokens to).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "actors/messages.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/reference_engine.hpp"
#include "tests/golden/golden_data.hpp"

namespace moe::actors::testing {

inline std::filesystem::path tiny() {
  return std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3";
}

/// The token ids stored as `name` in tiny-v3's golden outputs.
inline std::vector<int32_t> golden_ids(const std::string& name) {
  return moe::testing::golden_file::open(tiny() / "golden.safetensors").ids(name);
}

inline std::shared_ptr<const model::checkpoint> tiny_checkpoint() {
  auto cfg = model::load_config(tiny());
  EXPECT_TRUE(cfg) << error_text(cfg.error());
  if (!cfg) return nullptr;
  auto ckpt = model::load_checkpoint(tiny(), *cfg);
  EXPECT_TRUE(ckpt) << error_text(ckpt.error());
  if (!ckpt) return nullptr;
  return std::make_shared<const model::checkpoint>(std::move(*ckpt));
}

/// `job` as model::generate's request: the same prompt, length, sampling, seed and stop tokens.
inline model::generation_request reference_request_of(const generation_job& job) {
  model::generation_request r;
  r.prompt = job.prompt;
  r.max_new_tokens = job.max_new_tokens;
  r.sampling = {job.sampling.temperature, job.sampling.top_k, job.sampling.top_p};
  r.seed = job.sampling.seed;
  r.stop_token_ids = job.stop_token_ids;
  return r;
}

}  // namespace moe::actors::testing
