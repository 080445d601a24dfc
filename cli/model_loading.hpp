// How the commands that run a model (`moe run`, `moe serve --engine gpu|reference`) read its
// checkpoint and turn the GPU engine's flags into its options: one place, so that both read a
// checkpoint, quantize it and pick a dtype alike.
#pragma once

#include <filesystem>
#include <string>

#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#ifdef MOE_HAVE_ENGINE
#include "engine/gpu_engine.hpp"
#endif

namespace moe::cli {

/// The checkpoint in `dir` (config.json + safetensors). fp8: for the GPU engine's FP8 path,
/// FP8 weights stay FP8 (model::load_options::keep_fp8) and a checkpoint stored without any is
/// quantized as DeepSeek-V3's were (model::quantize_fp8).
[[nodiscard]] caf::expected<model::checkpoint> open_model(const std::filesystem::path& dir,
                                                          bool fp8 = false);
/// The same, with its config already read (model::load_config(dir)).
[[nodiscard]] caf::expected<model::checkpoint> open_model(const std::filesystem::path& dir,
                                                          const model::model_config& config,
                                                          bool fp8);

#ifdef MOE_HAVE_ENGINE
/// The options of --gpu-dtype (bf16 | f32) and --fp8 (off | block_scaled | expand), values the
/// flags' checks already accepted; fp8 "off" keeps the default products (unused without FP8
/// weights).
[[nodiscard]] engine::gpu_engine_options gpu_engine_options_of(const std::string& gpu_dtype,
                                                               const std::string& fp8);
#endif

}  // namespace moe::cli
