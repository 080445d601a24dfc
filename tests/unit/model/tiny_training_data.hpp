// tiny-v3 as the training tests use it: its weights, owned and mutable (the optimizer updates
// them in place), and golden.safetensors' batch of two 16-token sequences.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "tests/golden/golden_data.hpp"

namespace moe::model::testing {

inline std::filesystem::path tiny_dir() { return std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3"; }

inline std::shared_ptr<checkpoint> load_tiny() {
  auto c = load_config(tiny_dir());
  EXPECT_TRUE(c) << error_text(c.error());
  load_options o;
  o.progress = false;
  auto ckpt = load_checkpoint(tiny_dir(), *c, o);
  EXPECT_TRUE(ckpt) << error_text(ckpt.error());
  return std::make_shared<checkpoint>(std::move(*ckpt));
}

/// golden.safetensors' input_ids: two sequences of 16 tokens.
inline std::vector<std::vector<int32_t>> golden_batch() {
  const auto ids = moe::testing::golden_file::open(tiny_dir() / "golden.safetensors").ids("input_ids");
  const auto half = static_cast<std::ptrdiff_t>(ids.size() / 2);
  return {std::vector<int32_t>(ids.begin(), ids.begin() + half), std::vector<int32_t>(ids.begin() + half, ids.end())};
}

}  // namespace moe::model::testing
