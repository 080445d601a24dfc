#include "actors/attention.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <cstring>
#include <deque>
#include <numeric>
#include <optional>
#include <unordered_map>

#include "actors/actor_metrics.hpp"
#include "actors/training_owner.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/sampling.hpp"
#include "model/attention_block.hpp"
#include "model/model_errc.hpp"
#include "model/reference_engine.hpp"
#include "model/trunk_training.hpp"

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

// The inference blocks of a shard, bound to its weights.
struct serving_blocks {
  model::embedding_head head;
  std::vector<model::attention_block> attention;
  std::vector<std::optional<model::mlp_block>> dense;
};

caf::expected<serving_blocks> bind_serving(const model::checkpoint& weights) {
  const auto& c = weights.config;
  const auto lookup = model::lookup_in(weights);
  auto head = model::embedding_head::bind(c, lookup);
  if (!head) return head.error();
  serving_blocks b{*head, {}, {}};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto a = model::attention_block::bind(c, l, lookup);
    if (!a) return a.error();
    b.attention.push_back(std::move(*a));
    if (c.is_moe_layer(l)) {
      b.dense.emplace_back();
    } else {
      auto m = model::mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.", c.hidden_size,
                                      c.intermediate_size, lookup);
      if (!m) return m.error();
      b.dense.emplace_back(*m);
    }
  }
  return b;
}

struct queued_train {
  train_request request;
  caf::typed_response_promise<train_result> promise;
};

// Training (actors/training_messages.hpp): the shard's own copy of its weights (serving shares
// one between the shards of a process, which must not all apply the same update) and the trunk.
struct shard_training {
  std::shared_ptr<model::checkpoint> own;
  std::optional<model::trunk_training> trunk;
  training_owner owner;
};

struct attention_state {
  std::shared_ptr<const model::checkpoint> weights;
  std::optional<model::embedding_head> head;
  std::vector<model::attention_block> attention;
  std::vector<std::optional<model::mlp_block>> dense;
  std::optional<shard_training> training;
  std::deque<queued_train> train_queue;  // run when no serving step waits
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
void start_training(pointer self);

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
  kc::sampler sampler(V);
  for (size_t i = 0; i < ctx.job.request.entries.size(); ++i) {
    const auto& e = ctx.job.request.entries[i];
    int32_t token = 0;
    if (sampler.draw(logits.data() + i * V,
                     {e.sampling.temperature, e.sampling.top_k, e.sampling.top_p}, e.sampling.seed,
                     e.sample_offset, &token) != kernels::kernel_status::ok)
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
  if (st.queue.empty()) {
    if (!st.train_queue.empty()) start_training(self);
    return;
  }
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

// --- training (actors/training_messages.hpp) ---------------------------------------------------

caf::error training_error(std::string text) {
  return model::make_error(model::model_errc::bad_input, "attention training: " + std::move(text));
}

// Made on first use: a private copy of the weights, the serving blocks rebound to it, the trunk.
caf::expected<shard_training*> training_of(pointer self) {
  auto& st = self->state;
  if (st.training) return &*st.training;
  shard_training t;
  t.own = std::make_shared<model::checkpoint>(*st.weights);
  auto blocks = bind_serving(*t.own);
  if (!blocks) return blocks.error();
  auto trunk = model::trunk_training::bind(t.own->config, model::lookup_in(*t.own));
  if (!trunk) return trunk.error();
  t.trunk.emplace(std::move(*trunk));
  st.head = blocks->head;
  st.attention = std::move(blocks->attention);
  st.dense = std::move(blocks->dense);
  st.weights = t.own;
  st.training = std::move(t);
  return &*st.training;
}

struct train_context {
  queued_train job;
  int64_t layer = 0;
  double loss = 0;
  double balance_loss = 0;
};

void train_done(pointer self, const std::shared_ptr<train_context>& ctx, caf::expected<train_result> r) {
  if (r) ctx->job.promise.deliver(std::move(*r));
  else ctx->job.promise.deliver(std::move(r.error()));
  self->state.busy = false;
  start_next(self);
}

void train_backward_layers(pointer self, std::shared_ptr<train_context> ctx);

void train_forward_layers(pointer self, std::shared_ptr<train_context> ctx) {
  auto& st = self->state;
  auto& trunk = *st.training->trunk;
  const auto& c = trunk.config();
  while (ctx->layer < c.num_hidden_layers) {
    const int64_t l = ctx->layer;
    if (!c.is_moe_layer(l)) {
      if (auto err = trunk.forward_dense_layer(l)) return train_done(self, ctx, err);
      ++ctx->layer;
      continue;
    }
    if (auto err = trunk.forward_attention(l)) return train_done(self, ctx, err);
    const auto in = trunk.mlp_input();
    train_route_request req;
    req.layer = l;
    req.step = ctx->job.request.step;
    req.x = tensor_ref::wrap(std::vector<float>(in.begin(), in.end()),
                             {static_cast<int64_t>(trunk.num_tokens()), c.hidden_size});
    req.cu_seqlens.assign(trunk.cu_seqlens().begin(), trunk.cu_seqlens().end());
    req.balance_alpha = ctx->job.request.balance_alpha;
    self->request(st.router, caf::infinite, train_forward_atom::value, std::move(req))
        .then(
            [self, ctx](route_result& r) {
              auto& trunk = *self->state.training->trunk;
              if (!r.y.data()) return train_done(self, ctx, training_error("malformed router result"));
              if (auto err = trunk.add_moe_output({r.y.data(), static_cast<size_t>(r.y.num_elements())}))
                return train_done(self, ctx, err);
              ++ctx->layer;
              train_forward_layers(self, ctx);
            },
            [self, ctx](caf::error& e) { train_done(self, ctx, std::move(e)); });
    return;
  }
  auto loss = trunk.loss(ctx->job.request.loss_scale);
  if (!loss) return train_done(self, ctx, std::move(loss.error()));
  ctx->loss = *loss;
  ctx->layer = c.num_hidden_layers - 1;
  train_backward_layers(self, ctx);
}

void train_backward_layers(pointer self, std::shared_ptr<train_context> ctx) {
  auto& st = self->state;
  auto& trunk = *st.training->trunk;
  const auto& c = trunk.config();
  while (ctx->layer >= 0) {
    const int64_t l = ctx->layer;
    if (!c.is_moe_layer(l)) {
      if (auto err = trunk.backward_dense_layer(l)) return train_done(self, ctx, err);
      --ctx->layer;
      continue;
    }
    const auto dy = trunk.hidden_grad();
    layer_gradient g;
    g.layer = l;
    g.step = ctx->job.request.step;
    g.grad = tensor_ref::wrap(std::vector<float>(dy.begin(), dy.end()),
                              {static_cast<int64_t>(trunk.num_tokens()), c.hidden_size});
    self->request(st.router, caf::infinite, train_backward_atom::value, std::move(g))
        .then(
            [self, ctx, l](layer_gradient& dx) {
              auto& trunk = *self->state.training->trunk;
              if (!dx.grad.data()) return train_done(self, ctx, training_error("malformed router gradient"));
              if (auto err = trunk.backward_attention(l, {dx.grad.data(), static_cast<size_t>(dx.grad.num_elements())}))
                return train_done(self, ctx, err);
              ctx->balance_loss += dx.balance_loss;
              --ctx->layer;
              train_backward_layers(self, ctx);
            },
            [self, ctx](caf::error& e) { train_done(self, ctx, std::move(e)); });
    return;
  }
  if (auto err = trunk.end_backward()) return train_done(self, ctx, err);
  train_result r;
  r.step = ctx->job.request.step;
  r.loss = ctx->loss;
  r.balance_loss = ctx->balance_loss;
  for (auto t : trunk.targets()) r.predicted_positions += t >= 0;
  train_done(self, ctx, std::move(r));
}

void start_training(pointer self) {
  auto& st = self->state;
  auto ctx = std::make_shared<train_context>();
  ctx->job = std::move(st.train_queue.front());
  st.train_queue.pop_front();
  st.busy = true;
  auto t = training_of(self);
  if (!t) return train_done(self, ctx, std::move(t.error()));
  const auto& req = ctx->job.request;
  const auto& cu = req.cu_seqlens;
  bool ok = cu.size() >= 2 && cu.front() == 0 && cu.back() == static_cast<int32_t>(req.tokens.size());
  for (size_t i = 1; ok && i < cu.size(); ++i) ok = cu[i] >= cu[i - 1];
  if (!ok) return train_done(self, ctx, training_error("cu_seqlens must rise from 0 to the token count"));
  std::vector<std::vector<int32_t>> sequences;
  for (size_t i = 0; i + 1 < cu.size(); ++i) sequences.emplace_back(req.tokens.begin() + cu[i], req.tokens.begin() + cu[i + 1]);
  if (auto err = (*t)->trunk->begin(sequences)) return train_done(self, ctx, err);
  train_forward_layers(self, ctx);
}

std::vector<std::span<float>> trunk_grad_spans(model::trunk_training& trunk) {
  std::vector<std::span<float>> out;
  trunk.for_each_grad([&](const std::string&, std::vector<float>& g) { out.emplace_back(g); });
  return out;
}

caf::expected<gradient_report> train_grads(pointer self, uint64_t step) {
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  gradient_report r;
  r.step = step;
  auto flat = flatten_grads(trunk_grad_spans(*(*t)->trunk));
  const auto n = static_cast<int64_t>(flat.size());
  r.shared = tensor_ref::wrap(std::move(flat), {n});
  return r;
}

caf::expected<uint64_t> train_apply(pointer self, const train_update& u) {
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  auto& trunk = *(*t)->trunk;
  auto grads = trunk_grad_spans(trunk);
  if (auto err = unflatten_grads(u.shared.local ? std::span<const float>(*u.shared.local) : std::span<const float>{},
                                 grads))
    return err;
  if (auto err = (*t)->owner.apply(u, trunk.parameters(*(*t)->own), grads)) return err;
  trunk.zero_grads();
  return u.step;
}

// The trainer's rollback: the trunk's weights and moments from its snapshot. The trainer sends
// it only once every training step it started here has ended (actors/trainer.hpp).
caf::expected<int64_t> train_restore(pointer self, const owner_state& snapshot, const train_hyper& h) {
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  std::vector<restore_target> targets;
  (*t)->trunk->for_each_grad([&](const std::string& name, std::vector<float>&) {
    targets.push_back({name, (*t)->own->find(name)->data()});
  });
  if (auto err = (*t)->owner.restore(snapshot, targets, {h.beta1, h.beta2, h.eps, h.weight_decay})) return err;
  (*t)->trunk->zero_grads();
  return snapshot.optimizer_steps;
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
  auto blocks = bind_serving(*weights);
  if (!blocks) return blocks.error();
  auto impl = [](pointer self, std::shared_ptr<const model::checkpoint> w, serving_blocks b, router_actor r,
                 attention_options opts) -> attention_actor::behavior_type {
    const auto& cache_opts = opts.cache;
    auto& st = self->state;
    const auto& cfg = w->config;
    st.cache = std::make_unique<model::latent_cache>(cfg.num_hidden_layers, cfg.kv_lora_rank,
                                                     cfg.qk_rope_head_dim, cache_opts);
    st.weights = std::move(w);
    st.head = b.head;
    st.attention = std::move(b.attention);
    st.dense = std::move(b.dense);
    st.router = std::move(r);
    st.registry = opts.metrics;
    st.transport = opts.transport;
    if (opts.metrics) {
      const std::string id = std::to_string(opts.shard);
      st.mailbox = mailbox_gauge(*opts.metrics, "attention", id);
      st.queued_steps = queued_steps_gauge(*opts.metrics, id);
      st.free_cache_blocks = free_cache_blocks_gauge(*opts.metrics, id);
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
        [self](train_state_atom) -> caf::result<owner_state> {
          auto t = training_of(self);
          if (!t) return std::move(t.error());
          std::vector<state_entry> entries;
          (*t)->trunk->for_each_grad([&](const std::string& name, std::vector<float>&) {
            const auto* v = std::as_const(*(*t)->own).find(name);
            entries.push_back({name, v->shape(), v->data()});
          });
          auto s = (*t)->owner.state(entries);
          if (auto err = export_owner_state(self->state.transport, self->node(), reply_node(self), s)) return err;
          return s;
        },
        // Training steps queue behind serving steps and run one at a time like them.
        [self](train_step_atom, train_request& req) -> caf::result<train_result> {
          auto rp = self->make_response_promise<train_result>();
          self->state.train_queue.push_back({std::move(req), rp});
          start_next(self);
          return rp;
        },
        [self](train_grads_atom, uint64_t step) {
          return answer_gradients(self, self->state.transport, train_grads(self, step));
        },
        [self](train_apply_atom, train_update& u) {
          return receive_update(self, self->state.transport, u,
                                [self](const train_update& landed) { return train_apply(self, landed); });
        },
        [self](train_restore_atom, owner_state& snapshot, train_hyper& h) {
          return receive_restore(self, self->state.transport, snapshot,
                                 [self, h](const owner_state& s) { return train_restore(self, s, h); });
        },
    };
  };
  return sys.spawn(impl, std::move(weights), std::move(*blocks), std::move(router), options);
}

}  // namespace moe::actors
