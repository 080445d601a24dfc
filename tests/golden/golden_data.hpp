// Reading the transformers fixtures in tests/data for golden tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"

namespace moe::testing {

/// tests/data/<name>: where the build found it, or under $MOE_TEST_DATA_DIR when that is set
/// (a test executable run on another machine, as scripts/gpu/device_checks.sh does).
inline std::filesystem::path fixture_dir(const std::string& name) {
  if (const char* dir = std::getenv("MOE_TEST_DATA_DIR"); dir != nullptr && *dir != '\0')
    return std::filesystem::path(dir) / name;
  return std::filesystem::path(MOE_TEST_DATA_DIR) / name;
}

/// Loads a fixture checkpoint; fails the test on error.
/// keep_fp8: FP8 weights stay FP8 (model::load_options::keep_fp8).
inline std::shared_ptr<const model::checkpoint> load_fixture(const std::string& name,
                                                             bool keep_fp8 = false) {
  auto cfg = model::load_config(fixture_dir(name));
  EXPECT_TRUE(cfg) << error_text(cfg.error());
  if (!cfg) return nullptr;
  model::load_options opts;
  opts.progress = false;
  opts.keep_fp8 = keep_fp8;
  auto ckpt = model::load_checkpoint(fixture_dir(name), *cfg, opts);
  EXPECT_TRUE(ckpt) << error_text(ckpt.error());
  if (!ckpt) return nullptr;
  return std::make_shared<const model::checkpoint>(std::move(*ckpt));
}

/// A tensor of a golden file, as float or int64 host values.
struct golden_file {
  model::safetensors_file file;

  static golden_file open(const std::filesystem::path& path) {
    auto f = model::safetensors_file::open(path);
    EXPECT_TRUE(f) << error_text(f.error());
    return golden_file{std::move(*f)};
  }
  const model::tensor_view& view(const std::string& name) const {
    const auto* v = file.find(name);
    if (!v) throw std::runtime_error("golden tensor missing: " + name);
    return *v;
  }
  std::vector<float> floats(const std::string& name) const {
    const auto& v = view(name);
    std::vector<float> out(v.data.size() / sizeof(float));
    std::memcpy(out.data(), v.data.data(), v.data.size());
    return out;
  }
  std::vector<int32_t> ids(const std::string& name) const {
    const auto& v = view(name);
    std::vector<int64_t> wide(v.data.size() / sizeof(int64_t));
    std::memcpy(wide.data(), v.data.data(), v.data.size());
    return std::vector<int32_t>(wide.begin(), wide.end());
  }
  std::vector<int64_t> shape(const std::string& name) const { return view(name).shape; }
};

inline float max_abs_diff(const float* a, const float* b, size_t n) {
  float worst = 0.0f;
  for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

}  // namespace moe::testing
