// What every decoder of a single flat Cap'n Proto message from the network does before and
// around reading its root, and the matching encoder's last step. Internal to protocol/.
// Thread safety: pure functions.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "protocol/protocol_errc.hpp"

namespace moe::protocol::detail {

/// The message's bytes as a flat array (what travels).
inline std::vector<std::byte> to_flat_bytes(::capnp::MessageBuilder& message) {
  auto words = ::capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  std::vector<std::byte> out(bytes.size());
  std::memcpy(out.data(), bytes.begin(), bytes.size());
  return out;
}

/// Checks the size (at most `max_bytes`, whole words), copies the bytes into word-aligned
/// storage (network buffers carry no alignment promise), and runs `decode(root reader)` under
/// reader limits; Cap'n Proto's exceptions become truncated or malformed. `what` ("tensor
/// frame", "load report") starts every message.
template <class Root, class Decode>
auto read_flat_message(std::span<const std::byte> bytes, size_t max_bytes, const char* what, Decode&& decode)
    -> decltype(decode(std::declval<typename Root::Reader>())) {
  if (bytes.size() > max_bytes) {
    return make_error(protocol_errc::oversized, std::string(what) + ": " + std::to_string(bytes.size()) +
                                                    " bytes exceed the limit of " + std::to_string(max_bytes));
  }
  if (bytes.size() < sizeof(::capnp::word) || bytes.size() % sizeof(::capnp::word) != 0) {
    return make_error(protocol_errc::truncated, std::string(what) + ": " + std::to_string(bytes.size()) +
                                                    " bytes is not a whole number of words");
  }
  kj::Array<::capnp::word> words = kj::heapArray<::capnp::word>(bytes.size() / sizeof(::capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  ::capnp::ReaderOptions options;
  options.traversalLimitInWords = max_bytes / sizeof(::capnp::word) + 1;
  options.nestingLimit = 16;
  decltype(decode(std::declval<typename Root::Reader>())) result =
      make_error(protocol_errc::malformed, std::string(what) + ": not decoded");
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&] {
                ::capnp::FlatArrayMessageReader reader(words.asPtr(), options);
                result = decode(reader.getRoot<Root>());
              })) {
    const std::string text = e->getDescription().cStr();
    const bool short_input = text.find("ended prematurely") != std::string::npos ||
                             text.find("truncated") != std::string::npos;
    return make_error(short_input ? protocol_errc::truncated : protocol_errc::malformed, std::string(what) + ": " + text);
  }
  return result;
}

}  // namespace moe::protocol::detail
