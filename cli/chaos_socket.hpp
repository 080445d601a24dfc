// Plain TCP sockets for `moe chaos proxy` and `moe chaos garbage`: an owned file descriptor,
// HOST:PORT parsing, listen and connect with a timeout. Blocking POSIX sockets on purpose: the
// chaos tools must not share an event loop (kj, CAF) with what they attack.
//
// Ownership: unique_fd closes its descriptor. Thread safety: plain functions; a unique_fd is used
// by one thread at a time (shutdown() from another thread is fine: that is how the proxy stops).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

#include "base/error.hpp"

namespace moe::cli {

class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

struct host_port {
  std::string host;
  uint16_t port = 0;
  [[nodiscard]] std::string to_string() const;
};

/// "HOST:PORT" or "[V6]:PORT"; port 0 is allowed only when `allow_zero` (a listen address).
[[nodiscard]] caf::expected<host_port> parse_host_port(const std::string& text, bool allow_zero);

/// A listening TCP socket (SO_REUSEADDR) on `at`; port 0 takes an ephemeral one.
[[nodiscard]] caf::expected<unique_fd> listen_tcp(const host_port& at);

/// The local port a socket is bound to.
[[nodiscard]] uint16_t local_port(int fd);

/// Connects within `timeout` (TCP_NODELAY set: small frames leave at once).
[[nodiscard]] caf::expected<unique_fd> connect_tcp(const host_port& to, std::chrono::milliseconds timeout);

/// Writes all of `data`; false when the peer is gone (EPIPE, ECONNRESET), never SIGPIPE.
[[nodiscard]] bool send_all(int fd, const void* data, size_t size);

}  // namespace moe::cli
