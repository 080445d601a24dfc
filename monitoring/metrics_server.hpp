// Serves a process's Prometheus registry as text on http://HOST:PORT/metrics.
//
// Why not prometheus-cpp's Exposer: Debian's civetweb gives its threads a 100 KiB stack, and
// with OpenBLAS and CUDA loaded glibc carves their thread-local storage out of it, so the first
// scrape crashes. cpp-httplib threads have normal stacks.
// Ownership: shares the registry (keeps it alive). Thread safety: start/stop from one thread;
// scrapes are served from the server's own threads, and prometheus-cpp's Collect is thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "base/error.hpp"

namespace prometheus {
class Registry;
}
namespace httplib {
class Server;
}

namespace moe::monitoring {

enum class monitoring_errc : uint8_t {
  bind_failed = 1,  ///< Transient if the port is busy; permanent if the address is invalid.
};

[[nodiscard]] caf::error make_error(monitoring_errc code, std::string text);

class metrics_server {
 public:
  /// Binds host:port (port 0: an ephemeral port) and starts serving. Fails if the bind fails.
  [[nodiscard]] static caf::expected<std::unique_ptr<metrics_server>> start(
      std::shared_ptr<prometheus::Registry> registry, const std::string& host, uint16_t port);

  ~metrics_server();  ///< stop()
  metrics_server(const metrics_server&) = delete;
  metrics_server& operator=(const metrics_server&) = delete;

  [[nodiscard]] uint16_t port() const noexcept { return port_; }
  [[nodiscard]] const std::string& host() const noexcept { return host_; }
  /// "http://127.0.0.1:9400/metrics"
  [[nodiscard]] std::string url() const;

  /// Refuses new scrapes, finishes the one in flight, joins the server thread. Idempotent.
  void stop();

 private:
  metrics_server() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> finished_{false};
  std::string host_;
  uint16_t port_ = 0;
};

}  // namespace moe::monitoring

MOE_ERROR_ENUM(moe::monitoring::monitoring_errc, "monitoring")
