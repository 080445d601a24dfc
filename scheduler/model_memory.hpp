// What each actor of the model needs in memory, computed from the checkpoint's tensor list
// (model/weights.hpp), and the model a cluster config names.
//
// The split follows the actors of docs/architecture.md:
//   attention shard  embedding, every layer's attention weights and norms, the dense MLPs of the
//                    first_k_dense_replace layers, the final norm and the LM head (and the MTP
//                    modules' non-expert weights when counted) -- one full copy per shard;
//   router           the gate matrix and bias of every MoE layer (one per attention shard,
//                    co-located with it);
//   routed expert    gate/up/down of one logical expert in every MoE layer (an expert group holds
//                    the same set of experts in every layer);
//   shared experts   the shared experts of every MoE layer (held once, by expert group 0).
// Plus, per attention shard, the latent KV cache: (kv_lora_rank + qk_rope_head_dim) values per
// token and layer.
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/error.hpp"
#include "model/config.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::scheduler {

struct model_memory {
  uint64_t attention_bytes = 0;      ///< Weights of one attention shard (no KV cache, no router).
  uint64_t router_bytes = 0;         ///< Gate weights and bias of every MoE layer.
  uint64_t per_expert_bytes = 0;     ///< One routed expert, across every MoE layer.
  uint64_t shared_expert_bytes = 0;  ///< All shared experts, across every MoE layer.
  uint64_t kv_cache_bytes_per_token = 0;  ///< Latent KV cache of one token, across every layer.
  int64_t num_moe_layers = 0;
};

/// `bytes_per_param`: bytes of one weight (and one KV-cache value) as the runtime holds them:
/// 4 for float32 on the CPU today, 2 for bf16. MTP modules count when `include_mtp`.
[[nodiscard]] model_memory model_memory_estimate(const model::model_config& config,
                                                 size_t bytes_per_param, bool include_mtp = true);

/// The model config.model names: the preset's config, or `path`/config.json. Errors
/// (scheduler_errc::bad_model) name the config file and line: "deploy/x.yaml:9: model.preset:
/// unknown model preset 'huge' (known: tiny, small, v2lite-8L)".
[[nodiscard]] caf::expected<model::model_config> resolve_model_config(
    const runtime::cluster_config& config);

}  // namespace moe::scheduler
