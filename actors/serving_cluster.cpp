#include "actors/serving_cluster.hpp"

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <numeric>
#include <random>
#include <set>
#include <thread>
#include <unistd.h>

#include "actors/api_server.hpp"
#include "actors/engine_shard.hpp"
#include "actors/rebalancer.hpp"
#include "model/init_model.hpp"
#include "model/model_errc.hpp"
#include "monitoring/metrics_server.hpp"
#include "runtime/actor_system.hpp"
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
                                            const scheduler::placement& p, bool separate_controller) {
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
  d.actors.push_back({"controller", "0", separate_controller ? "coordinator" : config.nodes.front().name, ""});
  d.placement_version = p.version;
  d.placement_json = scheduler::to_json(p).dump();
  return d;
}

}  // namespace

namespace {

// Every node's agent once each is up (join_nodes), in config order, with its data plane.
caf::expected<member_list> await_members(caf::actor_system& sys, const cluster_membership_actor& membership,
                                         const runtime::cluster_config& config, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    member_list list;
    caf::error failure;
    self->request(membership, std::chrono::seconds(10), members_atom::value)
        .receive([&](member_list& l) { list = std::move(l); }, [&](caf::error& e) { failure = std::move(e); });
    if (failure) return failure;
    std::string missing;
    for (const auto& m : list.members) {
      if (m.state == member_state::refused)
        return make_error(node_errc::refused, "cluster " + config.name + ": node " + m.node + ": " + m.reason);
      if (m.state != member_state::up && m.state != member_state::suspect)
        missing += (missing.empty() ? "" : "; ") + m.node + " (" + m.host + ":" + std::to_string(m.control_port) +
                   ", " + to_string(m.state) + (m.reason.empty() ? "" : ": " + m.reason) + ")";
    }
    if (missing.empty()) return list;
    if (std::chrono::steady_clock::now() >= deadline)
      return make_error(node_errc::unreachable,
                        "cluster " + config.name + ": nodes not up after " + std::to_string(timeout.count()) +
                            " ms: " + missing + " (start them with `moe cluster up --config " + config.source + "`)");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

bool all_nodes_local(const runtime::cluster_config& config) {
  return std::all_of(config.nodes.begin(), config.nodes.end(), [](const runtime::node_config& n) {
    return n.host.starts_with("127.") || n.host == "localhost";
  });
}

controller_options controller_options_of(const runtime::cluster_config& config,
                                         const model::model_config& model,
                                         std::vector<attention_actor> shards,
                                         std::shared_ptr<prometheus::Registry> registry) {
  controller_options co;
  co.shards = std::move(shards);
  co.vocab_size = model.vocab_size;
  co.limits.max_running_requests = config.batching.max_running_requests;
  co.limits.max_batch_tokens = config.batching.max_batch_tokens;
  co.limits.max_queue = config.batching.max_queue;
  co.limits.max_new_tokens_limit = config.batching.max_new_tokens_limit;
  co.metrics = std::move(registry);
  co.request_timeout = std::chrono::milliseconds(config.batching.request_timeout_ms);
  return co;
}

// What runs on each node: its attention shards (indices into the shard order) and its expert
// groups (group ids); what a node failure takes with it.
void node_contents(const scheduler::placement& p, const std::vector<int32_t>& shard_ids, controller_options& co) {
  for (const auto& g : p.expert_groups) co.groups_on_node[g.device.node].push_back(g.group);
  for (const auto& a : p.attention) {
    auto it = std::find(shard_ids.begin(), shard_ids.end(), a.shard);
    if (it == shard_ids.end()) continue;
    co.shards_on_node[a.device.node].push_back(static_cast<size_t>(it - shard_ids.begin()));
  }
}

// The rebalancer of this cluster: the placement's layout (every MoE layer holds each group's
// experts) as version placement.version, groups in group order with their nodes' indices.
caf::expected<rebalancer_actor> spawn_cluster_rebalancer(caf::actor_system& sys, const runtime::cluster_config& config,
                                                         const model::model_config& model, const scheduler::placement& p,
                                                         const group_handles& handles,
                                                         const std::vector<router_actor>& routers,
                                                         const controller_actor& controller,
                                                         const trainer_actor& trainer,
                                                         std::shared_ptr<prometheus::Registry> registry,
                                                         std::string& unplannable) {
  rebalancer_options o;
  o.model = model;
  o.routers = routers;
  o.controller = controller;
  o.trainer = trainer;
  o.metrics = std::move(registry);
  o.current.version = p.version;
  std::vector<std::vector<int64_t>> per_group(p.expert_groups.size());
  o.groups.resize(p.expert_groups.size());
  o.group_node.resize(p.expert_groups.size());
  for (const auto& g : p.expert_groups) {
    const auto index = static_cast<size_t>(g.group);
    if (index >= o.groups.size()) return make_error(node_errc::bad_request, "expert group ids are not 0..n-1");
    auto it = std::find(handles.groups.begin(), handles.groups.end(), g.group);
    if (it == handles.groups.end())
      return make_error(node_errc::bad_request, "no handle for expert group " + std::to_string(g.group));
    o.groups[index] = handles.handles[static_cast<size_t>(it - handles.groups.begin())];
    o.group_node[index] = static_cast<int>(runtime::find_node(config, g.device.node).value_or(0));
    per_group[index] = g.experts;
    std::sort(per_group[index].begin(), per_group[index].end());
    if (g.holds_shared_experts && o.shared_experts_group < 0) o.shared_experts_group = g.group;
  }
  for (int64_t l = 0; l < model.num_hidden_layers; ++l) {
    if (!model.is_moe_layer(l)) continue;
    o.current.layers.push_back(l);
    o.current.experts.push_back(per_group);
  }
  o.max_moved_replicas = config.rebalancing.max_moved_replicas;
  o.period = std::chrono::seconds(config.rebalancing.period_s);
  o.min_improvement = static_cast<double>(config.rebalancing.min_improvement_pct) / 100.0;
  o.stats_interval = std::chrono::seconds(10);
  unplannable = rebalance_unplannable(o.current, model.n_routed_experts);
  return spawn_rebalancer(sys, std::move(o));
}

}  // namespace

caf::expected<std::unique_ptr<serving_cluster>> serving_cluster::start(
    caf::actor_system& sys, const runtime::cluster_config& config, const serving_options& options) {
  auto s = std::unique_ptr<serving_cluster>(new serving_cluster());
  s->sys_ = &sys;
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
  // Every shard's latent cache holds the config's KV budget per shard.
  const auto cache =
      model::latent_cache_holding(scheduler::kv_cache_tokens_per_shard(config, *model_cfg));
  if (options.make_engine) {
    if (auto err = s->start_engine_shards(config, options, cache)) return err;
    return s;
  }

  if (options.join_nodes) {
    cluster_membership_options mo;
    mo.config = config;
    mo.peer_name = "coordinator";
    mo.metrics = s->registry_;
    s->membership_ = spawn_cluster_membership(sys, std::move(mo));
    auto members = await_members(sys, s->membership_, config, options.join_timeout);
    if (!members) return members.error();
    // This process's own data plane: logits asked of remote shards come back through it.
    runtime::data_plane_options dp;
    dp.host = options.bind_host;
    if (dp.host == "0.0.0.0") {
      // Bound everywhere: the nodes reach us at this host's own address.
      char name[256] = {};
      ::gethostname(name, sizeof name - 1);
      auto advertised = runtime::resolve_ipv4(name);
      if (!advertised) return advertised.error();
      dp.advertise_host = *advertised;
    } else if (dp.host.starts_with("127.") && !all_nodes_local(config)) {
      return make_error(node_errc::bad_request,
                        "the coordinator binds " + dp.host + " but nodes run on other hosts: give --host an "
                        "address they can reach (or 0.0.0.0)");
    }
    // Node n has plane n + 1; a coordinator takes a random id above them, so that a restarted
    // coordinator is never mistaken by the nodes for its predecessor (whose goodbye they may
    // still be processing).
    std::random_device rd;
    const uint32_t above = static_cast<uint32_t>(config.nodes.size()) + 1;
    dp.plane_id = above + static_cast<uint32_t>(rd() % (runtime::data_plane_tag::max_plane_id - above));
    dp.metrics = s->registry_;
    auto exchange = runtime::tensor_exchange::start(std::move(dp));
    if (!exchange) return exchange.error();
    s->transport_ = make_tensor_transport(sys, std::move(*exchange));
    cluster_session session;
    session.owner = caf::actor_cast<caf::actor>(s->membership_);
    session.model_dir = s->model_dir_.string();
    session.cache_block_size = cache.block_size;
    session.cache_num_blocks = cache.num_blocks;
    session.load_window_steps = config.rebalancing.load_window_steps;
    session.peers.push_back({sys.node(), s->transport_.exchange->address(), {}, 0});
    for (const auto& m : members->members) {
      session.peers.push_back({m.agent.node(), m.info.data_address, m.info.host, m.info.control_port});
      s->transport_.exchange->add_peer(m.agent.node(), m.info.data_address);
      s->agents_.push_back(m.agent);
    }
    for (size_t i = 0; i < s->agents_.size(); ++i) {
      self->request(s->agents_[i], std::chrono::seconds(30), open_session_atom::value, session)
          .receive([](caf::atom_value) {},
                   [&](caf::error& e) {
                     failure = with_context(
                         e, "node " + config.nodes[i].name + ": cannot open a session");
                   });
      if (failure) return failure;
    }
  } else {
    for (const auto& node : config.nodes) {
      node_agent_options o;
      o.node = node.name;
      o.model_dir = s->model_dir_;
      o.cache = cache;
      o.metrics = s->registry_;
      o.load_window_steps = config.rebalancing.load_window_steps;
      s->agents_.push_back(spawn_node_agent(sys, std::move(o)));
    }
  }
  // Phase 1: every node's expert groups; phase 2: attention shards and routers, which need them.
  // Each phase asks every node at once, so the nodes read their weights side by side, and
  // waits for all the answers (the first error fails the start once no node is still loading).
  auto from_every_node = [&](auto on_answer, const auto&... request) {
    std::vector<decltype(self->request(s->agents_.front(), caf::infinite, request...))> pending;
    for (auto& agent : s->agents_)
      pending.push_back(self->request(agent, caf::infinite, request...));
    for (auto& r : pending)
      r.receive(on_answer, [&](caf::error& e) {
        if (!failure) failure = std::move(e);
      });
  };
  group_handles groups;
  from_every_node(
      [&](group_handles& g) {
        groups.groups.insert(groups.groups.end(), g.groups.begin(), g.groups.end());
        groups.handles.insert(groups.handles.end(), g.handles.begin(), g.handles.end());
      },
      spawn_groups_atom::value, s->placement_);
  if (failure) return failure;
  struct spawned_shard {
    int32_t id;
    attention_actor shard;
    router_actor router;
  };
  std::vector<spawned_shard> shards;
  from_every_node(
      [&](shard_handles& h) {
        for (size_t i = 0; i < h.shards.size(); ++i)
          shards.push_back(
              {h.shards[i], h.handles[i], i < h.routers.size() ? h.routers[i] : router_actor{}});
      },
      spawn_shards_atom::value, s->placement_, groups);
  if (failure) return failure;
  std::sort(shards.begin(), shards.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  std::vector<int32_t> shard_ids;
  for (auto& sh : shards) {
    s->shards_.push_back(sh.shard);
    s->routers_.push_back(sh.router);
    shard_ids.push_back(sh.id);
  }

  auto co = controller_options_of(config, *model_cfg, s->shards_, s->registry_);
  if (options.join_nodes) node_contents(s->placement_, shard_ids, co);
  s->controller_ = spawn_controller(sys, co);
  if (s->membership_)
    caf::anon_send(s->membership_, member_subscribe_atom::value, caf::actor_cast<caf::actor>(s->controller_));

  trainer_options to;
  to.shards = s->shards_;
  to.routers = s->routers_;
  to.model = *model_cfg;
  to.transport = s->transport_;
  to.metrics = s->registry_;
  if (options.join_nodes) {
    to.shard_nodes.resize(shard_ids.size());
    for (const auto& a : s->placement_.attention)
      if (auto it = std::find(shard_ids.begin(), shard_ids.end(), a.shard); it != shard_ids.end())
        to.shard_nodes[static_cast<size_t>(it - shard_ids.begin())] = a.device.node;
    to.group_nodes.resize(s->placement_.expert_groups.size());
    for (const auto& g : s->placement_.expert_groups)
      if (static_cast<size_t>(g.group) < to.group_nodes.size()) to.group_nodes[static_cast<size_t>(g.group)] = g.device.node;
  }
  to.recovery_timeout = std::chrono::milliseconds(config.training.recovery_timeout_ms);
  for (const auto& g : s->placement_.expert_groups)
    if (g.holds_shared_experts && to.shared_experts_group < 0) to.shared_experts_group = g.group;
  std::vector<std::vector<int64_t>> group_experts(s->placement_.expert_groups.size());
  to.groups.resize(group_experts.size());
  for (const auto& g : s->placement_.expert_groups) {
    const auto index = static_cast<size_t>(g.group);
    auto it = std::find(groups.groups.begin(), groups.groups.end(), g.group);
    if (index >= to.groups.size() || it == groups.groups.end())
      return make_error(node_errc::bad_request, "no handle for expert group " + std::to_string(g.group));
    to.groups[index] = groups.handles[static_cast<size_t>(it - groups.groups.begin())];
    group_experts[index] = g.experts;
  }
  to.layout = uniform_layout(*model_cfg, group_experts, s->placement_.version);
  s->trainer_ = spawn_trainer(sys, std::move(to));
  if (s->membership_)
    caf::anon_send(s->membership_, member_subscribe_atom::value, caf::actor_cast<caf::actor>(s->trainer_));
  training_jobs_options jo;
  jo.trainer = s->trainer_;
  jo.vocab_size = model_cfg->vocab_size;
  jo.max_position_embeddings = model_cfg->max_position_embeddings;
  // In one process no node can fail alone: snapshots would only cost.
  jo.snapshot_every = options.join_nodes ? config.training.snapshot_every_steps : 0;
  s->training_jobs_ = spawn_training_jobs(sys, std::move(jo));

  std::string unplannable;
  auto rebalancer = spawn_cluster_rebalancer(sys, config, *model_cfg, s->placement_, groups, s->routers_,
                                             s->controller_, s->trainer_, s->registry_, unplannable);
  // A layout the planner cannot move (groups of unequal size) still serves, unbalanced, and
  // still fails over when a node dies.
  if (rebalancer) {
    s->failover_ = *rebalancer;
    caf::anon_send(s->controller_, use_failover_atom::value, *rebalancer);
    s->rebalance_unavailable_ = unplannable;
  }
  if (!rebalancer || !s->rebalance_unavailable_.empty()) {
    if (!rebalancer) s->rebalance_unavailable_ = error_text(rebalancer.error());
    spdlog::warn("online expert rebalancing is off for this cluster: {}", s->rebalance_unavailable_);
  } else {
    s->rebalancer_ = *rebalancer;
  }

  if (auto err = s->start_endpoints(config, options,
                                    describe(config, s->placement_, options.join_nodes), {}))
    return err;
  return s;
}

caf::error serving_cluster::start_engine_shards(const runtime::cluster_config& config,
                                                const serving_options& options,
                                                const model::latent_cache_options& cache) {
  if (options.join_nodes)
    return make_error(
        node_errc::bad_request,
        "engine shards serve in the coordinator's process: not with join_nodes (--join-nodes)");
  if (options.num_engine_shards < 1)
    return make_error(node_errc::bad_request,
                      "serving engine shards needs at least one (num_engine_shards)");
  engine_shards_ = true;
  protocol::api_cluster_description d;
  d.name = config.name;
  d.placement_version = placement_.version;
  for (int i = 0; i < options.num_engine_shards; ++i) {
    auto engine = options.make_engine(i, model_dir_, cache);
    if (!engine) return with_context(engine.error(), "engine shard " + std::to_string(i));
    const std::string node =
        config.nodes.empty() ? std::string("local") : config.nodes.front().name;
    d.actors.push_back({"engine_shard", std::to_string(i), node, (*engine)->device()});
    engine_shard_options eo;
    eo.shard = i;
    eo.metrics = registry_;
    shards_.push_back(spawn_engine_shard(*sys_, std::move(*engine), eo));
  }
  d.actors.push_back({"controller", "0", d.actors.front().node, ""});
  controller_ = spawn_controller(*sys_, controller_options_of(config, model_, shards_, registry_));
  rebalance_unavailable_ =
      "this cluster serves whole-model engine shards, which hold every expert themselves";
  return start_endpoints(
      config, options, std::move(d),
      "this cluster serves whole-model engine shards; training runs on the actor graph");
}

caf::error serving_cluster::start_endpoints(const runtime::cluster_config& config,
                                            const serving_options& options,
                                            protocol::api_cluster_description description,
                                            std::string training_unavailable) {
  auto metrics = monitoring::metrics_server::start(
      registry_, options.bind_host, options.metrics_port.value_or(config.ports.metrics));
  if (!metrics) return metrics.error();
  metrics_ = std::move(*metrics);

  api_server_options ao;
  ao.host = options.bind_host;
  ao.port = options.api_port.value_or(config.ports.api);
  ao.secret = config.secret;
  ao.cluster = std::move(description);
  ao.rebalancer = rebalancer_;
  ao.rebalance_unavailable = rebalance_unavailable_;
  ao.training_jobs = training_jobs_;
  ao.training_unavailable = std::move(training_unavailable);
  ao.vocab_size = model_.vocab_size;
  ao.tls = config.api_tls;
  auto api = api_server::start(*sys_, controller_, ao);
  if (!api) return api.error();
  api_ = std::move(*api);
  return {};
}

serving_cluster::~serving_cluster() { stop(); }

uint16_t serving_cluster::api_port() const { return api_ ? api_->port() : 0; }

std::string serving_cluster::metrics_url() const { return metrics_ ? metrics_->url() : ""; }

void serving_cluster::stop() {
  if (api_) api_->stop();
  api_.reset();
  if (failover_) caf::anon_send_exit(failover_, caf::exit_reason::user_shutdown);
  failover_ = nullptr;
  rebalancer_ = nullptr;
  if (controller_) caf::anon_send_exit(controller_, caf::exit_reason::user_shutdown);
  controller_ = nullptr;
  if (training_jobs_) caf::anon_send_exit(training_jobs_, caf::exit_reason::user_shutdown);
  training_jobs_ = nullptr;
  if (trainer_) caf::anon_send_exit(trainer_, caf::exit_reason::user_shutdown);
  trainer_ = nullptr;
  if (membership_) {
    // The node processes stay up for the next coordinator: close our sessions (each node drops
    // the actors it spawned for us). Nodes known to be down are skipped; one that does not
    // answer drops them anyway once it sees the membership actor end.
    caf::scoped_actor self{*sys_};
    std::set<caf::actor_addr> up;
    self->request(membership_, std::chrono::seconds(5), members_atom::value)
        .receive(
            [&](const member_list& l) {
              for (const auto& m : l.members)
                if (m.agent) up.insert(m.agent.address());
            },
            [](caf::error&) {});
    for (auto& a : agents_) {
      if (!up.count(a.address())) continue;
      self->request(a, std::chrono::seconds(5), close_session_atom::value).receive([](caf::atom_value) {},
                                                                                  [](caf::error&) {});
    }
    // A detached actor the nodes hold proxies of (their sessions' owner): the system could not
    // be destroyed were it still referenced then (runtime::await_released says why).
    const auto membership = membership_.address();
    caf::anon_send_exit(membership_, caf::exit_reason::user_shutdown);
    membership_ = nullptr;
    if (!runtime::await_released(membership, std::chrono::seconds(10)))
      spdlog::warn("the cluster membership actor is still referenced 10 s after it was told to stop; the process "
                   "may not exit");
  } else {
    // The node agents own their actors (linked): ending an agent ends them.
    for (auto& a : agents_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  }
  agents_.clear();
  // The data plane stops here, before stop() returns.
  end_tensor_fetcher(*sys_, transport_);
  transport_ = {};
  if (engine_shards_) {
    // Detached (actors/engine_shard.hpp): ended and waited for here, so that no thread of theirs
    // (nor the engine it owns) outlives stop().
    caf::scoped_actor self{*sys_};
    for (auto& shard : shards_) {
      caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
      self->wait_for(shard);
    }
  }
  shards_.clear();
  routers_.clear();
  if (scheduler_) caf::anon_send_exit(scheduler_, caf::exit_reason::user_shutdown);
  scheduler_ = nullptr;
  if (metrics_) metrics_->stop();
}

}  // namespace moe::actors
