#include "actors/engine_shard.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "actors/actor_metrics.hpp"
#include "base/assert.hpp"
#include "model/model_errc.hpp"

namespace moe::actors {

namespace {

struct engine_shard_state {
  std::unique_ptr<model::step_engine> engine;
  int shard = 0;
  tensor_transport transport;
  mailbox_gauge mailbox;
  prometheus::Gauge* free_cache_blocks = nullptr;
  engine_step_metrics steps;
  std::shared_ptr<prometheus::Registry> registry;  // keeps the metrics above alive
  static inline const char* name = "engine_shard";
};

caf::error no_training(int shard) {
  return model::make_error(
      model::model_errc::bad_input,
      "shard " + std::to_string(shard) +
          " runs the whole model on one engine and serves only: training runs on the "
          "actor graph (attention shards, routers, expert groups)");
}

void report_cache(engine_shard_state& st) {
  if (st.free_cache_blocks)
    st.free_cache_blocks->Set(static_cast<double>(st.engine->free_cache_blocks()));
}

caf::expected<step_result> run_step(engine_shard_state& st, const step_request& req,
                                    const caf::node_id& here, const caf::node_id& reply_to) {
  step_result out;
  out.step = req.step;
  if (req.entries.empty()) return out;
  std::vector<model::step_sequence> seqs;
  seqs.reserve(req.entries.size());
  for (const auto& e : req.entries) {
    seqs.push_back({e.sequence,
                    e.tokens,
                    {e.sampling.temperature, e.sampling.top_k, e.sampling.top_p},
                    e.sampling.seed,
                    e.sample_offset});
    out.sequences.push_back(e.sequence);
  }
  const auto started = std::chrono::steady_clock::now();
  auto r = req.prefill ? st.engine->prefill(seqs, req.want_logits)
                       : st.engine->decode(seqs, req.want_logits);
  int64_t tokens = 0;
  for (const auto& s : seqs) tokens += static_cast<int64_t>(s.tokens.size());
  st.steps.observe(
      req.prefill,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(), tokens,
      static_cast<bool>(r));
  report_cache(st);
  if (!r) return r.error();
  out.tokens = std::move(r->tokens);
  if (req.want_logits) {
    const auto rows = static_cast<int64_t>(seqs.size());
    out.logits = tensor_ref::wrap(std::move(r->logits), {rows, st.engine->config().vocab_size});
    const runtime::tensor_frame_meta meta{protocol::frame_kind::activations, 0, out.step, 0};
    if (auto err = export_tensor(st.transport, here, reply_to, out.logits, meta)) {
      // The tokens were computed and the cache advanced; a prefill that cannot answer must not
      // leave its sequences cached (the controller replays or fails them).
      if (req.prefill) {
        for (const auto& s : seqs) st.engine->release(s.id);
        report_cache(st);
      }
      return err;
    }
  }
  return out;
}

}  // namespace

attention_actor spawn_engine_shard(caf::actor_system& sys,
                                   std::unique_ptr<model::step_engine> engine,
                                   const engine_shard_options& options) {
  MOE_ASSERT(engine != nullptr);
  auto impl = [](attention_actor::stateful_pointer<engine_shard_state> self,
                 std::shared_ptr<std::unique_ptr<model::step_engine>> owned,
                 engine_shard_options opts) -> attention_actor::behavior_type {
    auto& st = self->state;
    st.engine = std::move(*owned);
    st.shard = opts.shard;
    st.transport = opts.transport;
    st.registry = opts.metrics;
    if (opts.metrics) {
      const std::string id = std::to_string(opts.shard);
      st.mailbox = mailbox_gauge(*opts.metrics, "attention", id);
      st.free_cache_blocks = free_cache_blocks_gauge(*opts.metrics, id);
      st.steps = engine_step_metrics(*opts.metrics, id);
      report_cache(st);
    }
    return {
        [self](step_atom, step_request& req) -> caf::result<step_result> {
          self->state.mailbox.set(self->mailbox().size());
          const auto& sender = self->current_sender();
          auto r = run_step(self->state, req, self->node(), sender ? sender->node() : self->node());
          if (!r) return std::move(r.error());
          return std::move(*r);
        },
        [self](release_atom, std::vector<uint64_t>& ids) {
          for (auto id : ids) self->state.engine->release(id);
          report_cache(self->state);
        },
        [self](train_step_atom, train_request&) -> caf::result<train_result> {
          return no_training(self->state.shard);
        },
        [self](train_grads_atom, uint64_t) -> caf::result<gradient_report> {
          return no_training(self->state.shard);
        },
        [self](train_apply_atom, train_update&) -> caf::result<uint64_t> {
          return no_training(self->state.shard);
        },
        [self](train_state_atom) -> caf::result<owner_state> {
          return no_training(self->state.shard);
        },
        [self](train_restore_atom, owner_state&, train_hyper&) -> caf::result<int64_t> {
          return no_training(self->state.shard);
        },
    };
  };
  // The engine travels as a shared slot: CAF copies spawn arguments.
  auto owned = std::make_shared<std::unique_ptr<model::step_engine>>(std::move(engine));
  return sys.spawn<caf::detached>(impl, std::move(owned), options);
}

}  // namespace moe::actors
