#include "actors/expert_group.hpp"

#include <caf/all.hpp>
#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include "actors/actor_metrics.hpp"
#include "actors/detached_work.hpp"
#include "base/assert.hpp"
#include "actors/training_owner.hpp"
#include "model/mlp_block.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"
#include "model/moe_training.hpp"

namespace moe::actors {

namespace {

using replica_key = std::pair<int64_t, int64_t>;  // (layer, logical expert)

// "model.layers.L.mlp.experts.E." -> (L, E); nullopt for any other tensor.
std::optional<replica_key> replica_of(std::string_view name) {
  constexpr std::string_view layers = "model.layers.", experts = ".mlp.experts.";
  if (name.substr(0, layers.size()) != layers) return std::nullopt;
  const auto pos = name.find(experts);
  if (pos == std::string_view::npos) return std::nullopt;
  int64_t l = 0, e = 0;
  const auto lv = name.substr(layers.size(), pos - layers.size());
  const auto rest = name.substr(pos + experts.size());
  const auto ev = rest.substr(0, rest.find('.'));
  if (std::from_chars(lv.data(), lv.data() + lv.size(), l).ec != std::errc{} ||
      std::from_chars(ev.data(), ev.data() + ev.size(), e).ec != std::errc{})
    return std::nullopt;
  return replica_key{l, e};
}

uint64_t bytes_of(const model::checkpoint& c) {
  uint64_t n = 0;
  for (const auto& [name, t] : c.tensors) n += static_cast<uint64_t>(t.num_elements()) * sizeof(float);
  return n;
}

// The weights a group holds: each routed replica in a checkpoint of its own, the shared
// experts in another. Moving a host_tensor between maps keeps its buffer, so blocks bound to
// it stay valid while its replica is held.
class replica_store {
 public:
  /// Takes the routed replicas of `c` it does not hold yet and (keep_shared) the shared experts'
  /// tensors; drops the rest. Returns the bytes taken.
  uint64_t absorb(model::checkpoint&& c, bool keep_shared) {
    uint64_t taken = 0;
    for (auto& [name, tensor] : c.tensors) {
      auto key = replica_of(name);
      model::checkpoint* dst = nullptr;
      if (key) {
        auto& slot = routed_[*key];
        if (!slot) slot = std::make_unique<model::checkpoint>();
        if (slot->find(name)) continue;  // held already: keep the bound copy
        dst = slot.get();
      } else if (keep_shared && name.find(".mlp.shared_experts.") != std::string::npos) {
        dst = &shared_;
      } else {
        continue;
      }
      taken += static_cast<uint64_t>(tensor.num_elements()) * sizeof(float);
      dst->tensors.emplace(name, std::move(tensor));
    }
    return taken;
  }
  [[nodiscard]] bool holds(const replica_key& k) const { return routed_.count(k) != 0; }
  /// Frees every routed replica not in `keep`; returns the bytes freed.
  uint64_t keep_only(const std::set<replica_key>& keep) {
    uint64_t freed = 0;
    for (auto it = routed_.begin(); it != routed_.end();) {
      if (keep.count(it->first)) {
        ++it;
        continue;
      }
      freed += bytes_of(*it->second);
      it = routed_.erase(it);
    }
    return freed;
  }
  /// A held tensor by name, for the optimizer to update in place (null: not held).
  [[nodiscard]] model::host_tensor* find(const std::string& name) {
    if (auto key = replica_of(name)) {
      auto it = routed_.find(*key);
      return it == routed_.end() ? nullptr : it->second->find(name);
    }
    return shared_.find(name);
  }
  [[nodiscard]] model::weight_lookup lookup() const {
    return [this](const std::string& name, std::span<const int64_t> shape) -> caf::expected<const float*> {
      const model::checkpoint* src = &shared_;
      if (auto key = replica_of(name)) {
        auto it = routed_.find(*key);
        if (it == routed_.end())
          return model::make_error(model::model_errc::missing_tensor, "expert group does not hold " + name);
        src = it->second.get();
      }
      return model::lookup_in(*src)(name, shape);
    };
  }

 private:
  std::map<replica_key, std::unique_ptr<model::checkpoint>> routed_;
  model::checkpoint shared_;
};

struct layer_blocks {
  std::optional<model::expert_set> routed;
  std::optional<model::mlp_block> shared;
};

// One placement version: per MoE layer, its blocks, and the replicas it uses.
struct version_blocks {
  std::map<int64_t, layer_blocks> layers;
  std::set<replica_key> replicas;
};

// Training (actors/training_messages.hpp): the serving version's experts as training sets, their
// gradients, and the passes in flight, one per (router, layer).
struct training_pass {
  uint64_t step = 0;
  std::vector<int32_t> routed_rows, shared_rows;  // the batch's rows of each kind
  model::expert_pass routed, shared;
};

struct group_training {
  // The placement version the sets are bound to; none when only the owner is set up (a rollback
  // reached a group that had not trained yet).
  std::optional<uint32_t> version;
  std::map<int64_t, model::expert_training_set> routed, shared;  // by layer
  std::map<replica_key, model::mlp_grads> grads;                  // every held routed replica
  std::map<int64_t, model::mlp_grads> shared_grads;               // by layer
  std::map<std::pair<int32_t, int64_t>, training_pass> passes;    // (source, layer)
  std::vector<int64_t> reported;  // the replicated (layer, expert) pairs of the last train_grads
  training_owner owner;
};

struct expert_group_state {
  model::model_config config;
  expert_group_options options;
  replica_store store;
  std::map<uint32_t, version_blocks> versions;
  std::optional<uint32_t> preparing;  // a version whose replicas are loading
  bool preparing_aborted = false;     // ... and was aborted meanwhile: dropped when loaded
  model::mlp_scratch scratch;
  int64_t hidden = 0;
  std::optional<group_training> training;
  // Trained experts a failover reloaded from the model checkpoint, as no surviving group held
  // them: their values are the untrained ones until the trainer's rollback restores them, and
  // no training step runs here meanwhile.
  std::set<replica_key> stale;
  // Whether the shared experts are held here: from the options, or since a failover moved them
  // here (group_layout::holds_shared).
  bool holds_shared = false;
  mailbox_gauge mailbox;
  prometheus::Histogram* forward_seconds = nullptr;
  std::shared_ptr<prometheus::Registry> registry;  // keeps the metrics above alive
  static inline const char* name = "expert_group";
};

using pointer = expert_group_actor::stateful_pointer<expert_group_state>;

// Binds one version's blocks over the replicas in `store` (which must hold them all).
caf::expected<version_blocks> bind_version(const model::model_config& c, const replica_store& store,
                                           const std::vector<int64_t>& layers,
                                           const std::vector<std::vector<int64_t>>& experts,
                                           bool holds_shared) {
  version_blocks v;
  const auto lookup = store.lookup();
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t l = layers[i];
    layer_blocks lb;
    if (!experts[i].empty()) {
      auto s = model::expert_set::bind(c, l, experts[i], lookup);
      if (!s) return s.error();
      lb.routed = std::move(*s);
      for (auto e : experts[i]) v.replicas.insert({l, e});
    }
    if (holds_shared && c.n_shared_experts > 0) {
      auto m = model::mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.shared_experts.",
                                      c.hidden_size, c.shared_intermediate_size(), lookup);
      if (!m) return m.error();
      lb.shared = *m;
    }
    v.layers.emplace(l, std::move(lb));
  }
  return v;
}

std::vector<int64_t> moe_layers_of(const model::model_config& c) {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (c.is_moe_layer(l)) out.push_back(l);
  return out;
}

std::set<replica_key> held_replicas(const expert_group_state& st) {
  std::set<replica_key> out;
  for (const auto& [v, blocks] : st.versions) out.insert(blocks.replicas.begin(), blocks.replicas.end());
  return out;
}

caf::error check_layout(const model::model_config& c, const group_layout& g) {
  auto bad = [](std::string text) { return model::make_error(model::model_errc::bad_input, std::move(text)); };
  if (g.layers != moe_layers_of(c)) return bad("placement version " + std::to_string(g.version) + ": layers do not match the model's MoE layers");
  if (g.experts.size() != g.layers.size()) return bad("placement version " + std::to_string(g.version) + ": one expert list per MoE layer expected");
  for (size_t i = 0; i < g.experts.size(); ++i) {
    const auto& list = g.experts[i];
    for (size_t j = 0; j < list.size(); ++j) {
      if (list[j] < 0 || list[j] >= c.n_routed_experts || (j > 0 && list[j] <= list[j - 1]))
        return bad("placement version " + std::to_string(g.version) + ": layer " + std::to_string(g.layers[i]) +
                   ": expert ids must be sorted, unique and in [0, " + std::to_string(c.n_routed_experts) + ")");
    }
  }
  return {};
}

caf::expected<expert_result> forward(pointer self, expert_batch& b) {
  auto& st = self->state;
  auto version = st.versions.find(b.placement_version);
  if (version == st.versions.end())
    return model::make_error(model::model_errc::bad_input,
                             "expert group " + std::to_string(st.options.group) + ": placement version " +
                                 std::to_string(b.placement_version) + " is not held");
  auto it = version->second.layers.find(b.layer);
  const size_t n = b.experts.size();
  const size_t D = static_cast<size_t>(st.hidden);
  if (it == version->second.layers.end())
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
  if (auto err = export_tensor(self->state.options.transport, self->node(), reply_to, r->rows, meta)) return err;
  return r;
}

// --- training (actors/training_messages.hpp) ---------------------------------------------------

caf::error training_error(const expert_group_state& st, std::string text) {
  return model::make_error(model::model_errc::bad_input,
                           "expert group " + std::to_string(st.options.group) + ": " + std::move(text));
}

std::string expert_prefix(int64_t layer, int64_t expert) {
  const std::string l = "model.layers." + std::to_string(layer) + ".mlp.";
  return expert == model::shared_experts_id ? l + "shared_experts." : l + "experts." + std::to_string(expert) + ".";
}

// An expert's (routed or shared) trained weights under its prefix, in the order of its
// gradients (model::mlp_grads): what training state, snapshots and rollbacks name.
constexpr std::array<const char*, 3> expert_weights{"gate_proj.weight", "up_proj.weight", "down_proj.weight"};

// The state entries (name, shape, values) of the expert under `prefix`; it is held.
void append_state_entries(replica_store& store, const std::string& prefix, std::vector<state_entry>& out) {
  for (const char* part : expert_weights) {
    const auto* v = store.find(prefix + part);
    MOE_ASSERT(v != nullptr);
    out.push_back({prefix + part, v->shape(), v->data()});
  }
}

// The training sets of the serving version (the oldest held), bound on first use and again after
// a rebalance committed another version; AdamW's moments carry over by name.
caf::expected<group_training*> training_for(pointer self, uint32_t version) {
  auto& st = self->state;
  const uint32_t serving = st.versions.begin()->first;
  if (version != serving)
    return training_error(st, "training batch of placement version " + std::to_string(version) +
                                  ", but version " + std::to_string(serving) + " is the one serving");
  if (!st.stale.empty()) {
    const auto [layer, expert] = *st.stale.begin();
    return training_error(st, (expert == model::shared_experts_id ? std::string("the shared experts")
                                                                    : "expert " + std::to_string(expert)) +
                                  " of layer " + std::to_string(layer) +
                                  " was reloaded from the model checkpoint after its node failed; training resumes "
                                  "once the trainer has rolled back to its last snapshot");
  }
  if (st.training && st.training->version == serving) return &*st.training;
  group_training t;
  t.version = serving;
  const auto& c = st.config;
  const auto lookup = st.store.lookup();
  std::map<int64_t, std::vector<int64_t>> held;
  for (const auto& [layer, expert] : st.versions.begin()->second.replicas) held[layer].push_back(expert);
  for (const auto& [layer, blocks] : st.versions.begin()->second.layers) {
    if (auto it = held.find(layer); it != held.end()) {
      auto set = model::expert_training_set::bind(c, layer, it->second, lookup);
      if (!set) return set.error();
      t.routed.emplace(layer, std::move(*set));
      for (auto e : it->second) t.grads.emplace(replica_key{layer, e}, model::mlp_grads::zeros(c.hidden_size, c.moe_intermediate_size));
    }
    if (blocks.shared) {
      auto set = model::expert_training_set::bind_shared(c, layer, lookup);
      if (!set) return set.error();
      t.shared.emplace(layer, std::move(*set));
      t.shared_grads.emplace(layer, model::mlp_grads::zeros(c.hidden_size, c.shared_intermediate_size()));
    }
  }
  if (st.training) t.owner = std::move(st.training->owner);
  st.training = std::move(t);
  return &*st.training;
}

// Runs `rows` of a batch through `set` (rows.size() == n: all of them, without staging copies)
// and scatters the outputs into out (n, hidden).
template <class Run>
caf::error run_rows(size_t D, const float* x, size_t n, const std::vector<int32_t>& rows, float* out, Run run) {
  if (rows.empty()) return {};
  if (rows.size() == n) return run(x, out);
  std::vector<float> in(rows.size() * D), part(rows.size() * D);
  for (size_t i = 0; i < rows.size(); ++i) std::copy_n(x + static_cast<size_t>(rows[i]) * D, D, in.data() + i * D);
  if (auto err = run(in.data(), part.data())) return err;
  for (size_t i = 0; i < rows.size(); ++i) std::copy_n(part.data() + i * D, D, out + static_cast<size_t>(rows[i]) * D);
  return {};
}

caf::expected<expert_result> train_forward(pointer self, train_expert_batch& b) {
  auto& st = self->state;
  auto t = training_for(self, b.placement_version);
  if (!t) return std::move(t.error());
  const size_t n = b.experts.size(), D = static_cast<size_t>(st.hidden);
  if (!b.rows.data() || b.rows.num_elements() != static_cast<int64_t>(n * D))
    return training_error(st, "malformed training batch");
  training_pass pass;
  pass.step = b.step;
  std::vector<int32_t> routed_ids, shared_ids;
  for (size_t r = 0; r < n; ++r) {
    const bool shared = b.experts[r] == shared_expert_row;
    (shared ? pass.shared_rows : pass.routed_rows).push_back(static_cast<int32_t>(r));
    (shared ? shared_ids : routed_ids).push_back(b.experts[r]);
  }
  std::vector<float> out(n * D);
  auto set_of = [&](std::map<int64_t, model::expert_training_set>& sets, const char* kind)
      -> caf::expected<model::expert_training_set*> {
    auto it = sets.find(b.layer);
    if (it == sets.end())
      return training_error(st, std::string("holds no ") + kind + " of layer " + std::to_string(b.layer));
    return &it->second;
  };
  if (!pass.routed_rows.empty()) {
    auto set = set_of((*t)->routed, "routed experts");
    if (!set) return std::move(set.error());
    if (auto err = run_rows(D, b.rows.data(), n, pass.routed_rows, out.data(), [&](const float* x, float* o) {
          return (*set)->forward(x, routed_ids, o, pass.routed);
        }))
      return err;
  }
  if (!pass.shared_rows.empty()) {
    auto set = set_of((*t)->shared, "shared experts");
    if (!set) return std::move(set.error());
    if (auto err = run_rows(D, b.rows.data(), n, pass.shared_rows, out.data(), [&](const float* x, float* o) {
          return (*set)->forward(x, shared_ids, o, pass.shared);
        }))
      return err;
  }
  (*t)->passes[{b.source, b.layer}] = std::move(pass);
  expert_result r;
  r.layer = b.layer;
  r.step = b.step;
  r.rows = tensor_ref::wrap(std::move(out), {static_cast<int64_t>(n), st.hidden});
  return r;
}

caf::expected<expert_result> train_backward(pointer self, train_expert_grad& g) {
  auto& st = self->state;
  if (!st.training) return training_error(st, "training backward without a forward");
  auto& t = *st.training;
  auto it = t.passes.find({g.source, g.layer});
  if (it == t.passes.end() || it->second.step != g.step)
    return training_error(st, "no training forward of layer " + std::to_string(g.layer) + ", step " +
                                  std::to_string(g.step) + " from router " + std::to_string(g.source));
  auto& pass = it->second;
  const size_t n = pass.routed_rows.size() + pass.shared_rows.size(), D = static_cast<size_t>(st.hidden);
  if (!g.d_rows.data() || g.d_rows.num_elements() != static_cast<int64_t>(n * D))
    return training_error(st, "malformed training gradient");
  std::vector<float> d_in(n * D);
  const int64_t layer = g.layer;
  if (auto err = run_rows(D, g.d_rows.data(), n, pass.routed_rows, d_in.data(), [&](const float* d, float* o) {
        return t.routed.at(layer).backward(pass.routed, d, o, [&](int64_t e) -> model::mlp_grads* {
          auto found = t.grads.find({layer, e});
          return found == t.grads.end() ? nullptr : &found->second;
        });
      }))
    return err;
  if (auto err = run_rows(D, g.d_rows.data(), n, pass.shared_rows, d_in.data(), [&](const float* d, float* o) {
        return t.shared.at(layer).backward(pass.shared, d, o, [&](int64_t) { return &t.shared_grads.at(layer); });
      }))
    return err;
  t.passes.erase(it);  // the activations are not needed again
  expert_result r;
  r.layer = g.layer;
  r.step = g.step;
  r.rows = tensor_ref::wrap(std::move(d_in), {static_cast<int64_t>(n), st.hidden});
  return r;
}

// Every gradient of the group as spans: first those of `reported` (in its order, each expert's
// gate, up, down), then the rest (`others`).
void split_grads(group_training& t, const std::vector<int64_t>& reported, std::vector<std::span<float>>& asked,
                 std::vector<std::span<float>>& others) {
  std::set<replica_key> asked_keys;
  auto add = [](std::vector<std::span<float>>& to, model::mlp_grads& g) {
    to.emplace_back(g.gate_proj);
    to.emplace_back(g.up_proj);
    to.emplace_back(g.down_proj);
  };
  for (size_t i = 0; i + 1 < reported.size(); i += 2) {
    asked_keys.insert({reported[i], reported[i + 1]});
    add(asked, t.grads.at({reported[i], reported[i + 1]}));
  }
  for (auto& [key, g] : t.grads)
    if (!asked_keys.count(key)) add(others, g);
  for (auto& [layer, g] : t.shared_grads) add(others, g);
}

caf::expected<gradient_report> train_grads(pointer self, uint64_t step, std::vector<int64_t>& replicated) {
  auto& st = self->state;
  auto t = training_for(self, st.versions.begin()->first);
  if (!t) return std::move(t.error());
  if (replicated.size() % 2 != 0) return training_error(st, "replicated experts come as (layer, expert) pairs");
  for (size_t i = 0; i < replicated.size(); i += 2)
    if (!(*t)->grads.count({replicated[i], replicated[i + 1]}))
      return training_error(st, "does not hold expert " + std::to_string(replicated[i + 1]) + " of layer " +
                                    std::to_string(replicated[i]));
  std::vector<std::span<float>> asked, others;
  split_grads(**t, replicated, asked, others);
  gradient_report r;
  r.step = step;
  auto flat = flatten_grads(asked);
  const auto n = static_cast<int64_t>(flat.size());
  r.shared = tensor_ref::wrap(std::move(flat), {n});
  r.own_norm_sq = grads_norm_sq(others);
  (*t)->reported = std::move(replicated);
  return r;
}

caf::expected<uint64_t> train_apply(pointer self, const train_update& u) {
  auto& st = self->state;
  auto t = training_for(self, st.versions.begin()->first);
  if (!t) return std::move(t.error());
  std::vector<std::span<float>> asked, others;
  split_grads(**t, (*t)->reported, asked, others);
  if (auto err = unflatten_grads(u.shared.local ? std::span<const float>(*u.shared.local) : std::span<const float>{},
                                 asked))
    return err;
  std::vector<model::parameter_ref> params;
  std::vector<std::span<float>> grads;
  auto add = [&](const std::string& prefix, model::mlp_grads& g) {
    const std::array<std::span<float>, 3> parts{g.gate_proj, g.up_proj, g.down_proj};
    for (size_t i = 0; i < parts.size(); ++i) {
      const std::string name = prefix + expert_weights[i];
      model::host_tensor* value = st.store.find(name);
      MOE_ASSERT(value != nullptr && value->data().size() == parts[i].size());  // the sets are bound to them
      params.push_back({name, value->data(), parts[i]});
      grads.push_back(parts[i]);
    }
  };
  for (auto& [key, g] : (*t)->grads) add(expert_prefix(key.first, key.second), g);
  for (auto& [layer, g] : (*t)->shared_grads) add(expert_prefix(layer, model::shared_experts_id), g);
  if (auto err = (*t)->owner.apply(u, params, grads)) return err;
  for (auto& g : grads) std::fill(g.begin(), g.end(), 0.0f);
  (*t)->passes.clear();
  (*t)->reported.clear();
  return u.step;
}

// The trainer's rollback: every replica this group holds (of any version it keeps, so a failover
// version prepared but not yet committed is covered) takes its snapshot's values and moments;
// the gradients and passes of the interrupted step go, and reloaded experts are stale no more.
caf::expected<int64_t> train_restore(pointer self, const owner_state& snapshot, const train_hyper& h) {
  auto& st = self->state;
  std::vector<restore_target> targets;
  auto add = [&](const std::string& prefix) -> caf::error {
    for (const char* part : expert_weights) {
      model::host_tensor* v = st.store.find(prefix + part);
      if (!v) return training_error(st, "holds no " + prefix + part);
      targets.push_back({prefix + part, v->data()});
    }
    return {};
  };
  for (const auto& key : held_replicas(st))
    if (auto err = add(expert_prefix(key.first, key.second))) return err;
  if (st.holds_shared && st.config.n_shared_experts > 0)
    for (auto layer : moe_layers_of(st.config))
      if (auto err = add(expert_prefix(layer, model::shared_experts_id))) return err;
  if (!st.training) st.training.emplace();
  auto& t = *st.training;
  if (auto err = t.owner.restore(snapshot, targets, {h.beta1, h.beta2, h.eps, h.weight_decay})) return err;
  for (auto& [key, g] : t.grads) g.zero();
  for (auto& [layer, g] : t.shared_grads) g.zero();
  t.passes.clear();
  t.reported.clear();
  st.stale.clear();
  return snapshot.optimizer_steps;
}

// Loads the version's missing replicas on a thread of its own, then binds the version.
caf::result<prepare_result> prepare(pointer self, group_layout& g) {
  auto& st = self->state;
  if (auto err = check_layout(st.config, g)) return err;
  if (st.versions.count(g.version)) {
    // A version prepared earlier but never committed (its rebalance failed after the prepare)
    // is prepared anew; the oldest version is the one serving and is never replaced.
    if (g.version == st.versions.begin()->first)
      return model::make_error(model::model_errc::bad_input,
                               "placement version " + std::to_string(g.version) + " is the one serving");
    st.versions.erase(g.version);
  }
  if (st.preparing)
    return model::make_error(model::model_errc::bad_input,
                             "expert group " + std::to_string(st.options.group) + " is already preparing version " +
                                 std::to_string(*st.preparing));
  std::set<replica_key> missing;
  for (size_t i = 0; i < g.layers.size(); ++i)
    for (auto e : g.experts[i])
      if (!st.store.holds({g.layers[i], e})) missing.insert({g.layers[i], e});
  // A failover moves the shared experts here: loaded from the checkpoint with the replicas.
  const bool load_shared = g.holds_shared && !st.holds_shared && st.config.n_shared_experts > 0;
  const bool shared = st.holds_shared || g.holds_shared;
  auto rp = self->make_response_promise<prepare_result>();
  auto finish = [self, rp, g, load_shared, shared](caf::expected<model::checkpoint> loaded, int64_t count) mutable -> void {
    auto& st = self->state;
    st.preparing.reset();
    if (std::exchange(st.preparing_aborted, false)) {
      st.store.keep_only(held_replicas(st));
      rp.deliver(model::make_error(model::model_errc::bad_input,
                                   "placement version " + std::to_string(g.version) + " was aborted while loading"));
      return;
    }
    if (!loaded) {
      rp.deliver(std::move(loaded.error()));
      return;
    }
    prepare_result r;
    r.replicas_loaded = count;
    r.bytes_loaded = st.store.absorb(std::move(*loaded), load_shared);
    auto v = bind_version(st.config, st.store, g.layers, g.experts, shared);
    if (!v) {
      st.store.keep_only(held_replicas(st));
      rp.deliver(std::move(v.error()));
      return;
    }
    st.versions.emplace(g.version, std::move(*v));
    if (shared) st.holds_shared = true;
    rp.deliver(r);
  };
  if (missing.empty() && !load_shared) {
    finish(model::checkpoint{}, 0);
    return rp;
  }
  const bool trained = st.training && st.training->owner.optimizer();
  bool reload_trained = false;
  std::map<size_t, std::vector<int64_t>> asks;
  if (trained) {
    // Trained: the checkpoint on disk no longer has the experts' values; copy them (and their
    // AdamW moments, so replicas keep stepping alike) from the groups that hold them now.
    size_t covered = 0;
    for (size_t i = 0; i + 2 < g.sources.size(); i += 3) {
      if (!missing.count({g.sources[i], g.sources[i + 1]})) continue;
      const auto source = static_cast<size_t>(g.sources[i + 2]);
      if (source >= g.peers.size() || !g.peers[source]) {
        // The promise holds the request now: errors go through it, or the caller never hears.
        rp.deliver(model::make_error(model::model_errc::bad_input, "placement version " + std::to_string(g.version) +
                                                                       ": a replica's source group is not among the peers"));
        return rp;
      }
      asks[source].insert(asks[source].end(), {g.sources[i], g.sources[i + 1]});
      ++covered;
    }
    if (covered != missing.size() && !g.urgent) {
      rp.deliver(model::make_error(model::model_errc::bad_input,
                                   "expert group " + std::to_string(st.options.group) +
                                       " holds trained experts: every replica it gains needs a group to copy it "
                                       "from, and no surviving group holds some of them"));
      return rp;
    }
    // A failover, and some lost experts (or the shared ones) have no surviving holder: every
    // missing replica comes from the model checkpoint, stale until the trainer rolls the cluster
    // back to its last snapshot (values and moments of every expert; train_restore), which it
    // does after a failover.
    reload_trained = covered != missing.size() || load_shared;
  }
  if (trained && !reload_trained) {
    st.preparing = g.version;
    st.preparing_aborted = false;
    struct copy_state {
      model::checkpoint weights;
      std::map<std::string, model::adamw::moments, std::less<>> moments;
      size_t outstanding = 0;
      bool failed = false;
    };
    auto copy = std::make_shared<copy_state>();
    copy->outstanding = asks.size();
    const auto count = static_cast<int64_t>(missing.size());
    auto failed = [copy, finish](caf::error& e) mutable {
      if (std::exchange(copy->failed, true)) return;
      finish(std::move(e), 0);
    };
    for (auto& [source, pairs] : asks) {
      self->request(caf::actor_cast<expert_group_actor>(g.peers[source]), std::chrono::minutes(2),
                    train_state_atom::value, pairs)
          .then(
              [self, copy, finish, failed, count](owner_state& state) mutable {
                if (copy->failed) return;
                auto held = std::make_shared<owner_state>(std::move(state));
                const auto& transport = self->state.options.transport;
                with_local_tensor(
                    self, transport, held->values,
                    [self, copy, finish, failed, count, held](tensor_ref& values) mutable {
                      held->values = values;
                      with_local_tensor(
                          self, self->state.options.transport, held->moments,
                          [self, copy, finish, failed, count, held](tensor_ref& moments) mutable {
                            if (copy->failed) return;
                            held->moments = moments;
                            if (auto err = unpack_owner_state(*held, copy->weights, copy->moments)) return failed(err);
                            if (--copy->outstanding > 0) return;
                            self->state.training->owner.adopt(std::move(copy->moments));
                            finish(std::move(copy->weights), count);
                          },
                          failed);
                    },
                    failed);
              },
              failed);
    }
    return rp;
  }
  if (st.options.checkpoint_dir.empty()) {
    rp.deliver(model::make_error(model::model_errc::bad_input,
                                 "expert group " + std::to_string(st.options.group) +
                                     " cannot load new replicas: it was given no checkpoint directory"));
    return rp;
  }
  if (reload_trained) {
    st.stale.insert(missing.begin(), missing.end());
    if (load_shared)
      for (auto layer : g.layers) st.stale.insert({layer, model::shared_experts_id});
    spdlog::warn("expert group {}: {} trained replicas it gains in failover version {} have no surviving holder; "
                 "loaded from the model checkpoint until the trainer rolls back to its last snapshot",
                 st.options.group, missing.size(), g.version);
  }
  st.preparing = g.version;
  st.preparing_aborted = false;
  // The read can take long (a real expert is tens of MB): a detached worker does it, and this
  // group answers batches meanwhile.
  auto loaded = std::make_shared<caf::expected<model::checkpoint>>(model::checkpoint{});
  const auto count = static_cast<int64_t>(missing.size());
  run_detached(
      self,
      [loaded, dir = st.options.checkpoint_dir, cfg = st.config, missing, urgent = g.urgent,
       load_shared] {
        // Background work: SCHED_IDLE, so that it runs only on cores the serving threads leave
        // idle. A lower nice value is not enough: steps are chains of short messages, and each
        // hop waits for a core a niced but runnable loader holds (measured: a 4x longer step
        // with nice 10, 2.4x with SCHED_IDLE, on 2 cores shared with 4 loaders).
        sched_param idle{};
        if (!urgent) ::pthread_setschedparam(::pthread_self(), SCHED_IDLE, &idle);
        model::load_options o;
        o.filter = [&missing, load_shared](std::string_view name) {
          if (load_shared && name.find(".mlp.shared_experts.") != std::string_view::npos)
            return true;
          auto key = replica_of(name);
          return key && missing.count(*key) != 0;
        };
        o.mtp = model::mtp_policy::skip;
        o.progress = false;
        *loaded = model::load_checkpoint(dir, cfg, o);
      },
      [loaded, finish, count](caf::error err) mutable {
        if (err) return finish(std::move(err), 0);
        finish(std::move(*loaded), count);
      });
  return rp;
}

}  // namespace

bool expert_group_needs(const expert_group_options& o, std::string_view name) {
  if (o.holds_shared_experts && name.find(".mlp.shared_experts.") != std::string_view::npos)
    return true;
  auto key = replica_of(name);
  if (!key) return false;
  return std::find(o.experts.begin(), o.experts.end(), key->second) != o.experts.end();
}

caf::expected<expert_group_actor> spawn_expert_group(caf::actor_system& sys, model::checkpoint weights,
                                                     const expert_group_options& options) {
  auto config = weights.config;
  auto store = std::make_unique<replica_store>();
  store->absorb(std::move(weights), options.holds_shared_experts);
  const auto layers = moe_layers_of(config);
  std::vector<int64_t> experts = options.experts;
  std::sort(experts.begin(), experts.end());
  auto initial = bind_version(config, *store, layers, std::vector<std::vector<int64_t>>(layers.size(), experts),
                              options.holds_shared_experts);
  if (!initial) return initial.error();
  store->keep_only(initial->replicas);
  auto impl = [](pointer self, model::model_config c, std::shared_ptr<replica_store> store, version_blocks initial,
                 expert_group_options opts) -> expert_group_actor::behavior_type {
    auto& st = self->state;
    st.hidden = c.hidden_size;
    st.config = std::move(c);
    st.store = std::move(*store);
    st.versions.emplace(opts.placement_version, std::move(initial));
    st.holds_shared = opts.holds_shared_experts;
    st.registry = opts.metrics;
    if (opts.metrics) {
      st.mailbox = mailbox_gauge(*opts.metrics, "expert_group", std::to_string(opts.group));
      st.forward_seconds = expert_forward_histogram(*opts.metrics, std::to_string(opts.group));
    }
    st.options = std::move(opts);
    return {
        [self](expert_forward_atom, expert_batch& b) -> caf::result<expert_result> {
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
              self, self->state.options.transport, std::move(rows),
              [self, rp, b = std::move(b), reply_to](tensor_ref& landed) mutable {
                b.rows = std::move(landed);
                auto r = answer(self, b, reply_to);
                if (r) rp.deliver(std::move(*r));
                else rp.deliver(std::move(r.error()));
              },
              [rp](caf::error& e) mutable { rp.deliver(std::move(e)); });
          return rp;
        },
        [self](prepare_layout_atom, group_layout& g) { return prepare(self, g); },
        [self](commit_layout_atom, uint32_t version) -> caf::result<uint64_t> {
          auto& st = self->state;
          if (!st.versions.count(version))
            return model::make_error(model::model_errc::bad_input,
                                     "expert group " + std::to_string(st.options.group) + ": cannot commit version " +
                                         std::to_string(version) + ", which it does not hold");
          for (auto it = st.versions.begin(); it != st.versions.end();)
            it = it->first < version ? st.versions.erase(it) : std::next(it);
          return st.store.keep_only(held_replicas(st));
        },
        [self](train_forward_atom, train_expert_batch& b) -> caf::result<expert_result> {
          const auto reply_to = reply_node(self);
          auto rows = std::move(b.rows);
          return answer_when_local<expert_result>(
              self, self->state.options.transport, std::move(rows),
              [self, b = std::move(b), reply_to](tensor_ref& landed) mutable -> caf::expected<expert_result> {
                b.rows = std::move(landed);
                auto r = train_forward(self, b);
                if (!r) return r;
                const runtime::tensor_frame_meta meta{protocol::frame_kind::expert_output,
                                                      static_cast<uint32_t>(b.layer), b.step, b.placement_version};
                if (auto err = export_tensor(self->state.options.transport, self->node(), reply_to, r->rows, meta))
                  return err;
                return r;
              });
        },
        [self](train_backward_atom, train_expert_grad& g) -> caf::result<expert_result> {
          const auto reply_to = reply_node(self);
          auto rows = std::move(g.d_rows);
          return answer_when_local<expert_result>(
              self, self->state.options.transport, std::move(rows),
              [self, g = std::move(g), reply_to](tensor_ref& landed) mutable -> caf::expected<expert_result> {
                g.d_rows = std::move(landed);
                auto r = train_backward(self, g);
                if (!r) return r;
                const runtime::tensor_frame_meta meta{protocol::frame_kind::gradients, static_cast<uint32_t>(g.layer),
                                                      g.step, 0};
                if (auto err = export_tensor(self->state.options.transport, self->node(), reply_to, r->rows, meta))
                  return err;
                return r;
              });
        },
        [self](train_grads_atom, uint64_t step, std::vector<int64_t>& replicated) {
          return answer_gradients(self, self->state.options.transport, train_grads(self, step, replicated));
        },
        [self](train_apply_atom, train_update& u) {
          return receive_update(self, self->state.options.transport, u,
                                [self](const train_update& landed) { return train_apply(self, landed); });
        },
        [self](train_state_atom, const std::vector<int64_t>& pairs) -> caf::result<owner_state> {
          // The named replicas' weights and moments, for a group that gains them in a rebalance.
          auto& st = self->state;
          if (pairs.size() % 2 != 0) return training_error(st, "replicas come as (layer, expert) pairs");
          std::vector<state_entry> entries;
          for (size_t i = 0; i < pairs.size(); i += 2) {
            if (!st.store.holds({pairs[i], pairs[i + 1]}))
              return training_error(st, "does not hold expert " + std::to_string(pairs[i + 1]) + " of layer " +
                                            std::to_string(pairs[i]));
            append_state_entries(st.store, expert_prefix(pairs[i], pairs[i + 1]), entries);
          }
          training_owner none;
          auto s = st.training ? st.training->owner.state(entries) : none.state(entries);
          if (auto err = export_owner_state(st.options.transport, self->node(), reply_node(self), s)) return err;
          return s;
        },
        [self](train_state_atom) -> caf::result<owner_state> {
          auto& st = self->state;
          auto t = training_for(self, st.versions.begin()->first);
          if (!t) return std::move(t.error());
          std::vector<state_entry> entries;
          for (const auto& [key, g] : (*t)->grads)
            append_state_entries(st.store, expert_prefix(key.first, key.second), entries);
          for (const auto& [layer, g] : (*t)->shared_grads)
            append_state_entries(st.store, expert_prefix(layer, model::shared_experts_id), entries);
          auto s = (*t)->owner.state(entries);
          if (auto err = export_owner_state(st.options.transport, self->node(), reply_node(self), s)) return err;
          return s;
        },
        [self](train_restore_atom, owner_state& snapshot, train_hyper& h) {
          return receive_restore(self, self->state.options.transport, snapshot,
                                 [self, h](const owner_state& s) { return train_restore(self, s, h); });
        },
        [self](abort_layout_atom, uint32_t version) {
          auto& st = self->state;
          if (st.preparing == version) st.preparing_aborted = true;
          // The serving version (the oldest) is never aborted.
          if (st.versions.size() < 2 || st.versions.begin()->first == version) return;
          st.versions.erase(version);
          st.store.keep_only(held_replicas(st));
        },
    };
  };
  return sys.spawn(impl, std::move(config), std::shared_ptr<replica_store>(std::move(store)), std::move(*initial),
                   options);
}

}  // namespace moe::actors
