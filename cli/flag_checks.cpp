#include "cli/flag_checks.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <string>

namespace moe::cli {

namespace {

enum class parsed : uint8_t { ok, out_of_range, malformed };

/// Whether the whole text is a T (from_chars: no leading '+' or spaces, "inf" and "nan" are
/// doubles), one past T's range, or neither.
template <class T>
parsed parse_all(const std::string& text, T& out) {
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, out);
  if (ptr != end || ec == std::errc::invalid_argument) return parsed::malformed;
  return ec == std::errc{} ? parsed::ok : parsed::out_of_range;
}

}  // namespace

CLI::Validator whole_number(int64_t low, int64_t high) {
  const std::string what = high == std::numeric_limits<int64_t>::max()
                               ? fmt::format("a whole number >= {}", low)
                               : fmt::format("a whole number in [{}, {}]", low, high);
  return CLI::Validator(
      [low, high, what](std::string& text) -> std::string {
        int64_t v = 0;
        switch (parse_all(text, v)) {
          case parsed::ok: return v >= low && v <= high ? std::string{} : text + " is not " + what;
          case parsed::out_of_range: return text + " is not " + what;
          case parsed::malformed: break;
        }
        return "'" + text + "' is not " + what;
      },
      what);
}

CLI::Validator seed_number() {
  const std::string what = fmt::format("a whole number in [0, {}]", std::numeric_limits<uint64_t>::max());
  return CLI::Validator(
      [what](std::string& text) -> std::string {
        uint64_t v = 0;
        switch (parse_all(text, v)) {
          case parsed::ok: return {};
          case parsed::out_of_range: return text + " is not " + what;
          case parsed::malformed: break;
        }
        // from_chars reads no sign into an unsigned: a negative number is a number all the same.
        int64_t negative = 0;
        if (parse_all(text, negative) == parsed::ok) return text + " is not " + what;
        return "'" + text + "' is not " + what;
      },
      what);
}

CLI::Validator real_number(double low, double high, bool low_open) {
  const std::string what =
      std::isinf(high) ? fmt::format("a finite number {} {}", low_open ? ">" : ">=", low)
                       : fmt::format("a number in {}{}, {}]", low_open ? "(" : "[", low, high);
  return CLI::Validator(
      [low, high, low_open, what](std::string& text) -> std::string {
        double v = 0.0;
        if (parse_all(text, v) == parsed::malformed) return "'" + text + "' is not " + what;
        const bool ok = std::isfinite(v) && (low_open ? v > low : v >= low) && v <= high;
        return ok ? std::string{} : text + " is not " + what;
      },
      what);
}

}  // namespace moe::cli
