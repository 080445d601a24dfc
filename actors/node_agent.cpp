#include "actors/node_agent.hpp"

#include <caf/all.hpp>
#include <prometheus/counter.h>

#include <chrono>

#include "actors/attention.hpp"
#include "actors/expert_group.hpp"
#include "actors/router.hpp"
#include "actors/weights_loading.hpp"
#include "model/config.hpp"
#include "model/model_errc.hpp"

namespace moe::actors {

namespace {

struct node_agent_state {
  node_agent_options options;
  std::optional<model::model_config> config;
  static inline const char* name = "node_agent";
};

using pointer = node_agent_actor::stateful_pointer<node_agent_state>;

caf::expected<const model::model_config*> model_config_of(node_agent_state& st) {
  if (!st.config) {
    auto c = model::load_config(st.options.model_dir);
    if (!c) return c.error();
    st.config = std::move(*c);
  }
  return &*st.config;
}

caf::result<group_handles> spawn_groups(pointer self, const scheduler::placement& p) {
  auto& st = self->state;
  auto cfg = model_config_of(st);
  if (!cfg) return cfg.error();
  group_handles out;
  for (const auto& g : p.expert_groups) {
    if (g.device.node != st.options.node) continue;
    expert_group_options o;
    o.group = g.group;
    o.experts = g.experts;
    o.holds_shared_experts = g.holds_shared_experts;
    o.metrics = st.options.metrics;
    auto weights = load_weights(st.options.model_dir, **cfg,
                                [&o](std::string_view n) { return expert_group_needs(o, n); });
    if (!weights) return weights.error();
    auto actor = spawn_expert_group(self->system(), *weights, o);
    if (!actor) return actor.error();
    self->link_to(*actor);  // the agent owns its actors: they end with it
    out.groups.push_back(g.group);
    out.handles.push_back(*actor);
  }
  return out;
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
  shard_handles out;
  std::shared_ptr<const model::checkpoint> gate_weights, attention_weights;
  for (const auto& a : p.attention) {
    if (a.device.node != st.options.node) continue;
    if (!gate_weights) {
      auto gw = load_weights(st.options.model_dir, **cfg, router_needs);
      if (!gw) return gw.error();
      auto aw = load_weights(st.options.model_dir, **cfg, attention_needs);
      if (!aw) return aw.error();
      gate_weights = *gw;
      attention_weights = *aw;
    }
    router_options ro;
    ro.shard = a.shard;
    ro.placement_version = p.version;
    ro.groups = routes;
    ro.metrics = st.options.metrics;
    auto router = spawn_router(self->system(), gate_weights, ro);
    if (!router) return router.error();
    self->link_to(*router);
    attention_options ao;
    ao.shard = a.shard;
    ao.cache = st.options.cache;
    ao.metrics = st.options.metrics;
    auto shard = spawn_attention(self->system(), attention_weights, *router, ao);
    if (!shard) return shard.error();
    self->link_to(*shard);
    out.shards.push_back(a.shard);
    out.handles.push_back(*shard);
  }
  return out;
}

}  // namespace

node_agent_actor spawn_node_agent(caf::actor_system& sys, node_agent_options options) {
  auto impl = [](pointer self, node_agent_options opts) -> node_agent_actor::behavior_type {
    self->state.options = std::move(opts);
    return {
        [self](spawn_groups_atom, const scheduler::placement& p) { return spawn_groups(self, p); },
        [self](spawn_shards_atom, const scheduler::placement& p, const group_handles& g) {
          return spawn_shards(self, p, g);
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
  return sys.spawn(impl, std::move(options));
}

}  // namespace moe::actors
