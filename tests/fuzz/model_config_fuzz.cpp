// libFuzzer target: a checkpoint's config.json (model/config.hpp), read by `moe run`, `moe
// serve`, `moe node`, `moe plan` and the expert groups from a directory anyone may have written.
// Properties: parse_config returns a config or a model error with a text, whatever the bytes; a
// parsed config passes validate_config, writes back (to_json) to a config.json that parses to
// the same config, and can be planned with: its tensor list (what the loader, the initialiser
// and the memory model enumerate) and its parameter counts are computed without a crash.
// The first byte decides whether unknown keys are accepted (both modes are used).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <nlohmann/json.hpp>

#include "model/config.hpp"
#include "model/weights.hpp"
#include "tests/fuzz/fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  moe::model::config_parse_options options;
  options.allow_unknown_keys = (data[0] & 1) != 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  auto config = moe::model::parse_config(text, options);
  if (!config) {
    moe::fuzz::check_rejection(config.error(), "model");
    return 0;
  }
  MOE_FUZZ_CHECK(static_cast<bool>(moe::model::validate_config(*config)));
  const nlohmann::json written = moe::model::to_json(*config);
  auto again = moe::model::parse_config(std::string_view(written.dump()));
  MOE_FUZZ_CHECK(static_cast<bool>(again));
  MOE_FUZZ_CHECK(moe::model::to_json(*again) == written);
  if (moe::model::rope_kernel_params(*config)) (void)moe::model::attention_softmax_scale(*config);
  const auto weights = moe::model::expected_weights(*config);
  MOE_FUZZ_CHECK(!weights.empty());
  MOE_FUZZ_CHECK(moe::model::count_parameters(*config) >= moe::model::count_active_parameters(*config));
  return 0;
}
