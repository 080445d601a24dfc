#include "model/mlp_training.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace kc = kernels::cpu;
using kernels::kernel_status;

namespace {

caf::expected<mlp_weight_refs> bind_mlp(const std::string& prefix, int64_t hidden,
                                        int64_t intermediate, const weight_lookup& weights) {
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

void ensure(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

void ensure(mlp_saved& s, size_t n) {
  ensure(s.gate, n);
  ensure(s.up, n);
  ensure(s.act, n);
}

caf::error kernel_error(int64_t layer, const char* what) {
  return make_error(model_errc::kernel_failed,
                    "mlp training, layer " + std::to_string(layer) + ": " + what);
}

// y (rows, hidden) = down(silu(gate(x)) * up(x)), the kernels mlp_block::forward calls, keeping
// gate(x), up(x) and the SwiGLU output in gate/up/act (rows, inter) for the backward.
bool mlp_forward(const mlp_weight_refs& m, const float* x, size_t rows, float* y, float* gate,
                 float* up, float* act) {
  const size_t D = m.hidden, I = m.intermediate;
  return kc::linear(x, m.gate_proj, gate, rows, D, I) == kernel_status::ok &&
         kc::linear(x, m.up_proj, up, rows, D, I) == kernel_status::ok &&
         kc::swiglu(gate, up, act, rows, I) == kernel_status::ok &&
         kc::linear(act, m.down_proj, y, rows, I, D) == kernel_status::ok;
}

// The transpose of mlp_forward: dx (rows, hidden) written (+= with accumulate_dx), weight
// gradients +=. d: scratch of at least rows * inter per vector.
bool mlp_backward(const mlp_weight_refs& m, const float* x, size_t rows, const float* gate,
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

// The unbiased gate score sigmoid(x . w) in double, as the gate's backward differentiates it.
double gate_score(const float* x, const float* w, size_t hidden) {
  double logit = 0.0;
  for (size_t d = 0; d < hidden; ++d) logit += static_cast<double>(x[d]) * w[d];
  return 1.0 / (1.0 + std::exp(-logit));
}

bool fits(const mlp_grads& g, const mlp_weight_refs& m) {
  const size_t n = static_cast<size_t>(m.hidden * m.intermediate);
  return g.gate_proj.size() == n && g.up_proj.size() == n && g.down_proj.size() == n;
}

}  // namespace

mlp_grads mlp_grads::zeros(int64_t hidden, int64_t intermediate) {
  const size_t n = static_cast<size_t>(hidden * intermediate);
  return mlp_grads{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
}

void mlp_grads::zero() {
  std::ranges::fill(gate_proj, 0.0f);
  std::ranges::fill(up_proj, 0.0f);
  std::ranges::fill(down_proj, 0.0f);
}

mlp_half_grads mlp_half_grads::zeros(const model_config& c, int64_t layer) {
  mlp_half_grads g;
  if (!c.is_moe_layer(layer)) {
    g.dense = mlp_grads::zeros(c.hidden_size, c.intermediate_size);
    return g;
  }
  g.gate.assign(static_cast<size_t>(c.n_routed_experts * c.hidden_size), 0.0f);
  g.experts.assign(static_cast<size_t>(c.n_routed_experts),
                   mlp_grads::zeros(c.hidden_size, c.moe_intermediate_size));
  if (c.n_shared_experts > 0) g.shared = mlp_grads::zeros(c.hidden_size, c.shared_intermediate_size());
  return g;
}

void mlp_half_grads::zero() {
  dense.zero();
  std::ranges::fill(gate, 0.0f);
  for (auto& e : experts) e.zero();
  shared.zero();
}

caf::expected<mlp_training_block> mlp_training_block::bind(const model_config& c, int64_t layer,
                                                           const weight_lookup& weights) {
  mlp_training_block b;
  b.layer_ = layer;
  b.hidden_ = c.hidden_size;
  const std::string prefix = "model.layers." + std::to_string(layer) + ".mlp.";
  if (!c.is_moe_layer(layer)) {
    auto m = bind_mlp(prefix, c.hidden_size, c.intermediate_size, weights);
    if (!m) return m.error();
    b.dense_ = *m;
    return b;
  }
  auto router = router_block::bind(c, layer, weights);
  if (!router) return router.error();
  b.router_ = std::move(*router);
  // router_block keeps its gate weight private; the backward needs it too.
  const int64_t gate_shape[] = {c.n_routed_experts, c.hidden_size};
  auto gate = weights(prefix + "gate.weight", gate_shape);
  if (!gate) return gate.error();
  b.gate_weight_ = *gate;
  b.expert_load_.assign(static_cast<size_t>(c.n_routed_experts), 0);
  b.norm_topk_prob_ = c.norm_topk_prob;
  b.routed_scaling_factor_ = static_cast<float>(c.routed_scaling_factor);
  b.experts_.reserve(static_cast<size_t>(c.n_routed_experts));
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    auto m = bind_mlp(prefix + "experts." + std::to_string(e) + ".", c.hidden_size,
                      c.moe_intermediate_size, weights);
    if (!m) return m.error();
    b.experts_.push_back(*m);
  }
  if (c.n_shared_experts > 0) {
    auto m = bind_mlp(prefix + "shared_experts.", c.hidden_size, c.shared_intermediate_size(),
                      weights);
    if (!m) return m.error();
    b.shared_ = *m;
  }
  return b;
}

caf::error mlp_training_block::forward(const float* x, float* y, size_t T,
                                       std::span<const int32_t> cu_seqlens, double balance_alpha) {
  have_forward_ = false;
  balance_loss_ = 0.0;
  balance_alpha_ = 0.0;
  if (T > 0 && (x == nullptr || y == nullptr)) {
    return make_error(model_errc::bad_input, "mlp training forward: null input or output");
  }
  if (!cu_seqlens.empty()) {
    bool ok = cu_seqlens.size() >= 2 && cu_seqlens.front() == 0 &&
              cu_seqlens.back() == static_cast<int64_t>(T);
    for (size_t s = 1; ok && s < cu_seqlens.size(); ++s) ok = cu_seqlens[s] >= cu_seqlens[s - 1];
    if (!ok) {
      return make_error(model_errc::bad_input,
                        "mlp training forward: cu_seqlens must rise from 0 to the token count");
    }
  }
  if (!std::isfinite(balance_alpha) || balance_alpha < 0.0) {
    return make_error(model_errc::bad_input,
                      "mlp training forward: balance_alpha must be finite and >= 0");
  }
  num_tokens_ = T;
  const size_t D = hidden_;
  x_.assign(x, x + T * D);
  topk_idx_.clear();
  topk_weight_.clear();
  std::ranges::fill(expert_load_, 0);
  if (router_) {
    balance_alpha_ = balance_alpha;
    if (cu_seqlens.empty()) {
      cu_seqlens_.assign({0, static_cast<int32_t>(T)});
    } else {
      cu_seqlens_.assign(cu_seqlens.begin(), cu_seqlens.end());
    }
  }
  if (T > 0) {
    if (router_) {
      if (auto err = forward_moe(x_.data(), y, T)) return err;
    } else {
      const size_t n = T * dense_.intermediate;
      ensure(dense_saved_, n);
      if (!mlp_forward(dense_, x_.data(), T, y, dense_saved_.gate.data(), dense_saved_.up.data(),
                       dense_saved_.act.data()))
        return kernel_error(layer_, "dense mlp forward failed");
    }
  }
  have_forward_ = true;
  return {};
}

caf::error mlp_training_block::forward_moe(const float* x, float* y, size_t T) {
  const size_t D = hidden_, k = router_->top_k();
  topk_idx_.resize(T * k);
  topk_weight_.resize(T * k);
  if (auto err = router_->route(x, T, topk_idx_.data(), topk_weight_.data())) return err;
  for (int32_t e : topk_idx_) ++expert_load_[static_cast<size_t>(e)];
  gate_scores(x, T);
  if (balance_alpha_ > 0.0) balance_forward();

  // Routed experts, grouped as expert_set::run groups them (stable by expert id).
  rows_ = make_expert_rows(topk_idx_, topk_weight_, k);
  const size_t R = rows_.size();
  order_.resize(R);
  std::iota(order_.begin(), order_.end(), 0);
  std::stable_sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
    return rows_.expert_of_row[a] < rows_.expert_of_row[b];
  });
  ensure(rows_in_, R * D);
  ensure(rows_out_, R * D);
  for (size_t i = 0; i < R; ++i) {
    const float* src = x + static_cast<size_t>(rows_.token_of_row[order_[i]]) * D;
    std::copy_n(src, D, rows_in_.data() + i * D);
  }
  const size_t I = experts_.empty() ? 0 : static_cast<size_t>(experts_.front().intermediate);
  ensure(rows_saved_, R * I);
  for (size_t begin = 0; begin < R;) {
    const int32_t e = rows_.expert_of_row[order_[begin]];
    size_t end = begin;
    while (end < R && rows_.expert_of_row[order_[end]] == e) ++end;
    if (!mlp_forward(experts_[e], rows_in_.data() + begin * D, end - begin,
                     rows_out_.data() + begin * D, rows_saved_.gate.data() + begin * I,
                     rows_saved_.up.data() + begin * I, rows_saved_.act.data() + begin * I))
      return kernel_error(layer_, "routed expert forward failed");
    begin = end;
  }
  // Weighted, back in row order (as expert_set::run returns them).
  ensure(rows_buf_, R * D);
  for (size_t i = 0; i < R; ++i) {
    const size_t r = static_cast<size_t>(order_[i]);
    const float w = rows_.weight_of_row[r];
    const float* src = rows_out_.data() + i * D;
    float* dst = rows_buf_.data() + r * D;
    for (size_t d = 0; d < D; ++d) dst[d] = w * src[d];
  }

  const float* shared_out = nullptr;
  if (shared_) {
    const size_t n = T * static_cast<size_t>(shared_->intermediate);
    ensure(shared_saved_, n);
    ensure(shared_buf_, T * D);
    if (!mlp_forward(*shared_, x, T, shared_buf_.data(), shared_saved_.gate.data(),
                     shared_saved_.up.data(), shared_saved_.act.data()))
      return kernel_error(layer_, "shared experts forward failed");
    shared_out = shared_buf_.data();
  }
  return moe_layer_output(rows_buf_.data(), rows_, shared_out, y, T, D);
}

void mlp_training_block::gate_scores(const float* x, size_t T) {
  const size_t D = hidden_, k = router_->top_k(), E = experts_.size();
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
void mlp_training_block::balance_forward() {
  const size_t k = router_->top_k(), E = experts_.size(), num_seqs = cu_seqlens_.size() - 1;
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
      const double* st = scores_.data() + t * E;
      double sum = 0.0, dot = 0.0;
      for (size_t e = 0; e < E; ++e) {
        sum += st[e];
        dot += c[e] * st[e];
      }
      loss += dot / sum;
    }
  }
  balance_loss_ = loss;
}

// With s'_i = s_i / Z, Z = sum_j s_j: dL/ds_j = (c_j - sum_i c_i s'_i) / Z, then through the
// sigmoid: dL/dlogit_j = dL/ds_j * s_j (1 - s_j). Adds to d_logits_ (T, E), every expert.
void mlp_training_block::balance_backward() {
  const size_t E = experts_.size(), num_seqs = cu_seqlens_.size() - 1;
  for (size_t s = 0; s < num_seqs; ++s) {
    const double* c = balance_coef_.data() + s * E;
    const size_t begin = cu_seqlens_[s], end = cu_seqlens_[s + 1];
    for (size_t t = begin; t < end; ++t) {
      const double* st = scores_.data() + t * E;
      double sum = 0.0, dot = 0.0;
      for (size_t e = 0; e < E; ++e) {
        sum += st[e];
        dot += c[e] * st[e];
      }
      const double mean_c = dot / sum;
      float* dl = d_logits_.data() + t * E;
      for (size_t e = 0; e < E; ++e)
        dl[e] = static_cast<float>(dl[e] + (c[e] - mean_c) / sum * st[e] * (1.0 - st[e]));
    }
  }
}

bool mlp_training_block::grads_fit(const mlp_half_grads& g) const noexcept {
  if (!router_) return fits(g.dense, dense_);
  if (g.gate.size() != experts_.size() * static_cast<size_t>(hidden_)) return false;
  if (g.experts.size() != experts_.size()) return false;
  for (size_t e = 0; e < experts_.size(); ++e)
    if (!fits(g.experts[e], experts_[e])) return false;
  return !shared_ || fits(g.shared, *shared_);
}

caf::error mlp_training_block::backward(const float* dy, float* dx, mlp_half_grads& grads) {
  if (!have_forward_) {
    return make_error(model_errc::bad_input,
                      "mlp training layer " + std::to_string(layer_) + ": backward without forward");
  }
  if (!grads_fit(grads)) {
    return make_error(model_errc::bad_input, "mlp training layer " + std::to_string(layer_) +
                                                 ": gradients are not shaped for this layer");
  }
  const size_t T = num_tokens_;
  if (T == 0) return {};
  if (dy == nullptr || dx == nullptr) {
    return make_error(model_errc::bad_input, "mlp training backward: null dy or dx");
  }
  if (router_) return backward_moe(dy, dx, grads);
  ensure(d_mlp_, T * dense_.intermediate);
  if (!mlp_backward(dense_, x_.data(), T, dense_saved_.gate.data(), dense_saved_.up.data(),
                    dense_saved_.act.data(), dy, dx, /*accumulate_dx=*/false, grads.dense, d_mlp_))
    return kernel_error(layer_, "dense mlp backward failed");
  return {};
}

caf::error mlp_training_block::backward_moe(const float* dy, float* dx, mlp_half_grads& grads) {
  const size_t T = num_tokens_, D = hidden_, k = router_->top_k(), E = experts_.size();
  const size_t R = rows_.size();

  // Shared experts: d(out) = dy on every token.
  if (shared_) {
    ensure(d_mlp_, T * static_cast<size_t>(shared_->intermediate));
    if (!mlp_backward(*shared_, x_.data(), T, shared_saved_.gate.data(), shared_saved_.up.data(),
                      shared_saved_.act.data(), dy, dx, /*accumulate_dx=*/false, grads.shared,
                      d_mlp_))
      return kernel_error(layer_, "shared experts backward failed");
  } else {
    std::fill_n(dx, T * D, 0.0f);
  }

  // Routed rows (in expert order): d(out_r) = w_r * dy_t, and dL/dw_r = dy_t . expert(x_t).
  ensure(rows_buf_, R * D);  // d(out) of each row, in `order_`
  ensure(d_weight_, R);      // by row (t * k + j)
  for (size_t i = 0; i < R; ++i) {
    const size_t r = static_cast<size_t>(order_[i]);
    const float* dyt = dy + static_cast<size_t>(rows_.token_of_row[r]) * D;
    const float* out = rows_out_.data() + i * D;
    const float w = rows_.weight_of_row[r];
    float* d_out = rows_buf_.data() + i * D;
    double g = 0.0;
    for (size_t d = 0; d < D; ++d) {
      d_out[d] = w * dyt[d];
      g += static_cast<double>(dyt[d]) * out[d];
    }
    d_weight_[r] = static_cast<float>(g);
  }
  const size_t I = experts_.empty() ? 0 : static_cast<size_t>(experts_.front().intermediate);
  ensure(d_rows_in_, R * D);
  ensure(d_mlp_, R * I);
  for (size_t begin = 0; begin < R;) {
    const int32_t e = rows_.expert_of_row[order_[begin]];
    size_t end = begin;
    while (end < R && rows_.expert_of_row[order_[end]] == e) ++end;
    if (!mlp_backward(experts_[e], rows_in_.data() + begin * D, end - begin,
                      rows_saved_.gate.data() + begin * I, rows_saved_.up.data() + begin * I,
                      rows_saved_.act.data() + begin * I, rows_buf_.data() + begin * D,
                      d_rows_in_.data() + begin * D, /*accumulate_dx=*/false, grads.experts[e],
                      d_mlp_))
      return kernel_error(layer_, "routed expert backward failed");
    begin = end;
  }
  for (size_t i = 0; i < R; ++i) {
    float* dst = dx + static_cast<size_t>(rows_.token_of_row[order_[i]]) * D;
    const float* src = d_rows_in_.data() + i * D;
    for (size_t d = 0; d < D; ++d) dst[d] += src[d];
  }

  // Gate: through w = rsf * s / (sum s + 1e-20) (or rsf * s) and s = sigmoid(logit), to the
  // chosen logits; the others (and the choice itself) get nothing.
  ensure(d_logits_, T * E);
  std::fill_n(d_logits_.data(), T * E, 0.0f);
  const double rsf = routed_scaling_factor_;
  for (size_t t = 0; t < T; ++t) {
    const float* s = topk_score_.data() + t * k;
    const float* g = d_weight_.data() + t * k;
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
  if (kc::linear_backward(x_.data(), gate_weight_, d_logits_.data(), dx, grads.gate.data(), T, D,
                          E, /*accumulate=*/true) != kernel_status::ok)
    return kernel_error(layer_, "gate backward failed");
  return {};
}

}  // namespace moe::model
