#include "actors/expert_group.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <map>
#include <chrono>
#include <optional>

#include "actors/actor_metrics.hpp"
#include "model/mlp_block.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"

namespace moe::actors {

namespace {

struct layer_blocks {
  std::optional<model::expert_set> routed;
  std::optional<model::mlp_block> shared;
};

struct expert_group_state {
  std::shared_ptr<const model::checkpoint> weights;
  std::map<int64_t, layer_blocks> layers;
  model::mlp_scratch scratch;
  int64_t hidden = 0;
  mailbox_gauge mailbox;
  prometheus::Histogram* forward_seconds = nullptr;
  std::shared_ptr<prometheus::Registry> registry;  // keeps the metrics above alive
  tensor_transport transport;
  static inline const char* name = "expert_group";
};

using pointer = expert_group_actor::stateful_pointer<expert_group_state>;

caf::expected<expert_result> forward(pointer self, expert_batch& b) {
  auto& st = self->state;
  auto it = st.layers.find(b.layer);
  const size_t n = b.experts.size();
  const size_t D = static_cast<size_t>(st.hidden);
  if (it == st.layers.end())
    return model::make_error(model::model_errc::bad_input,
                             "expert group: layer " + std::to_string(b.layer) + " is not an MoE layer");
  if (!b.rows.data() || b.rows.num_elements() != static_cast<int64_t>(n * D) ||
      b.weights.size() != n)
    return model::make_error(model::model_errc::bad_input, "expert group: malformed batch");
  std::vector<float> out(n * D);
  // Routed rows and shared rows are computed separately, each a grouped batch.
  std::vector<int32_t> routed_rows, shared_rows;
  for (size_t r = 0; r < n; ++r)
    (b.experts[r] == shared_expert_row ? shared_rows : routed_rows).push_back(static_cast<int32_t>(r));
  const float* x = b.rows.data();
  // The router sends routed and shared rows in separate batches: the common case computes
  // straight from the received rows into the result, without staging copies.
  if (shared_rows.empty()) {
    if (!it->second.routed)
      return model::make_error(model::model_errc::bad_input, "expert group holds no routed experts");
    if (auto err = it->second.routed->run(x, n, b.experts.data(), b.weights.data(), out.data()))
      return err;
  } else if (routed_rows.empty()) {
    if (!it->second.shared)
      return model::make_error(model::model_errc::bad_input, "expert group holds no shared experts");
    if (auto err = it->second.shared->forward(x, n, out.data(), 0.0f, st.scratch)) return err;
  } else {
    // A mixed batch (another router's choice): each kind computed on its own rows.
    std::vector<float> routed_in(routed_rows.size() * D), routed_out(routed_rows.size() * D);
    std::vector<int32_t> experts(routed_rows.size());
    std::vector<float> weights(routed_rows.size());
    for (size_t i = 0; i < routed_rows.size(); ++i) {
      const size_t r = static_cast<size_t>(routed_rows[i]);
      std::copy_n(x + r * D, D, routed_in.data() + i * D);
      experts[i] = b.experts[r];
      weights[i] = b.weights[r];
    }
    if (!it->second.routed || !it->second.shared)
      return model::make_error(model::model_errc::bad_input,
                               "expert group does not hold both routed and shared experts");
    if (auto err = it->second.routed->run(routed_in.data(), routed_rows.size(), experts.data(),
                                          weights.data(), routed_out.data()))
      return err;
    std::vector<float> shared_in(shared_rows.size() * D), shared_out(shared_rows.size() * D);
    for (size_t i = 0; i < shared_rows.size(); ++i)
      std::copy_n(x + static_cast<size_t>(shared_rows[i]) * D, D, shared_in.data() + i * D);
    if (auto err = it->second.shared->forward(shared_in.data(), shared_rows.size(),
                                              shared_out.data(), 0.0f, st.scratch))
      return err;
    for (size_t i = 0; i < routed_rows.size(); ++i)
      std::copy_n(routed_out.data() + i * D, D, out.data() + static_cast<size_t>(routed_rows[i]) * D);
    for (size_t i = 0; i < shared_rows.size(); ++i)
      std::copy_n(shared_out.data() + i * D, D, out.data() + static_cast<size_t>(shared_rows[i]) * D);
  }
  expert_result result;
  result.layer = b.layer;
  result.step = b.step;
  result.rows = tensor_ref::wrap(std::move(out), {static_cast<int64_t>(n), st.hidden});
  return result;
}

// Runs the batch and readies the result for the router's process.
caf::expected<expert_result> answer(pointer self, expert_batch& b, const caf::node_id& reply_to) {
  const auto start = std::chrono::steady_clock::now();
  auto r = forward(self, b);
  if (self->state.forward_seconds)
    self->state.forward_seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (!r) return r;
  const runtime::tensor_frame_meta meta{protocol::frame_kind::expert_output, static_cast<uint32_t>(b.layer),
                                        b.step, b.placement_version};
  if (auto err = export_tensor(self->state.transport, self->node(), reply_to, r->rows, meta)) return err;
  return r;
}

}  // namespace

bool expert_group_needs(const expert_group_options& o, std::string_view name) {
  if (o.holds_shared_experts && name.find(".mlp.shared_experts.") != std::string_view::npos)
    return true;
  const auto pos = name.find(".mlp.experts.");
  if (pos == std::string_view::npos) return false;
  const auto rest = name.substr(pos + 13);
  const int64_t e = std::stoll(std::string(rest.substr(0, rest.find('.'))));
  return std::find(o.experts.begin(), o.experts.end(), e) != o.experts.end();
}

caf::expected<expert_group_actor> spawn_expert_group(caf::actor_system& sys,
                                                     std::shared_ptr<const model::checkpoint> weights,
                                                     const expert_group_options& options) {
  const auto& c = weights->config;
  const auto lookup = model::lookup_in(*weights);
  std::map<int64_t, layer_blocks> layers;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    layer_blocks lb;
    if (!options.experts.empty()) {
      auto s = model::expert_set::bind(c, l, options.experts, lookup);
      if (!s) return s.error();
      lb.routed = std::move(*s);
    }
    if (options.holds_shared_experts && c.n_shared_experts > 0) {
      auto m = model::mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.shared_experts.",
                                      c.hidden_size, c.shared_intermediate_size(), lookup);
      if (!m) return m.error();
      lb.shared = *m;
    }
    layers.emplace(l, std::move(lb));
  }
  auto impl = [](pointer self, std::shared_ptr<const model::checkpoint> w,
                 std::map<int64_t, layer_blocks> blocks,
                 expert_group_options opts) -> expert_group_actor::behavior_type {
    self->state.hidden = w->config.hidden_size;
    self->state.weights = std::move(w);
    self->state.layers = std::move(blocks);
    self->state.registry = opts.metrics;
    if (opts.metrics) {
      self->state.mailbox = mailbox_gauge(*opts.metrics, "expert_group", std::to_string(opts.group));
      self->state.forward_seconds = expert_forward_histogram(*opts.metrics, std::to_string(opts.group));
    }
    self->state.transport = opts.transport;
    return {[self](expert_forward_atom, expert_batch& b) -> caf::result<expert_result> {
      self->state.mailbox.set(self->mailbox().size());
      // The answer goes back to the router's process: captured now, before any fetch.
      const auto& sender = self->current_sender();
      const caf::node_id reply_to = sender ? sender->node() : self->node();
      if (!is_remote(b.rows)) {
        auto r = answer(self, b, reply_to);
        if (!r) return std::move(r.error());
        return std::move(*r);
      }
      auto rp = self->make_response_promise<expert_result>();
      auto rows = std::move(b.rows);
      with_local_tensor(
          self, self->state.transport, std::move(rows),
          [self, rp, b = std::move(b), reply_to](tensor_ref& landed) mutable {
            b.rows = std::move(landed);
            auto r = answer(self, b, reply_to);
            if (r) rp.deliver(std::move(*r));
            else rp.deliver(std::move(r.error()));
          },
          [rp](caf::error& e) mutable { rp.deliver(std::move(e)); });
      return rp;
    }};
  };
  return sys.spawn(impl, std::move(weights), std::move(layers), options);
}

}  // namespace moe::actors
