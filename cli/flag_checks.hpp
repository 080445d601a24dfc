// Checks of numeric flags whose refusals read plainly: "--top-p: 0 is not a number in (0, 1]".
// CLI11's own checks (NonNegativeNumber, Range) print their bounds with %f, so a user who passed
// --max-new-tokens -1 read "not in range 0.000000 to 17976931348623157..." (309 digits).
// Thread safety: the validators are pure functions of the flag's text.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <limits>

namespace moe::cli {

/// A whole number in [low, high], written in decimal ("1.5", "abc" and "-1" for low 0 are refused).
[[nodiscard]] CLI::Validator whole_number(int64_t low,
                                          int64_t high = std::numeric_limits<int64_t>::max());

/// A seed: a whole number in [0, 2^64 - 1] (CLI11 alone read "-1" as 2^64 - 1).
[[nodiscard]] CLI::Validator seed_number();

/// A finite number in [low, high], or in (low, high] with `low_open` (NaN and infinities are
/// refused; high may be infinity: no upper bound).
[[nodiscard]] CLI::Validator real_number(double low, double high, bool low_open = false);

/// A timeout in seconds: a number in (0, 1e6] (about 11 days: far past any wait, and its
/// milliseconds fit an int64 where a larger one would overflow the conversion).
[[nodiscard]] inline CLI::Validator timeout_seconds() {
  return real_number(0.0, 1e6, /*low_open=*/true);
}

}  // namespace moe::cli
