#include "actors/cluster_membership.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>

#include <optional>

#include "runtime/control_plane.hpp"

namespace moe::actors {

namespace {

using clock_type = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr member_state all_states[] = {member_state::joining, member_state::up, member_state::suspect,
                                       member_state::down, member_state::refused};

struct membership_metrics {
  explicit membership_metrics(prometheus::Registry& r)
      : nodes(prometheus::BuildGauge()
                  .Name("moe_cluster_nodes")
                  .Help("Nodes of the cluster by membership state")
                  .Register(r)),
        failures(prometheus::BuildCounter()
                     .Name("moe_cluster_node_failures_total")
                     .Help("Nodes declared down, by cause (exit: the agent is gone; timeout: no heartbeat answered)")
                     .Register(r)),
        detection_seconds(prometheus::BuildHistogram()
                              .Name("moe_cluster_failure_detection_seconds")
                              .Help("From a node's last answered heartbeat to its being declared down")
                              .Register(r)
                              .Add({}, prometheus::Histogram::BucketBoundaries{0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5,
                                                                               10, 30})) {
    // Both causes exist from the start: the first failure is then a rise from 0, which rate()
    // and increase() (dashboards, alerts) can see.
    failures.Add({{"cause", "exit"}});
    failures.Add({{"cause", "timeout"}});
  }
  prometheus::Family<prometheus::Gauge>& nodes;
  prometheus::Family<prometheus::Counter>& failures;
  prometheus::Histogram& detection_seconds;
};

struct member {
  member_status status;
  node_agent_actor agent;
  bool join_in_flight = false;
  clock_type::time_point next_join;
  std::optional<clock_type::time_point> last_good;  ///< Last heartbeat answered (or the join).
  uint64_t sequence = 0;
  int join_failures = 0;
};

struct membership_state {
  cluster_membership_options options;
  std::vector<member> members;
  std::vector<caf::actor> listeners;
  std::unique_ptr<membership_metrics> metrics;
  milliseconds interval{500};
  milliseconds failure_timeout{3000};
  static inline const char* name = "cluster_membership";
};

using pointer = cluster_membership_actor::stateful_pointer<membership_state>;

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

void update_gauges(membership_state& st) {
  if (!st.metrics) return;
  for (auto s : all_states) {
    const auto n = std::count_if(st.members.begin(), st.members.end(),
                                 [s](const member& m) { return m.status.state == s; });
    st.metrics->nodes.Add({{"state", to_string(s)}}).Set(static_cast<double>(n));
  }
}

void transition(pointer self, member& m, member_state to, std::string reason) {
  auto& st = self->state;
  const member_state from = m.status.state;
  if (from == to) return;
  m.status.state = to;
  m.status.reason = reason;
  const auto level = to == member_state::up ? spdlog::level::info : spdlog::level::warn;
  spdlog::log(level, "cluster {}: node {} ({}:{}) {} -> {}{}{}", st.options.config.name, m.status.node,
              m.status.host, m.status.control_port, to_string(from), to_string(to),
              reason.empty() ? "" : ": ", reason);
  if (to == member_state::down && st.metrics) {
    const bool timeout = reason.find("heartbeat") != std::string::npos;
    st.metrics->failures.Add({{"cause", timeout ? "timeout" : "exit"}}).Increment();
    if (m.last_good) st.metrics->detection_seconds.Observe(seconds_since(*m.last_good));
  }
  if (to == member_state::down || to == member_state::refused) {
    if (m.agent) self->demonitor(m.agent.address());
    m.agent = nullptr;
    m.status.agent = nullptr;
    m.next_join = clock_type::now() + st.options.join_retry;
  }
  update_gauges(st);
  member_event ev{m.status.node, from, to, std::move(reason)};
  for (auto& l : st.listeners) caf::anon_send(l, ev);
}

void join_failed(pointer self, size_t i, const std::string& why) {
  auto& m = self->state.members[i];
  m.join_in_flight = false;
  m.next_join = clock_type::now() + self->state.options.join_retry;
  m.status.reason = why;
  // The first failure says why at info level; retries of a node that stays away would flood.
  if (m.join_failures++ == 0) {
    spdlog::info("cluster {}: node {} not joined yet: {}", self->state.options.config.name, m.status.node, why);
  } else {
    spdlog::debug("cluster {}: node {} still not joined: {}", self->state.options.config.name, m.status.node, why);
  }
}

void start_join(pointer self, size_t i) {
  auto& st = self->state;
  auto& m = st.members[i];
  m.join_in_flight = true;
  const std::string where = m.status.host + ":" + std::to_string(m.status.control_port);
  auto mm = runtime::control_plane_handle(self->system());
  self->request(mm, st.options.join_timeout, caf::connect_atom::value, m.status.host, m.status.control_port)
      .then(
          [self, i, where](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
            if (!ptr) {
              join_failed(self, i, "nothing published at " + where);
              return;
            }
            auto& st = self->state;
            auto gk = caf::actor_cast<node_gatekeeper_actor>(ptr);
            node_credentials creds{st.options.config.name, st.options.config.secret, st.options.peer_name};
            self->request(gk, st.options.join_timeout, join_atom::value, creds)
                .then(
                    [self, i](node_join_reply& r) {
                      auto& m = self->state.members[i];
                      m.join_in_flight = false;
                      m.join_failures = 0;
                      if (r.info.name != m.status.node) {
                        join_failed(self, i, "the node there is '" + r.info.name + "', not '" + m.status.node + "'");
                        return;
                      }
                      m.status.info = r.info;
                      m.agent = r.agent;
                      m.status.agent = r.agent;
                      m.last_good = clock_type::now();
                      self->monitor(m.agent);
                      transition(self, m, member_state::up, "joined (pid " + std::to_string(r.info.pid) + ")");
                    },
                    [self, i](caf::error& e) {
                      auto& m = self->state.members[i];
                      if (e.category() == caf::atom("node") &&
                          e.code() == static_cast<uint8_t>(node_errc::refused)) {
                        m.join_in_flight = false;
                        transition(self, m, member_state::refused, error_text(e));
                        return;
                      }
                      join_failed(self, i, "join: " + self->system().render(e));
                    });
          },
          [self, i, where](caf::error& e) {
            join_failed(self, i, "cannot connect to " + where + ": " + runtime::render_connect_error(self->system(), e));
          });
}

void send_heartbeat(pointer self, size_t i) {
  auto& m = self->state.members[i];
  runtime::node_heartbeat hb{self->state.options.peer_name, ++m.sequence, 0};
  auto agent = m.agent;
  self->request(agent, self->state.failure_timeout, runtime::heartbeat_atom::value, hb)
      .then(
          [self, i, agent](const runtime::node_heartbeat&) {
            auto& m = self->state.members[i];
            if (m.agent != agent) return;  // an answer from before a rejoin
            m.last_good = clock_type::now();
            if (m.status.state == member_state::suspect) transition(self, m, member_state::up, "heartbeat answered");
          },
          // Late and lost answers are judged by the tick against failure_timeout, in one place.
          [](caf::error&) {});
}

void tick(pointer self) {
  auto& st = self->state;
  const auto now = clock_type::now();
  for (size_t i = 0; i < st.members.size(); ++i) {
    auto& m = st.members[i];
    switch (m.status.state) {
      case member_state::up:
      case member_state::suspect: {
        const auto silent = std::chrono::duration_cast<milliseconds>(now - *m.last_good);
        if (silent >= st.failure_timeout) {
          transition(self, m, member_state::down,
                     "no heartbeat answered for " + std::to_string(silent.count()) + " ms (failure timeout " +
                         std::to_string(st.failure_timeout.count()) + " ms)");
          break;
        }
        if (m.status.state == member_state::up && silent > 2 * st.interval) {
          transition(self, m, member_state::suspect,
                     "last heartbeat answered " + std::to_string(silent.count()) + " ms ago");
        }
        send_heartbeat(self, i);
        break;
      }
      case member_state::joining:
      case member_state::down:
        if (!m.join_in_flight && now >= m.next_join) start_join(self, i);
        break;
      case member_state::refused: break;
    }
  }
  self->delayed_send(self, st.interval, membership_tick_atom::value);
}

void on_down(pointer self, const caf::down_msg& dm) {
  auto& st = self->state;
  auto l = std::find_if(st.listeners.begin(), st.listeners.end(),
                        [&](const caf::actor& a) { return a.address() == dm.source; });
  if (l != st.listeners.end()) {
    st.listeners.erase(l);
    return;
  }
  for (auto& m : st.members) {
    if (m.agent && m.agent.address() == dm.source) {
      transition(self, m, member_state::down, "node agent down: " + self->system().render(dm.reason));
      return;
    }
  }
}

}  // namespace

cluster_membership_actor spawn_cluster_membership(caf::actor_system& sys, cluster_membership_options options) {
  auto impl = [](pointer self, cluster_membership_options opts) -> cluster_membership_actor::behavior_type {
    auto& st = self->state;
    st.interval = milliseconds(opts.config.heartbeat_interval_ms);
    st.failure_timeout = milliseconds(opts.config.failure_timeout_ms);
    if (opts.metrics) st.metrics = std::make_unique<membership_metrics>(*opts.metrics);
    for (size_t i = 0; i < opts.config.nodes.size(); ++i) {
      member m;
      m.status.node = opts.config.nodes[i].name;
      m.status.host = opts.config.nodes[i].host;
      m.status.control_port = runtime::node_control_port(opts.config, i);
      st.members.push_back(std::move(m));
    }
    st.options = std::move(opts);
    update_gauges(st);
    self->set_down_handler([self](caf::down_msg& dm) { on_down(self, dm); });
    self->send(self, membership_tick_atom::value);
    return {
        [self](member_subscribe_atom, caf::actor listener) {
          if (!listener) return;
          self->monitor(listener);
          self->state.listeners.push_back(std::move(listener));
        },
        [self](members_atom) {
          member_list out;
          for (const auto& m : self->state.members) out.members.push_back(m.status);
          return out;
        },
        [self](membership_tick_atom) { tick(self); },
    };
  };
  // A thread of its own: on the shared pool, a pool held by long compute would hold the ticks too,
  // and a node that died meanwhile would be called down (and its requests failed over) only once
  // the pool frees.
  return sys.spawn<caf::detached>(impl, std::move(options));
}

}  // namespace moe::actors
