// Token-id lists given on the command line ("5,17,42"), parsed strictly. CLI11 would turn ""
// into [0] and drop empty items, so `moe run` and `moe submit` take these flags as strings
// and parse them here.
// Thread safety: pure function.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace moe::cli {

/// "5,17,42" -> {5, 17, 42}. Every item must be a decimal integer in [0, INT32_MAX]; an empty
/// text or an empty item is an error (model_errc::bad_input) naming `flag` and the item.
[[nodiscard]] caf::expected<std::vector<int32_t>> parse_token_ids(std::string_view text,
                                                                  std::string_view flag);

/// The generation flags `moe run` and `moe submit` share, with the same names, checks and help.
struct generation_flags {
  std::string prompt_ids;  ///< Parsed by parse_token_ids, not CLI11.
  int64_t max_new_tokens = 16;
  std::optional<float> temperature;  ///< absent: greedy (unless --top-k/--top-p ask to sample)
  float top_p = 1.0f;
  int64_t top_k = 0;
  uint64_t seed = 0;
  std::string stop_ids;  ///< Parsed by parse_token_ids; empty: none.
};

void add_generation_flags(CLI::App& cmd, generation_flags& flags);

}  // namespace moe::cli
