// Randomly initialised DeepSeek-V3-family checkpoints, written in the hub layout (config.json +
// model.safetensors, or shards + model.safetensors.index.json), for demos, tests and benchmarks.
//
// Initialisation, chosen to be reproducible and fast enough for billions of parameters:
//  - matrices (projections, experts, gate, embeddings): uniform on [-a, a] with
//    a = sqrt(3) * initializer_range, i.e. the standard deviation of transformers'
//    normal(0, initializer_range) without the cost of a Gaussian sampler (about 1 ns per value
//    instead of ~10, so the 4.6B-parameter preset is bound by disk, not by the sampler);
//  - RMSNorm scales: ones;
//  - e_score_correction_bias: zeros, which is where DeepSeek-V3's auxiliary-loss-free balancing
//    starts training; the random gate weights already make routing non-trivial.
// Each value is a counter-based hash (splitmix64) of (seed, tensor name, element index), so the
// output depends only on the seed and the config: not on sharding, tensor order or threads.
//
// Thread safety: pure apart from the files written; calls on different directories are
// independent.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "kernels/dtype.hpp"
#include "model/config.hpp"

namespace moe::model {

/// Preset names:
///   tiny       tiny-v3's config (the golden fixture): vocab 512, hidden 64, 3 layers, 16 experts
///              in 4 groups, top-2 groups, top-4, q_lora 32, kv_lora 16, YaRN; 340,080 parameters.
///   small      V3 structure, 174.2M parameters (156.5M without the MTP module, 60.2M active
///              per token): hidden 512, 8 layers, 64 experts in 8 groups,
///              top-4 groups, top-6, q_lora 384, kv_lora 256, vocab 32000, one MTP module.
///   v2lite-8L  DeepSeek-V2-Lite's shapes cut to 8 layers (hidden 2048, 16 heads, no q
///              compression, kv_lora 512, 64 experts top-6 in one group, 2 shared, vocab
///              102400) with V3 routing (sigmoid, noaux_tc); 4,594,375,104 parameters.
[[nodiscard]] std::span<const std::string_view> preset_names() noexcept;
[[nodiscard]] caf::expected<model_config> model_preset(std::string_view name);

struct init_options {
  uint64_t seed = 0;
  kernels::dtype dtype = kernels::dtype::f32;  ///< f32 or bf16.
  /// Shards close at this many data bytes; everything in one model.safetensors below it.
  uint64_t max_shard_bytes = uint64_t{2} << 30;
  /// Progress bar on stderr by bytes written; nullopt: only when stderr is a terminal.
  std::optional<bool> progress;
  /// Write config.json alone (no weights): for tools that build the same model themselves,
  /// such as the transformers peer of the GPU benchmark.
  bool config_only = false;
};

/// Creates `dir` if needed and writes config.json (torch_dtype set to options.dtype) and random
/// weights for every non-optional tensor of expected_weights(config). Returns the files written.
[[nodiscard]] caf::expected<std::vector<std::filesystem::path>> init_model(
    const std::filesystem::path& dir, const model_config& config, const init_options& options = {});

/// The checkpoint that init_model(dir, config, options) then load_checkpoint(dir) would give,
/// built in memory (no disk, no parsing): for benchmarks and tools on billions of parameters,
/// where writing and reading back 9 GB costs more than the work measured. Values are float32
/// (bf16-rounded when options.dtype is bf16); MTP modules included, as init_model writes them.
/// config_only, max_shard_bytes and progress are ignored. Errors: as init_model's checks.
[[nodiscard]] caf::expected<checkpoint> random_checkpoint(const model_config& config,
                                                          const init_options& options = {});

}  // namespace moe::model
