#include "actors/serving_cluster.hpp"

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "actors/api_server.hpp"
#include "model/init_model.hpp"
#include "model/model_errc.hpp"
#include "monitoring/metrics_server.hpp"
#include "scheduler/model_memory.hpp"

namespace moe::actors {

std::filesystem::path default_model_cache() {
  if (const char* d = std::getenv("MOE_MODEL_CACHE")) return d;
  if (const char* c = std::getenv("XDG_CACHE_HOME")) return std::filesystem::path(c) / "moe-runtime";
  if (const char* h = std::getenv("HOME")) return std::filesystem::path(h) / ".cache/moe-runtime";
  return std::filesystem::temp_directory_path() / "moe-runtime";
}

caf::expected<std::filesystem::path> resolve_model_dir(const runtime::cluster_config& config,
                                                       const std::filesystem::path& cache_dir) {
  if (!config.model.path.empty()) return config.model.path;
  const uint64_t seed = config.model.seed.value_or(0);
  const auto dir = cache_dir / (config.model.preset + "-seed" + std::to_string(seed));
  if (std::filesystem::exists(dir / "config.json")) return dir;
  auto preset = model::model_preset(config.model.preset);
  if (!preset) return preset.error();
  model::init_options o;
  o.seed = seed;
  if (auto files = model::init_model(dir, *preset, o); !files) return files.error();
  return dir;
}

namespace {

protocol::api_cluster_description describe(const runtime::cluster_config& config,
                                            const scheduler::placement& p) {
  protocol::api_cluster_description d;
  d.name = config.name;
  for (const auto& n : config.nodes) {
    protocol::api_node node{n.name, n.host, {}};
    for (int64_t g = 0; g < n.gpus; ++g) node.devices.push_back(n.name + "/gpu" + std::to_string(g));
    for (int64_t c = 0; c < n.cpu_slots; ++c)
      node.devices.push_back(n.name + "/cpu" + std::to_string(c));
    d.nodes.push_back(std::move(node));
  }
  for (const auto& a : p.attention) {
    d.actors.push_back({"attention", std::to_string(a.shard), a.device.node, a.device.to_string()});
    d.actors.push_back({"router", std::to_string(a.shard), a.device.node, a.device.to_string()});
  }
  for (const auto& g : p.expert_groups)
    d.actors.push_back({"expert_group", std::to_string(g.group), g.device.node, g.device.to_string()});
  d.actors.push_back({"controller", "0", config.nodes.front().name, ""});
  d.placement_version = p.version;
  d.placement_json = scheduler::to_json(p).dump();
  return d;
}

}  // namespace

caf::expected<std::unique_ptr<serving_cluster>> serving_cluster::start(
    caf::actor_system& sys, const runtime::cluster_config& config, const serving_options& options) {
  auto s = std::unique_ptr<serving_cluster>(new serving_cluster());
  auto model_cfg = scheduler::resolve_model_config(config);
  if (!model_cfg) return model_cfg.error();
  s->model_ = *model_cfg;
  auto sched = scheduler::spawn_scheduler(sys, config, *model_cfg);
  if (!sched) return sched.error();
  s->scheduler_ = *sched;
  auto dir = resolve_model_dir(config, options.preset_cache_dir.empty() ? default_model_cache()
                                                                        : options.preset_cache_dir);
  if (!dir) return dir.error();
  s->model_dir_ = *dir;
  s->registry_ = std::make_shared<prometheus::Registry>();

  caf::scoped_actor self{sys};
  caf::error failure;
  self->request(s->scheduler_, caf::infinite, scheduler::placement_atom::value)
      .receive([&](scheduler::placement& p) { s->placement_ = std::move(p); },
               [&](caf::error& e) { failure = std::move(e); });
  if (failure) return failure;

  const int64_t tokens = scheduler::kv_cache_tokens_per_shard(config, *model_cfg);
  for (const auto& node : config.nodes) {
    node_agent_options o;
    o.node = node.name;
    o.model_dir = s->model_dir_;
    o.cache.block_size = 16;
    o.cache.num_blocks = std::max<int64_t>(1, (tokens + 15) / 16);
    o.metrics = s->registry_;
    s->agents_.push_back(spawn_node_agent(sys, std::move(o)));
  }
  // Phase 1: every node's expert groups; phase 2: attention shards and routers, which need them.
  group_handles groups;
  for (auto& agent : s->agents_) {
    self->request(agent, caf::infinite, spawn_groups_atom::value, s->placement_)
        .receive(
            [&](group_handles& g) {
              groups.groups.insert(groups.groups.end(), g.groups.begin(), g.groups.end());
              groups.handles.insert(groups.handles.end(), g.handles.begin(), g.handles.end());
            },
            [&](caf::error& e) { failure = std::move(e); });
    if (failure) return failure;
  }
  std::vector<std::pair<int32_t, attention_actor>> shards;
  for (auto& agent : s->agents_) {
    self->request(agent, caf::infinite, spawn_shards_atom::value, s->placement_, groups)
        .receive(
            [&](shard_handles& h) {
              for (size_t i = 0; i < h.shards.size(); ++i) shards.emplace_back(h.shards[i], h.handles[i]);
            },
            [&](caf::error& e) { failure = std::move(e); });
    if (failure) return failure;
  }
  std::sort(shards.begin(), shards.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [id, handle] : shards) s->shards_.push_back(handle);

  controller_options co;
  co.shards = s->shards_;
  co.vocab_size = model_cfg->vocab_size;
  co.limits.max_running_requests = config.batching.max_running_requests;
  co.limits.max_batch_tokens = config.batching.max_batch_tokens;
  co.limits.max_queue = config.batching.max_queue;
  co.limits.max_new_tokens_limit = config.batching.max_new_tokens_limit;
  co.metrics = s->registry_;
  s->controller_ = spawn_controller(sys, co);

  auto metrics = monitoring::metrics_server::start(
      s->registry_, options.bind_host, options.metrics_port.value_or(config.ports.metrics));
  if (!metrics) return metrics.error();
  s->metrics_ = std::move(*metrics);

  api_server_options ao;
  ao.host = options.bind_host;
  ao.port = options.api_port.value_or(config.ports.api);
  ao.secret = config.secret;
  ao.cluster = describe(config, s->placement_);
  auto api = api_server::start(sys, s->controller_, ao);
  if (!api) return api.error();
  s->api_ = std::move(*api);
  return s;
}

serving_cluster::~serving_cluster() { stop(); }

uint16_t serving_cluster::api_port() const { return api_ ? api_->port() : 0; }

std::string serving_cluster::metrics_url() const { return metrics_ ? metrics_->url() : ""; }

void serving_cluster::stop() {
  if (api_) api_->stop();
  api_.reset();
  if (controller_) caf::anon_send_exit(controller_, caf::exit_reason::user_shutdown);
  controller_ = nullptr;
  // The node agents own their actors (linked): ending an agent ends them.
  for (auto& a : agents_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  agents_.clear();
  shards_.clear();
  if (scheduler_) caf::anon_send_exit(scheduler_, caf::exit_reason::user_shutdown);
  scheduler_ = nullptr;
  if (metrics_) metrics_->stop();
}

}  // namespace moe::actors
