// Encoding and validated decoding of expert load reports (protocol/load_report.capnp).
//
// A router measures, over a window of recent steps, how many tokens each logical expert was
// routed and how many rows each physical slot served; the scheduler decides replication and
// placement from these reports. As with the frame codec, callers see only the plain struct
// below, and decode_load_report never throws: every Cap'n Proto exception becomes a
// protocol_errc naming what was wrong.
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/error.hpp"

namespace moe::protocol {

struct expert_load_report {
  uint16_t version = 0;  ///< Filled by the encoder; checked by the decoder.
  uint32_t shard = 0;    ///< Which router (attention shard) measured this.
  uint32_t placement_version = 0;  ///< The placement the physical counts refer to.
  uint64_t first_step = 0;         ///< Oldest step in the window (inclusive).
  uint64_t last_step = 0;          ///< Newest step in the window (inclusive); >= first_step.
  uint32_t window_steps = 0;       ///< The window's length in steps: >= 1, > last - first.
  struct layer {
    uint32_t layer = 0;               ///< The model's layer id; unique within a report.
    std::vector<uint64_t> logical;    ///< Tokens per logical expert, indexed by expert id.
    std::vector<uint64_t> physical;   ///< Rows per physical slot, slots in placement order.
  };
  /// Every layer's `logical` has the same length, and every layer's `physical` too.
  std::vector<layer> layers;
};

/// The only version this build speaks.
[[nodiscard]] uint16_t load_report_version() noexcept;

/// Serialises `r` (version set to load_report_version()) as a flat Cap'n Proto message.
[[nodiscard]] std::vector<std::byte> encode_load_report(const expert_load_report& r);

/// Limits a decoder enforces before trusting a report from the network.
struct load_report_limits {
  size_t max_message_bytes = 64ull << 20;
  size_t max_layers = 1024;
  size_t max_experts_per_layer = 1u << 16;  ///< Length of each layer's `logical`.
  size_t max_slots_per_layer = 1u << 17;    ///< Length of each layer's `physical`.
};

/// Parses and validates one message. `bytes` need not be word-aligned.
[[nodiscard]] caf::expected<expert_load_report> decode_load_report(
    std::span<const std::byte> bytes, const load_report_limits& limits = {});

}  // namespace moe::protocol
