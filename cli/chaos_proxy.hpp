// `moe chaos proxy`: a TCP relay between clients and a server (the job API, a node's control
// port) that injects faults into live streams: flips random bits (seeded, so a run repeats),
// cuts each connection after a number of bytes, and delays traffic.
//
// Corruption is decided per byte position of each direction of each connection (the k-th
// accepted connection's RNG is seeded from the seed, k and the direction), so the same bytes in
// the same order get the same flips however the kernel chunks them. Delay holds each chunk for
// `delay_ms` after it was read (latency, not a bandwidth cap).
//
// Ownership and threads: start() spawns an accept thread and one thread per connection; stop()
// (or the destructor) wakes them all, closes every socket and joins them. The log callback is
// called from those threads, one call at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "base/error.hpp"
#include "cli/chaos_socket.hpp"

namespace moe::cli {

enum class proxy_direction : uint8_t { both, to_server, to_client };

struct proxy_options {
  host_port listen;   ///< Port 0: ephemeral (see chaos_proxy::port()).
  host_port target;
  double corrupt_rate = 0;  ///< Probability per byte of flipping one of its bits, in [0, 1].
  proxy_direction corrupt_direction = proxy_direction::both;
  std::optional<uint64_t> drop_after_bytes;  ///< Per connection, both directions together.
  uint32_t delay_ms = 0;
  uint64_t seed = 1;
};

/// Whether a byte stream's bytes are flipped, decided by position (see the header comment).
/// Exposed for tests. Thread safety: one owner.
class bit_flipper {
 public:
  bit_flipper(double rate, uint64_t seed);
  /// Flips bits in `data` (the next `size` bytes of the stream); answers how many were flipped.
  size_t apply(char* data, size_t size);

 private:
  uint64_t next_skip();
  double rate_;
  uint64_t state_;
  uint64_t until_next_;  ///< Bytes to pass before the next flip.
};

class chaos_proxy {
 public:
  using log_function = std::function<void(const std::string&)>;

  [[nodiscard]] static caf::expected<std::unique_ptr<chaos_proxy>> start(const proxy_options& o, log_function log);
  ~chaos_proxy();
  chaos_proxy(const chaos_proxy&) = delete;
  chaos_proxy& operator=(const chaos_proxy&) = delete;

  [[nodiscard]] uint16_t port() const noexcept;
  /// Stops accepting, cuts every connection, joins every thread. Idempotent.
  void stop();

 private:
  struct impl;
  explicit chaos_proxy(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace moe::cli
