#include "actors/router.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>

#include "actors/actor_metrics.hpp"
#include "actors/controller.hpp"
#include "actors/training_owner.hpp"
#include "base/assert.hpp"
#include "model/moe_training.hpp"
#include "model/routing_bias.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"
#include "protocol/load_report_codec.hpp"
#include "scheduler/load_window.hpp"

namespace moe::actors {

namespace {

// Where one MoE layer's experts are, in one placement version.
struct layer_table {
  std::vector<std::vector<size_t>> holders;   // logical expert -> groups holding it
  std::vector<std::vector<int32_t>> slot_of;  // [group][logical expert] -> physical slot, -1: not held
};

struct placement_table {
  uint32_t version = 0;
  std::map<int64_t, layer_table> layers;
  // The most slots of any layer (the groups' experts of a layer, in group order). Layers hold the
  // same count until a failover adds replicas where a lost group's experts had none elsewhere.
  int32_t num_slots = 0;
};

// Checks a layout against the model and the groups, and indexes it.
caf::expected<placement_table> make_table(const router_layout& l, const model::model_config& c, size_t num_groups) {
  auto bad = [&](std::string text) {
    return model::make_error(model::model_errc::bad_input,
                             "placement version " + std::to_string(l.version) + ": " + std::move(text));
  };
  std::vector<int64_t> moe_layers;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    if (c.is_moe_layer(i)) moe_layers.push_back(i);
  if (l.layers != moe_layers) return bad("its layers are not the model's MoE layers");
  if (l.experts.size() != l.layers.size()) return bad("one entry per MoE layer expected");
  placement_table t;
  t.version = l.version;
  for (size_t i = 0; i < l.layers.size(); ++i) {
    const auto& groups = l.experts[i];
    if (groups.size() != num_groups)
      return bad("layer " + std::to_string(l.layers[i]) + " names " + std::to_string(groups.size()) +
                 " expert groups; the router has " + std::to_string(num_groups));
    layer_table lt;
    lt.holders.resize(static_cast<size_t>(c.n_routed_experts));
    int32_t next_slot = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      std::vector<int32_t> slots(lt.holders.size(), -1);
      for (size_t j = 0; j < groups[g].size(); ++j) {
        const int64_t e = groups[g][j];
        if (e < 0 || e >= c.n_routed_experts)
          return bad("expert " + std::to_string(e) + " does not exist");
        if (slots[static_cast<size_t>(e)] >= 0)
          return bad("expert group " + std::to_string(g) + " lists expert " + std::to_string(e) + " twice");
        slots[static_cast<size_t>(e)] = next_slot++;
        lt.holders[static_cast<size_t>(e)].push_back(g);
      }
      lt.slot_of.push_back(std::move(slots));
    }
    for (size_t e = 0; e < lt.holders.size(); ++e)
      if (lt.holders[e].empty())
        return bad("no expert group holds expert " + std::to_string(e) + " in layer " + std::to_string(l.layers[i]));
    t.num_slots = std::max(t.num_slots, next_slot);
    t.layers.emplace(l.layers[i], std::move(lt));
  }
  return t;
}

// Training (actors/training_messages.hpp): one pass per MoE layer of the running step.
struct route_training_pass {
  uint64_t step = 0;
  size_t num_tokens = 0;
  model::expert_rows rows;
  std::vector<std::vector<int32_t>> group_rows;  // per group, the rows it computed
  std::vector<float> rows_out;                   // (rows, hidden) unweighted outputs, row order
  std::vector<size_t> asked;                     // the groups sent a batch, in request order
};

struct router_training {
  std::shared_ptr<model::checkpoint> own;  // the router's weights once it trains
  std::map<int64_t, model::gate_training> gates;
  std::map<int64_t, std::vector<float>> gate_grads;  // (E, hidden) per layer
  std::map<int64_t, route_training_pass> passes;
  training_owner owner;
};

struct pending_route;

struct router_state {
  std::shared_ptr<const model::checkpoint> weights;
  std::map<int64_t, model::router_block> gates;
  router_options options;
  placement_table table;
  std::optional<size_t> shared_group;
  int64_t hidden = 0;
  mailbox_gauge mailbox;
  routed_tokens_counter routed;
  std::optional<scheduler::load_window> load;
  bool load_error_logged = false;
  std::optional<router_training> training;
  // Expert groups lost with their node (groups_down_atom): nothing is sent to them any more, and
  // the route requests waiting on them fail at once instead of waiting for answers that will
  // not come (a killed node's requests are never answered, a frozen one's not in time).
  std::vector<bool> down;
  std::vector<std::pair<std::weak_ptr<pending_route>, std::vector<size_t>>> inflight;
  // The same for training's scatters to the groups: alive until the scatter has ended, the groups
  // asked, and how to fail it.
  struct training_scatter {
    std::weak_ptr<void> alive;
    std::vector<size_t> asked;
    std::function<void(caf::error)> fail;
  };
  std::vector<training_scatter> training_inflight;
  static inline const char* name = "router";
};

using pointer = router_actor::stateful_pointer<router_state>;

// Collects the expert groups' answers for one route request.
struct pending_route {
  caf::typed_response_promise<route_result> promise;
  int64_t layer = 0;
  uint64_t step = 0;
  size_t num_tokens = 0;
  model::expert_rows rows;
  std::vector<int32_t> choices;
  std::vector<float> rows_out;                      // (rows, hidden), token-major
  std::shared_ptr<const std::vector<float>> shared; // (T, hidden)
  size_t outstanding = 0;
  bool failed = false;
};

// The first failure answers the route request; answers arriving after it are dropped.
void fail(pending_route& p, caf::error err) {
  if (p.failed) return;
  p.failed = true;
  p.promise.deliver(std::move(err));
}

// Replayable by the controller (controller_errc::unavailable): the step did not fail because of
// its input, and succeeds once the routers serve a placement without the lost group.
caf::error group_down_error(size_t group) {
  return make_error(controller_errc::unavailable,
                    "expert group " + std::to_string(group) + " is down (its node failed); awaiting re-placement");
}

void mark_groups_down(pointer self, const std::vector<int64_t>& groups) {
  auto& st = self->state;
  st.down.resize(st.options.groups.size(), false);
  for (auto g : groups)
    if (g >= 0 && static_cast<size_t>(g) < st.down.size()) st.down[static_cast<size_t>(g)] = true;
  std::vector<std::pair<std::weak_ptr<pending_route>, std::vector<size_t>>> still;
  for (auto& [weak, asked] : st.inflight) {
    auto p = weak.lock();
    if (!p || p->failed) continue;
    auto lost = std::find_if(asked.begin(), asked.end(), [&](size_t g) { return st.down[g]; });
    if (lost != asked.end()) fail(*p, group_down_error(*lost));
    else still.emplace_back(std::move(weak), std::move(asked));
  }
  st.inflight = std::move(still);
  // Training waits on the groups without a timeout (a step's batch can take long): fail the
  // scatters that wait on a lost group now, or the step would never end and the trainer's
  // recovery would wait for it in vain.
  auto training = std::move(st.training_inflight);
  st.training_inflight.clear();
  for (auto& s : training) {
    if (s.alive.expired()) continue;
    auto lost = std::find_if(s.asked.begin(), s.asked.end(), [&](size_t g) { return st.down[g]; });
    if (lost != s.asked.end()) s.fail(group_down_error(*lost));
    else st.training_inflight.push_back(std::move(s));
  }
}

void finish(pointer self, pending_route& p) {
  const size_t D = static_cast<size_t>(self->state.hidden);
  std::vector<float> y(p.num_tokens * D);
  if (auto err = model::moe_layer_output(p.rows_out.data(), p.rows, p.shared ? p.shared->data() : nullptr,
                                         y.data(), p.num_tokens, D)) {
    p.promise.deliver(err);
    return;
  }
  route_result r;
  r.layer = p.layer;
  r.step = p.step;
  r.y = tensor_ref::wrap(std::move(y), {static_cast<int64_t>(p.num_tokens), static_cast<int64_t>(D)});
  self->state.routed.add(p.layer, p.choices);
  r.expert_choices = std::move(p.choices);
  p.promise.deliver(std::move(r));
}

runtime::tensor_frame_meta frame_meta(const expert_batch& b) {
  return {protocol::frame_kind::activations, static_cast<uint32_t>(b.layer), b.step, b.placement_version};
}

// Sends one expert batch to group g and hands the rows it answers with, once local, to
// take(out, p), which returns an error for a malformed answer. Any failure fails the route (its
// promise answers once; other groups' answers are then ignored). False when nothing was sent.
template <class Take>
bool ask_group(pointer self, const std::shared_ptr<pending_route>& p, size_t g, expert_batch b, Take take) {
  auto& st = self->state;
  const auto& group = st.options.groups[g].handle;
  if (auto err = export_tensor(st.options.transport, self->node(), group.node(), b.rows, frame_meta(b))) {
    fail(*p, std::move(err));
    return false;
  }
  ++p->outstanding;
  self->request(group, caf::infinite, expert_forward_atom::value, std::move(b))
      .then(
          [self, p, take](expert_result& res) {
            if (p->failed) return;
            with_local_tensor(
                self, self->state.options.transport, std::move(res.rows),
                [self, p, take](tensor_ref& out) {
                  if (p->failed) return;
                  if (auto err = take(out, *p)) return fail(*p, std::move(err));
                  if (--p->outstanding == 0) finish(self, *p);
                },
                [p](caf::error& err) { fail(*p, std::move(err)); });
          },
          [p](caf::error& err) { fail(*p, std::move(err)); });
  return true;
}

caf::result<route_result> route(pointer self, route_request& req) {
  auto& st = self->state;
  auto gate = st.gates.find(req.layer);
  const size_t D = static_cast<size_t>(st.hidden);
  if (gate == st.gates.end())
    return model::make_error(model::model_errc::bad_input,
                             "router: layer " + std::to_string(req.layer) + " is not an MoE layer");
  if (!req.x.data() || req.x.shape.size() != 2 || req.x.shape[1] != st.hidden)
    return model::make_error(model::model_errc::bad_input, "router: malformed input tensor");
  const size_t T = static_cast<size_t>(req.x.shape[0]);
  const size_t k = gate->second.top_k();
  auto p = std::make_shared<pending_route>();
  p->promise = self->make_response_promise<route_result>();
  p->layer = req.layer;
  p->step = req.step;
  p->num_tokens = T;
  p->choices.resize(T * k);
  std::vector<float> weights(T * k);
  if (auto err = gate->second.route(req.x.data(), T, p->choices.data(), weights.data())) {
    fail(*p, std::move(err));  // the promise owns the answer now
    return p->promise;
  }
  p->rows = model::make_expert_rows(p->choices, weights, k);
  const size_t n = p->rows.size();
  p->rows_out.assign(n * D, 0.0f);

  // Replica choice: the i-th row of expert e in the batch of step s goes to holder
  // (i + s + e) mod replicas. Rows alternate within a batch, and the starting replica rotates
  // from step to step (small decode batches would otherwise always favour the first holder);
  // the choice depends only on the batch, so outputs stay deterministic.
  const auto& table = st.table.layers.at(req.layer);
  std::vector<std::vector<int32_t>> group_rows(st.options.groups.size());
  std::vector<size_t> seen(table.holders.size(), 0);
  for (size_t r = 0; r < n; ++r) {
    const auto e = static_cast<size_t>(p->rows.expert_of_row[r]);
    const auto& h = table.holders[e];
    group_rows[h[(seen[e]++ + req.step + e) % h.size()]].push_back(static_cast<int32_t>(r));
  }
  if (st.load) {
    std::vector<int32_t> slots(n);
    for (size_t g = 0; g < group_rows.size(); ++g)
      for (auto r : group_rows[g])
        slots[static_cast<size_t>(r)] = table.slot_of[g][static_cast<size_t>(p->rows.expert_of_row[static_cast<size_t>(r)])];
    // Counting is bookkeeping: a refused sample (a step older than the window) never fails routing.
    if (auto err = st.load->record(req.step, req.layer, p->choices, slots); err && !st.load_error_logged) {
      st.load_error_logged = true;
      spdlog::warn("router {}: expert load not counted: {}", st.options.shard, error_text(err));
    }
  }
  std::vector<size_t> asked;
  for (size_t g = 0; g < group_rows.size(); ++g)
    if (!group_rows[g].empty() || st.shared_group == g) asked.push_back(g);
  for (size_t g : asked) {
    if (g < st.down.size() && st.down[g]) {
      fail(*p, group_down_error(g));
      return p->promise;
    }
  }
  // Answered requests have released their pending_route; pruning here keeps the list at the
  // requests still in flight (a few per router).
  std::erase_if(st.inflight, [](const auto& entry) { return entry.first.expired(); });
  st.inflight.emplace_back(p, asked);
  const float* x = req.x.data();
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const auto& rows = group_rows[g];
    if (rows.empty()) continue;
    std::vector<float> in(rows.size() * D);
    expert_batch b;
    b.layer = req.layer;
    b.step = req.step;
    b.placement_version = st.table.version;
    b.experts.resize(rows.size());
    b.weights.resize(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      const size_t r = static_cast<size_t>(rows[i]);
      std::copy_n(x + static_cast<size_t>(p->rows.token_of_row[r]) * D, D, in.data() + i * D);
      b.experts[i] = p->rows.expert_of_row[r];
      b.weights[i] = p->rows.weight_of_row[r];
    }
    b.rows = tensor_ref::wrap(std::move(in), {static_cast<int64_t>(rows.size()), st.hidden});
    const auto take = [rows, D](tensor_ref& out, pending_route& route) -> caf::error {
      const float* src = out.data();
      if (!src || out.num_elements() != static_cast<int64_t>(rows.size() * D))
        return model::make_error(model::model_errc::bad_input, "router: malformed expert result");
      for (size_t i = 0; i < rows.size(); ++i)
        std::copy_n(src + i * D, D, route.rows_out.data() + static_cast<size_t>(rows[i]) * D);
      return {};
    };
    if (!ask_group(self, p, g, std::move(b), take)) return p->promise;  // groups already asked are ignored
  }
  if (st.shared_group) {
    // Every token goes to the shared experts: the input tensor is handed over as it is.
    expert_batch b;
    b.layer = req.layer;
    b.step = req.step;
    b.placement_version = st.table.version;
    b.rows = req.x;
    b.experts.assign(T, shared_expert_row);
    b.weights.assign(T, 1.0f);
    const auto take = [T, D](tensor_ref& out, pending_route& route) -> caf::error {
      if (out.num_elements() != static_cast<int64_t>(T * D))
        return model::make_error(model::model_errc::bad_input, "router: malformed shared-expert result");
      route.shared = out.local;
      return {};
    };
    if (!ask_group(self, p, *st.shared_group, std::move(b), take)) return p->promise;
  }
  if (p->outstanding == 0) finish(self, *p);
  return p->promise;
}

// --- training (actors/training_messages.hpp) ---------------------------------------------------

caf::error training_error(const router_state& st, std::string text) {
  return model::make_error(model::model_errc::bad_input,
                           "router " + std::to_string(st.options.shard) + ": " + std::move(text));
}

std::string gate_name(int64_t layer) { return "model.layers." + std::to_string(layer) + ".mlp.gate.weight"; }

// The training state, made on first use: the router's own copy of its weights (serving shares
// one copy between the routers of a process, which must not all apply the same update), the
// serving gates rebound to it, and the training gates.
caf::expected<router_training*> training_of(pointer self) {
  auto& st = self->state;
  if (st.training) return &*st.training;
  router_training t;
  t.own = std::make_shared<model::checkpoint>(*st.weights);
  const auto& c = t.own->config;
  const auto lookup = model::lookup_in(*t.own);
  std::map<int64_t, model::router_block> serving;
  for (const auto& [layer, unused] : st.gates) {
    auto g = model::router_block::bind(c, layer, lookup);
    if (!g) return g.error();
    serving.emplace(layer, std::move(*g));
    auto trained = model::gate_training::bind(c, layer, lookup);
    if (!trained) return trained.error();
    t.gates.emplace(layer, std::move(*trained));
    t.gate_grads.emplace(layer, std::vector<float>(static_cast<size_t>(c.n_routed_experts * c.hidden_size)));
  }
  st.gates = std::move(serving);
  st.weights = t.own;
  st.training = std::move(t);
  return &*st.training;
}

// Sends one request per part to its expert group and calls done(results, in part order) once
// every answer is local; the first failure calls fail and later answers are dropped.
template <class Msg, class Atom>
void scatter_to_groups(pointer self, Atom atom, std::vector<std::pair<size_t, Msg>> parts,
                       tensor_ref Msg::*tensor, protocol::frame_kind kind,
                       std::function<void(std::vector<tensor_ref>&)> done, std::function<void(caf::error)> fail) {
  struct gather {
    std::vector<tensor_ref> results;
    size_t outstanding = 0;
    bool failed = false;
    std::function<void(std::vector<tensor_ref>&)> done;
    std::function<void(caf::error)> fail;
    void error(caf::error e) {
      if (failed) return;
      failed = true;
      fail(std::move(e));
    }
  };
  auto g = std::make_shared<gather>();
  g->results.resize(parts.size());
  g->outstanding = parts.size();
  g->done = std::move(done);
  g->fail = std::move(fail);
  if (parts.empty()) return g->done(g->results);
  auto& st = self->state;
  std::vector<size_t> asked;
  for (const auto& [group, msg] : parts) {
    if (group < st.down.size() && st.down[group]) return g->error(group_down_error(group));
    asked.push_back(group);
  }
  // Forget the scatters that have ended, and remember this one until it does.
  std::erase_if(st.training_inflight, [](const auto& s) { return s.alive.expired(); });
  st.training_inflight.push_back({g, std::move(asked), [w = std::weak_ptr<gather>(g)](caf::error e) {
                                    if (auto live = w.lock()) live->error(std::move(e));
                                  }});
  for (size_t i = 0; i < parts.size(); ++i) {
    auto& [group, msg] = parts[i];
    const auto& handle = st.options.groups[group].handle;
    const runtime::tensor_frame_meta meta{kind, static_cast<uint32_t>(msg.layer), msg.step, st.table.version};
    if (auto err = export_tensor(st.options.transport, self->node(), handle.node(), msg.*tensor, meta))
      return g->error(std::move(err));
    self->request(handle, caf::infinite, atom, std::move(msg))
        .then(
            [self, g, i](expert_result& res) {
              if (g->failed) return;
              with_local_tensor(
                  self, self->state.options.transport, std::move(res.rows),
                  [g, i](tensor_ref& out) {
                    if (g->failed) return;
                    g->results[i] = std::move(out);
                    if (--g->outstanding == 0) g->done(g->results);
                  },
                  [g](caf::error& err) { g->error(std::move(err)); });
            },
            [g](caf::error& err) { g->error(std::move(err)); });
  }
}

caf::result<route_result> train_route(pointer self, train_route_request& req) {
  auto& st = self->state;
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  auto gate = (*t)->gates.find(req.layer);
  if (gate == (*t)->gates.end())
    return training_error(st, "layer " + std::to_string(req.layer) + " is not an MoE layer");
  const auto D = static_cast<size_t>(st.hidden);
  if (!req.x.data() || req.x.shape.size() != 2 || req.x.shape[1] != st.hidden)
    return training_error(st, "malformed training input");
  const auto T = static_cast<size_t>(req.x.shape[0]);
  if (auto err = gate->second.forward(req.x.data(), T, req.cu_seqlens, req.balance_alpha)) return err;
  auto& pass = (*t)->passes[req.layer];
  pass = route_training_pass{};
  pass.step = req.step;
  pass.num_tokens = T;
  pass.rows = model::make_expert_rows(gate->second.routing(), gate->second.routing_weights(), gate->second.top_k());
  const size_t n = pass.rows.size();
  pass.group_rows.assign(st.options.groups.size(), {});
  const auto& table = st.table.layers.at(req.layer);
  std::vector<size_t> seen(table.holders.size(), 0);
  for (size_t r = 0; r < n; ++r) {  // the serving path's replica choice
    const auto e = static_cast<size_t>(pass.rows.expert_of_row[r]);
    const auto& h = table.holders[e];
    pass.group_rows[h[(seen[e]++ + req.step + e) % h.size()]].push_back(static_cast<int32_t>(r));
  }
  // One batch per group: its routed rows, then (the shared experts' group) every token once.
  std::vector<std::pair<size_t, train_expert_batch>> parts;
  const float* x = req.x.data();
  for (size_t g = 0; g < pass.group_rows.size(); ++g) {
    const auto& rows = pass.group_rows[g];
    const bool shared = st.shared_group == g;
    if (rows.empty() && !shared) continue;
    train_expert_batch b;
    b.layer = req.layer;
    b.step = req.step;
    b.source = st.options.shard;
    b.placement_version = st.table.version;
    const size_t n_rows = rows.size() + (shared ? T : 0);
    std::vector<float> in(n_rows * D);
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto r = static_cast<size_t>(rows[i]);
      std::copy_n(x + static_cast<size_t>(pass.rows.token_of_row[r]) * D, D, in.data() + i * D);
      b.experts.push_back(pass.rows.expert_of_row[r]);
    }
    if (shared) {
      std::copy_n(x, T * D, in.data() + rows.size() * D);
      b.experts.insert(b.experts.end(), T, shared_expert_row);
    }
    b.rows = tensor_ref::wrap(std::move(in), {static_cast<int64_t>(n_rows), st.hidden});
    pass.asked.push_back(g);
    parts.emplace_back(g, std::move(b));
  }
  auto rp = self->make_response_promise<route_result>();
  const int64_t layer = req.layer;
  const uint64_t step = req.step;
  scatter_to_groups<train_expert_batch>(
      self, train_forward_atom::value, std::move(parts), &train_expert_batch::rows, protocol::frame_kind::activations,
      [self, rp, layer, step](std::vector<tensor_ref>& results) mutable {
        auto& st = self->state;
        auto& pass = st.training->passes.at(layer);
        const auto D = static_cast<size_t>(st.hidden);
        const size_t n = pass.rows.size(), T = pass.num_tokens;
        pass.rows_out.assign(n * D, 0.0f);
        const float* shared = nullptr;
        for (size_t i = 0; i < pass.asked.size(); ++i) {
          const size_t g = pass.asked[i];
          const auto& rows = pass.group_rows[g];
          const bool has_shared = st.shared_group == g;
          const auto& out = results[i];
          if (!out.data() || out.num_elements() != static_cast<int64_t>((rows.size() + (has_shared ? T : 0)) * D))
            return void(rp.deliver(training_error(st, "malformed expert result")));
          for (size_t j = 0; j < rows.size(); ++j)
            std::copy_n(out.data() + j * D, D, pass.rows_out.data() + static_cast<size_t>(rows[j]) * D);
          if (has_shared) shared = out.data() + rows.size() * D;
        }
        std::vector<float> weighted(n * D), y(T * D);
        for (size_t r = 0; r < n; ++r) {
          const float w = pass.rows.weight_of_row[r];
          for (size_t d = 0; d < D; ++d) weighted[r * D + d] = w * pass.rows_out[r * D + d];
        }
        if (auto err = model::moe_layer_output(weighted.data(), pass.rows, shared, y.data(), T, D))
          return void(rp.deliver(std::move(err)));
        route_result r;
        r.layer = layer;
        r.step = step;
        r.y = tensor_ref::wrap(std::move(y), {static_cast<int64_t>(T), st.hidden});
        const auto choices = st.training->gates.at(layer).routing();
        r.expert_choices.assign(choices.begin(), choices.end());
        st.routed.add(layer, r.expert_choices);
        rp.deliver(std::move(r));
      },
      [rp](caf::error err) mutable { rp.deliver(std::move(err)); });
  return rp;
}

caf::result<layer_gradient> train_route_backward(pointer self, layer_gradient& in) {
  auto& st = self->state;
  if (!st.training) return training_error(st, "training backward without a forward");
  auto& t = *st.training;
  auto it = t.passes.find(in.layer);
  if (it == t.passes.end() || it->second.step != in.step || (it->second.rows_out.empty() && it->second.rows.size() > 0))
    return training_error(st, "no training forward of layer " + std::to_string(in.layer) + ", step " +
                                  std::to_string(in.step));
  auto& pass = it->second;
  const auto D = static_cast<size_t>(st.hidden);
  const size_t T = pass.num_tokens, n = pass.rows.size();
  if (!in.grad.data() || in.grad.num_elements() != static_cast<int64_t>(T * D))
    return training_error(st, "malformed training gradient");
  const float* dy = in.grad.data();
  // Row r of token t: d(out_r) = w_r * dy_t and dL/dw_r = dy_t . out_r (out_r unweighted).
  auto d_weight = std::make_shared<std::vector<float>>(n);
  std::vector<std::pair<size_t, train_expert_grad>> parts;
  for (size_t g : pass.asked) {  // the forward's batches: routed rows, then the shared rows
    const auto& rows = pass.group_rows[g];
    const bool shared = st.shared_group == g;
    const size_t n_rows = rows.size() + (shared ? T : 0);
    std::vector<float> d_out(n_rows * D);
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto r = static_cast<size_t>(rows[i]);
      const float* dyt = dy + static_cast<size_t>(pass.rows.token_of_row[r]) * D;
      const float* out = pass.rows_out.data() + r * D;
      const float w = pass.rows.weight_of_row[r];
      double dot = 0;
      for (size_t d = 0; d < D; ++d) {
        d_out[i * D + d] = w * dyt[d];
        dot += static_cast<double>(dyt[d]) * out[d];
      }
      (*d_weight)[r] = static_cast<float>(dot);
    }
    if (shared) std::copy_n(dy, T * D, d_out.data() + rows.size() * D);
    train_expert_grad m;
    m.layer = in.layer;
    m.step = in.step;
    m.source = st.options.shard;
    m.d_rows = tensor_ref::wrap(std::move(d_out), {static_cast<int64_t>(n_rows), st.hidden});
    parts.emplace_back(g, std::move(m));
  }
  auto rp = self->make_response_promise<layer_gradient>();
  const int64_t layer = in.layer;
  const uint64_t step = in.step;
  const auto reply_to = reply_node(self);
  scatter_to_groups<train_expert_grad>(
      self, train_backward_atom::value, std::move(parts), &train_expert_grad::d_rows, protocol::frame_kind::gradients,
      [self, rp, layer, step, d_weight, reply_to](std::vector<tensor_ref>& results) mutable {
        auto& st = self->state;
        auto& t = *st.training;
        auto& pass = t.passes.at(layer);
        const auto D = static_cast<size_t>(st.hidden);
        const size_t n = pass.rows.size(), T = pass.num_tokens;
        // The order of additions of mlp_training_block: shared experts, routed rows (token-major),
        // then the gate.
        std::vector<float> dx(T * D, 0.0f), d_rows(n * D);
        for (size_t i = 0; i < pass.asked.size(); ++i) {
          const size_t g = pass.asked[i];
          const auto& rows = pass.group_rows[g];
          const bool has_shared = st.shared_group == g;
          const auto& got = results[i];
          if (!got.data() || got.num_elements() != static_cast<int64_t>((rows.size() + (has_shared ? T : 0)) * D))
            return void(rp.deliver(training_error(st, "malformed expert gradient")));
          for (size_t j = 0; j < rows.size(); ++j)
            std::copy_n(got.data() + j * D, D, d_rows.data() + static_cast<size_t>(rows[j]) * D);
          if (has_shared) std::copy_n(got.data() + rows.size() * D, T * D, dx.data());
        }
        for (size_t r = 0; r < n; ++r) {
          float* dst = dx.data() + static_cast<size_t>(pass.rows.token_of_row[r]) * D;
          const float* src = d_rows.data() + r * D;
          for (size_t d = 0; d < D; ++d) dst[d] += src[d];
        }
        auto& gate = t.gates.at(layer);
        if (auto err = gate.backward(d_weight->data(), dx.data(), t.gate_grads.at(layer)))
          return void(rp.deliver(std::move(err)));
        layer_gradient out;
        out.layer = layer;
        out.step = step;
        out.balance_loss = gate.balance_loss();
        out.grad = tensor_ref::wrap(std::move(dx), {static_cast<int64_t>(T), st.hidden});
        const runtime::tensor_frame_meta meta{protocol::frame_kind::gradients, static_cast<uint32_t>(layer), step, 0};
        if (auto err = export_tensor(st.options.transport, self->node(), reply_to, out.grad, meta))
          return void(rp.deliver(std::move(err)));
        pass.rows_out = {};  // the pass is over
        rp.deliver(std::move(out));
      },
      [rp](caf::error err) mutable { rp.deliver(std::move(err)); });
  return rp;
}

std::vector<std::span<float>> gate_grad_spans(router_training& t) {
  std::vector<std::span<float>> out;
  for (auto& [layer, g] : t.gate_grads) out.emplace_back(g);
  return out;
}

caf::expected<gradient_report> train_grads(pointer self, uint64_t step) {
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  gradient_report r;
  r.step = step;
  auto flat = flatten_grads(gate_grad_spans(**t));
  const auto n = static_cast<int64_t>(flat.size());
  r.shared = tensor_ref::wrap(std::move(flat), {n});
  for (const auto& [layer, gate] : (*t)->gates) {
    const bool ran = (*t)->passes.count(layer) != 0;
    for (size_t e = 0; e < gate.num_experts(); ++e) r.expert_loads.push_back(ran ? gate.expert_load()[e] : 0);
  }
  return r;
}

caf::expected<uint64_t> train_apply(pointer self, const train_update& u) {
  auto& st = self->state;
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  auto grads = gate_grad_spans(**t);
  if (auto err = unflatten_grads(u.shared.local ? std::span<const float>(*u.shared.local) : std::span<const float>{},
                                 grads))
    return err;
  std::vector<model::parameter_ref> params;
  for (auto& [layer, g] : (*t)->gate_grads) {
    model::host_tensor* value = (*t)->own->find(gate_name(layer));
    MOE_ASSERT(value != nullptr && value->data().size() == g.size());  // the gates are bound to it
    params.push_back({gate_name(layer), value->data(), g});
  }
  if (auto err = (*t)->owner.apply(u, params, grads)) return err;
  for (auto& g : grads) std::fill(g.begin(), g.end(), 0.0f);
  // DeepSeek-V3's auxiliary-loss-free balancing, from the loads of every shard.
  const size_t E = static_cast<size_t>(st.weights->config.n_routed_experts);
  if (u.bias_update_speed != 0 && u.expert_loads.size() != (*t)->gates.size() * E)
    return training_error(st, "expert loads for " + std::to_string(u.expert_loads.size() / std::max<size_t>(E, 1)) +
                                  " MoE layers; the router has " + std::to_string((*t)->gates.size()));
  size_t i = 0;
  for (const auto& [layer, gate] : (*t)->gates) {
    if (u.bias_update_speed == 0) break;
    model::host_tensor* bias =
        (*t)->own->find("model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
    MOE_ASSERT(bias != nullptr && bias->data().size() == E);  // bound by the gates
    model::update_routing_bias(bias->data(), std::span<const int64_t>(u.expert_loads.data() + i * E, E),
                               u.bias_update_speed);
    ++i;
  }
  (*t)->passes.clear();
  return u.step;
}

// The trainer's rollback: the gates and routing biases from its snapshot, their moments, and no
// gradient or pass of the interrupted step.
caf::expected<int64_t> train_restore(pointer self, const owner_state& snapshot, const train_hyper& h) {
  auto t = training_of(self);
  if (!t) return std::move(t.error());
  std::vector<restore_target> targets;
  for (const auto& [layer, g] : (*t)->gates)
    for (auto name : {gate_name(layer), "model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias"})
      targets.push_back({name, (*t)->own->find(name)->data()});
  if (auto err = (*t)->owner.restore(snapshot, targets, {h.beta1, h.beta2, h.eps, h.weight_decay})) return err;
  for (auto& g : gate_grad_spans(**t)) std::fill(g.begin(), g.end(), 0.0f);
  (*t)->passes.clear();
  return snapshot.optimizer_steps;
}

}  // namespace

bool router_needs(std::string_view name) { return name.find(".mlp.gate.") != std::string_view::npos; }

caf::expected<router_actor> spawn_router(caf::actor_system& sys,
                                         std::shared_ptr<const model::checkpoint> weights,
                                         router_options options) {
  const auto& c = weights->config;
  const auto lookup = model::lookup_in(*weights);
  std::map<int64_t, model::router_block> gates;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    auto g = model::router_block::bind(c, l, lookup);
    if (!g) return g.error();
    gates.emplace(l, std::move(*g));
  }
  std::optional<size_t> shared_group;
  router_layout initial;
  initial.version = options.placement_version;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    initial.layers.push_back(l);
    std::vector<std::vector<int64_t>> per_group;
    for (const auto& g : options.groups) {
      auto sorted = g.experts;
      std::sort(sorted.begin(), sorted.end());
      per_group.push_back(std::move(sorted));
    }
    initial.experts.push_back(std::move(per_group));
  }
  auto table = make_table(initial, c, options.groups.size());
  if (!table) return table.error();
  for (size_t g = 0; g < options.groups.size(); ++g)
    if (options.groups[g].holds_shared_experts && !shared_group) shared_group = g;
  if (c.n_shared_experts > 0 && !shared_group)
    return model::make_error(model::model_errc::bad_input,
                             "placement: no expert group holds the shared experts");
  auto impl = [](pointer self, std::shared_ptr<const model::checkpoint> w,
                 std::map<int64_t, model::router_block> gates, router_options opts,
                 std::shared_ptr<placement_table> table,
                 std::optional<size_t> shared) -> router_actor::behavior_type {
    auto& st = self->state;
    st.hidden = w->config.hidden_size;
    st.weights = std::move(w);
    st.gates = std::move(gates);
    st.options = std::move(opts);
    st.table = std::move(*table);
    st.shared_group = shared;
    if (st.options.metrics) {
      const auto& c = st.weights->config;
      std::vector<bool> moe_layers;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers.push_back(c.is_moe_layer(l));
      st.mailbox = mailbox_gauge(*st.options.metrics, "router", std::to_string(st.options.shard));
      st.routed = routed_tokens_counter(*st.options.metrics, c.num_hidden_layers, c.n_routed_experts,
                                        moe_layers);
    }
    const int32_t next_slot = st.table.num_slots;
    if (st.options.load_window_steps > 0) {
      const auto& c = st.weights->config;
      std::vector<int64_t> moe_layers;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l)
        if (c.is_moe_layer(l)) moe_layers.push_back(l);
      auto window = scheduler::load_window::make(std::move(moe_layers), c.n_routed_experts, std::max(1, next_slot),
                                                 st.options.load_window_steps, st.options.placement_version);
      if (window) st.load.emplace(std::move(*window));
      else spdlog::warn("router {}: no expert load window: {}", st.options.shard, error_text(window.error()));
    }
    return {[self](route_atom, route_request& req) {
              self->state.mailbox.set(self->mailbox().size());
              return route(self, req);
            },
            [self](load_report_atom) -> caf::result<load_report_bytes> {
              auto& st = self->state;
              if (!st.load)
                return model::make_error(model::model_errc::bad_input,
                                         "router " + std::to_string(st.options.shard) + " counts no expert load");
              const auto bytes = protocol::encode_load_report(st.load->snapshot(static_cast<uint32_t>(st.options.shard)));
              load_report_bytes out;
              out.capnp.resize(bytes.size());
              std::memcpy(out.capnp.data(), bytes.data(), bytes.size());
              return out;
            },
            // An attention shard and its router share a process: their tensors are always local.
            [self](train_forward_atom, train_route_request& req) -> caf::result<route_result> {
              self->state.mailbox.set(self->mailbox().size());
              return train_route(self, req);
            },
            [self](train_backward_atom, layer_gradient& g) -> caf::result<layer_gradient> {
              return train_route_backward(self, g);
            },
            [self](train_grads_atom, uint64_t step) {
              return answer_gradients(self, self->state.options.transport, train_grads(self, step));
            },
            [self](train_apply_atom, train_update& u) {
              return receive_update(self, self->state.options.transport, u,
                                    [self](const train_update& landed) { return train_apply(self, landed); });
            },
            [self](train_state_atom) -> caf::result<owner_state> {
              auto t = training_of(self);
              if (!t) return std::move(t.error());
              std::vector<state_entry> entries;
              for (const auto& [layer, g] : (*t)->gates) {
                for (auto name : {gate_name(layer), "model.layers." + std::to_string(layer) +
                                                        ".mlp.gate.e_score_correction_bias"}) {
                  const auto* v = std::as_const(*(*t)->own).find(name);
                  entries.push_back({name, v->shape(), v->data()});
                }
              }
              auto s = (*t)->owner.state(entries);
              if (auto err = export_owner_state(self->state.options.transport, self->node(), reply_node(self), s))
                return err;
              return s;
            },
            [self](train_restore_atom, owner_state& snapshot, train_hyper& h) {
              return receive_restore(self, self->state.options.transport, snapshot,
                                     [self, h](const owner_state& s) { return train_restore(self, s, h); });
            },
            [self](groups_down_atom, const std::vector<int64_t>& groups) { mark_groups_down(self, groups); },
            [self](switch_layout_atom, const router_layout& layout) -> caf::result<uint32_t> {
              auto& st = self->state;
              auto table = make_table(layout, st.weights->config, st.options.groups.size());
              if (!table) return std::move(table.error());
              if (layout.shared_group >= 0) {
                if (static_cast<size_t>(layout.shared_group) >= st.options.groups.size())
                  return model::make_error(model::model_errc::bad_input,
                                           "placement version " + std::to_string(layout.version) +
                                               " puts the shared experts on expert group " +
                                               std::to_string(layout.shared_group) + ", which the router does not know");
                // A failover moved them there (the group they were on is lost).
                st.shared_group = static_cast<size_t>(layout.shared_group);
              }
              // Slot ids now name other replicas: the counts start over for the new version.
              if (st.load) {
                if (auto err = st.load->reset(layout.version, std::max(1, table->num_slots))) return err;
              }
              st.table = std::move(*table);
              return st.table.version;
            }};
  };
  return sys.spawn(impl, std::move(weights), std::move(gates), std::move(options),
                   std::make_shared<placement_table>(std::move(*table)), shared_group);
}

}  // namespace moe::actors
