#include "actors/node_agent.hpp"

#include <caf/all.hpp>
#include <prometheus/counter.h>

#include <chrono>
#include <set>
#include <spdlog/spdlog.h>

#include "actors/attention.hpp"
#include "actors/cluster_messages.hpp"
#include "actors/detached_work.hpp"
#include "actors/expert_group.hpp"
#include "actors/router.hpp"
#include "actors/weights_loading.hpp"
#include "model/config.hpp"
#include "model/model_errc.hpp"
#include "runtime/control_plane.hpp"

namespace moe::actors {

namespace {

struct node_agent_state {
  node_agent_options options;
  std::optional<model::model_config> config;
  std::vector<caf::actor> owned;  // what this agent spawned (linked while it runs)
  caf::actor owner;               // the coordinator of the open session, if any
  uint64_t generation = 0;        // bumped whenever the agent drops its actors: weights
                                  // loaded before that are not spawned after it
  static inline const char* name = "node_agent";
};

using pointer = node_agent_actor::stateful_pointer<node_agent_state>;

// The agent owns its actors: linked, they end with it.
void own(pointer self, caf::actor a) {
  self->link_to(a);
  self->state.owned.push_back(std::move(a));
}

// Ends the actors spawned so far (a session closed, or its coordinator is gone).
void drop_actors(pointer self) {
  ++self->state.generation;
  for (auto& a : self->state.owned) {
    self->unlink_from(a);
    self->send_exit(a, caf::exit_reason::user_shutdown);
  }
  self->state.owned.clear();
}

caf::result<caf::atom_value> open_session(pointer self, cluster_session& s) {
  auto& st = self->state;
  if (!s.owner) return make_error(node_errc::bad_request, "a session needs its coordinator's handle");
  if (st.owner && st.owner != s.owner)
    return make_error(node_errc::bad_request,
                      "node " + st.options.node + " already serves another coordinator (" +
                          to_string(st.owner.node()) + ")");
  if (!st.owner) {
    // A new session starts clean: nothing of an earlier coordinator survives into it.
    drop_actors(self);
    st.owner = s.owner;
    self->monitor(st.owner);
    spdlog::info("node {}: session opened by {}", st.options.node, to_string(st.owner.node()));
  }
  if (!s.model_dir.empty() && std::filesystem::exists(std::filesystem::path(s.model_dir) / "config.json") &&
      st.options.model_dir != s.model_dir) {
    st.options.model_dir = s.model_dir;
    st.config.reset();
  }
  if (s.load_window_steps > 0) st.options.load_window_steps = s.load_window_steps;
  if (s.cache_num_blocks > 0) {
    st.options.cache.block_size = s.cache_block_size;
    st.options.cache.num_blocks = s.cache_num_blocks;
  }
  for (const auto& p : s.peers) {
    if (p.node == self->node()) continue;
    if (!st.options.transport)
      return make_error(node_errc::bad_request, "node " + st.options.node + " has no data plane");
    st.options.transport.exchange->add_peer(p.node, p.address);
    // CAF relays messages to a node it knows only through the coordinator; a connection of our
    // own makes router <-> expert group messages direct. Best effort: the relay still works.
    // One side of each pair connects (BASP connections carry both directions).
    if (p.control_port != 0 && self->node() < p.node) {
      const std::string where = p.control_host + ":" + std::to_string(p.control_port);
      self->request(runtime::control_plane_handle(self->system()), std::chrono::seconds(5), caf::connect_atom::value,
                    p.control_host, p.control_port)
          .then([](const caf::node_id&, caf::strong_actor_ptr&, const std::set<std::string>&) {},
                [self, where](caf::error& e) {
                  spdlog::warn("node {}: no direct control connection to {} (messages go through the coordinator): {}",
                               self->state.options.node, where, runtime::render_connect_error(self->system(), e));
                });
    }
  }
  return caf::atom("ok");
}

void close_session(pointer self, const char* why) {
  auto& st = self->state;
  if (!st.owner) return;
  spdlog::info("node {}: session of {} closed ({}): dropping {} actors", st.options.node,
               to_string(st.owner.node()), why, st.owned.size());
  self->demonitor(st.owner);
  st.owner = nullptr;
  drop_actors(self);
}

caf::expected<const model::model_config*> model_config_of(node_agent_state& st) {
  if (!st.config) {
    auto c = model::load_config(st.options.model_dir);
    if (!c) return c.error();
    st.config = std::move(*c);
  }
  return &*st.config;
}

// Reading a node's part of a checkpoint takes minutes for a large model. On the agent's own
// thread it would hold up heartbeats (the membership would call a loading node down after
// failure_timeout_ms) and a coordinator's close_session; a detached worker reads it instead.
// Its weights come back to the agent, which spawns and owns the actors, unless the session
// that asked has closed meanwhile.
template <class Loaded, class Spawn, class Handles>
void load_then_spawn(pointer self, std::function<Loaded()> load, Spawn spawn,
                     caf::typed_response_promise<Handles> rp) {
  auto loaded = std::make_shared<std::optional<Loaded>>();
  run_detached(
      self,
      [loaded, load = std::move(load), before = self->state.options.before_loading] {
        if (before) before();
        *loaded = load();
      },
      [self, loaded, spawn, rp,
       generation = self->state.generation](caf::error err) mutable -> void {
        auto& st = self->state;
        if (!err && generation != st.generation)
          err = make_error(node_errc::bad_request,
                           "node " + st.options.node +
                               ": its session closed while the weights of the actors it "
                               "asked for loaded");
        if (err) {
          rp.deliver(std::move(err));
          return;
        }
        auto handles = spawn(std::move(**loaded));
        if (handles)
          rp.deliver(std::move(*handles));
        else
          rp.deliver(std::move(handles.error()));
      });
}

caf::result<group_handles> spawn_groups(pointer self, const scheduler::placement& p) {
  auto& st = self->state;
  auto cfg = model_config_of(st);
  if (!cfg) return cfg.error();
  std::vector<expert_group_options> local;
  for (const auto& g : p.expert_groups) {
    if (g.device.node != st.options.node) continue;
    expert_group_options o;
    o.group = g.group;
    o.experts = g.experts;
    o.holds_shared_experts = g.holds_shared_experts;
    o.metrics = st.options.metrics;
    o.transport = st.options.transport;
    o.placement_version = p.version;
    o.checkpoint_dir = st.options.model_dir;
    local.push_back(std::move(o));
  }
  if (local.empty()) return group_handles{};
  using parts = std::vector<caf::expected<model::checkpoint>>;
  auto rp = self->make_response_promise<group_handles>();
  load_then_spawn<parts>(
      self,
      [local, dir = st.options.model_dir, config = **cfg] {
        parts out;
        for (const auto& o : local)
          out.push_back(load_weights_part(
              dir, config, [&o](std::string_view n) { return expert_group_needs(o, n); }));
        return out;
      },
      [self, local](parts weights) -> caf::expected<group_handles> {
        group_handles out;
        for (size_t i = 0; i < local.size(); ++i) {
          if (!weights[i]) return weights[i].error();
          auto actor = spawn_expert_group(self->system(), std::move(*weights[i]), local[i]);
          if (!actor) return actor.error();
          own(self, caf::actor_cast<caf::actor>(*actor));
          out.groups.push_back(local[i].group);
          out.handles.push_back(*actor);
        }
        return out;
      },
      rp);
  return rp;
}

caf::result<shard_handles> spawn_shards(pointer self, const scheduler::placement& p,
                                        const group_handles& all_groups) {
  auto& st = self->state;
  auto cfg = model_config_of(st);
  if (!cfg) return cfg.error();
  std::vector<expert_group_route> routes;
  for (const auto& g : p.expert_groups) {
    auto it = std::find(all_groups.groups.begin(), all_groups.groups.end(), g.group);
    if (it == all_groups.groups.end())
      return make_error(model::model_errc::bad_input,
                        "node " + st.options.node + ": no handle for expert group " +
                            std::to_string(g.group));
    routes.push_back({all_groups.handles[static_cast<size_t>(it - all_groups.groups.begin())],
                      g.experts, g.holds_shared_experts});
  }
  std::vector<int32_t> local;
  for (const auto& a : p.attention)
    if (a.device.node == st.options.node) local.push_back(a.shard);
  if (local.empty()) return shard_handles{};
  // Every shard of the node shares one copy of the gate and attention weights.
  struct shared_weights {
    caf::expected<std::shared_ptr<const model::checkpoint>> gate, attention;
  };
  auto rp = self->make_response_promise<shard_handles>();
  load_then_spawn<shared_weights>(
      self,
      [dir = st.options.model_dir, config = **cfg] {
        return shared_weights{load_weights(dir, config, router_needs),
                              load_weights(dir, config, attention_needs)};
      },
      [self, local, routes, version = p.version](shared_weights w) -> caf::expected<shard_handles> {
        auto& st = self->state;
        if (!w.gate) return w.gate.error();
        if (!w.attention) return w.attention.error();
        shard_handles out;
        for (const int32_t shard : local) {
          router_options ro;
          ro.shard = shard;
          ro.placement_version = version;
          ro.groups = routes;
          ro.metrics = st.options.metrics;
          ro.transport = st.options.transport;
          ro.load_window_steps = st.options.load_window_steps;
          auto router = spawn_router(self->system(), *w.gate, ro);
          if (!router) return router.error();
          own(self, caf::actor_cast<caf::actor>(*router));
          attention_options ao;
          ao.shard = shard;
          ao.cache = st.options.cache;
          ao.metrics = st.options.metrics;
          ao.transport = st.options.transport;
          auto handle = spawn_attention(self->system(), *w.attention, *router, ao);
          if (!handle) return handle.error();
          own(self, caf::actor_cast<caf::actor>(*handle));
          out.shards.push_back(shard);
          out.handles.push_back(*handle);
          out.routers.push_back(*router);
        }
        return out;
      },
      rp);
  return rp;
}

}  // namespace

node_agent_actor spawn_node_agent(caf::actor_system& sys, node_agent_options options) {
  auto impl = [](pointer self, node_agent_options opts) -> node_agent_actor::behavior_type {
    self->state.options = std::move(opts);
    self->set_down_handler([self](caf::down_msg& dm) {
      if (self->state.owner && dm.source == self->state.owner.address())
        close_session(self, "its coordinator is gone");
    });
    return {
        [self](spawn_groups_atom, const scheduler::placement& p) { return spawn_groups(self, p); },
        [self](spawn_shards_atom, const scheduler::placement& p, const group_handles& g) {
          return spawn_shards(self, p, g);
        },
        [self](open_session_atom, cluster_session& s) { return open_session(self, s); },
        [self](close_session_atom) {
          close_session(self, "closed by its coordinator");
          return caf::atom("ok");
        },
        [self](runtime::heartbeat_atom, runtime::node_heartbeat hb) {
          hb.node = self->state.options.node;
          hb.sent_unix_ms = static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count());
          if (self->state.options.heartbeats_answered) self->state.options.heartbeats_answered->Increment();
          return hb;
        },
    };
  };
  // A thread of its own: the actors it spawns compute on CAF's worker pool (a CPU expert group's
  // forward can hold a worker for seconds), and a heartbeat queued behind them would get a live
  // node called down.
  return sys.spawn<caf::detached>(impl, std::move(options));
}

}  // namespace moe::actors
