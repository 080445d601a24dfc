#include "model/moe_training.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>

#include "base/assert.hpp"
#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "model/model_errc.hpp"
#include "model/scratch.hpp"

namespace moe::model {

namespace kc = kernels::cpu;
using kernels::kernel_status;

namespace {

using detail::ensure_size;

void ensure_size(mlp_saved& s, size_t n) {
  ensure_size(s.gate, n);
  ensure_size(s.up, n);
  ensure_size(s.act, n);
}

caf::error bad_input(std::string what) {
  return make_error(model_errc::bad_input, std::move(what));
}

// mlp_forward over saved state at raw offsets: expert_training_set runs each expert on its slice
// of the grouped rows, whose saved state lies in one (R, inter) buffer.
bool forward_rows(const mlp_weight_refs& m, const float* x, size_t rows, float* y, float* gate,
                  float* up, float* act) {
  const size_t D = m.hidden, I = m.intermediate;
  // The kernels mlp_block::forward calls, so a training forward equals the inference one.
  return kc::linear(x, m.gate_proj, gate, rows, D, I) == kernel_status::ok &&
         kc::linear(x, m.up_proj, up, rows, D, I) == kernel_status::ok &&
         kc::swiglu(gate, up, act, rows, I) == kernel_status::ok &&
         kc::linear(act, m.down_proj, y, rows, I, D) == kernel_status::ok;
}

// mlp_backward over saved state at raw offsets. d: scratch of at least rows * inter per vector.
bool backward_rows(const mlp_weight_refs& m, const float* x, size_t rows, const float* gate,
                   const float* up, const float* act, const float* dy, float* dx,
                   bool accumulate_dx, mlp_grads& g, mlp_saved& d) {
  const size_t D = m.hidden, I = m.intermediate;
  return kc::linear_backward(act, m.down_proj, dy, d.act.data(), g.down_proj.data(), rows, I, D) ==
             kernel_status::ok &&
         kc::swiglu_backward(gate, up, d.act.data(), d.gate.data(), d.up.data(), rows, I) ==
             kernel_status::ok &&
         kc::linear_backward(x, m.gate_proj, d.gate.data(), dx, g.gate_proj.data(), rows, D, I,
                             accumulate_dx) == kernel_status::ok &&
         kc::linear_backward(x, m.up_proj, d.up.data(), dx, g.up_proj.data(), rows, D, I,
                             /*accumulate=*/true) == kernel_status::ok;
}

// Calls f(expert, begin, end) for each run [begin, end) of `order` whose rows name one expert;
// stops at the first f returning false and returns false then.
template <class F>
bool for_each_run(std::span<const int32_t> expert_of_row, std::span<const int32_t> order, F&& f) {
  for (size_t begin = 0; begin < order.size();) {
    const int32_t e = expert_of_row[static_cast<size_t>(order[begin])];
    size_t end = begin;
    while (end < order.size() && expert_of_row[static_cast<size_t>(order[end])] == e) ++end;
    if (!f(e, begin, end)) return false;
    begin = end;
  }
  return true;
}

// The unbiased gate score sigmoid(x . w) in double, as the gate's backward differentiates it.
double gate_score(const float* x, const float* w, size_t hidden) {
  double logit = 0.0;
  for (size_t d = 0; d < hidden; ++d) logit += static_cast<double>(x[d]) * w[d];
  return 1.0 / (1.0 + std::exp(-logit));
}

// A token's Z = sum_j s_j and sum_j c_j s_j over the E experts: the balance loss's normaliser
// and numerator, recomputed by the backward rather than kept per token.
std::pair<double, double> sum_and_dot(const double* scores, const double* coef, size_t E) {
  double sum = 0.0, dot = 0.0;
  for (size_t e = 0; e < E; ++e) {
    sum += scores[e];
    dot += coef[e] * scores[e];
  }
  return {sum, dot};
}

}  // namespace

// --- one SwiGLU MLP ---------------------------------------------------------------------------

mlp_grads mlp_grads::zeros(int64_t hidden, int64_t intermediate) {
  const size_t n = static_cast<size_t>(hidden * intermediate);
  return mlp_grads{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
}

void mlp_grads::zero() {
  std::ranges::fill(gate_proj, 0.0f);
  std::ranges::fill(up_proj, 0.0f);
  std::ranges::fill(down_proj, 0.0f);
}

bool mlp_grads::fits(int64_t hidden, int64_t intermediate) const noexcept {
  const size_t n = static_cast<size_t>(hidden * intermediate);
  return gate_proj.size() == n && up_proj.size() == n && down_proj.size() == n;
}

caf::expected<mlp_weight_refs> bind_mlp_weights(const std::string& prefix, int64_t hidden,
                                                int64_t intermediate,
                                                const weight_lookup& weights) {
  // The same tensors mlp_block::bind borrows; the training path needs the pointers themselves.
  const int64_t in_shape[] = {intermediate, hidden};
  const int64_t out_shape[] = {hidden, intermediate};
  auto g = weights(prefix + "gate_proj.weight", in_shape);
  if (!g) return g.error();
  auto u = weights(prefix + "up_proj.weight", in_shape);
  if (!u) return u.error();
  auto d = weights(prefix + "down_proj.weight", out_shape);
  if (!d) return d.error();
  return mlp_weight_refs{*g, *u, *d, hidden, intermediate};
}

bool mlp_forward(const mlp_weight_refs& m, const float* x, size_t rows, float* y,
                 mlp_saved& saved) {
  const size_t n = rows * static_cast<size_t>(m.intermediate);
  saved.gate.resize(n);
  saved.up.resize(n);
  saved.act.resize(n);
  return forward_rows(m, x, rows, y, saved.gate.data(), saved.up.data(), saved.act.data());
}

bool mlp_backward(const mlp_weight_refs& m, const float* x, size_t rows, const mlp_saved& saved,
                  const float* dy, float* dx, bool accumulate_dx, mlp_grads& grads,
                  mlp_saved& scratch) {
  const size_t n = rows * static_cast<size_t>(m.intermediate);
  // Callers check their inputs; a mismatch here would let the kernels run off the buffers.
  MOE_ASSERT(grads.fits(m.hidden, m.intermediate));
  MOE_ASSERT(saved.gate.size() >= n && saved.up.size() >= n && saved.act.size() >= n);
  ensure_size(scratch, n);
  return backward_rows(m, x, rows, saved.gate.data(), saved.up.data(), saved.act.data(), dy, dx,
                       accumulate_dx, grads, scratch);
}

// --- gate_training ----------------------------------------------------------------------------

caf::error check_balance_args(std::span<const int32_t> cu_seqlens, size_t num_tokens,
                              double balance_alpha) {
  if (!cu_seqlens.empty()) {
    bool ok = cu_seqlens.size() >= 2 && cu_seqlens.front() == 0 &&
              cu_seqlens.back() == static_cast<int64_t>(num_tokens);
    for (size_t s = 1; ok && s < cu_seqlens.size(); ++s) ok = cu_seqlens[s] >= cu_seqlens[s - 1];
    if (!ok)
      return bad_input("mlp training forward: cu_seqlens must rise from 0 to the token count");
  }
  if (!std::isfinite(balance_alpha) || balance_alpha < 0.0)
    return bad_input("mlp training forward: balance_alpha must be finite and >= 0");
  return {};
}

caf::expected<gate_training> gate_training::bind(const model_config& c, int64_t layer,
                                                 const weight_lookup& weights) {
  auto router = router_block::bind(c, layer, weights);
  if (!router) return router.error();
  // router_block keeps its gate weight private; the backward needs it too.
  const int64_t gate_shape[] = {c.n_routed_experts, c.hidden_size};
  auto w = weights("model.layers." + std::to_string(layer) + ".mlp.gate.weight", gate_shape);
  if (!w) return w.error();
  gate_training g(std::move(*router));
  g.layer_ = layer;
  g.hidden_ = c.hidden_size;
  g.gate_weight_ = *w;
  g.norm_topk_prob_ = c.norm_topk_prob;
  g.routed_scaling_factor_ = static_cast<float>(c.routed_scaling_factor);
  g.expert_load_.assign(static_cast<size_t>(c.n_routed_experts), 0);
  return g;
}

caf::error gate_training::forward(const float* x, size_t T, std::span<const int32_t> cu_seqlens,
                                  double balance_alpha) {
  have_forward_ = false;
  balance_alpha_ = 0.0;
  balance_loss_ = 0.0;
  if (T > 0 && x == nullptr) return bad_input("gate training forward: null input");
  if (auto err = check_balance_args(cu_seqlens, T, balance_alpha)) return err;
  num_tokens_ = T;
  balance_alpha_ = balance_alpha;
  if (cu_seqlens.empty()) {
    cu_seqlens_.assign({0, static_cast<int32_t>(T)});
  } else {
    cu_seqlens_.assign(cu_seqlens.begin(), cu_seqlens.end());
  }
  const size_t k = top_k();
  x_.assign(x, x + T * static_cast<size_t>(hidden_));
  topk_idx_.resize(T * k);
  topk_weight_.resize(T * k);
  std::ranges::fill(expert_load_, 0);
  if (T > 0) {
    if (auto err = router_.route(x_.data(), T, topk_idx_.data(), topk_weight_.data())) return err;
    for (int32_t e : topk_idx_) ++expert_load_[static_cast<size_t>(e)];
    gate_scores(T);
    if (balance_alpha_ > 0.0) balance_forward();
  }
  have_forward_ = true;
  return {};
}

void gate_training::gate_scores(size_t T) {
  const size_t D = hidden_, k = top_k(), E = num_experts();
  const float* x = x_.data();
  topk_score_.resize(T * k);
  if (balance_alpha_ > 0.0) {
    // The balance loss needs every expert's score: the gate GEMM again, in double (the router
    // does not expose its float logits); the chosen scores are the same numbers.
    scores_.resize(T * E);
    for (size_t t = 0; t < T; ++t) {
      for (size_t e = 0; e < E; ++e)
        scores_[t * E + e] = gate_score(x + t * D, gate_weight_ + e * D, D);
    }
    for (size_t i = 0; i < T * k; ++i)
      topk_score_[i] = static_cast<float>(scores_[(i / k) * E + static_cast<size_t>(topk_idx_[i])]);
    return;
  }
  // The chosen experts only: T * k dot products instead of the full gate GEMM.
  for (size_t i = 0; i < T * k; ++i) {
    const float* w = gate_weight_ + static_cast<size_t>(topk_idx_[i]) * D;
    topk_score_[i] = static_cast<float>(gate_score(x + (i / k) * D, w, D));
  }
}

// L = alpha / S * sum_s sum_i f_i^s P_i^s = sum_s sum_{t in s} sum_i c_i^s s'_{i,t} with
// c_i^s = alpha / S * f_i^s / T_s, which is also dL/ds'_{i,t} (f being constant); keeps c.
void gate_training::balance_forward() {
  const size_t k = top_k(), E = num_experts(), num_seqs = cu_seqlens_.size() - 1;
  size_t num_counted = 0;
  for (size_t s = 0; s < num_seqs; ++s) num_counted += cu_seqlens_[s + 1] > cu_seqlens_[s];
  balance_coef_.assign(num_seqs * E, 0.0);
  double loss = 0.0;
  for (size_t s = 0; s < num_seqs; ++s) {
    const size_t begin = cu_seqlens_[s], end = cu_seqlens_[s + 1], Ts = end - begin;
    if (Ts == 0) continue;
    double* c = balance_coef_.data() + s * E;
    for (size_t i = begin * k; i < end * k; ++i) c[static_cast<size_t>(topk_idx_[i])] += 1.0;
    // f_i = E / (k * Ts) * count_i, then * alpha / S / Ts.
    const double scale = balance_alpha_ / static_cast<double>(num_counted) *
                         static_cast<double>(E) / (static_cast<double>(k) * Ts * Ts);
    for (size_t e = 0; e < E; ++e) c[e] *= scale;
    for (size_t t = begin; t < end; ++t) {
      const auto [sum, dot] = sum_and_dot(scores_.data() + t * E, c, E);
      loss += dot / sum;
    }
  }
  balance_loss_ = loss;
}

// With s'_i = s_i / Z, Z = sum_j s_j: dL/ds_j = (c_j - sum_i c_i s'_i) / Z, then through the
// sigmoid: dL/dlogit_j = dL/ds_j * s_j (1 - s_j). Adds to d_logits_ (T, E), every expert.
void gate_training::balance_backward() {
  const size_t E = num_experts(), num_seqs = cu_seqlens_.size() - 1;
  for (size_t s = 0; s < num_seqs; ++s) {
    const double* c = balance_coef_.data() + s * E;
    const size_t begin = cu_seqlens_[s], end = cu_seqlens_[s + 1];
    for (size_t t = begin; t < end; ++t) {
      const double* st = scores_.data() + t * E;
      const auto [sum, dot] = sum_and_dot(st, c, E);
      const double mean_c = dot / sum;
      float* dl = d_logits_.data() + t * E;
      for (size_t e = 0; e < E; ++e)
        dl[e] = static_cast<float>(dl[e] + (c[e] - mean_c) / sum * st[e] * (1.0 - st[e]));
    }
  }
}

caf::error gate_training::backward(const float* d_weight, float* dx, std::span<float> gate_grad) {
  const std::string where = "gate training layer " + std::to_string(layer_);
  if (!have_forward_) return bad_input(where + ": backward without forward");
  const size_t T = num_tokens_, D = hidden_, k = top_k(), E = num_experts();
  if (gate_grad.size() != E * D)
    return bad_input(where + ": the gate gradient is not shaped (n_routed_experts, hidden)");
  if (T == 0) return {};
  if (d_weight == nullptr || dx == nullptr) return bad_input(where + ": null d_weight or dx");

  // Through w = rsf * s / (sum s + 1e-20) (or rsf * s) and s = sigmoid(logit), to the chosen
  // logits; the others (and the choice itself) get nothing.
  ensure_size(d_logits_, T * E);
  std::fill_n(d_logits_.data(), T * E, 0.0f);
  const double rsf = routed_scaling_factor_;
  for (size_t t = 0; t < T; ++t) {
    const float* s = topk_score_.data() + t * k;
    const float* g = d_weight + t * k;
    double sum = 1e-20, gs = 0.0;
    for (size_t j = 0; j < k; ++j) {
      sum += s[j];
      gs += static_cast<double>(g[j]) * s[j];
    }
    for (size_t j = 0; j < k; ++j) {
      const double ds = norm_topk_prob_ ? rsf / sum * (g[j] - gs / sum) : rsf * g[j];
      const double sj = s[j];
      d_logits_[t * E + static_cast<size_t>(topk_idx_[t * k + j])] =
          static_cast<float>(ds * sj * (1.0 - sj));
    }
  }
  if (balance_alpha_ > 0.0) balance_backward();
  if (kc::linear_backward(x_.data(), gate_weight_, d_logits_.data(), dx, gate_grad.data(), T, D, E,
                          /*accumulate=*/true) != kernel_status::ok)
    return make_error(model_errc::kernel_failed, where + ": gate backward failed");
  return {};
}

// --- expert_training_set ----------------------------------------------------------------------

caf::expected<expert_training_set> expert_training_set::bind(const model_config& c, int64_t layer,
                                                             std::span<const int64_t> experts,
                                                             const weight_lookup& weights) {
  expert_training_set s;
  s.layer_ = layer;
  s.hidden_ = c.hidden_size;
  s.intermediate_ = c.moe_intermediate_size;
  const std::string prefix = "model.layers." + std::to_string(layer) + ".mlp.experts.";
  for (int64_t e : experts) {
    const std::string which = "expert " + std::to_string(e) + " of layer " + std::to_string(layer);
    if (e < 0 || e >= c.n_routed_experts) return bad_input(which + " does not exist");
    if (s.holds(e)) return bad_input(which + " is named twice");
    auto m = bind_mlp_weights(prefix + std::to_string(e) + ".", c.hidden_size,
                              c.moe_intermediate_size, weights);
    if (!m) return m.error();
    s.experts_.emplace(e, *m);
  }
  return s;
}

caf::expected<expert_training_set> expert_training_set::bind_shared(const model_config& c,
                                                                    int64_t layer,
                                                                    const weight_lookup& weights) {
  if (c.n_shared_experts <= 0)
    return bad_input("layer " + std::to_string(layer) + " has no shared experts");
  expert_training_set s;
  s.layer_ = layer;
  s.hidden_ = c.hidden_size;
  s.intermediate_ = c.shared_intermediate_size();
  auto m = bind_mlp_weights("model.layers." + std::to_string(layer) + ".mlp.shared_experts.",
                            c.hidden_size, s.intermediate_, weights);
  if (!m) return m.error();
  s.experts_.emplace(shared_experts_id, *m);
  return s;
}

caf::error expert_training_set::forward(const float* x, std::span<const int32_t> expert_of_row,
                                        float* out, expert_pass& pass) {
  pass.expert_of_row.clear();
  pass.order.clear();
  pass.in.clear();
  pass.saved = {};
  const std::string where = "expert training, layer " + std::to_string(layer_);
  const size_t R = expert_of_row.size(), D = hidden_, I = intermediate_;
  if (R > 0 && (x == nullptr || out == nullptr)) return bad_input(where + ": null input or output");
  for (int32_t e : expert_of_row) {
    if (!holds(e)) return bad_input(where + ": expert " + std::to_string(e) + " is not held here");
  }
  // Grouped as expert_set::run groups them: stable, so each expert sees its rows in row order.
  pass.order.resize(R);
  std::iota(pass.order.begin(), pass.order.end(), 0);
  std::stable_sort(pass.order.begin(), pass.order.end(), [&](int32_t a, int32_t b) {
    return expert_of_row[static_cast<size_t>(a)] < expert_of_row[static_cast<size_t>(b)];
  });
  pass.in.resize(R * D);
  for (size_t i = 0; i < R; ++i)
    std::copy_n(x + static_cast<size_t>(pass.order[i]) * D, D, pass.in.data() + i * D);
  pass.saved.gate.resize(R * I);
  pass.saved.up.resize(R * I);
  pass.saved.act.resize(R * I);
  ensure_size(out_, R * D);
  const bool ok = for_each_run(expert_of_row, pass.order, [&](int32_t e, size_t begin, size_t end) {
    return forward_rows(experts_.at(e), pass.in.data() + begin * D, end - begin,
                        out_.data() + begin * D, pass.saved.gate.data() + begin * I,
                        pass.saved.up.data() + begin * I, pass.saved.act.data() + begin * I);
  });
  if (!ok) {
    pass.order.clear();
    pass.in.clear();
    pass.saved = {};
    return make_error(model_errc::kernel_failed, where + ": expert forward failed");
  }
  for (size_t i = 0; i < R; ++i)
    std::copy_n(out_.data() + i * D, D, out + static_cast<size_t>(pass.order[i]) * D);
  pass.expert_of_row.assign(expert_of_row.begin(), expert_of_row.end());
  return {};
}

caf::error expert_training_set::backward(const expert_pass& pass, const float* d_out, float* d_in,
                                         const std::function<mlp_grads*(int64_t expert)>& grad_of) {
  const std::string where = "expert training, layer " + std::to_string(layer_);
  const size_t R = pass.num_rows(), D = hidden_, I = intermediate_;
  bool fits = pass.order.size() == R && pass.in.size() == R * D &&
              pass.saved.gate.size() == R * I && pass.saved.up.size() == R * I &&
              pass.saved.act.size() == R * I;
  for (size_t i = 0; fits && i < R; ++i)
    fits = pass.order[i] >= 0 && static_cast<size_t>(pass.order[i]) < R;
  if (!fits) return bad_input(where + ": the pass was not filled by this set");
  if (R == 0) return {};
  if (d_out == nullptr || d_in == nullptr) return bad_input(where + ": null d_out or d_in");
  if (!grad_of) return bad_input(where + ": no gradient lookup");

  // Every gradient is checked before any is touched, so a refusal leaves them all as they were.
  group_grads_.clear();
  caf::error refused;
  for_each_run(pass.expert_of_row, pass.order, [&](int32_t e, size_t, size_t) {
    mlp_grads* g = holds(e) ? grad_of(e) : nullptr;
    if (!holds(e)) {
      refused =
          bad_input(where + ": the pass names expert " + std::to_string(e) + ", not held here");
    } else if (g == nullptr || !g->fits(hidden_, intermediate_)) {
      refused =
          bad_input(where + ": expert " + std::to_string(e) + "'s gradient is null or misshapen");
    }
    group_grads_.push_back(g);
    return !refused;
  });
  if (refused) return refused;

  ensure_size(d_out_, R * D);
  ensure_size(d_in_, R * D);
  ensure_size(d_mlp_, R * I);
  for (size_t i = 0; i < R; ++i)
    std::copy_n(d_out + static_cast<size_t>(pass.order[i]) * D, D, d_out_.data() + i * D);
  size_t run = 0;
  const bool ok =
      for_each_run(pass.expert_of_row, pass.order, [&](int32_t e, size_t begin, size_t end) {
        return backward_rows(experts_.at(e), pass.in.data() + begin * D, end - begin,
                             pass.saved.gate.data() + begin * I, pass.saved.up.data() + begin * I,
                             pass.saved.act.data() + begin * I, d_out_.data() + begin * D,
                             d_in_.data() + begin * D, /*accumulate_dx=*/false,
                             *group_grads_[run++], d_mlp_);
      });
  if (!ok) return make_error(model_errc::kernel_failed, where + ": expert backward failed");
  for (size_t i = 0; i < R; ++i)
    std::copy_n(d_in_.data() + i * D, D, d_in + static_cast<size_t>(pass.order[i]) * D);
  return {};
}

}  // namespace moe::model
