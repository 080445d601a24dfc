#include "actors/node_process.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <utility>
#include <vector>

#include "actors/serving_cluster.hpp"
#include "base/constant_time.hpp"
#include "monitoring/metrics_server.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/control_plane.hpp"

namespace moe::actors {

/// The node process's own metrics (the agent's actors add theirs to the same registry).
struct node_metrics {
  explicit node_metrics(prometheus::Registry& r)
      : up(prometheus::BuildGauge().Name("moe_node_up").Help("1 while the node process serves").Register(r).Add({})),
        start_time_seconds(prometheus::BuildGauge()
                               .Name("moe_node_start_time_seconds")
                               .Help("Unix time the node process started")
                               .Register(r)
                               .Add({})),
        uptime_seconds(prometheus::BuildGauge()
                           .Name("moe_node_uptime_seconds")
                           .Help("Seconds since the node process started (refreshed every second)")
                           .Register(r)
                           .Add({})),
        refused_joins_total(prometheus::BuildCounter()
                                .Name("moe_node_refused_joins_total")
                                .Help("Requests refused for a wrong cluster name or secret")
                                .Register(r)
                                .Add({})),
        joins_total(prometheus::BuildCounter()
                        .Name("moe_node_joins_total")
                        .Help("Joins accepted (a coordinator got the node agent's handle)")
                        .Register(r)
                        .Add({})),
        heartbeats_answered_total(prometheus::BuildCounter()
                                      .Name("moe_node_heartbeats_answered_total")
                                      .Help("Heartbeats the node agent answered")
                                      .Register(r)
                                      .Add({})) {}
  prometheus::Gauge& up;
  prometheus::Gauge& start_time_seconds;
  prometheus::Gauge& uptime_seconds;
  prometheus::Counter& refused_joins_total;
  prometheus::Counter& joins_total;
  prometheus::Counter& heartbeats_answered_total;
};

namespace {

using clock_type = std::chrono::steady_clock;

// How long stop() waits for its detached actors to be released: each ends at its next message,
// and the BASP broker reads the down messages they leave it within milliseconds.
constexpr std::chrono::seconds release_timeout{10};


struct gatekeeper_state {
  std::string cluster;
  std::string secret;
  node_info info;
  node_agent_actor agent;
  std::shared_ptr<node_metrics> metrics;
  std::shared_ptr<std::function<void()>> on_shutdown;
  // Known only once publish() returns (port 0 asks for an ephemeral one); a peer that joins in
  // between reads 0 here, which is harmless: it connected to the port it already knows.
  std::shared_ptr<std::atomic<uint16_t>> bound_port;
  clock_type::time_point started;
  bool shutting_down = false;
  static inline const char* name = "node_gatekeeper";
};

using gatekeeper_pointer = node_gatekeeper_actor::stateful_pointer<gatekeeper_state>;

// Refuses unless both the cluster name and the secret match. The log names the peer and the
// cluster it claimed, never the secret it presented.
caf::error check(gatekeeper_pointer self, const node_credentials& c, const char* what) {
  auto& st = self->state;
  const bool secret_ok = constant_time_equal(c.secret, st.secret);
  if (secret_ok && c.cluster == st.cluster) return {};
  st.metrics->refused_joins_total.Increment();
  const std::string why = c.cluster != st.cluster ? "cluster name '" + c.cluster + "' is not '" + st.cluster + "'"
                                                  : "wrong cluster secret";
  spdlog::warn("node {}: refused {} from '{}': {}", st.info.name, what, c.peer, why);
  return make_error(node_errc::refused, "node " + st.info.name + " refused " + what + ": " + why);
}

node_gatekeeper_actor::behavior_type gatekeeper_impl(gatekeeper_pointer self, gatekeeper_state init) {
  self->state = std::move(init);
  return {
      [self](join_atom, const node_credentials& c) -> caf::result<node_join_reply> {
        if (auto err = check(self, c, "join")) return err;
        self->state.metrics->joins_total.Increment();
        spdlog::info("node {}: '{}' joined", self->state.info.name, c.peer);
        auto info = self->state.info;
        info.control_port = self->state.bound_port->load();
        return node_join_reply{std::move(info), self->state.agent};
      },
      [self](node_status_atom, const node_credentials& c) -> caf::result<node_status> {
        if (auto err = check(self, c, "status")) return err;
        auto& st = self->state;
        node_status s;
        s.info = st.info;
        s.info.control_port = st.bound_port->load();
        s.uptime_ms = static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(clock_type::now() - st.started).count());
        s.actors = {"node_gatekeeper", "node_agent"};
        s.heartbeats_answered = static_cast<uint64_t>(st.metrics->heartbeats_answered_total.Value());
        s.refused_joins = static_cast<uint64_t>(st.metrics->refused_joins_total.Value());
        return s;
      },
      [self](shutdown_atom, const node_credentials& c) -> caf::result<caf::atom_value> {
        if (auto err = check(self, c, "shutdown")) return err;
        auto& st = self->state;
        if (!st.shutting_down) {
          st.shutting_down = true;
          spdlog::info("node {}: shutdown requested by '{}'", st.info.name, c.peer);
          if (st.on_shutdown && *st.on_shutdown) (*st.on_shutdown)();
        }
        return caf::atom("ok");
      },
  };
}

}  // namespace

caf::expected<std::unique_ptr<node_process>> node_process::start(caf::actor_system& sys,
                                                                 const runtime::cluster_config& config,
                                                                 node_process_options options) {
  const auto index = runtime::find_node(config, options.node);
  if (!index) {
    std::string known;
    for (const auto& n : config.nodes) known += (known.empty() ? "" : ", ") + n.name;
    return make_error(node_errc::bad_request,
                      config.source + ": no node named '" + options.node + "' (nodes: " + known + ")");
  }
  const auto& node = config.nodes[*index];
  auto p = std::unique_ptr<node_process>(new node_process());
  p->sys_ = &sys;
  p->registry_ = std::make_shared<prometheus::Registry>();
  p->metrics_ = std::make_shared<node_metrics>(*p->registry_);
  const std::string host = options.bind_host.empty() ? node.host : options.bind_host;
  p->info_.name = node.name;
  p->info_.host = node.host;
  p->info_.gpus = node.gpus;
  p->info_.cpu_slots = node.cpu_slots;
  p->info_.pid = static_cast<int64_t>(::getpid());

  // The agent loads weights lazily, on its first spawn request: a node comes up (and can be
  // joined and watched) without touching the model. A preset is materialised by whoever
  // plans the cluster (resolve_model_dir); this only names where it will be.
  node_agent_options ao;
  ao.node = node.name;
  ao.model_dir = !config.model.path.empty()
                     ? config.model.path
                     : default_model_cache() / (config.model.preset + "-seed" +
                                                std::to_string(config.model.seed.value_or(0)));
  ao.metrics = p->registry_;
  ao.heartbeats_answered = &p->metrics_->heartbeats_answered_total;
  // The data plane: tensors to and from the other processes. Its port is ephemeral and reaches
  // peers through the join reply; a bind-all node advertises its configured host.
  runtime::data_plane_options dp;
  dp.host = host;
  if (host == "0.0.0.0") {
    auto advertised = runtime::resolve_ipv4(node.host);
    if (!advertised) return advertised.error();
    dp.advertise_host = *advertised;
  }
  dp.plane_id = static_cast<uint32_t>(*index + 1);
  dp.metrics = p->registry_;
  auto exchange = runtime::tensor_exchange::start(std::move(dp));
  if (!exchange) return exchange.error();
  p->transport_ = make_tensor_transport(sys, std::move(*exchange));
  p->info_.data_address = p->transport_.exchange->address();
  ao.transport = p->transport_;
  p->agent_ = spawn_node_agent(sys, std::move(ao));

  // Metrics first: its port goes into the metadata the gatekeeper hands out.
  auto metrics = monitoring::metrics_server::start(p->registry_, host, runtime::node_metrics_port(config, *index));
  if (!metrics) {
    caf::anon_send_exit(p->agent_, caf::exit_reason::user_shutdown);
    return metrics.error();
  }
  p->metrics_server_ = std::move(*metrics);
  p->info_.metrics_port = p->metrics_server_->port();

  gatekeeper_state gs;
  gs.cluster = config.name;
  gs.secret = config.secret;
  gs.info = p->info_;
  gs.agent = p->agent_;
  gs.metrics = p->metrics_;
  gs.bound_port = std::make_shared<std::atomic<uint16_t>>(0);
  gs.on_shutdown = std::make_shared<std::function<void()>>(std::move(options.on_shutdown));
  gs.started = clock_type::now();
  auto bound_port = gs.bound_port;
  // A thread of its own, like the agent's: a coordinator's join and an operator's status request
  // are answered while the node's actors hold every worker of the pool.
  p->gatekeeper_ = sys.spawn<caf::detached>(gatekeeper_impl, std::move(gs));
  const uint16_t want_port = runtime::node_control_port(config, *index);
  auto port = runtime::publish_control(sys, p->gatekeeper_, want_port, host, /*reuse_addr=*/true);
  if (!port) {
    p->stop();
    return make_error(node_errc::unreachable, "node " + node.name + ": cannot publish the control endpoint on " +
                                                  host + ":" + std::to_string(want_port) + ": " +
                                                  sys.render(port.error()));
  }
  p->info_.control_port = *port;
  bound_port->store(*port);

  p->metrics_->up.Set(1);
  const auto started_wall = std::chrono::system_clock::now();
  p->metrics_->start_time_seconds.Set(
      std::chrono::duration<double>(started_wall.time_since_epoch()).count());
  p->uptime_thread_ = std::thread([proc = p.get(), started = clock_type::now()] {
    std::unique_lock lock(proc->mutex_);
    while (!proc->stopping_) {
      proc->metrics_->uptime_seconds.Set(std::chrono::duration<double>(clock_type::now() - started).count());
      proc->wake_.wait_for(lock, std::chrono::seconds(1));
    }
  });
  spdlog::info("node {}: control endpoint {}:{}, metrics {}", node.name, host, p->info_.control_port,
               p->metrics_server_->url());
  return p;
}

node_process::~node_process() { stop(); }

std::string node_process::metrics_url() const { return metrics_server_ ? metrics_server_->url() : ""; }

void node_process::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (uptime_thread_.joinable()) uptime_thread_.join();
  if (metrics_) metrics_->up.Set(0);
  // The gatekeeper and the agent are detached actors that coordinators hold proxies of: awaited
  // below, once both have been told, while the middleman still runs (runtime::await_released
  // says why the process could not exit otherwise).
  std::vector<std::pair<const char*, caf::actor_addr>> ending;
  if (gatekeeper_) {
    if (info_.control_port != 0) (void)runtime::unpublish_control(*sys_, gatekeeper_, info_.control_port);
    ending.emplace_back("gatekeeper", gatekeeper_.address());
    caf::anon_send_exit(gatekeeper_, caf::exit_reason::user_shutdown);
    gatekeeper_ = nullptr;
  }
  // The agent's spawned actors are linked to it: they end with it.
  if (agent_) {
    ending.emplace_back("agent", agent_.address());
    caf::anon_send_exit(agent_, caf::exit_reason::user_shutdown);
    agent_ = nullptr;
  }
  end_tensor_fetcher(*sys_, transport_);
  const auto deadline = clock_type::now() + release_timeout;
  for (const auto& [what, addr] : ending) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now());
    if (!runtime::await_released(addr, std::max(left, std::chrono::milliseconds(0))))
      spdlog::warn("node {}: its {} is still referenced {} s after it was told to stop; the process may not exit",
                   info_.name, what, std::chrono::duration_cast<std::chrono::seconds>(release_timeout).count());
  }
  // Its other owners (the agent, the fetcher) are gone: the data plane stops here, before stop()
  // returns.
  transport_ = {};
  if (metrics_server_) metrics_server_->stop();
}

}  // namespace moe::actors
