// Encoding and validated decoding of tensor frame headers (protocol/tensor_frame.capnp).
//
// Callers work with the plain struct below and never see Cap'n Proto types, so the data plane
// and the actors need not include generated headers. decode_frame_header never throws: every
// Cap'n Proto exception is turned into a protocol_errc naming what was wrong.
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/error.hpp"
#include "kernels/dtype.hpp"

namespace moe::protocol {

enum class frame_kind : uint8_t { activations, expert_output, kv_block, expert_weights, gradients, parameters };

struct tensor_frame_header {
  uint16_t version = 0;  ///< Filled by the encoder; checked by the decoder.
  frame_kind kind = frame_kind::activations;
  kernels::dtype dt = kernels::dtype::f32;
  std::vector<uint64_t> shape;
  uint32_t layer = 0;
  uint64_t step = 0;
  uint32_t placement_version = 0;
  std::vector<uint32_t> token_indices;
  std::vector<uint32_t> expert_indices;
  uint64_t transfer_tag = 0;
  uint64_t byte_length = 0;  ///< Must equal product(shape) * dtype_bytes(dt).
  uint64_t offset = 0;
  std::vector<std::byte> inline_payload;  ///< Empty, or exactly byte_length bytes.
};

/// The only version this build speaks.
[[nodiscard]] uint16_t tensor_frame_version() noexcept;

/// Serialises `h` (version set to tensor_frame_version()) as a flat Cap'n Proto message.
[[nodiscard]] std::vector<std::byte> encode_frame_header(const tensor_frame_header& h);

/// Limits a decoder enforces before trusting a frame from the network.
struct frame_limits {
  size_t max_message_bytes = 64ull << 20;
  size_t max_rank = 8;
  size_t max_indices = 1u << 24;
};

/// Parses and validates one message. `bytes` need not be word-aligned.
[[nodiscard]] caf::expected<tensor_frame_header> decode_frame_header(
    std::span<const std::byte> bytes, const frame_limits& limits = {});

}  // namespace moe::protocol
