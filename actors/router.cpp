#include "actors/router.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <cstring>
#include <map>
#include <optional>

#include "actors/actor_metrics.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"
#include "protocol/load_report_codec.hpp"
#include "scheduler/load_window.hpp"

namespace moe::actors {

namespace {

struct router_state {
  std::shared_ptr<const model::checkpoint> weights;
  std::map<int64_t, model::router_block> gates;
  router_options options;
  std::vector<std::vector<size_t>> holders;  // logical expert -> groups holding it
  std::optional<size_t> shared_group;
  int64_t hidden = 0;
  mailbox_gauge mailbox;
  routed_tokens_counter routed;
  std::optional<scheduler::load_window> load;
  std::vector<std::vector<int32_t>> slot_of;  // [group][logical expert] -> physical slot, -1: not held
  bool load_error_logged = false;
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

  // Replica choice: the i-th row of an expert in this batch goes to holder i mod replicas, which
  // keeps replicas even and depends only on the batch, so outputs stay deterministic.
  std::vector<std::vector<int32_t>> group_rows(st.options.groups.size());
  std::vector<size_t> seen(st.holders.size(), 0);
  for (size_t r = 0; r < n; ++r) {
    const auto e = static_cast<size_t>(p->rows.expert_of_row[r]);
    const auto& h = st.holders[e];
    group_rows[h[seen[e]++ % h.size()]].push_back(static_cast<int32_t>(r));
  }
  if (st.load) {
    std::vector<int32_t> slots(n);
    for (size_t g = 0; g < group_rows.size(); ++g)
      for (auto r : group_rows[g])
        slots[static_cast<size_t>(r)] = st.slot_of[g][static_cast<size_t>(p->rows.expert_of_row[static_cast<size_t>(r)])];
    // Counting is bookkeeping: a refused sample (a step older than the window) never fails routing.
    if (auto err = st.load->record(req.step, req.layer, p->choices, slots); err && !st.load_error_logged) {
      st.load_error_logged = true;
      spdlog::warn("router {}: expert load not counted: {}", st.options.shard, error_text(err));
    }
  }
  const float* x = req.x.data();
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const auto& rows = group_rows[g];
    if (rows.empty()) continue;
    std::vector<float> in(rows.size() * D);
    expert_batch b;
    b.layer = req.layer;
    b.step = req.step;
    b.placement_version = st.options.placement_version;
    b.experts.resize(rows.size());
    b.weights.resize(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      const size_t r = static_cast<size_t>(rows[i]);
      std::copy_n(x + static_cast<size_t>(p->rows.token_of_row[r]) * D, D, in.data() + i * D);
      b.experts[i] = p->rows.expert_of_row[r];
      b.weights[i] = p->rows.weight_of_row[r];
    }
    b.rows = tensor_ref::wrap(std::move(in), {static_cast<int64_t>(rows.size()), st.hidden});
    const auto& group = st.options.groups[g].handle;
    if (auto err = export_tensor(st.options.transport, self->node(), group.node(), b.rows, frame_meta(b))) {
      fail(*p, std::move(err));  // answers the request; groups already asked are ignored
      return p->promise;
    }
    ++p->outstanding;
    self->request(group, caf::infinite, expert_forward_atom::value, std::move(b))
        .then(
            [self, p, rows](expert_result& res) {
              if (p->failed) return;
              with_local_tensor(
                  self, self->state.options.transport, std::move(res.rows),
                  [self, p, rows](tensor_ref& out) {
                    if (p->failed) return;
                    const float* src = out.data();
                    const size_t Dh = static_cast<size_t>(self->state.hidden);
                    if (!src || out.num_elements() != static_cast<int64_t>(rows.size() * Dh))
                      return fail(*p, model::make_error(model::model_errc::bad_input,
                                                        "router: malformed expert result"));
                    for (size_t i = 0; i < rows.size(); ++i)
                      std::copy_n(src + i * Dh, Dh, p->rows_out.data() + static_cast<size_t>(rows[i]) * Dh);
                    if (--p->outstanding == 0) finish(self, *p);
                  },
                  [p](caf::error& err) { fail(*p, std::move(err)); });
            },
            [p](caf::error& err) { fail(*p, std::move(err)); });
  }
  if (st.shared_group) {
    // Every token goes to the shared experts: the input tensor is handed over as it is.
    expert_batch b;
    b.layer = req.layer;
    b.step = req.step;
    b.placement_version = st.options.placement_version;
    b.rows = req.x;
    b.experts.assign(T, shared_expert_row);
    b.weights.assign(T, 1.0f);
    const auto& group = st.options.groups[*st.shared_group].handle;
    if (auto err = export_tensor(st.options.transport, self->node(), group.node(), b.rows, frame_meta(b))) {
      fail(*p, std::move(err));  // answers the request; groups already asked are ignored
      return p->promise;
    }
    ++p->outstanding;
    self->request(group, caf::infinite, expert_forward_atom::value, std::move(b))
        .then(
            [self, p, T](expert_result& res) {
              if (p->failed) return;
              with_local_tensor(
                  self, self->state.options.transport, std::move(res.rows),
                  [self, p, T](tensor_ref& out) {
                    if (p->failed) return;
                    if (out.num_elements() != static_cast<int64_t>(T) * self->state.hidden)
                      return fail(*p, model::make_error(model::model_errc::bad_input,
                                                        "router: malformed shared-expert result"));
                    p->shared = out.local;
                    if (--p->outstanding == 0) finish(self, *p);
                  },
                  [p](caf::error& err) { fail(*p, std::move(err)); });
            },
            [p](caf::error& err) { fail(*p, std::move(err)); });
  }
  if (p->outstanding == 0) finish(self, *p);
  return p->promise;
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
  std::vector<std::vector<size_t>> holders(static_cast<size_t>(c.n_routed_experts));
  std::optional<size_t> shared_group;
  for (size_t g = 0; g < options.groups.size(); ++g) {
    for (int64_t e : options.groups[g].experts) {
      if (e < 0 || e >= c.n_routed_experts)
        return model::make_error(model::model_errc::bad_input,
                                 "placement: expert " + std::to_string(e) + " does not exist");
      holders[static_cast<size_t>(e)].push_back(g);
    }
    if (options.groups[g].holds_shared_experts && !shared_group) shared_group = g;
  }
  for (size_t e = 0; e < holders.size(); ++e) {
    if (holders[e].empty())
      return model::make_error(model::model_errc::bad_input,
                               "placement: no expert group holds expert " + std::to_string(e));
  }
  if (c.n_shared_experts > 0 && !shared_group)
    return model::make_error(model::model_errc::bad_input,
                             "placement: no expert group holds the shared experts");
  auto impl = [](pointer self, std::shared_ptr<const model::checkpoint> w,
                 std::map<int64_t, model::router_block> gates, router_options opts,
                 std::vector<std::vector<size_t>> holders,
                 std::optional<size_t> shared) -> router_actor::behavior_type {
    auto& st = self->state;
    st.hidden = w->config.hidden_size;
    st.weights = std::move(w);
    st.gates = std::move(gates);
    st.options = std::move(opts);
    st.holders = std::move(holders);
    st.shared_group = shared;
    if (st.options.metrics) {
      const auto& c = st.weights->config;
      std::vector<bool> moe_layers;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers.push_back(c.is_moe_layer(l));
      st.mailbox = mailbox_gauge(*st.options.metrics, "router", std::to_string(st.options.shard));
      st.routed = routed_tokens_counter(*st.options.metrics, c.num_hidden_layers, c.n_routed_experts,
                                        moe_layers);
    }
    int32_t next_slot = 0;
    for (const auto& g : st.options.groups) {
      std::vector<int32_t> slots(st.holders.size(), -1);
      for (auto e : g.experts) slots[static_cast<size_t>(e)] = next_slot++;
      st.slot_of.push_back(std::move(slots));
    }
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
            }};
  };
  return sys.spawn(impl, std::move(weights), std::move(gates), std::move(options),
                   std::move(holders), shared_group);
}

}  // namespace moe::actors
