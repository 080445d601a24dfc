// An attention shard that runs the whole model on one engine (model/step_engine.hpp): a
// data-parallel replica of the model, for a model that fits one device. It answers the
// controller exactly as an attention shard of the actor graph does (step, release), so
// continuous batching, streaming, deadlines, cancellation and replays after a failure work
// unchanged, but it hands no layer to a router: its engine holds the embedding, every layer
// (attention, dense MLPs, routed and shared experts), the final norm, the LM head and the
// latent KV cache of the sequences it owns. This is how one GPU serves the GPU engine
// (engine::gpu_step_engine) behind the job API (`moe serve --engine gpu`); the reference engine
// behind it (model::reference_step_engine) is its CPU yardstick.
//
// What it does not do: training (the trainer drives the actor graph) and expert placement (no
// routers, no expert groups: nothing to rebalance). Training requests answer model_errc::
// bad_input saying so.
//
// Steps run one at a time, in arrival order, on the actor's own thread (detached: a step blocks
// it for the step's duration, which must not hold a worker of CAF's pool that the controller and
// the API need). A step's failure leaves none of its prefill's sequences cached; a release
// during a step is applied after it (mailbox order).
// Ownership: the actor owns its engine.
#pragma once

#include <caf/fwd.hpp>

#include <memory>

#include "actors/messages.hpp"
#include "actors/tensor_transport.hpp"
#include "model/step_engine.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

struct engine_shard_options {
  int shard = 0;
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  /// How logits (want_logits) reach a requester in another process (empty: one process).
  tensor_transport transport;
};

/// The shard, owning `engine` (non-null).
[[nodiscard]] attention_actor spawn_engine_shard(caf::actor_system& sys,
                                                 std::unique_ptr<model::step_engine> engine,
                                                 const engine_shard_options& options);

}  // namespace moe::actors
