// One node of a multi-process cluster, as `moe node` runs it: the node agent, a gatekeeper
// published on the node's control endpoint, and the process's /metrics endpoint.
//
// The gatekeeper is the only actor reachable from the network without a handle: it answers
// join (the node agent's handle and the node's metadata), status and shutdown, each only to a
// peer presenting the cluster's name and secret (compared in constant time). Refusals are
// logged without the secret and counted (moe_node_refused_joins_total).
//
// The gatekeeper and the agent are detached actors (a thread each): they answer while the node's
// actors hold every worker of CAF's pool with their compute.
//
// Lifecycle: start() brings the agent, the gatekeeper (published) and the metrics endpoint up;
// stop() unpublishes the gatekeeper, ends the agent (and the actors linked to it) and stops the
// metrics endpoint. A shutdown request calls options.on_shutdown from the gatekeeper's thread:
// it must only wake the owner (the `moe node` command raises SIGTERM at itself), never call
// stop().
// Thread safety: start/stop from one thread; accessors are safe after start.
#pragma once

#include <caf/fwd.hpp>

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "actors/cluster_messages.hpp"
#include "actors/tensor_transport.hpp"
#include "runtime/cluster_config.hpp"

namespace prometheus {
class Registry;
}
namespace moe::monitoring {
class metrics_server;
}

namespace moe::actors {

struct node_metrics;

struct node_process_options {
  std::string node;                  ///< Which of the config's nodes this process is.
  std::string bind_host;             ///< Empty: the node's host from the config.
  std::function<void()> on_shutdown;  ///< Called (once) when a peer asks the node to stop.
};

class node_process {
 public:
  [[nodiscard]] static caf::expected<std::unique_ptr<node_process>> start(
      caf::actor_system& sys, const runtime::cluster_config& config, node_process_options options);
  ~node_process();  ///< stop()
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  [[nodiscard]] const node_info& info() const noexcept { return info_; }
  [[nodiscard]] node_gatekeeper_actor gatekeeper() const noexcept { return gatekeeper_; }
  [[nodiscard]] node_agent_actor agent() const noexcept { return agent_; }
  [[nodiscard]] std::string metrics_url() const;

  /// Idempotent.
  void stop();

 private:
  node_process() = default;
  caf::actor_system* sys_ = nullptr;
  node_info info_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<node_metrics> metrics_;
  tensor_transport transport_;
  node_agent_actor agent_;
  node_gatekeeper_actor gatekeeper_;
  std::unique_ptr<monitoring::metrics_server> metrics_server_;
  // Refreshes moe_node_uptime_seconds between scrapes (the endpoint has no scrape hook).
  std::thread uptime_thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
};

}  // namespace moe::actors
