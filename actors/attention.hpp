// The attention actor: one data-parallel shard of attention. Holds the embedding, every layer's
// MLA weights and norms (and the dense first-k MLPs), the final norm, the LM head and the latent
// KV cache of the sequences it owns; runs prefill and decode steps layer by layer, handing each
// MoE layer to its co-located router, then computes logits and samples.
// Steps are processed one at a time, in arrival order; a step's failure frees what it reserved.
#pragma once

#include <caf/fwd.hpp>

#include <memory>

#include "actors/messages.hpp"
#include "actors/tensor_transport.hpp"
#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

struct attention_options {
  int shard = 0;
  model::latent_cache_options cache;
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  /// How logits (want_logits) reach a requester in another process (empty: one process).
  tensor_transport transport;
};

[[nodiscard]] caf::expected<attention_actor> spawn_attention(
    caf::actor_system& sys, std::shared_ptr<const model::checkpoint> weights, router_actor router,
    const attention_options& options);

/// The names an attention shard needs from a checkpoint (for load_options::filter).
[[nodiscard]] bool attention_needs(std::string_view name);

}  // namespace moe::actors
