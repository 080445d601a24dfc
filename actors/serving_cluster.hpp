// A serving cluster in one process, from a cluster config: the scheduler actor plans the
// placement, one node agent per configured node spawns that node's actors (expert groups first,
// then attention shards with their co-located routers), then the controller, the process's
// metrics endpoint and the job API come up. What `moe serve` and `moe demo` run. With
// join_nodes the node agents are those of `moe node` processes (one per node of the config),
// joined with the cluster's secret and watched for failures; the controller fails the jobs
// that need a node that went down.
//
// Lifecycle: start() brings everything up in dependency order; stop() takes it down in reverse,
// draining first: the API stops accepting calls and lets in-flight ones finish (cancelling the
// jobs still streaming), then the controller, the actors and the metrics endpoint go.
// Thread safety: start/stop from one thread; accessors are safe after start.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "actors/cluster_membership.hpp"
#include "actors/controller.hpp"
#include "actors/node_agent.hpp"
#include "actors/rebalance_messages.hpp"
#include "actors/trainer.hpp"
#include "actors/training_jobs.hpp"
#include "model/latent_cache.hpp"
#include "model/step_engine.hpp"
#include "protocol/api_types.hpp"
#include "runtime/cluster_config.hpp"
#include "scheduler/placement.hpp"
#include "scheduler/scheduler_actor.hpp"

namespace prometheus {
class Registry;
}
namespace moe::monitoring {
class metrics_server;
}

namespace moe::actors {

class api_server;

struct serving_options {
  /// Where a preset model (config `model.preset`) is written on first use.
  std::filesystem::path preset_cache_dir;
  /// Override the config's ports (0: ephemeral), e.g. for tests and the demo.
  std::optional<uint16_t> api_port;
  std::optional<uint16_t> metrics_port;
  std::string bind_host = "127.0.0.1";
  /// The config's nodes run as `moe node` processes (`moe cluster up`, Kubernetes): join them
  /// (actors/cluster_membership.hpp) and place the model's actors there; this process keeps
  /// the scheduler, the controller, the job API and its /metrics. false: every node's agent
  /// runs in this process.
  bool join_nodes = false;
  /// join_nodes: how long start() waits for every node to be up before it gives up.
  std::chrono::milliseconds join_timeout{60'000};
  /// Makes shard `shard`'s engine from the model directory, with the latent cache the
  /// cluster's KV-cache budget gives each shard (scheduler::kv_cache_tokens_per_shard).
  using engine_factory = std::function<caf::expected<std::unique_ptr<model::step_engine>>(
      int shard, const std::filesystem::path& model_dir, const model::latent_cache_options& cache)>;
  /// Set: serve num_engine_shards whole-model engine shards (actors/engine_shard.hpp; e.g. the
  /// GPU engine on each GPU: `moe serve --engine gpu`) behind the controller instead of the
  /// actor graph. In this process only (not with join_nodes). Such a cluster neither trains nor
  /// rebalances (it has no routers and no expert groups); its API says so.
  engine_factory make_engine;
  int num_engine_shards = 0;
};

/// `$MOE_MODEL_CACHE`, else `$XDG_CACHE_HOME/moe-runtime`, else `~/.cache/moe-runtime`.
[[nodiscard]] std::filesystem::path default_model_cache();

/// The checkpoint directory of the config's model: its path, or the preset written (once) to
/// `cache_dir/<preset>-seed<seed>`.
[[nodiscard]] caf::expected<std::filesystem::path> resolve_model_dir(
    const runtime::cluster_config& config, const std::filesystem::path& cache_dir);

class serving_cluster {
 public:
  [[nodiscard]] static caf::expected<std::unique_ptr<serving_cluster>> start(
      caf::actor_system& sys, const runtime::cluster_config& config, const serving_options& options);
  ~serving_cluster();

  [[nodiscard]] const scheduler::placement& placement() const noexcept { return placement_; }
  [[nodiscard]] caf::actor_system& system() const noexcept { return *sys_; }
  [[nodiscard]] const model::model_config& model() const noexcept { return model_; }
  [[nodiscard]] const std::filesystem::path& model_dir() const noexcept { return model_dir_; }
  [[nodiscard]] controller_actor controller() const noexcept { return controller_; }
  /// The attention shards in shard order (tests send them steps directly).
  [[nodiscard]] const std::vector<attention_actor>& shards() const noexcept { return shards_; }
  /// Each shard's router, in shard order (tests ask them for load reports).
  [[nodiscard]] const std::vector<router_actor>& routers() const noexcept { return routers_; }
  /// Online expert rebalancing (actors/rebalancer.hpp): on demand through this handle or
  /// `moe rebalance`, and every rebalancing.period_s when set. Null when the layout cannot be
  /// rebalanced; rebalance_unavailable() says why.
  [[nodiscard]] rebalancer_actor rebalancer() const noexcept { return rebalancer_; }
  /// Training through the same actors (actors/trainer.hpp): single steps, and training jobs
  /// (actors/training_jobs.hpp), which `moe train --config` and the job API run.
  [[nodiscard]] trainer_actor trainer() const noexcept { return trainer_; }
  [[nodiscard]] training_jobs_actor training_jobs() const noexcept { return training_jobs_; }
  [[nodiscard]] const std::string& rebalance_unavailable() const noexcept { return rebalance_unavailable_; }
  [[nodiscard]] uint16_t api_port() const;
  [[nodiscard]] std::string metrics_url() const;
  /// join_nodes: this process's data plane (remote shards' logits are fetched through it),
  /// and the membership that watches the nodes. Empty in a single-process cluster.
  [[nodiscard]] const tensor_transport& transport() const noexcept { return transport_; }
  [[nodiscard]] cluster_membership_actor membership() const noexcept { return membership_; }
  [[nodiscard]] const std::shared_ptr<prometheus::Registry>& registry() const noexcept {
    return registry_;
  }

  /// True when whole-model engine shards serve (serving_options::make_engine): shards() are
  /// those; there are no routers, expert groups, rebalancer or trainer, and placement() is the
  /// actor graph's that the config describes, unused.
  [[nodiscard]] bool serves_engine_shards() const noexcept { return engine_shards_; }

  void stop();

 private:
  serving_cluster() = default;
  [[nodiscard]] caf::error start_engine_shards(const runtime::cluster_config& config,
                                               const serving_options& options,
                                               const model::latent_cache_options& cache);
  /// The process's /metrics and the job API, in front of the controller.
  [[nodiscard]] caf::error start_endpoints(const runtime::cluster_config& config,
                                           const serving_options& options,
                                           protocol::api_cluster_description description,
                                           std::string training_unavailable);
  bool engine_shards_ = false;
  caf::actor_system* sys_ = nullptr;
  scheduler::placement placement_;
  std::filesystem::path model_dir_;
  std::shared_ptr<prometheus::Registry> registry_;
  model::model_config model_;
  scheduler::scheduler_actor scheduler_;
  // One per node of the config: in this process, or (join_nodes) the node processes' agents,
  // which serve this cluster in a session (node_agent.hpp, cluster_session) until stop().
  std::vector<node_agent_actor> agents_;
  cluster_membership_actor membership_;  // join_nodes: joins and watches the node processes
  tensor_transport transport_;           // join_nodes: this process's data plane
  std::vector<attention_actor> shards_;
  std::vector<router_actor> routers_;
  controller_actor controller_;
  rebalancer_actor rebalancer_;
  rebalancer_actor failover_;  // the same actor; also where the planner cannot rebalance
  std::string rebalance_unavailable_;
  trainer_actor trainer_;
  training_jobs_actor training_jobs_;
  std::unique_ptr<monitoring::metrics_server> metrics_;
  std::unique_ptr<api_server> api_;
};

}  // namespace moe::actors
