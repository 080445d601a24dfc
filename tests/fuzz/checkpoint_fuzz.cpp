// libFuzzer target: a whole checkpoint directory as `moe run --model`, `moe serve` and the expert
// groups load it (model/checkpoint.hpp): config.json, then model.safetensors checked against
// it (names, shapes, dtypes, FP8 block scales) and converted to float32.
// Input: one flags byte, a 2-byte little-endian length n, n bytes of config.json, and the rest
// is model.safetensors. Flags: bits 0-1 the MTP policy, bit 2 loads one expert's tensors only
// (as an expert group does).
// Properties: loading returns a checkpoint or a model error with a text, whatever the bytes;
// a loaded checkpoint holds exactly the selected tensors, each with its expected shape.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

// Where the checkpoint's file is written for the loader to map; removed when the process exits.
struct scratch_directory {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("moe_checkpoint_fuzz." + std::to_string(::getpid()));
  scratch_directory() { std::filesystem::create_directories(path); }
  ~scratch_directory() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

bool write_file(const std::filesystem::path& path, const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data, 1, size, f) == size;
  return std::fclose(f) == 0 && ok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const uint8_t flags = data[0];
  const size_t config_bytes = std::min<size_t>(data[1] | (size_t{data[2]} << 8), size - 3);
  const std::string_view config_text(reinterpret_cast<const char*>(data + 3), config_bytes);
  auto config = moe::model::parse_config(config_text);
  if (!config) {
    moe::fuzz::check_rejection(config.error(), "model");
    return 0;
  }
  static const scratch_directory scratch;
  const auto file = scratch.path / "model.safetensors";
  MOE_FUZZ_CHECK(write_file(file, data + 3 + config_bytes, size - 3 - config_bytes));

  moe::model::load_options options;
  options.progress = false;
  switch (flags & 3) {
    case 0: options.mtp = moe::model::mtp_policy::load_if_present; break;
    case 1: options.mtp = moe::model::mtp_policy::require; break;
    default: options.mtp = moe::model::mtp_policy::skip; break;
  }
  if (flags & 4) {
    options.filter = [](std::string_view name) { return name.find(".mlp.experts.0.") != std::string_view::npos; };
  }
  auto loaded = moe::model::load_checkpoint(file, *config, options);
  if (!loaded) {
    moe::fuzz::check_rejection(loaded.error(), "model");
    return 0;
  }
  for (const auto& spec : moe::model::expected_weights(*config)) {
    const auto* tensor = loaded->find(spec.name);
    if (tensor == nullptr) continue;
    MOE_FUZZ_CHECK(tensor->shape() == spec.shape);
    MOE_FUZZ_CHECK(static_cast<int64_t>(tensor->data().size()) == spec.num_elements());
    MOE_FUZZ_CHECK(!options.filter || options.filter(spec.name));
  }
  return 0;
}
