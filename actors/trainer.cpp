#include "actors/trainer.hpp"

#include <caf/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>

#include "actors/training_owner.hpp"
#include "model/training_checkpoint.hpp"

namespace moe::actors {

const char* to_string(trainer_errc e) noexcept {
  switch (e) {
    case trainer_errc::busy: return "busy";
    case trainer_errc::bad_batch: return "bad_batch";
    case trainer_errc::failed: return "failed";
    case trainer_errc::unavailable: return "unavailable";
    case trainer_errc::rolled_back: return "rolled_back";
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
  prometheus::Counter* rolled_back = nullptr;  // recoveries that rolled back
  prometheus::Counter* stopped = nullptr;      // node failures that stopped training
  prometheus::Histogram* recovery_seconds = nullptr;
};

// Who a step asks: shard i, router i (on shard i's node) or expert group i.
enum class owner_kind : uint8_t { shard, router, group };
using owner_id = std::pair<owner_kind, size_t>;

std::string owner_name(owner_id who) {
  static constexpr const char* names[] = {"attention shard ", "router ", "expert group "};
  return names[static_cast<size_t>(who.first)] + std::to_string(who.second);
}

// One step in flight: what the phases collect.
struct step_state {
  uint64_t id = 0;
  train_batch batch;
  caf::typed_response_promise<train_step_report> promise;
  std::chrono::steady_clock::time_point start;
  train_step_report report;
  size_t outstanding = 0;
  bool failed = false;
  // The requests out to owners, until each is answered either way: a recovery waits for those
  // of surviving owners before rolling them back.
  std::multiset<owner_id> pending;
  // A failure waiting out options.failure_grace (a member_event may still explain it).
  std::optional<caf::error> held_error;
  // Phase 2, per owner (empty for a lost one).
  std::vector<tensor_ref> shard_grads, router_grads, group_grads;
  std::vector<double> group_norm_sq;
  std::vector<std::vector<int64_t>> router_loads;
};

// The point a node failure rolls back to.
struct snapshot_state {
  owner_state state;  // every parameter of the model once, with its moments
  int64_t steps_done = 0;
  model::adamw_options adamw;
};

// A node failure being recovered from.
struct recovery_state {
  uint64_t id = 0;
  std::chrono::steady_clock::time_point start;
  std::string why;                     // the nodes lost, in words
  std::shared_ptr<step_state> step;    // the interrupted step, until its surviving owners answered
  std::optional<caf::typed_response_promise<train_step_report>> interrupted;  // ... then its promise
  bool restoring = false;
  bool again = false;                  // a node went down while restoring: once more afterwards
  size_t outstanding = 0;
  std::string failed;                  // the first rollback error
};

struct trainer_state {
  trainer_options options;
  // Per group, the replicated (layer, expert) pairs it holds, flat; and per replicated pair,
  // its holders in group order with the pair's index in each holder's list.
  std::vector<std::vector<int64_t>> replicated;
  std::map<std::pair<int64_t, int64_t>, std::vector<std::pair<size_t, size_t>>> holders;
  size_t expert_grad_size = 0;  // one expert's gate, up and down gradients
  std::shared_ptr<step_state> running;
  uint64_t next_step_id = 1;
  // Steps wait here while one runs, a checkpoint is written, a hold is on or a recovery runs.
  struct waiting_step {
    train_batch batch;
    caf::typed_response_promise<train_step_report> promise;
  };
  std::deque<waiting_step> waiting;
  std::optional<uint64_t> hold;  // hold_steps' id while it holds
  uint64_t next_hold = 1;
  std::optional<caf::typed_response_promise<uint64_t>> hold_answer;  // once the running step ended
  bool saving = false;
  std::function<void()> void_gather;  // ends the gather in flight (saving) with an error
  int64_t steps_done = 0;
  std::vector<bool> shard_down, group_down;  // lost with their nodes (a shard with its router)
  std::optional<snapshot_state> snapshot;
  std::optional<recovery_state> recovery;
  uint64_t next_recovery = 1;
  std::string lost;  // why no step can run any more
  // A rollback that interrupted no step and found none waiting: the next step or snapshot asked
  // for is refused with it (trainer_errc::rolled_back), so that whoever is running steps learns
  // that the cluster went back, instead of running its next step on the older state.
  std::optional<std::string> unreported_rollback;
  model::adamw_options last_adamw;  // the hyperparameters of the last step, for a checkpoint
  trainer_metrics metrics;
  static inline const char* name = "trainer";
};

using pointer = trainer_actor::stateful_pointer<trainer_state>;

void run_waiting(pointer self);
void advance_recovery(pointer self);

bool is_down(const trainer_state& st, owner_id who) {
  return who.first == owner_kind::group ? st.group_down[who.second] : st.shard_down[who.second];
}

std::vector<size_t> live(const std::vector<bool>& down) {
  std::vector<size_t> out;
  for (size_t i = 0; i < down.size(); ++i)
    if (!down[i]) out.push_back(i);
  return out;
}

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

// Whether the layout still gives experts, routed or shared, to a lost group (the failover has not
// switched yet).
bool layout_uses_lost_groups(const trainer_state& st) {
  const auto shared = st.options.shared_experts_group;
  if (shared >= 0 && static_cast<size_t>(shared) < st.group_down.size() && st.group_down[static_cast<size_t>(shared)])
    return true;
  for (const auto& layer : st.options.layout.experts)
    for (size_t g = 0; g < layer.size() && g < st.group_down.size(); ++g)
      if (st.group_down[g] && !layer[g].empty()) return true;
  return false;
}

void answer_hold(trainer_state& st) {
  if (!st.hold_answer) return;
  st.hold_answer->deliver(*st.hold);
  st.hold_answer.reset();
}

// The step is over: its answer goes out and the next one may start.
void end_step(pointer self, const std::shared_ptr<step_state>& s, caf::error err) {
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
  if (st.running == s) st.running.reset();
  answer_hold(st);
  run_waiting(self);
}

void finish(pointer self, const std::shared_ptr<step_state>& s, caf::error err) {
  if (s->failed) return;
  s->failed = true;
  auto& st = self->state;
  if (err && st.snapshot && !st.options.shard_nodes.empty() && st.options.failure_grace.count() > 0) {
    // Possibly the first sign of a node failure the membership has not reported yet (a route
    // to its experts failed): that would roll back instead of failing the job.
    s->held_error = std::move(err);
    self->delayed_send(self, st.options.failure_grace, failure_grace_atom::value, s->id);
    return;
  }
  end_step(self, s, std::move(err));
}

// A failure in `what`: ends the step with trainer_errc::failed.
auto failer(pointer self, const std::shared_ptr<step_state>& s, std::string what) {
  return [self, s, what = std::move(what)](caf::error& e) {
    finish(self, s, make_error(trainer_errc::failed, what + ": " + error_text(e)));
  };
}

// An owner answered the step, either way.
void settled(pointer self, const std::shared_ptr<step_state>& s, owner_id who) {
  if (auto it = s->pending.find(who); it != s->pending.end()) s->pending.erase(it);
  const auto& rec = self->state.recovery;
  if (rec && rec->step == s) advance_recovery(self);
}

// Asks `who` for part of the step; ok(R&) runs unless the step has failed meanwhile.
template <class R, class Handle, class Ok, class... Ts>
void ask(pointer self, const std::shared_ptr<step_state>& s, owner_id who, std::string what, const Handle& handle,
         Ok ok, Ts&&... xs) {
  s->pending.insert(who);
  self->request(handle, self->state.options.phase_timeout, std::forward<Ts>(xs)...)
      .then(
          [self, s, who, ok = std::move(ok)](R& r) mutable {
            settled(self, s, who);
            if (!s->failed) ok(r);
          },
          [self, s, who, what = std::move(what)](caf::error& e) {
            settled(self, s, who);
            finish(self, s, make_error(trainer_errc::failed, owner_name(who) + " " + what + ": " + error_text(e)));
          });
}

void update_phase(pointer self, const std::shared_ptr<step_state>& s);

// Phase 2: every surviving owner's gradients; the sums when all are in.
void gradient_phase(pointer self, const std::shared_ptr<step_state>& s) {
  auto& st = self->state;
  const auto& o = st.options;
  s->shard_grads.assign(o.shards.size(), {});
  s->router_grads.assign(o.routers.size(), {});
  s->group_grads.assign(o.groups.size(), {});
  s->group_norm_sq.assign(o.groups.size(), 0.0);
  s->router_loads.assign(o.routers.size(), {});
  const auto shards = live(st.shard_down), groups = live(st.group_down);
  s->outstanding = 2 * shards.size() + groups.size();
  const uint64_t step = s->batch.step;
  auto arrived = [self, s](tensor_ref& slot, tensor_ref& got, owner_id who) {
    with_local_tensor(
        self, self->state.options.transport, std::move(got),
        [self, s, &slot](tensor_ref& local) {
          if (s->failed) return;
          slot = std::move(local);
          if (--s->outstanding == 0) update_phase(self, s);
        },
        failer(self, s, owner_name(who) + " gradients"));
  };
  for (size_t i : shards) {
    ask<gradient_report>(self, s, {owner_kind::shard, i}, "gradients", o.shards[i],
                         [s, i, arrived](gradient_report& r) { arrived(s->shard_grads[i], r.shared, {owner_kind::shard, i}); },
                         train_grads_atom::value, step);
    ask<gradient_report>(self, s, {owner_kind::router, i}, "gradients", o.routers[i],
                         [s, i, arrived](gradient_report& r) {
                           s->router_loads[i] = std::move(r.expert_loads);
                           arrived(s->router_grads[i], r.shared, {owner_kind::router, i});
                         },
                         train_grads_atom::value, step);
  }
  for (size_t i : groups)
    ask<gradient_report>(self, s, {owner_kind::group, i}, "gradients", o.groups[i],
                         [s, i, arrived](gradient_report& r) {
                           s->group_norm_sq[i] = r.own_norm_sq;
                           arrived(s->group_grads[i], r.shared, {owner_kind::group, i});
                         },
                         train_grads_atom::value, step, st.replicated[i]);
}

// Sums equally long tensors in order (a lost owner's empty slot skipped); nullopt when a size
// differs or none is there.
std::optional<std::vector<float>> sum_in_order(const std::vector<tensor_ref>& parts) {
  std::optional<std::vector<float>> sum;
  for (const auto& part : parts) {
    if (!part.local) continue;
    const auto& p = *part.local;
    if (!sum) {
      sum = p;
      continue;
    }
    if (p.size() != sum->size()) return std::nullopt;
    for (size_t j = 0; j < sum->size(); ++j) (*sum)[j] += p[j];
  }
  return sum;
}

double norm_sq(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return s;
}

// Phase 3: the sums, the clip factor, and every surviving owner's update.
void update_phase(pointer self, const std::shared_ptr<step_state>& s) {
  auto& st = self->state;
  const auto& o = st.options;
  auto trunk = sum_in_order(s->shard_grads);
  auto gates = sum_in_order(s->router_grads);
  if (!trunk || !gates)
    return finish(self, s, make_error(trainer_errc::failed, "the shards' or routers' gradients differ in size"));
  const auto groups = live(st.group_down);
  // Replicated experts: the sum over the holders, in group order.
  std::vector<std::vector<float>> group_sums(o.groups.size());
  for (size_t g : groups) {
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
      if (st.group_down[g]) continue;
      const float* src = s->group_grads[g].local->data() + index * n;
      for (size_t j = 0; j < n; ++j) sum[j] += src[j];
    }
    total_sq += norm_sq(sum);
    for (const auto& [g, index] : holders)
      if (!st.group_down[g]) std::copy(sum.begin(), sum.end(), group_sums[g].begin() + index * n);
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
  for (size_t r : live(st.shard_down)) {
    const auto& l = s->router_loads[r];
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
  const auto shards = live(st.shard_down);
  s->outstanding = 2 * shards.size() + groups.size();
  auto applied = [self, s](uint64_t&) {
    if (--s->outstanding == 0) finish(self, s, {});
  };
  // Each destination gets its own ref (export_tensor stamps it for that destination's process).
  auto send = [&](const auto& handle, owner_id who, train_update u, std::shared_ptr<const std::vector<float>> values) {
    u.shared.shape = {static_cast<int64_t>(values->size())};
    u.shared.local = std::move(values);
    const runtime::tensor_frame_meta meta{protocol::frame_kind::gradients, 0, u.step, 0};
    if (auto err = export_tensor(o.transport, self->node(), handle.node(), u.shared, meta))
      return finish(self, s, make_error(trainer_errc::failed, owner_name(who) + " update: " + error_text(err)));
    ask<uint64_t>(self, s, who, "update", handle, applied, train_apply_atom::value, std::move(u));
  };
  auto trunk_sum = std::make_shared<const std::vector<float>>(std::move(*trunk));
  auto gate_sum = std::make_shared<const std::vector<float>>(std::move(*gates));
  for (size_t i : shards) send(o.shards[i], {owner_kind::shard, i}, base, trunk_sum);
  train_update router_update = base;
  router_update.expert_loads = std::move(loads);
  router_update.bias_update_speed = h.bias_update_speed;
  for (size_t i : shards) send(o.routers[i], {owner_kind::router, i}, router_update, gate_sum);
  for (size_t i : groups)
    send(o.groups[i], {owner_kind::group, i}, base, std::make_shared<const std::vector<float>>(std::move(group_sums[i])));
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
  s->id = st.next_step_id++;
  s->start = std::chrono::steady_clock::now();
  s->promise = std::move(promise);
  s->batch = std::move(b);
  st.running = s;
  const auto& batch = s->batch;
  const auto shards = live(st.shard_down);
  const size_t S = batch.cu_seqlens.size() - 1, num_shards = shards.size();
  s->report.step = batch.step;
  s->report.tokens = static_cast<int64_t>(batch.tokens.size());
  s->report.predicted_positions = static_cast<int64_t>(batch.tokens.size() - S);
  const double total = static_cast<double>(s->report.predicted_positions);
  // Contiguous shares of the sequences over the surviving shards; a share with nothing to
  // predict stays out of the step (its shard still takes part in the all-reduce and the update).
  std::vector<train_request> requests(num_shards);
  std::vector<size_t> active;
  for (size_t k = 0; k < num_shards; ++k) {
    const size_t first = S * k / num_shards, last = S * (k + 1) / num_shards;
    auto& r = requests[k];
    r.step = batch.step;
    const int32_t base = batch.cu_seqlens[first];
    for (size_t q = first; q <= last; ++q) r.cu_seqlens.push_back(batch.cu_seqlens[q] - base);
    r.tokens.assign(batch.tokens.begin() + base, batch.tokens.begin() + batch.cu_seqlens[last]);
    const auto predicted = static_cast<double>(r.tokens.size() - (last - first));
    if (predicted == 0) continue;
    r.loss_scale = predicted / total;
    r.balance_alpha = batch.hyper.balance_alpha * static_cast<double>(last - first) / static_cast<double>(S);
    active.push_back(k);
  }
  s->outstanding = active.size();
  for (size_t k : active) {
    const double scale = requests[k].loss_scale;
    ask<train_result>(self, s, {owner_kind::shard, shards[k]}, "step", st.options.shards[shards[k]],
                      [self, s, scale](train_result& r) {
                        s->report.loss += r.loss * scale;
                        s->report.balance_loss += r.balance_loss;
                        if (--s->outstanding == 0) gradient_phase(self, s);
                      },
                      train_step_atom::value, std::move(requests[k]));
  }
}

void run_waiting(pointer self) {
  auto& st = self->state;
  if (st.running || st.saving || st.hold || st.recovery || st.waiting.empty()) return;
  auto next = std::move(st.waiting.front());
  st.waiting.pop_front();
  begin_step(self, std::move(next.batch), std::move(next.promise));
}

caf::result<train_step_report> enqueue_step(pointer self, train_batch& b) {
  auto& st = self->state;
  if (!st.lost.empty()) return make_error(trainer_errc::unavailable, st.lost);
  if (st.unreported_rollback) return make_error(trainer_errc::rolled_back, *std::exchange(st.unreported_rollback, {}));
  if (auto err = check_batch(b, st.options.model.vocab_size)) return err;
  auto rp = self->make_response_promise<train_step_report>();
  st.waiting.push_back({std::move(b), rp});
  run_waiting(self);
  return rp;
}

// --- snapshots, checkpoints and recovery ------------------------------------------------------

// Training stops for good: every step, the interrupted one included, fails with the reason.
void lose(pointer self, std::string why) {
  auto& st = self->state;
  st.lost = std::move(why);
  // A cluster that has only served loses no training: said, not counted as a failed recovery.
  const bool idle = st.steps_done == 0 && !st.running && st.waiting.empty() && !st.recovery;
  if (idle) {
    spdlog::warn("training: {} (no training step had run)", st.lost);
    answer_hold(st);
    return;
  }
  spdlog::error("training: {}", st.lost);
  auto err = [&] { return make_error(trainer_errc::unavailable, st.lost); };
  for (auto& w : st.waiting) w.promise.deliver(err());
  st.waiting.clear();
  if (st.recovery) {
    if (st.recovery->interrupted) st.recovery->interrupted->deliver(err());
    if (st.metrics.stopped) st.metrics.stopped->Increment();
    st.recovery.reset();
  } else if (st.metrics.stopped) {
    st.metrics.stopped->Increment();
  }
  if (auto s = st.running) {
    s->failed = true;
    s->promise.deliver(err());
    st.running.reset();
  }
  answer_hold(st);
}

// The rollback is done (or failed) everywhere it was sent.
void restore_done(pointer self) {
  auto& st = self->state;
  auto& rec = *st.recovery;
  rec.restoring = false;
  const auto at = std::to_string(st.snapshot->steps_done);
  if (!rec.failed.empty())
    return lose(self, "rolling back to the snapshot after step " + at + " failed (" + rec.failed +
                          "); training stops; restart the cluster and continue from the last checkpoint");
  // Another node went down meanwhile: wait for its failover and roll back once more.
  if (rec.again) return advance_recovery(self);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - rec.start).count();
  st.steps_done = st.snapshot->steps_done;
  const std::string text = rec.why + "; training rolled back to the snapshot after step " + at +
                           ": run the steps after it again";
  if (!rec.interrupted && st.waiting.empty()) st.unreported_rollback = text;
  if (rec.interrupted) rec.interrupted->deliver(make_error(trainer_errc::rolled_back, text));
  for (auto& w : st.waiting) w.promise.deliver(make_error(trainer_errc::rolled_back, text));
  st.waiting.clear();
  if (st.metrics.rolled_back) {
    st.metrics.rolled_back->Increment();
    st.metrics.recovery_seconds->Observe(seconds);
  }
  spdlog::warn("training: {} ({:.3f} s after the failure; {} attention shards, {} expert groups left)", text, seconds,
               live(st.shard_down).size(), live(st.group_down).size());
  st.recovery.reset();
  run_waiting(self);
}

// Every surviving owner takes the snapshot back.
void start_restore(pointer self) {
  auto& st = self->state;
  auto& rec = *st.recovery;
  const auto& o = st.options;
  rec.restoring = true;
  rec.again = false;
  rec.failed.clear();
  rec.outstanding = 0;
  train_hyper h;
  h.beta1 = st.snapshot->adamw.beta1;
  h.beta2 = st.snapshot->adamw.beta2;
  h.eps = st.snapshot->adamw.eps;
  h.weight_decay = st.snapshot->adamw.weight_decay;
  const uint64_t id = rec.id;
  auto answered = [self, id](owner_id who, caf::error err) {
    auto& st = self->state;
    if (!st.recovery || st.recovery->id != id || !st.recovery->restoring) return;
    auto& rec = *st.recovery;
    // A rollback that failed because its owner went down since does not matter.
    if (err && !is_down(st, who) && rec.failed.empty()) rec.failed = owner_name(who) + ": " + error_text(err);
    if (--rec.outstanding == 0) restore_done(self);
  };
  auto send = [&](const auto& handle, owner_id who) {
    owner_state copy = st.snapshot->state;
    if (auto err = export_owner_state(o.transport, self->node(), handle.node(), copy)) {
      if (rec.failed.empty()) rec.failed = owner_name(who) + ": " + error_text(err);
      return;
    }
    ++rec.outstanding;
    self->request(handle, o.recovery_timeout, train_restore_atom::value, std::move(copy), h)
        .then([answered, who](int64_t) { answered(who, {}); }, [answered, who](caf::error& e) { answered(who, e); });
  };
  for (size_t i : live(st.shard_down)) {
    send(o.shards[i], {owner_kind::shard, i});
    send(o.routers[i], {owner_kind::router, i});
  }
  for (size_t i : live(st.group_down)) send(o.groups[i], {owner_kind::group, i});
  if (rec.outstanding == 0) restore_done(self);
}

// Moves a recovery on as far as it can: the interrupted step's surviving owners have answered,
// the failover has switched the layout, then the rollback.
void advance_recovery(pointer self) {
  auto& st = self->state;
  if (!st.recovery || st.recovery->restoring) return;
  auto& rec = *st.recovery;
  if (rec.step) {
    for (const auto& who : rec.step->pending)
      if (!is_down(st, who)) return;
    rec.interrupted = rec.step->promise;
    if (st.running == rec.step) st.running.reset();
    rec.step.reset();
    // The failover holds training before it switches the routers: it may go on now.
    answer_hold(st);
  }
  if (layout_uses_lost_groups(st)) return;
  start_restore(self);
}

void node_down(pointer self, const member_event& ev) {
  auto& st = self->state;
  if (ev.to != member_state::down || !st.lost.empty()) return;
  bool held = false;
  for (size_t i = 0; i < st.options.shard_nodes.size() && i < st.shard_down.size(); ++i)
    if (st.options.shard_nodes[i] == ev.node && !st.shard_down[i]) held = st.shard_down[i] = true;
  for (size_t i = 0; i < st.options.group_nodes.size() && i < st.group_down.size(); ++i)
    if (st.options.group_nodes[i] == ev.node && !st.group_down[i]) held = st.group_down[i] = true;
  if (!held) return;
  const std::string what = "node " + ev.node + " is down (" + ev.reason + ")";
  if (!st.snapshot)
    return lose(self, what + ": training stops; restart the cluster and continue from the last checkpoint");
  if (live(st.shard_down).empty())
    return lose(self, what + " and no attention shard is left: training stops; restart the cluster and continue "
                             "from the last checkpoint");
  if (!st.recovery) {
    if (std::exchange(st.saving, false) && st.void_gather) st.void_gather();
    auto& rec = st.recovery.emplace();
    rec.id = st.next_recovery++;
    rec.start = std::chrono::steady_clock::now();
    if (auto s = st.running) {
      s->failed = true;  // no phase goes on; a held failure is superseded
      rec.step = s;
    }
    self->delayed_send(self, st.options.recovery_timeout, recovery_timeout_atom::value, rec.id);
    spdlog::warn("training: {}; rolling back to the snapshot after step {}", what, st.snapshot->steps_done);
  } else if (st.recovery->restoring) {
    st.recovery->again = true;
  }
  auto& rec = *st.recovery;
  rec.why += (rec.why.empty() ? "" : "; ") + what;
  advance_recovery(self);
}

// Gathers every owner's parameters and moments: the first surviving shard's, its router's and
// every surviving group's (a replicated expert from its first holder). Steps wait meanwhile. A
// node failure meanwhile voids the gather (node_down ends the wait at once): its owners may be
// rolled back halfway through it, and a lost one would never answer.
void gather_states(pointer self, std::function<void(caf::expected<std::vector<owner_state>>)> done) {
  auto& st = self->state;
  const auto& o = st.options;
  const auto shards = live(st.shard_down), groups = live(st.group_down);
  struct gather {
    std::vector<owner_state> states;
    size_t outstanding = 0;
    bool failed = false;
    uint64_t epoch = 0;  // next_recovery when it started
    std::function<void(caf::expected<std::vector<owner_state>>)> done;
  };
  auto g = std::make_shared<gather>();
  g->epoch = st.next_recovery;
  g->done = std::move(done);
  st.void_gather = [g] {
    if (std::exchange(g->failed, true)) return;
    g->done(make_error(trainer_errc::busy, "a node failure interrupted it; ask again once training runs again"));
  };
  g->states.resize(2 + groups.size());
  g->outstanding = g->states.size();
  st.saving = true;
  auto fail = [self, g](const std::string& who) {
    return [self, g, who](caf::error& e) {
      if (std::exchange(g->failed, true)) return;
      if (self->state.next_recovery != g->epoch) return;  // voided: answered by node_down
      self->state.saving = false;
      run_waiting(self);
      g->done(make_error(trainer_errc::failed, who + " state: " + error_text(e)));
    };
  };
  auto landed = [self, g, fail](size_t i, owner_state& s, const std::string& who) {
    if (g->failed) return;
    g->states[i] = std::move(s);
    const auto& transport = self->state.options.transport;
    with_local_tensor(
        self, transport, g->states[i].values,
        [self, g, i, fail, who](tensor_ref& values) {
          if (g->failed) return;
          g->states[i].values = values;
          with_local_tensor(
              self, self->state.options.transport, g->states[i].moments,
              [self, g, i](tensor_ref& moments) {
                if (g->failed) return;
                g->states[i].moments = moments;
                if (--g->outstanding > 0) return;
                if (self->state.next_recovery != g->epoch) return;  // voided: answered by node_down
                self->state.saving = false;
                g->done(std::move(g->states));
                run_waiting(self);
              },
              fail(who));
        },
        fail(who));
  };
  auto ask_state = [&](const auto& handle, size_t i, const std::string& who) {
    self->request(handle, o.phase_timeout, train_state_atom::value)
        .then([landed, i, who](owner_state& s) { landed(i, s, who); }, fail(who));
  };
  ask_state(o.shards[shards.front()], 0, "attention shard " + std::to_string(shards.front()));
  ask_state(o.routers[shards.front()], 1, "router " + std::to_string(shards.front()));
  for (size_t k = 0; k < groups.size(); ++k)
    ask_state(o.groups[groups[k]], 2 + k, "expert group " + std::to_string(groups[k]));
}

// Why no snapshot or checkpoint can be taken now (empty: it can).
caf::error gather_refused(const trainer_state& st) {
  if (!st.lost.empty()) return make_error(trainer_errc::unavailable, st.lost);
  if (st.recovery) return make_error(trainer_errc::busy, "a node failure is being recovered from");
  if (st.running) return make_error(trainer_errc::busy, "step " + std::to_string(st.running->batch.step) + " is running");
  if (st.saving) return make_error(trainer_errc::busy, "a checkpoint or snapshot is being taken");
  if (st.options.shards.empty() || st.options.routers.empty())
    return make_error(trainer_errc::failed, "no attention shard or router");
  return {};
}

// Writes every owner's parameters and moments as one training checkpoint.
caf::result<std::string> save(pointer self, std::string dir) {
  if (auto err = gather_refused(self->state)) return err;
  auto rp = self->make_response_promise<std::string>();
  gather_states(self, [self, rp, dir = std::move(dir)](caf::expected<std::vector<owner_state>> states) mutable -> void {
    if (!states) return void(rp.deliver(std::move(states.error())));
    auto& st = self->state;
    model::checkpoint weights;
    weights.config = st.options.model;
    std::map<std::string, model::adamw::moments, std::less<>> moments;
    for (const auto& s : *states)
      if (auto err = unpack_owner_state(s, weights, moments)) return void(rp.deliver(std::move(err)));
    model::adamw opt(st.last_adamw);
    opt.restore(states->front().optimizer_steps, std::move(moments));
    model::training_checkpoint_options so;
    so.progress = false;
    if (auto saved = model::save_training_checkpoint(dir, weights, opt, st.steps_done, so); !saved)
      return void(rp.deliver(std::move(saved.error())));
    rp.deliver(dir);
  });
  return rp;
}

// Keeps every owner's parameters and moments in memory: what a node failure rolls back to.
caf::result<int64_t> take_snapshot(pointer self) {
  if (auto err = gather_refused(self->state)) return err;
  // A snapshot now would be of the older state, taken for the newer.
  if (auto& r = self->state.unreported_rollback) return make_error(trainer_errc::rolled_back, *std::exchange(r, {}));
  auto rp = self->make_response_promise<int64_t>();
  gather_states(self, [self, rp](caf::expected<std::vector<owner_state>> states) mutable -> void {
    if (!states) return void(rp.deliver(std::move(states.error())));
    auto merged = merge_owner_states(*states);
    if (!merged) return void(rp.deliver(std::move(merged.error())));
    auto& st = self->state;
    auto& snap = st.snapshot.emplace();
    snap.state = std::move(*merged);
    snap.steps_done = st.steps_done;
    snap.adamw = st.last_adamw;
    rp.deliver(st.steps_done);
  });
  return rp;
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
      auto& outcomes = prometheus::BuildCounter()
                           .Name("moe_training_recoveries_total")
                           .Help("Node failures during training, by outcome: rolled_back to the last snapshot, or "
                                 "stopped training (no snapshot, no shard left, or the rollback failed)")
                           .Register(r);
      st.metrics.rolled_back = &outcomes.Add({{"outcome", "rolled_back"}});
      st.metrics.stopped = &outcomes.Add({{"outcome", "stopped"}});
      st.metrics.recovery_seconds = &prometheus::BuildHistogram()
                                         .Name("moe_training_recovery_seconds")
                                         .Help("From a node failure during training to the rollback done on the survivors")
                                         .Register(r)
                                         .Add({}, prometheus::Histogram::BucketBoundaries{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120});
    }
    st.steps_done = o.steps_done;
    st.expert_grad_size = static_cast<size_t>(3 * o.model.moe_intermediate_size * o.model.hidden_size);
    st.options = std::move(o);
    st.shard_down.assign(st.options.shards.size(), false);
    st.group_down.assign(st.options.groups.size(), false);
    set_layout(st, st.options.layout);
    return {[self](train_step_atom, train_batch& b) { return enqueue_step(self, b); },
            [self](train_save_atom, std::string& dir) { return save(self, std::move(dir)); },
            [self](train_snapshot_atom) { return take_snapshot(self); },
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
            [self](switch_layout_atom, router_layout& layout) {
              if (layout.shared_group >= 0) self->state.options.shared_experts_group = layout.shared_group;
              set_layout(self->state, layout);
              advance_recovery(self);
            },
            [self](const member_event& ev) { node_down(self, ev); },
            [self](recovery_timeout_atom, uint64_t id) {
              auto& st = self->state;
              if (!st.recovery || st.recovery->id != id) return;
              const auto& rec = *st.recovery;
              const char* waiting = rec.restoring ? "the surviving owners' rollback"
                                    : rec.step    ? "the interrupted step's surviving owners"
                                                  : "the failover to move the lost expert groups' experts";
              lose(self, rec.why + ": the recovery did not finish within " +
                             std::to_string(st.options.recovery_timeout.count()) + " ms (waiting for " + waiting +
                             "); training stops; restart the cluster and continue from the last checkpoint");
            },
            [self](failover_failed_atom, const std::string& why) {
              auto& st = self->state;
              if (!st.recovery || st.recovery->restoring || !layout_uses_lost_groups(st)) return;
              lose(self, st.recovery->why + ": the lost expert groups could not be re-placed (" + why +
                             "); training stops; restart the cluster and continue from the last checkpoint");
            },
            [self](failure_grace_atom, uint64_t id) {
              auto& st = self->state;
              auto s = st.running;
              if (!s || s->id != id || !s->held_error || st.recovery) return;
              end_step(self, s, std::move(*s->held_error));
            }};
  });
}

}  // namespace moe::actors
