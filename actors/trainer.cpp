#include "actors/trainer.hpp"

#include <caf/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <optional>

#include "actors/training_owner.hpp"
#include "model/training_checkpoint.hpp"

namespace moe::actors {

const char* to_string(trainer_errc e) noexcept {
  switch (e) {
    case trainer_errc::busy: return "busy";
    case trainer_errc::bad_batch: return "bad_batch";
    case trainer_errc::failed: return "failed";
    case trainer_errc::unavailable: return "unavailable";
  }
  return "unknown";
}

caf::error make_error(trainer_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("trainer"), caf::make_message(std::move(text))};
}

router_layout uniform_layout(const model::model_config& c, const std::vector<std::vector<int64_t>>& group_experts,
                             uint32_t version) {
  router_layout l;
  l.version = version;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (!c.is_moe_layer(layer)) continue;
    l.layers.push_back(layer);
    auto groups = group_experts;
    for (auto& g : groups) std::sort(g.begin(), g.end());
    l.experts.push_back(std::move(groups));
  }
  return l;
}

namespace {

struct trainer_metrics {
  prometheus::Counter* steps = nullptr;
  prometheus::Counter* tokens = nullptr;
  prometheus::Gauge* loss = nullptr;
  prometheus::Gauge* grad_norm = nullptr;
  prometheus::Histogram* step_seconds = nullptr;
  prometheus::Family<prometheus::Gauge>* balance = nullptr;
};

// One step in flight: what the phases collect.
struct step_state {
  train_batch batch;
  caf::typed_response_promise<train_step_report> promise;
  std::chrono::steady_clock::time_point start;
  train_step_report report;
  size_t outstanding = 0;
  bool failed = false;
  // Phase 2.
  std::vector<tensor_ref> shard_grads, router_grads, group_grads;
  std::vector<double> group_norm_sq;
  std::vector<std::vector<int64_t>> router_loads;
};

struct trainer_state {
  trainer_options options;
  // Per group, the replicated (layer, expert) pairs it holds, flat; and per replicated pair,
  // its holders in group order with the pair's index in each holder's list.
  std::vector<std::vector<int64_t>> replicated;
  std::map<std::pair<int64_t, int64_t>, std::vector<std::pair<size_t, size_t>>> holders;
  size_t expert_grad_size = 0;  // one expert's gate, up and down gradients
  std::shared_ptr<step_state> running;
  // Steps wait here while one runs, a checkpoint is written or a hold is on.
  struct waiting_step {
    train_batch batch;
    caf::typed_response_promise<train_step_report> promise;
  };
  std::deque<waiting_step> waiting;
  std::optional<uint64_t> hold;  // hold_steps' id while it holds
  uint64_t next_hold = 1;
  std::optional<caf::typed_response_promise<uint64_t>> hold_answer;  // once the running step ended
  bool saving = false;
  int64_t steps_done = 0;
  std::string lost;  // why no step can run any more (a node running owners is down)
  model::adamw_options last_adamw;  // the hyperparameters of the last step, for a checkpoint
  trainer_metrics metrics;
  static inline const char* name = "trainer";
};

using pointer = trainer_actor::stateful_pointer<trainer_state>;

void run_waiting(pointer self);

// Which experts several groups hold, and where each sits in its holders' lists.
void set_layout(trainer_state& st, const router_layout& layout) {
  st.options.layout = layout;
  st.replicated.assign(st.options.groups.size(), {});
  st.holders.clear();
  std::map<std::pair<int64_t, int64_t>, std::vector<size_t>> where;
  for (size_t i = 0; i < layout.layers.size(); ++i)
    for (size_t g = 0; g < layout.experts[i].size(); ++g)
      for (auto e : layout.experts[i][g]) where[{layout.layers[i], e}].push_back(g);
  for (const auto& [key, groups] : where) {
    if (groups.size() < 2) continue;
    auto& h = st.holders[key];
    for (auto g : groups) {
      if (g >= st.replicated.size()) continue;
      h.emplace_back(g, st.replicated[g].size() / 2);
      st.replicated[g].push_back(key.first);
      st.replicated[g].push_back(key.second);
    }
  }
}

void finish(pointer self, const std::shared_ptr<step_state>& s, caf::error err) {
  if (s->failed) return;
  s->failed = true;
  auto& st = self->state;
  if (err) {
    s->promise.deliver(std::move(err));
  } else {
    auto& r = s->report;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - s->start).count();
    if (st.metrics.steps) {
      st.metrics.steps->Increment();
      st.metrics.tokens->Increment(static_cast<double>(r.tokens));
      st.metrics.loss->Set(r.loss);
      st.metrics.grad_norm->Set(r.grad_norm);
      st.metrics.step_seconds->Observe(r.seconds);
      for (size_t i = 0; i < r.load_balance.size(); ++i)
        st.metrics.balance->Add({{"layer", std::to_string(st.options.layout.layers[i])}}).Set(r.load_balance[i]);
    }
    ++st.steps_done;
    const auto& h = s->batch.hyper;
    st.last_adamw = {h.beta1, h.beta2, h.eps, h.weight_decay};
    s->promise.deliver(r);
  }
  st.running.reset();
  if (st.hold_answer) {
    st.hold_answer->deliver(*st.hold);
    st.hold_answer.reset();
  }
  run_waiting(self);
}

// A failure in `what`: ends the step with trainer_errc::failed.
auto failer(pointer self, const std::shared_ptr<step_state>& s, std::string what) {
  return [self, s, what = std::move(what)](caf::error& e) {
    finish(self, s, make_error(trainer_errc::failed, what + ": " + error_text(e)));
  };
}

void update_phase(pointer self, const std::shared_ptr<step_state>& s);

// Phase 2: every owner's gradients; the sums when all are in.
void gradient_phase(pointer self, const std::shared_ptr<step_state>& s) {
  auto& st = self->state;
  const auto& o = st.options;
  s->shard_grads.assign(o.shards.size(), {});
  s->router_grads.assign(o.routers.size(), {});
  s->group_grads.assign(o.groups.size(), {});
  s->group_norm_sq.assign(o.groups.size(), 0.0);
  s->router_loads.assign(o.routers.size(), {});
  s->outstanding = o.shards.size() + o.routers.size() + o.groups.size();
  const uint64_t step = s->batch.step;
  auto arrived = [self, s](tensor_ref& slot, tensor_ref& got, const std::string& who) {
    with_local_tensor(
        self, self->state.options.transport, std::move(got),
        [self, s, &slot](tensor_ref& local) {
          if (s->failed) return;
          slot = std::move(local);
          if (--s->outstanding == 0) update_phase(self, s);
        },
        failer(self, s, who + " gradients"));
  };
  for (size_t i = 0; i < o.shards.size(); ++i)
    self->request(o.shards[i], o.phase_timeout, train_grads_atom::value, step)
        .then(
            [s, i, arrived](gradient_report& r) {
              if (!s->failed) arrived(s->shard_grads[i], r.shared, "attention shard " + std::to_string(i));
            },
            failer(self, s, "attention shard " + std::to_string(i) + " gradients"));
  for (size_t i = 0; i < o.routers.size(); ++i)
    self->request(o.routers[i], o.phase_timeout, train_grads_atom::value, step)
        .then(
            [s, i, arrived](gradient_report& r) {
              if (s->failed) return;
              s->router_loads[i] = std::move(r.expert_loads);
              arrived(s->router_grads[i], r.shared, "router " + std::to_string(i));
            },
            failer(self, s, "router " + std::to_string(i) + " gradients"));
  for (size_t i = 0; i < o.groups.size(); ++i)
    self->request(o.groups[i], o.phase_timeout, train_grads_atom::value, step, st.replicated[i])
        .then(
            [s, i, arrived](gradient_report& r) {
              if (s->failed) return;
              s->group_norm_sq[i] = r.own_norm_sq;
              arrived(s->group_grads[i], r.shared, "expert group " + std::to_string(i));
            },
            failer(self, s, "expert group " + std::to_string(i) + " gradients"));
}

// Sums equally long tensors in order; nullopt when a size differs.
std::optional<std::vector<float>> sum_in_order(const std::vector<tensor_ref>& parts) {
  std::vector<float> sum;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = *parts[i].local;
    if (i == 0) {
      sum = p;
      continue;
    }
    if (p.size() != sum.size()) return std::nullopt;
    for (size_t j = 0; j < sum.size(); ++j) sum[j] += p[j];
  }
  return sum;
}

double norm_sq(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return s;
}

// Phase 3: the sums, the clip factor, and every owner's update.
void update_phase(pointer self, const std::shared_ptr<step_state>& s) {
  auto& st = self->state;
  const auto& o = st.options;
  auto trunk = sum_in_order(s->shard_grads);
  auto gates = sum_in_order(s->router_grads);
  if (!trunk || !gates)
    return finish(self, s, make_error(trainer_errc::failed, "the shards' or routers' gradients differ in size"));
  // Replicated experts: the sum over the holders, in group order.
  std::vector<std::vector<float>> group_sums(o.groups.size());
  for (size_t g = 0; g < o.groups.size(); ++g) {
    const size_t want = st.replicated[g].size() / 2 * st.expert_grad_size;
    if (s->group_grads[g].local->size() != want)
      return finish(self, s, make_error(trainer_errc::failed, "expert group " + std::to_string(g) + " reported " +
                                                                  std::to_string(s->group_grads[g].local->size()) +
                                                                  " replicated gradient values, not " +
                                                                  std::to_string(want)));
    group_sums[g].resize(want);
  }
  double total_sq = norm_sq(*trunk) + norm_sq(*gates);
  for (double x : s->group_norm_sq) total_sq += x;
  const size_t n = st.expert_grad_size;
  std::vector<float> sum(n);
  for (const auto& [key, holders] : st.holders) {
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (const auto& [g, index] : holders) {
      const float* src = s->group_grads[g].local->data() + index * n;
      for (size_t j = 0; j < n; ++j) sum[j] += src[j];
    }
    total_sq += norm_sq(sum);
    for (const auto& [g, index] : holders) std::copy(sum.begin(), sum.end(), group_sums[g].begin() + index * n);
  }
  const auto& h = s->batch.hyper;
  s->report.grad_norm = std::sqrt(total_sq);
  train_update base;
  base.step = s->batch.step;
  base.grad_scale = h.grad_clip > 0 ? h.grad_clip / (s->report.grad_norm + 1e-6) : 1.0;
  base.lr = h.lr;
  base.beta1 = h.beta1;
  base.beta2 = h.beta2;
  base.eps = h.eps;
  base.weight_decay = h.weight_decay;
  // The step's expert load, summed over the routers, and its balance per layer.
  std::vector<int64_t> loads;
  for (const auto& l : s->router_loads) {
    if (loads.empty()) loads.assign(l.size(), 0);
    if (l.size() != loads.size())
      return finish(self, s, make_error(trainer_errc::failed, "the routers' expert loads differ in size"));
    for (size_t i = 0; i < l.size(); ++i) loads[i] += l[i];
  }
  const size_t num_layers = o.layout.layers.size();
  if (num_layers > 0 && !loads.empty()) {
    const size_t E = loads.size() / num_layers;
    for (size_t l = 0; l < num_layers; ++l) {
      int64_t total = 0, max = 0;
      for (size_t e = 0; e < E; ++e) {
        total += loads[l * E + e];
        max = std::max(max, loads[l * E + e]);
      }
      s->report.load_balance.push_back(total > 0 ? static_cast<double>(max) * static_cast<double>(E) / total : 0.0);
    }
  }
  s->outstanding = o.shards.size() + o.routers.size() + o.groups.size();
  auto applied = [self, s](uint64_t) {
    if (!s->failed && --s->outstanding == 0) finish(self, s, {});
  };
  // Each destination gets its own ref (export_tensor stamps it for that destination's process).
  auto send = [&](const auto& handle, train_update u, std::shared_ptr<const std::vector<float>> values,
                  const std::string& who) {
    u.shared.shape = {static_cast<int64_t>(values->size())};
    u.shared.local = std::move(values);
    const runtime::tensor_frame_meta meta{protocol::frame_kind::gradients, 0, u.step, 0};
    if (auto err = export_tensor(o.transport, self->node(), handle.node(), u.shared, meta))
      return finish(self, s, make_error(trainer_errc::failed, who + " update: " + error_text(err)));
    self->request(handle, o.phase_timeout, train_apply_atom::value, std::move(u)).then(applied, failer(self, s, who + " update"));
  };
  auto trunk_sum = std::make_shared<const std::vector<float>>(std::move(*trunk));
  auto gate_sum = std::make_shared<const std::vector<float>>(std::move(*gates));
  for (size_t i = 0; i < o.shards.size(); ++i) send(o.shards[i], base, trunk_sum, "attention shard " + std::to_string(i));
  train_update router_update = base;
  router_update.expert_loads = std::move(loads);
  router_update.bias_update_speed = h.bias_update_speed;
  for (size_t i = 0; i < o.routers.size(); ++i) send(o.routers[i], router_update, gate_sum, "router " + std::to_string(i));
  for (size_t i = 0; i < o.groups.size(); ++i)
    send(o.groups[i], base, std::make_shared<const std::vector<float>>(std::move(group_sums[i])),
         "expert group " + std::to_string(i));
}

caf::error check_batch(const train_batch& b, int64_t vocab) {
  const auto& cu = b.cu_seqlens;
  bool ok = cu.size() >= 2 && cu.front() == 0 && cu.back() == static_cast<int32_t>(b.tokens.size());
  for (size_t i = 1; ok && i < cu.size(); ++i) ok = cu[i] > cu[i - 1];
  if (!ok)
    return make_error(trainer_errc::bad_batch,
                      "cu_seqlens must rise strictly from 0 to the token count (no empty sequence)");
  for (auto t : b.tokens)
    if (t < 0 || t >= vocab)
      return make_error(trainer_errc::bad_batch,
                        "token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  if (static_cast<size_t>(cu.size() - 1) == b.tokens.size())
    return make_error(trainer_errc::bad_batch, "no sequence has two tokens, so nothing is predicted");
  const auto& h = b.hyper;
  if (!(h.lr >= 0) || !std::isfinite(h.lr) || !(h.balance_alpha >= 0) || !std::isfinite(h.balance_alpha) ||
      !std::isfinite(h.bias_update_speed) || h.bias_update_speed < 0 || !std::isfinite(h.grad_clip))
    return make_error(trainer_errc::bad_batch, "learning rate, balance weight and bias speed must be finite and >= 0");
  return {};
}

void begin_step(pointer self, train_batch b, caf::typed_response_promise<train_step_report> promise) {
  auto& st = self->state;
  auto s = std::make_shared<step_state>();
  s->start = std::chrono::steady_clock::now();
  s->promise = std::move(promise);
  s->batch = std::move(b);
  st.running = s;
  const auto& batch = s->batch;
  const size_t S = batch.cu_seqlens.size() - 1, num_shards = st.options.shards.size();
  s->report.step = batch.step;
  s->report.tokens = static_cast<int64_t>(batch.tokens.size());
  s->report.predicted_positions = static_cast<int64_t>(batch.tokens.size() - S);
  const double total = static_cast<double>(s->report.predicted_positions);
  // Contiguous shares of the sequences; a share with nothing to predict stays out of the step
  // (its shard still takes part in the all-reduce and the update).
  std::vector<train_request> requests(num_shards);
  std::vector<size_t> active;
  for (size_t i = 0; i < num_shards; ++i) {
    const size_t first = S * i / num_shards, last = S * (i + 1) / num_shards;
    auto& r = requests[i];
    r.step = batch.step;
    const int32_t base = batch.cu_seqlens[first];
    for (size_t q = first; q <= last; ++q) r.cu_seqlens.push_back(batch.cu_seqlens[q] - base);
    r.tokens.assign(batch.tokens.begin() + base, batch.tokens.begin() + batch.cu_seqlens[last]);
    const auto predicted = static_cast<double>(r.tokens.size() - (last - first));
    if (predicted == 0) continue;
    r.loss_scale = predicted / total;
    r.balance_alpha = batch.hyper.balance_alpha * static_cast<double>(last - first) / static_cast<double>(S);
    active.push_back(i);
  }
  s->outstanding = active.size();
  for (size_t i : active) {
    const double scale = requests[i].loss_scale;
    self->request(st.options.shards[i], st.options.phase_timeout, train_step_atom::value, std::move(requests[i]))
        .then(
            [self, s, scale](train_result& r) {
              if (s->failed) return;
              s->report.loss += r.loss * scale;
              s->report.balance_loss += r.balance_loss;
              if (--s->outstanding == 0) gradient_phase(self, s);
            },
            failer(self, s, "attention shard " + std::to_string(i) + " step"));
  }
}

void run_waiting(pointer self) {
  auto& st = self->state;
  if (st.running || st.saving || st.hold || st.waiting.empty()) return;
  auto next = std::move(st.waiting.front());
  st.waiting.pop_front();
  begin_step(self, std::move(next.batch), std::move(next.promise));
}

caf::result<train_step_report> enqueue_step(pointer self, train_batch& b) {
  auto& st = self->state;
  if (!st.lost.empty()) return make_error(trainer_errc::unavailable, st.lost);
  if (auto err = check_batch(b, st.options.model.vocab_size)) return err;
  auto rp = self->make_response_promise<train_step_report>();
  st.waiting.push_back({std::move(b), rp});
  run_waiting(self);
  return rp;
}

// Gathers every owner's parameters and moments (shard 0, router 0, then the groups; a replicated
// expert from its first holder) and writes them as one training checkpoint.
caf::result<std::string> save(pointer self, std::string dir) {
  auto& st = self->state;
  if (st.running) return make_error(trainer_errc::busy, "step " + std::to_string(st.running->batch.step) + " is running");
  if (st.saving) return make_error(trainer_errc::busy, "a checkpoint is being written");
  const auto& o = st.options;
  if (o.shards.empty() || o.routers.empty()) return make_error(trainer_errc::failed, "no attention shard or router");
  struct gather {
    std::vector<owner_state> states;
    size_t outstanding = 0;
    bool failed = false;
    caf::typed_response_promise<std::string> promise;
    std::string dir;
  };
  auto g = std::make_shared<gather>();
  g->promise = self->make_response_promise<std::string>();
  g->dir = std::move(dir);
  g->states.resize(2 + o.groups.size());
  g->outstanding = g->states.size();
  st.saving = true;
  auto fail = [self, g](const std::string& who) {
    return [self, g, who](caf::error& e) {
      if (g->failed) return;
      g->failed = true;
      self->state.saving = false;
      run_waiting(self);
      g->promise.deliver(make_error(trainer_errc::failed, who + " state: " + error_text(e)));
    };
  };
  auto write = [self, g] {
    auto& st = self->state;
    st.saving = false;
    run_waiting(self);
    model::checkpoint weights;
    weights.config = st.options.model;
    std::map<std::string, model::adamw::moments, std::less<>> moments;
    for (const auto& s : g->states)
      if (auto err = unpack_owner_state(s, weights, moments)) return void(g->promise.deliver(std::move(err)));
    model::adamw opt(st.last_adamw);
    opt.restore(g->states.front().optimizer_steps, std::move(moments));
    model::training_checkpoint_options so;
    so.progress = false;
    if (auto saved = model::save_training_checkpoint(g->dir, weights, opt, st.steps_done, so); !saved)
      return void(g->promise.deliver(std::move(saved.error())));
    g->promise.deliver(g->dir);
  };
  auto landed = [self, g, write, fail](size_t i, owner_state& s, const std::string& who) {
    if (g->failed) return;
    g->states[i] = std::move(s);
    auto& state = g->states[i];
    const auto& transport = self->state.options.transport;
    with_local_tensor(
        self, transport, state.values,
        [self, g, i, write, fail, who](tensor_ref& values) {
          if (g->failed) return;
          g->states[i].values = values;
          with_local_tensor(
              self, self->state.options.transport, g->states[i].moments,
              [g, i, write](tensor_ref& moments) {
                if (g->failed) return;
                g->states[i].moments = moments;
                if (--g->outstanding == 0) write();
              },
              fail(who));
        },
        fail(who));
  };
  auto ask = [&](const auto& handle, size_t i, const std::string& who) {
    self->request(handle, o.phase_timeout, train_state_atom::value)
        .then([landed, i, who](owner_state& s) { landed(i, s, who); }, fail(who));
  };
  ask(o.shards.front(), 0, "attention shard 0");
  ask(o.routers.front(), 1, "router 0");
  for (size_t i = 0; i < o.groups.size(); ++i) ask(o.groups[i], 2 + i, "expert group " + std::to_string(i));
  return g->promise;
}

}  // namespace

trainer_actor spawn_trainer(caf::actor_system& sys, trainer_options options) {
  return sys.spawn([o = std::move(options)](pointer self) mutable -> trainer_actor::behavior_type {
    auto& st = self->state;
    if (o.metrics) {
      auto& r = *o.metrics;
      st.metrics.steps = &prometheus::BuildCounter().Name("moe_training_steps_total").Help("Training steps completed").Register(r).Add({});
      st.metrics.tokens = &prometheus::BuildCounter().Name("moe_training_tokens_total").Help("Tokens trained on").Register(r).Add({});
      st.metrics.loss = &prometheus::BuildGauge().Name("moe_training_loss").Help("Mean next-token cross-entropy of the last step").Register(r).Add({});
      st.metrics.grad_norm = &prometheus::BuildGauge().Name("moe_training_grad_norm").Help("Global gradient norm of the last step, before clipping").Register(r).Add({});
      st.metrics.step_seconds = &prometheus::BuildHistogram()
                                     .Name("moe_training_step_duration_seconds")
                                     .Help("Wall time of a training step: forward, backward, all-reduce and update")
                                     .Register(r)
                                     .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60});
      st.metrics.balance = &prometheus::BuildGauge()
                                .Name("moe_training_expert_balance_ratio")
                                .Help("Max over mean expert load of the last training step, per MoE layer")
                                .Register(r);
    }
    st.steps_done = o.steps_done;
    st.expert_grad_size = static_cast<size_t>(3 * o.model.moe_intermediate_size * o.model.hidden_size);
    st.options = std::move(o);
    set_layout(st, st.options.layout);
    return {[self](train_step_atom, train_batch& b) { return enqueue_step(self, b); },
            [self](train_save_atom, std::string& dir) { return save(self, std::move(dir)); },
            [self](hold_steps_atom) -> caf::result<uint64_t> {
              auto& st = self->state;
              if (st.hold) return make_error(trainer_errc::busy, "steps are held already");
              const uint64_t id = st.next_hold++;
              st.hold = id;
              // A holder that never resumes (it failed) does not stop training for good.
              self->delayed_send(self, st.options.max_hold, resume_steps_atom::value, id);
              if (!st.running) return id;
              auto rp = self->make_response_promise<uint64_t>();
              st.hold_answer = rp;
              return rp;
            },
            [self](resume_steps_atom, uint64_t id) {
              auto& st = self->state;
              if (st.hold != id) return;
              st.hold.reset();
              run_waiting(self);
            },
            [self](switch_layout_atom, router_layout& layout) { set_layout(self->state, layout); },
            [self](const member_event& ev) {
              auto& st = self->state;
              if (ev.to != member_state::down || !st.options.owner_nodes.count(ev.node) || !st.lost.empty()) return;
              st.lost = "node " + ev.node + " is down (" + ev.reason +
                        "): training stops; restart the cluster and continue from the last checkpoint";
              auto lost = [&] { return make_error(trainer_errc::unavailable, st.lost); };
              for (auto& w : st.waiting) w.promise.deliver(lost());
              st.waiting.clear();
              if (auto s = st.running) finish(self, s, lost());
            }};
  });
}

}  // namespace moe::actors
