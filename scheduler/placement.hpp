// Placement: which device of which node runs each attention shard (with its router) and each
// expert group, and which logical experts every group holds. A pure, deterministic function of
// the cluster config and the model config: the same inputs give the same placement on every
// node, so nodes can plan independently and compare versions.
//
// Model of the hardware. Every GPU is a device with gpu_memory bytes; every CPU slot is a device
// with memory / cpu_slots bytes of its node's host memory (the slots share the host memory
// equally, so that each is a bin of its own). Devices are ordered by node (config order), GPUs
// before CPU slots, then by index.
//
// Rules.
//  - Experts: the config's explicit lists, or an even contiguous split of the routed experts
//    over the groups (the first E % N groups get one more). redundant_expert_slots > 0 without
//    explicit lists adds one replica at a time to the group with the fewest slots (lowest index
//    on ties), copying the expert with the fewest copies (lowest id on ties) that the group does
//    not hold yet, so that group sizes differ by one at most. Every group holds the same experts
//    in every MoE layer; online rebalancing (actors/rebalancer.hpp) later re-chooses the replicas
//    and their places per layer from the measured load.
//  - Shared experts live in expert group 0 only: one copy is enough (they are not routed, so
//    replicas would not spread load), and every token's rows go to that group anyway.
//  - Each router is co-located with its attention shard (same device, same process): the
//    attention -> router hand-off is on every layer of every token.
//  - Spreading: attention shards first (in order), then expert groups (largest first), each on
//    the device that has the fewest actors of its kind, then the fewest actors, then the fewest
//    bytes used, then comes first, among the devices with room. Several actors may share a
//    device when memory allows. When that greedy pass cannot fit everything, a
//    worst-fit-decreasing pass and then a best-fit-decreasing pass over all actors are tried;
//    if all fail: scheduler_errc::infeasible, "infeasible: ..." naming the actor and resource.
//
// Thread safety: pure functions and plain values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "base/error.hpp"
#include "model/config.hpp"
#include "runtime/cluster_config.hpp"
#include "scheduler/model_memory.hpp"
#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

struct device_ref {
  std::string node;
  bool gpu = false;
  int index = 0;
  /// "local/cpu0", "n1/gpu3".
  [[nodiscard]] std::string to_string() const;
  bool operator==(const device_ref&) const = default;
};

/// The router of shard `shard` is co-located with it; memory_bytes counts the attention
/// weights, the router and the KV-cache budget.
struct attention_assignment {
  int shard = 0;
  device_ref device;
  uint64_t memory_bytes = 0;
  bool operator==(const attention_assignment&) const = default;
};

struct expert_group_assignment {
  int group = 0;
  device_ref device;
  /// Logical expert ids held (the same set for every MoE layer), sorted; a logical expert in
  /// several groups is replicated.
  std::vector<int64_t> experts;
  bool holds_shared_experts = false;
  uint64_t memory_bytes = 0;
  bool operator==(const expert_group_assignment&) const = default;
};

struct device_usage {
  device_ref device;
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  bool operator==(const device_usage&) const = default;
};

struct placement {
  std::vector<attention_assignment> attention;
  std::vector<expert_group_assignment> expert_groups;
  std::vector<device_usage> devices;  ///< Every device of the cluster, in device order.
  int64_t num_logical_experts = 0;
  uint32_t version = 1;
  bool operator==(const placement&) const = default;
};

struct placement_options {
  /// Bytes of one weight and one KV-cache value as the runtime holds them (float32 on the CPU).
  size_t bytes_per_param = 4;
  /// Count the multi-token-prediction modules (their attention, and their MoE layer's experts).
  bool include_mtp = true;
  /// Tokens of latent KV cache each attention shard reserves. Default:
  /// ceil(max_running_requests / attention_shards) * min(max_position_embeddings,
  /// max_new_tokens_limit): every running request of the shard budgeted at that context.
  std::optional<int64_t> kv_cache_tokens;
};

/// The even contiguous split (plus round-robin replicas) or the config's explicit lists,
/// checked against the model: one sorted list of logical experts per group.
/// scheduler_errc::bad_assignment names the config field and line.
[[nodiscard]] caf::expected<std::vector<std::vector<int64_t>>> assign_experts(
    const runtime::cluster_config& config, int64_t num_logical_experts);

[[nodiscard]] caf::expected<placement> plan_placement(const runtime::cluster_config& config,
                                                      const model::model_config& model,
                                                      const placement_options& options = {});

/// KV-cache tokens per attention shard under `options` (see placement_options::kv_cache_tokens).
[[nodiscard]] int64_t kv_cache_tokens_per_shard(const runtime::cluster_config& config,
                                                const model::model_config& model,
                                                const placement_options& options = {});

/// {"version", "num_logical_experts", "attention": [...], "expert_groups": [...], "devices": [...]};
/// a device is {"name": "local/cpu0", "node", "kind": "gpu"|"cpu", "index"}.
[[nodiscard]] nlohmann::json to_json(const placement& p);
/// Reads to_json's output back (scheduler_errc::bad_placement when malformed).
[[nodiscard]] caf::expected<placement> placement_from_json(const nlohmann::json& json);

/// Two tables, actors and devices, for people.
[[nodiscard]] std::string render_table(const placement& p);

}  // namespace moe::scheduler
