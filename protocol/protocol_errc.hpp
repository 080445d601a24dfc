// Error codes of the protocol component: decoding what arrived from another process.
#pragma once

#include <cstdint>
#include <string>

#include "base/error.hpp"

namespace moe::protocol {

enum class protocol_errc : uint8_t {
  truncated = 1,        ///< Permanent for this frame: fewer bytes than the message claims.
  malformed,            ///< Permanent for this frame: not a valid Cap'n Proto message.
  oversized,            ///< Permanent for this frame: larger than the decoder accepts.
  unsupported_version,  ///< Permanent: the peer speaks a protocol version we do not.
  out_of_range,         ///< Permanent for this frame: a value outside its valid range.
  inconsistent,         ///< Permanent for this frame: fields contradict each other.
};

[[nodiscard]] caf::error make_error(protocol_errc code, std::string text);

}  // namespace moe::protocol

MOE_ERROR_ENUM(moe::protocol::protocol_errc, "protocol")
