// What every libFuzzer target in tests/fuzz shares: the check that turns a broken property into a
// crash libFuzzer records (with the input that caused it), and the checks on a rejection.
//
// A decoder of untrusted bytes may do two things with an input: decode it, or return an error
// value whose text says what was wrong. Anything else (an exception escaping, an abort, an
// assertion, a sanitizer report, an allocation beyond -malloc_limit_mb) is a finding.
// Thread safety: the targets run one input at a time on one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include <caf/atom.hpp>
#include <caf/message.hpp>

#include "base/error.hpp"

/// Aborts with the failed property and its location: libFuzzer saves the input as a crash.
#define MOE_FUZZ_CHECK(cond)                                                                \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "%s:%d: fuzz property failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                         \
    }                                                                                       \
  } while (false)

namespace moe::fuzz {

inline std::span<const std::byte> as_bytes(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

/// A rejection must be an error of `category` ("protocol", "model", ...) made by make_error,
/// so that it carries a text saying what was wrong: a bare code is no help to an operator.
inline void check_rejection(const caf::error& err, const char* category) {
  MOE_FUZZ_CHECK(static_cast<bool>(err));
  MOE_FUZZ_CHECK(err.category() == caf::atom_from_string(caf::string_view(category, std::strlen(category))));
  const caf::message& context = err.context();
  MOE_FUZZ_CHECK(context.size() == 1 && context.match_element<std::string>(0));
  MOE_FUZZ_CHECK(!context.get_as<std::string>(0).empty());
}

}  // namespace moe::fuzz
