#include "actors/attention.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <cstring>
#include <deque>
#include <numeric>
#include <optional>
#include <unordered_map>

#include "actors/actor_metrics.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/sampling.hpp"
#include "model/attention_block.hpp"
#include "model/model_errc.hpp"
#include "model/reference_engine.hpp"

namespace moe::actors {

namespace {

namespace kc = kernels::cpu;

struct queued_step {
  step_request request;
  caf::typed_response_promise<step_result> promise;
  caf::node_id reply_to;  // the requester's process, where logits must go
};

// Everything one step carries from layer to layer.
struct step_context {
  queued_step job;
  size_t num_tokens = 0;
  int64_t layer = 0;
  std::vector<float> x;                         // (T, hidden): the residual stream
  std::shared_ptr<std::vector<float>> mlp_in;   // (T, hidden): lent to the router, read-only
  std::vector<int32_t> cu;                      // prefill
  std::vector<int64_t> positions, slots;
  std::vector<int32_t> block_table, seq_lens;   // decode
  size_t max_blocks = 0;
  std::vector<uint64_t> reserved;               // prefill sequences to free on failure
};

struct attention_state {
  std::shared_ptr<const model::checkpoint> weights;
  std::optional<model::embedding_head> head;
  std::vector<model::attention_block> attention;
  std::vector<std::optional<model::mlp_block>> dense;
  std::unique_ptr<model::latent_cache> cache;
  std::unordered_map<uint64_t, int64_t> lengths;
  router_actor router;
  model::mlp_scratch scratch;
  std::deque<queued_step> queue;
  std::vector<uint64_t> pending_release;  // released while a step was in flight
  bool busy = false;
  tensor_transport transport;
  mailbox_gauge mailbox;
  prometheus::Gauge* queued_steps = nullptr;
  prometheus::Gauge* free_cache_blocks = nullptr;
  std::shared_ptr<prometheus::Registry> registry;  // keeps the metrics above alive
  static inline const char* name = "attention";
};

using pointer = attention_actor::stateful_pointer<attention_state>;

void start_next(pointer self);

void fail(pointer self, const std::shared_ptr<step_context>& ctx, caf::error err) {
  for (auto id : ctx->reserved) self->state.cache->release(id);
  ctx->job.promise.deliver(std::move(err));
  self->state.busy = false;
  start_next(self);
}

caf::error sample_all(pointer self, step_context& ctx, const std::vector<float>& logits,
                      step_result& out) {
  const auto& c = self->state.weights->config;
  const size_t V = static_cast<size_t>(c.vocab_size);
  std::vector<double> probs(V);
  std::vector<int32_t> order(V);
  for (size_t i = 0; i < ctx.job.request.entries.size(); ++i) {
    const auto& e = ctx.job.request.entries[i];
    kc::sample_args a;
    a.logits = logits.data() + i * V;
    a.vocab = V;
    a.params = {e.sampling.temperature, e.sampling.top_k, e.sampling.top_p};
    a.seed = e.sampling.seed;
    a.offset = e.sample_offset;
    a.probs_workspace = probs.data();
    a.order_workspace = order.data();
    int32_t token = 0;
    if (kc::sample(a, &token) != kernels::kernel_status::ok)
      return model::make_error(model::model_errc::bad_input,
                               "sequence " + std::to_string(e.sequence) + ": sampling parameters rejected");
    out.sequences.push_back(e.sequence);
    out.tokens.push_back(token);
  }
  return {};
}

void complete(pointer self, const std::shared_ptr<step_context>& ctx) {
  auto& st = self->state;
  const auto& c = st.weights->config;
  const size_t D = static_cast<size_t>(c.hidden_size), V = static_cast<size_t>(c.vocab_size);
  const auto& entries = ctx->job.request.entries;
  const size_t B = entries.size();
  std::vector<float> last(B * D);
  for (size_t i = 0; i < B; ++i) {
    const size_t row = ctx->job.request.prefill ? static_cast<size_t>(ctx->cu[i + 1] - 1) : i;
    std::memcpy(last.data() + i * D, ctx->x.data() + row * D, D * sizeof(float));
  }
  std::vector<float> logits(B * V);
  if (auto err = st.head->logits(last.data(), B, logits.data(), nullptr)) return fail(self, ctx, err);
  step_result out;
  out.step = ctx->job.request.step;
  if (auto err = sample_all(self, *ctx, logits, out)) return fail(self, ctx, err);
  for (size_t i = 0; i < B; ++i) {
    auto& len = st.lengths[entries[i].sequence];
    len = ctx->job.request.prefill ? static_cast<int64_t>(entries[i].tokens.size()) : len + 1;
  }
  if (ctx->job.request.want_logits) {
    out.logits = tensor_ref::wrap(std::move(logits), {static_cast<int64_t>(B), static_cast<int64_t>(V)});
    const runtime::tensor_frame_meta meta{protocol::frame_kind::activations, 0, out.step, 0};
    if (auto err = export_tensor(st.transport, self->node(), ctx->job.reply_to, out.logits, meta))
      return fail(self, ctx, err);
  }
  ctx->job.promise.deliver(std::move(out));
  st.busy = false;
  start_next(self);
}

void run_layers(pointer self, std::shared_ptr<step_context> ctx) {
  auto& st = self->state;
  const auto& c = st.weights->config;
  const size_t T = ctx->num_tokens, D = static_cast<size_t>(c.hidden_size);
  while (ctx->layer < c.num_hidden_layers) {
    const int64_t l = ctx->layer;
    caf::error err;
    if (ctx->job.request.prefill) {
      err = st.attention[l].prefill(ctx->x.data(), ctx->mlp_in->data(), T,
                                    {ctx->cu, ctx->positions, ctx->slots}, *st.cache);
    } else {
      err = st.attention[l].decode(ctx->x.data(), ctx->mlp_in->data(), T,
                                   {ctx->positions, ctx->slots, ctx->block_table, ctx->max_blocks,
                                    ctx->seq_lens},
                                   *st.cache);
    }
    if (err) return fail(self, ctx, err);
    if (auto& dense = st.dense[l]) {
      if (auto e = dense->forward(ctx->mlp_in->data(), T, ctx->x.data(), 1.0f, st.scratch))
        return fail(self, ctx, e);
      ++ctx->layer;
      continue;
    }
    route_request req;
    req.layer = l;
    req.step = ctx->job.request.step;
    req.x.shape = {static_cast<int64_t>(T), static_cast<int64_t>(D)};
    req.x.local = ctx->mlp_in;  // lent without a copy; untouched until the router answers
    self->request(st.router, caf::infinite, route_atom::value, std::move(req))
        .then(
            [self, ctx](route_result& r) {
              const size_t n = ctx->x.size();
              if (!r.y.data() || r.y.num_elements() != static_cast<int64_t>(n))
                return fail(self, ctx, model::make_error(model::model_errc::bad_input,
                                                         "attention: malformed router result"));
              if (kc::add(ctx->x.data(), r.y.data(), ctx->x.data(), n) != kernels::kernel_status::ok)
                return fail(self, ctx, model::make_error(model::model_errc::kernel_failed, "residual add"));
              ++ctx->layer;
              run_layers(self, ctx);
            },
            [self, ctx](caf::error& e) { fail(self, ctx, std::move(e)); });
    return;
  }
  complete(self, ctx);
}

caf::error prepare_prefill(attention_state& st, step_context& ctx) {
  const auto& c = st.weights->config;
  std::vector<int32_t> ids;
  ctx.cu = {0};
  for (const auto& e : ctx.job.request.entries) {
    if (e.tokens.empty())
      return model::make_error(model::model_errc::bad_input,
                               "sequence " + std::to_string(e.sequence) + ": empty prompt");
    if (st.lengths.count(e.sequence) || st.cache->contains(e.sequence))
      return model::make_error(model::model_errc::bad_input,
                               "sequence " + std::to_string(e.sequence) + " is already cached");
    if (static_cast<int64_t>(e.tokens.size()) > c.max_position_embeddings)
      return model::make_error(model::model_errc::bad_input, "prompt longer than max_position_embeddings");
    ids.insert(ids.end(), e.tokens.begin(), e.tokens.end());
    for (size_t p = 0; p < e.tokens.size(); ++p) ctx.positions.push_back(static_cast<int64_t>(p));
    ctx.cu.push_back(static_cast<int32_t>(ids.size()));
  }
  ctx.num_tokens = ids.size();
  ctx.x.resize(ids.size() * c.hidden_size);
  if (auto err = st.head->embed(ids, ctx.x.data())) return err;
  for (const auto& e : ctx.job.request.entries) {
    if (auto err = st.cache->reserve(e.sequence, static_cast<int64_t>(e.tokens.size()))) return err;
    ctx.reserved.push_back(e.sequence);
  }
  ctx.slots.resize(ids.size());
  const auto& entries = ctx.job.request.entries;
  for (size_t i = 0; i < entries.size(); ++i)
    for (int32_t t = ctx.cu[i]; t < ctx.cu[i + 1]; ++t)
      ctx.slots[t] = st.cache->slot(entries[i].sequence, ctx.positions[t]);
  return {};
}

caf::error prepare_decode(attention_state& st, step_context& ctx) {
  const auto& c = st.weights->config;
  const auto& entries = ctx.job.request.entries;
  const size_t B = entries.size();
  std::vector<int32_t> ids(B);
  ctx.positions.resize(B);
  ctx.slots.resize(B);
  ctx.seq_lens.resize(B);
  for (size_t b = 0; b < B; ++b) {
    auto it = st.lengths.find(entries[b].sequence);
    if (it == st.lengths.end() || entries[b].tokens.size() != 1)
      return model::make_error(model::model_errc::bad_input,
                               "sequence " + std::to_string(entries[b].sequence) +
                                   ": decode needs a prefilled sequence and one token");
    if (it->second >= c.max_position_embeddings)
      return model::make_error(model::model_errc::bad_input, "sequence reached max_position_embeddings");
    ids[b] = entries[b].tokens[0];
    ctx.positions[b] = it->second;
    ctx.seq_lens[b] = static_cast<int32_t>(it->second + 1);
  }
  ctx.num_tokens = B;
  ctx.x.resize(B * c.hidden_size);
  if (auto err = st.head->embed(ids, ctx.x.data())) return err;
  for (size_t b = 0; b < B; ++b) {
    if (auto err = st.cache->reserve(entries[b].sequence, ctx.positions[b] + 1)) return err;
    ctx.slots[b] = st.cache->slot(entries[b].sequence, ctx.positions[b]);
    ctx.max_blocks = std::max(ctx.max_blocks, st.cache->blocks(entries[b].sequence).size());
  }
  ctx.block_table.assign(B * ctx.max_blocks, 0);
  for (size_t b = 0; b < B; ++b) {
    const auto& blocks = st.cache->blocks(entries[b].sequence);
    std::copy(blocks.begin(), blocks.end(), ctx.block_table.begin() + b * ctx.max_blocks);
  }
  return {};
}

void release_now(attention_state& st, const std::vector<uint64_t>& ids) {
  for (auto id : ids) {
    st.cache->release(id);
    st.lengths.erase(id);
  }
}

void start_next(pointer self) {
  auto& st = self->state;
  if (st.busy) return;
  if (!st.pending_release.empty()) {
    release_now(st, st.pending_release);
    st.pending_release.clear();
  }
  if (st.queued_steps) st.queued_steps->Set(static_cast<double>(st.queue.size()));
  if (st.free_cache_blocks) st.free_cache_blocks->Set(static_cast<double>(st.cache->num_free_blocks()));
  if (st.queue.empty()) return;
  auto ctx = std::make_shared<step_context>();
  ctx->job = std::move(st.queue.front());
  st.queue.pop_front();
  st.busy = true;
  if (ctx->job.request.entries.empty()) {
    ctx->job.promise.deliver(step_result{ctx->job.request.step, {}, {}, {}});
    st.busy = false;
    return start_next(self);
  }
  auto err = ctx->job.request.prefill ? prepare_prefill(st, *ctx) : prepare_decode(st, *ctx);
  if (err) return fail(self, ctx, err);
  ctx->mlp_in = std::make_shared<std::vector<float>>(ctx->x.size());
  run_layers(self, ctx);
}

}  // namespace

bool attention_needs(std::string_view name) {
  return name.find(".mlp.experts.") == std::string_view::npos &&
         name.find(".mlp.shared_experts.") == std::string_view::npos &&
         name.find(".mlp.gate.") == std::string_view::npos;
}

caf::expected<attention_actor> spawn_attention(caf::actor_system& sys,
                                               std::shared_ptr<const model::checkpoint> weights,
                                               router_actor router, const attention_options& options) {
  const auto& c = weights->config;
  const auto lookup = model::lookup_in(*weights);
  auto head = model::embedding_head::bind(c, lookup);
  if (!head) return head.error();
  std::vector<model::attention_block> attention;
  std::vector<std::optional<model::mlp_block>> dense;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto a = model::attention_block::bind(c, l, lookup);
    if (!a) return a.error();
    attention.push_back(std::move(*a));
    if (c.is_moe_layer(l)) {
      dense.emplace_back();
    } else {
      auto m = model::mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.", c.hidden_size,
                                      c.intermediate_size, lookup);
      if (!m) return m.error();
      dense.emplace_back(*m);
    }
  }
  auto impl = [](pointer self, std::shared_ptr<const model::checkpoint> w, model::embedding_head h,
                 std::vector<model::attention_block> attn,
                 std::vector<std::optional<model::mlp_block>> dns, router_actor r,
                 attention_options opts) -> attention_actor::behavior_type {
    const auto& cache_opts = opts.cache;
    auto& st = self->state;
    const auto& cfg = w->config;
    st.cache = std::make_unique<model::latent_cache>(cfg.num_hidden_layers, cfg.kv_lora_rank,
                                                     cfg.qk_rope_head_dim, cache_opts);
    st.weights = std::move(w);
    st.head = h;
    st.attention = std::move(attn);
    st.dense = std::move(dns);
    st.router = std::move(r);
    st.registry = opts.metrics;
    st.transport = opts.transport;
    if (opts.metrics) {
      const std::string id = std::to_string(opts.shard);
      st.mailbox = mailbox_gauge(*opts.metrics, "attention", id);
      st.queued_steps = &prometheus::BuildGauge()
                             .Name("moe_attention_queued_steps")
                             .Help("Steps waiting behind the running one on an attention shard")
                             .Register(*opts.metrics)
                             .Add({{"shard", id}});
      st.free_cache_blocks = &prometheus::BuildGauge()
                                  .Name("moe_attention_free_cache_blocks")
                                  .Help("Free blocks of the latent KV cache of a shard")
                                  .Register(*opts.metrics)
                                  .Add({{"shard", id}});
    }
    return {
        [self](step_atom, step_request& req) -> caf::result<step_result> {
          self->state.mailbox.set(self->mailbox().size());
          const auto& sender = self->current_sender();
          const caf::node_id reply_to = sender ? sender->node() : self->node();
          auto rp = self->make_response_promise<step_result>();
          self->state.queue.push_back({std::move(req), rp, reply_to});
          start_next(self);
          return rp;
        },
        [self](release_atom, std::vector<uint64_t>& ids) {
          // A sequence inside the running step keeps its cache until the step is over.
          auto& st = self->state;
          if (st.busy)
            st.pending_release.insert(st.pending_release.end(), ids.begin(), ids.end());
          else
            release_now(st, ids);
        },
    };
  };
  return sys.spawn(impl, std::move(weights), *head, std::move(attention), std::move(dense),
                   std::move(router), options);
}

}  // namespace moe::actors
