// The whole actor graph of one model in one actor system: attention shards, their co-located
// routers and the expert groups, each loading only the weights it needs from the checkpoint.
// Later issues put the same actors into several processes; this is the single-process layout.
// Ownership: holds the actor handles; stop() (or the destructor) ends every actor.
// Thread safety: start/stop/generate from one thread.
#pragma once

#include <caf/fwd.hpp>
#include <caf/typed_actor.hpp>

#include <filesystem>
#include <memory>
#include <vector>

#include "actors/attention.hpp"
#include "actors/expert_group.hpp"
#include "actors/messages.hpp"
#include "actors/router.hpp"
#include "model/config.hpp"
#include "model/reference_engine.hpp"

namespace moe::actors {

struct cluster_layout {
  int num_attention_shards = 1;
  std::vector<expert_group_options> groups;  ///< experts sorted; shared experts in one group
  model::latent_cache_options cache;
  std::shared_ptr<prometheus::Registry> metrics;  ///< shared by every actor; may be null
};

/// Even contiguous split of `num_experts` over `num_groups`, shared experts in group 0.
[[nodiscard]] cluster_layout even_layout(int num_attention_shards, int num_groups,
                                         int64_t num_experts);

class local_cluster {
 public:
  /// Loads each actor's weights from `model_dir` and spawns the graph.
  [[nodiscard]] static caf::expected<std::unique_ptr<local_cluster>> start(
      caf::actor_system& sys, const std::filesystem::path& model_dir, const cluster_layout& layout);
  ~local_cluster();

  [[nodiscard]] const std::vector<attention_actor>& shards() const noexcept { return shards_; }
  /// One per shard, in shard order (tests ask them for load reports).
  [[nodiscard]] const std::vector<router_actor>& routers() const noexcept { return routers_; }
  /// The expert groups in layout order (the trainer updates them).
  [[nodiscard]] const std::vector<expert_group_actor>& groups() const noexcept { return groups_; }
  [[nodiscard]] const model::model_config& config() const noexcept { return config_; }

  /// Greedy or sampled generation as the reference generate() does it, with requests spread
  /// round-robin over the shards: one prefill step per shard, then decode steps until done.
  /// Requests with want_logits collect every step's logits in `logits` (tests).
  [[nodiscard]] caf::expected<std::vector<std::vector<int32_t>>> generate(
      std::span<const model::generation_request> requests);

  void stop();

 private:
  explicit local_cluster(caf::actor_system& sys) : sys_(sys) {}
  caf::actor_system& sys_;
  model::model_config config_;
  std::vector<expert_group_actor> groups_;
  std::vector<router_actor> routers_;
  std::vector<attention_actor> shards_;
  uint64_t next_sequence_ = 1;
  uint64_t next_step_ = 1;
};

}  // namespace moe::actors
