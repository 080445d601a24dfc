#include "actors/local_cluster.hpp"

#include <caf/all.hpp>

#include <algorithm>

#include "model/checkpoint.hpp"
#include "actors/weights_loading.hpp"
#include "model/model_errc.hpp"

namespace moe::actors {

cluster_layout even_layout(int num_attention_shards, int num_groups, int64_t num_experts) {
  cluster_layout layout;
  layout.num_attention_shards = num_attention_shards;
  for (int g = 0; g < num_groups; ++g) {
    expert_group_options o;
    o.group = g;
    o.holds_shared_experts = g == 0;
    for (int64_t e = num_experts * g / num_groups; e < num_experts * (g + 1) / num_groups; ++e)
      o.experts.push_back(e);
    layout.groups.push_back(std::move(o));
  }
  return layout;
}

caf::expected<model::checkpoint> load_weights_part(const std::filesystem::path& dir, const model::model_config& c,
                                                  std::function<bool(std::string_view)> filter) {
  model::load_options o;
  o.filter = std::move(filter);
  o.mtp = model::mtp_policy::skip;
  o.progress = false;
  return model::load_checkpoint(dir, c, o);
}

caf::expected<std::shared_ptr<const model::checkpoint>> load_weights(
    const std::filesystem::path& dir, const model::model_config& c,
    std::function<bool(std::string_view)> filter) {
  auto ckpt = load_weights_part(dir, c, std::move(filter));
  if (!ckpt) return ckpt.error();
  return std::make_shared<const model::checkpoint>(std::move(*ckpt));
}

caf::expected<std::unique_ptr<local_cluster>> local_cluster::start(
    caf::actor_system& sys, const std::filesystem::path& model_dir, const cluster_layout& layout) {
  auto cfg = model::load_config(model_dir);
  if (!cfg) return cfg.error();
  if (layout.num_attention_shards < 1 || layout.groups.empty())
    return model::make_error(model::model_errc::bad_input,
                             "cluster layout: at least one attention shard and one expert group");
  auto cluster = std::unique_ptr<local_cluster>(new local_cluster(sys));
  cluster->config_ = *cfg;
  std::vector<expert_group_route> routes;
  for (auto g : layout.groups) {
    g.metrics = layout.metrics;
    g.checkpoint_dir = model_dir;
    auto weights = load_weights_part(model_dir, *cfg,
                                     [g](std::string_view n) { return expert_group_needs(g, n); });
    if (!weights) return weights.error();
    auto actor = spawn_expert_group(sys, std::move(*weights), g);
    if (!actor) return actor.error();
    cluster->groups_.push_back(*actor);
    routes.push_back({*actor, g.experts, g.holds_shared_experts});
  }
  auto gate_weights = load_weights(model_dir, *cfg, router_needs);
  if (!gate_weights) return gate_weights.error();
  auto attention_weights = load_weights(model_dir, *cfg, attention_needs);
  if (!attention_weights) return attention_weights.error();
  for (int s = 0; s < layout.num_attention_shards; ++s) {
    router_options ro;
    ro.shard = s;
    ro.groups = routes;
    ro.metrics = layout.metrics;
    auto router = spawn_router(sys, *gate_weights, ro);
    if (!router) return router.error();
    cluster->routers_.push_back(*router);
    attention_options ao;
    ao.shard = s;
    ao.cache = layout.cache;
    ao.metrics = layout.metrics;
    auto shard = spawn_attention(sys, *attention_weights, *router, ao);
    if (!shard) return shard.error();
    cluster->shards_.push_back(*shard);
  }
  return cluster;
}

local_cluster::~local_cluster() { stop(); }

void local_cluster::stop() {
  for (auto& a : shards_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  for (auto& r : routers_) caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
  for (auto& g : groups_) caf::anon_send_exit(g, caf::exit_reason::user_shutdown);
  shards_.clear();
  routers_.clear();
  groups_.clear();
}

caf::expected<std::vector<std::vector<int32_t>>> local_cluster::generate(
    std::span<const model::generation_request> requests) {
  const size_t n = requests.size();
  std::vector<std::vector<int32_t>> out(n);
  if (n == 0) return out;
  if (shards_.empty())
    return model::make_error(model::model_errc::bad_input, "local cluster is stopped");
  std::vector<uint64_t> ids(n);
  for (auto& id : ids) id = next_sequence_++;
  std::vector<bool> done(n, false);
  caf::scoped_actor self{sys_};
  caf::error failure;

  auto spec = [&](size_t i) {
    const auto& s = requests[i].sampling;
    return sampling_spec{s.temperature, static_cast<uint32_t>(s.top_k), s.top_p, requests[i].seed};
  };
  auto accept = [&](const std::vector<size_t>& who, const step_result& r) {
    for (size_t j = 0; j < who.size(); ++j) {
      const size_t i = who[j];
      out[i].push_back(r.tokens[j]);
      const auto& stops = requests[i].stop_token_ids;
      if (static_cast<int64_t>(out[i].size()) >= requests[i].max_new_tokens ||
          std::find(stops.begin(), stops.end(), r.tokens[j]) != stops.end())
        done[i] = true;
    }
  };
  // Runs one step on every shard that has entries, all shards concurrently.
  auto run_steps = [&](bool prefill) {
    std::vector<std::vector<size_t>> who(shards_.size());
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      who[i % shards_.size()].push_back(i);
    }
    // Send every shard its step first, then collect: the shards run concurrently.
    std::vector<std::pair<size_t, decltype(self->request(shards_[0], caf::infinite,
                                                         step_atom::value, step_request{}))>>
        pending;
    for (size_t s = 0; s < shards_.size(); ++s) {
      if (who[s].empty()) continue;
      step_request req;
      req.step = next_step_++;
      req.prefill = prefill;
      for (size_t i : who[s]) {
        step_entry e;
        e.sequence = ids[i];
        e.tokens = prefill ? requests[i].prompt : std::vector<int32_t>{out[i].back()};
        e.sampling = spec(i);
        e.sample_offset = out[i].size();
        req.entries.push_back(std::move(e));
      }
      pending.emplace_back(s, self->request(shards_[s], caf::infinite, step_atom::value, std::move(req)));
    }
    for (auto& [s, handle] : pending) {
      handle.receive([&, s = s](const step_result& r) { accept(who[s], r); },
                     [&](const caf::error& e) {
                       if (!failure) failure = e;
                     });
    }
  };
  for (size_t i = 0; i < n; ++i)
    if (requests[i].max_new_tokens <= 0) done[i] = true;
  run_steps(true);
  while (!failure && std::find(done.begin(), done.end(), false) != done.end()) run_steps(false);
  for (auto& shard : shards_) self->send(shard, release_atom::value, ids);
  if (failure) return failure;
  return out;
}

}  // namespace moe::actors
