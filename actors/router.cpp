#include "actors/router.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
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

// Where one MoE layer's experts are, in one placement version.
struct layer_table {
  std::vector<std::vector<size_t>> holders;   // logical expert -> groups holding it
  std::vector<std::vector<int32_t>> slot_of;  // [group][logical expert] -> physical slot, -1: not held
};

struct placement_table {
  uint32_t version = 0;
  std::map<int64_t, layer_table> layers;
  int32_t num_slots = 0;  // the groups' experts of a layer, in group order (the same count for every layer)
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
    if (i == 0) t.num_slots = next_slot;
    else if (next_slot != t.num_slots) return bad("layers hold different numbers of slots");
    t.layers.emplace(l.layers[i], std::move(lt));
  }
  return t;
}

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
    b.placement_version = st.table.version;
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
            [self](switch_layout_atom, const router_layout& layout) -> caf::result<uint32_t> {
              auto& st = self->state;
              auto table = make_table(layout, st.weights->config, st.options.groups.size());
              if (!table) return std::move(table.error());
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
