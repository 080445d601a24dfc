#include "monitoring/metrics_server.hpp"

#include <httplib.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace moe::monitoring {

caf::error make_error(monitoring_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("monitoring"),
                    caf::make_message(std::move(text))};
}

caf::expected<std::unique_ptr<metrics_server>> metrics_server::start(
    std::shared_ptr<prometheus::Registry> registry, const std::string& host, uint16_t port) {
  auto out = std::unique_ptr<metrics_server>(new metrics_server());
  out->registry_ = std::move(registry);
  out->server_ = std::make_unique<httplib::Server>();
  out->host_ = host;
  // httplib's default sets SO_REUSEPORT, which would let a second process silently share a
  // metrics port and answer half the scrapes. Keep SO_REUSEADDR only (fast restarts).
  out->server_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  auto* reg = out->registry_.get();
  out->server_->Get("/metrics", [reg](const httplib::Request&, httplib::Response& res) {
    res.set_content(prometheus::TextSerializer().Serialize(reg->Collect()),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  int bound = port == 0 ? out->server_->bind_to_any_port(host) :
                          (out->server_->bind_to_port(host, port) ? port : -1);
  if (bound <= 0) {
    return make_error(monitoring_errc::bind_failed,
                      "metrics endpoint: cannot bind " + host + ":" + std::to_string(port));
  }
  out->port_ = static_cast<uint16_t>(bound);
  auto* server = out->server_.get();
  auto* finished = &out->finished_;
  out->thread_ = std::thread([server, finished] {
    server->listen_after_bind();
    finished->store(true);
  });
  // stop() only reaches a server whose accept loop runs: wait for it (or for its failure).
  while (!server->is_running() && !finished->load()) std::this_thread::yield();
  return out;
}

metrics_server::~metrics_server() { stop(); }

std::string metrics_server::url() const {
  return "http://" + host_ + ":" + std::to_string(port_) + "/metrics";
}

void metrics_server::stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace moe::monitoring
