// RAII owners of UCX (ucp) handles and the tag-matched transfers the data plane is built from.
//
// Ownership and lifetime: a context outlives its workers; a worker outlives its endpoints,
// listener and requests (each keeps a non-owning pointer to its worker to progress it while
// closing). All types are move-only. Thread safety: a worker is created in single-thread mode
// and every object tied to it must be used from one thread at a time.
// Transfers are non-blocking: they return a `request` that completes as the workers involved are
// progressed; wait() progresses the given workers until it does.
#pragma once

#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "base/error.hpp"

namespace moe::runtime::ucx {

enum class ucx_errc : uint8_t {
  unavailable = 1,    ///< Permanent: UCX could not initialise (no usable transport).
  connect_failed,     ///< Transient: the peer did not accept; retry with backoff.
  transfer_failed,    ///< Transient: the transfer broke off (peer gone, message truncated).
  timed_out,          ///< Transient: no completion within the caller's bound.
};

[[nodiscard]] caf::error make_error(ucx_errc code, std::string text);

/// The loaded library's version, e.g. "1.13.1".
[[nodiscard]] std::string version_string();

struct context_deleter {
  void operator()(ucp_context_h c) const noexcept { ucp_cleanup(c); }
};
struct worker_deleter {
  void operator()(ucp_worker_h w) const noexcept { ucp_worker_destroy(w); }
};
struct listener_deleter {
  void operator()(ucp_listener_h l) const noexcept { ucp_listener_destroy(l); }
};

class context {
 public:
  /// Reads UCX_* environment variables (UCX_TLS, ...) as UCX itself does.
  [[nodiscard]] static caf::expected<context> create();
  [[nodiscard]] ucp_context_h get() const noexcept { return ctx_.get(); }

 private:
  std::unique_ptr<std::remove_pointer_t<ucp_context_h>, context_deleter> ctx_;
};

class worker {
 public:
  [[nodiscard]] static caf::expected<worker> create(const context& ctx);
  [[nodiscard]] ucp_worker_h get() const noexcept { return worker_.get(); }
  /// Drives pending communication; returns whether anything happened.
  bool progress() const noexcept { return ucp_worker_progress(get()) != 0; }

 private:
  std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, worker_deleter> worker_;
};

/// One outstanding transfer. Destroying an unfinished request cancels it.
class request {
 public:
  request() = default;  ///< An already completed request.
  request(request&& other) noexcept;
  request& operator=(request&& other) noexcept;
  request(const request&) = delete;
  request& operator=(const request&) = delete;
  ~request();

  [[nodiscard]] bool done() const noexcept;
  /// The outcome once done(): empty on success.
  [[nodiscard]] caf::error result() const;
  /// Progresses `workers` until done or `max_spins` rounds pass (0: unbounded).
  caf::error wait(std::initializer_list<const worker*> workers, uint64_t max_spins = 0);

 private:
  friend class endpoint;
  friend caf::expected<request> tag_recv(const worker&, std::span<std::byte>, ucp_tag_t,
                                         ucp_tag_t);
  request(void* handle, const worker* w) : handle_(handle), worker_(w) {}
  void release() noexcept;

  void* handle_ = nullptr;  // ucs_status_ptr_t of an in-flight operation, or null
  const worker* worker_ = nullptr;
};

class endpoint {
 public:
  endpoint() = default;
  endpoint(endpoint&& other) noexcept;
  endpoint& operator=(endpoint&& other) noexcept;
  endpoint(const endpoint&) = delete;
  endpoint& operator=(const endpoint&) = delete;
  ~endpoint();  ///< Flushes and closes, progressing the worker (forces after a bound).

  /// Client side of the client-server mode: connects to a listener at host:port.
  [[nodiscard]] static caf::expected<endpoint> connect(const worker& w, const std::string& host,
                                                       uint16_t port);
  /// Server side: accepts a connection request handed over by a listener.
  [[nodiscard]] static caf::expected<endpoint> accept(const worker& w, ucp_conn_request_h req);

  [[nodiscard]] ucp_ep_h get() const noexcept { return ep_; }

  /// Sends `data` with `tag`; `data` must stay valid until the request is done.
  [[nodiscard]] caf::expected<request> tag_send(std::span<const std::byte> data, ucp_tag_t tag);

 private:
  void close() noexcept;
  ucp_ep_h ep_ = nullptr;
  const worker* worker_ = nullptr;
};

/// Receives into `buffer` the next message whose tag matches `tag` under `tag_mask`.
[[nodiscard]] caf::expected<request> tag_recv(const worker& w, std::span<std::byte> buffer,
                                              ucp_tag_t tag, ucp_tag_t tag_mask = ~ucp_tag_t{0});

/// Accepts connections on host:port (port 0: an ephemeral port, see port()).
/// Connection requests queue up until take_request() hands them to endpoint::accept.
class listener {
 public:
  [[nodiscard]] static caf::expected<std::unique_ptr<listener>> listen(const worker& w,
                                                                       const std::string& host,
                                                                       uint16_t port);
  [[nodiscard]] uint16_t port() const noexcept { return port_; }
  /// The oldest pending connection request, or null when none has arrived.
  [[nodiscard]] ucp_conn_request_h take_request() noexcept;

 private:
  static void on_connection(ucp_conn_request_h req, void* self) noexcept;
  std::unique_ptr<std::remove_pointer_t<ucp_listener_h>, listener_deleter> listener_;
  std::deque<ucp_conn_request_h> pending_;
  uint16_t port_ = 0;
};

}  // namespace moe::runtime::ucx

MOE_ERROR_ENUM(moe::runtime::ucx::ucx_errc, "ucx")
