// `moe chaos garbage`: malformed Cap'n Proto frames sent to a server (the job API, whose RPC
// reads Cap'n Proto stream frames; or a node's control port, which speaks CAF's BASP and must
// survive bytes it does not expect), one connection per frame, and what the server did with each:
// closed the connection (at once, or only once we closed our side), aborted with a reason,
// answered an error, or nothing (a server that would hang on it).
//
// Frames, by kind (each kind is one or more variants, each sent on a connection of its own):
//   truncated      a segment table cut short; a segment shorter than the table says
//   oversized      a segment count far beyond the limit; a segment size far beyond the data
//   random         seeded random bytes
//   wrong-version  well-formed RPC: Bootstrap, then Gateway.login with an unknown API version,
//                  a Gateway method ordinal that does not exist, and an unknown interface id
//
// Thread safety: plain functions, blocking sockets.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "cli/chaos_socket.hpp"

namespace moe::cli {

enum class garbage_kind : uint8_t { truncated, oversized, random, wrong_version };

[[nodiscard]] const char* to_string(garbage_kind k) noexcept;
/// "truncated", "oversized", "random", "wrong-version", a comma-separated list of them, or "all".
[[nodiscard]] caf::expected<std::vector<garbage_kind>> parse_garbage_kinds(const std::string& text);

/// One frame to send: its name and bytes, and the RPC calls (question ids) it expects answers to.
struct garbage_frame {
  std::string variant;
  std::vector<char> bytes;
  std::vector<uint32_t> questions;  ///< Empty for frames no server can parse.
};

/// The variants of `kind`; `seed` makes the random ones repeat. `secret` goes into the login of
/// wrong-version (with the cluster's secret the server reaches its version check; with another
/// it answers unauthenticated first).
[[nodiscard]] std::vector<garbage_frame> make_garbage(garbage_kind kind, uint64_t seed, const std::string& secret);

struct garbage_outcome {
  std::string variant;
  size_t bytes_sent = 0;
  bool rejected = false;  ///< Closed, aborted or answered an error: what a robust server does.
  std::string what;       ///< For people: "closed by the server at once (2 ms); abort: ..."
};

/// Connects to `target`, sends `frame`, and waits up to `timeout` for the server's reaction
/// (then closes our sending side and waits as long again).
[[nodiscard]] garbage_outcome send_garbage(const host_port& target, const garbage_frame& frame,
                                           std::chrono::milliseconds timeout);

/// Whether the server still serves: a fresh connection gets a greeting (CAF's BASP handshake)
/// or, sent an RPC Bootstrap, answers it. `ok` false when neither happens within `timeout`.
struct probe_outcome {
  bool ok = false;
  std::string what;
};
[[nodiscard]] probe_outcome probe_server(const host_port& target, std::chrono::milliseconds timeout);

}  // namespace moe::cli
