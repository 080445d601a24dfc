// Comparison of secrets whose running time does not depend on the secret's content.
// Header-only; pure function, safe from any thread.
#pragma once

#include <cstddef>
#include <string_view>

namespace moe {

/// True when `given` equals `expected`. The loop runs over `given` (the untrusted input), so
/// its duration reveals neither the content nor the length of `expected`. An empty `expected`
/// never matches (a missing secret must not admit everyone).
[[nodiscard]] inline bool constant_time_equal(std::string_view given,
                                              std::string_view expected) noexcept {
  if (expected.empty()) return false;
  // volatile keeps the compiler from turning the accumulation into an early exit.
  volatile unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < given.size(); ++i) {
    diff = diff | static_cast<unsigned char>(given[i] ^ expected[i % expected.size()]);
  }
  return diff == 0;
}

}  // namespace moe
