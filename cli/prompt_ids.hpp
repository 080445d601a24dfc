// Token-id lists given on the command line ("5,17,42"), parsed strictly. CLI11 would turn ""
// into [0] and drop empty items, so `moe run` and `moe submit` take these flags as strings
// and parse them here.
// Thread safety: pure function.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace moe::cli {

/// "5,17,42" -> {5, 17, 42}. Every item must be a decimal integer in [0, INT32_MAX]; an empty
/// text or an empty item is an error (model_errc::bad_input) naming `flag` and the item.
[[nodiscard]] caf::expected<std::vector<int32_t>> parse_token_ids(std::string_view text,
                                                                  std::string_view flag);

}  // namespace moe::cli
