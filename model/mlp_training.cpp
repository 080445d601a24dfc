#include "model/mlp_training.hpp"

#include <algorithm>
#include <numeric>
#include <string>

#include "model/model_errc.hpp"
#include "model/scratch.hpp"

namespace moe::model {

namespace {

using detail::ensure_size;

caf::error kernel_error(int64_t layer, const char* what) {
  return make_error(model_errc::kernel_failed,
                    "mlp training, layer " + std::to_string(layer) + ": " + what);
}

}  // namespace

mlp_half_grads mlp_half_grads::zeros(const model_config& c, int64_t layer) {
  mlp_half_grads g;
  if (!c.is_moe_layer(layer)) {
    g.dense = mlp_grads::zeros(c.hidden_size, c.intermediate_size);
    return g;
  }
  g.gate.assign(static_cast<size_t>(c.n_routed_experts * c.hidden_size), 0.0f);
  g.experts.assign(static_cast<size_t>(c.n_routed_experts),
                   mlp_grads::zeros(c.hidden_size, c.moe_intermediate_size));
  if (c.n_shared_experts > 0)
    g.shared = mlp_grads::zeros(c.hidden_size, c.shared_intermediate_size());
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
  if (!c.is_moe_layer(layer)) {
    auto m = bind_mlp_weights("model.layers." + std::to_string(layer) + ".mlp.", c.hidden_size,
                              c.intermediate_size, weights);
    if (!m) return m.error();
    b.dense_ = *m;
    return b;
  }
  auto gate = gate_training::bind(c, layer, weights);
  if (!gate) return gate.error();
  b.gate_ = std::move(*gate);
  std::vector<int64_t> all(static_cast<size_t>(c.n_routed_experts));
  std::iota(all.begin(), all.end(), 0);
  auto routed = expert_training_set::bind(c, layer, all, weights);
  if (!routed) return routed.error();
  b.routed_ = std::move(*routed);
  if (c.n_shared_experts > 0) {
    auto shared = expert_training_set::bind_shared(c, layer, weights);
    if (!shared) return shared.error();
    b.shared_ = std::move(*shared);
  }
  return b;
}

caf::error mlp_training_block::forward(const float* x, float* y, size_t T,
                                       std::span<const int32_t> cu_seqlens, double balance_alpha) {
  have_forward_ = false;
  if (T > 0 && (x == nullptr || y == nullptr)) {
    return make_error(model_errc::bad_input, "mlp training forward: null input or output");
  }
  num_tokens_ = T;
  if (gate_) {
    if (auto err = forward_moe(x, y, T, cu_seqlens, balance_alpha)) return err;
  } else {
    if (auto err = check_balance_args(cu_seqlens, T, balance_alpha)) return err;
    x_.assign(x, x + T * static_cast<size_t>(hidden_));
    if (T > 0 && !mlp_forward(dense_, x_.data(), T, y, dense_saved_))
      return kernel_error(layer_, "dense mlp forward failed");
  }
  have_forward_ = true;
  return {};
}

caf::error mlp_training_block::forward_moe(const float* x, float* y, size_t T,
                                           std::span<const int32_t> cu_seqlens,
                                           double balance_alpha) {
  if (auto err = gate_->forward(x, T, cu_seqlens, balance_alpha)) return err;
  if (T == 0) return {};
  const size_t D = hidden_;
  rows_ = make_expert_rows(gate_->routing(), gate_->routing_weights(), gate_->top_k());
  const size_t R = rows_.size();
  ensure_size(rows_buf_, R * D);
  for (size_t r = 0; r < R; ++r)
    std::copy_n(x + static_cast<size_t>(rows_.token_of_row[r]) * D, D, rows_buf_.data() + r * D);
  rows_out_.resize(R * D);
  if (auto err =
          routed_->forward(rows_buf_.data(), rows_.expert_of_row, rows_out_.data(), routed_pass_))
    return err;
  // Weighted (the pass keeps its own copy of the inputs, so rows_buf_ is free again).
  for (size_t r = 0; r < R; ++r) {
    const float w = rows_.weight_of_row[r];
    const float* src = rows_out_.data() + r * D;
    float* dst = rows_buf_.data() + r * D;
    for (size_t d = 0; d < D; ++d) dst[d] = w * src[d];
  }

  const float* shared_out = nullptr;
  if (shared_) {
    shared_rows_.assign(T, static_cast<int32_t>(shared_experts_id));
    ensure_size(shared_buf_, T * D);
    if (auto err = shared_->forward(x, shared_rows_, shared_buf_.data(), shared_pass_)) return err;
    shared_out = shared_buf_.data();
  }
  return moe_layer_output(rows_buf_.data(), rows_, shared_out, y, T, D);
}

bool mlp_training_block::grads_fit(const mlp_half_grads& g) const noexcept {
  if (!gate_) return g.dense.fits(hidden_, dense_.intermediate);
  const size_t E = gate_->num_experts();
  if (g.gate.size() != E * static_cast<size_t>(hidden_) || g.experts.size() != E) return false;
  for (const auto& e : g.experts)
    if (!e.fits(hidden_, routed_->intermediate())) return false;
  return !shared_ || g.shared.fits(hidden_, shared_->intermediate());
}

caf::error mlp_training_block::backward(const float* dy, float* dx, mlp_half_grads& grads) {
  if (!have_forward_) {
    return make_error(model_errc::bad_input, "mlp training layer " + std::to_string(layer_) +
                                                 ": backward without forward");
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
  if (gate_) return backward_moe(dy, dx, grads);
  if (!mlp_backward(dense_, x_.data(), T, dense_saved_, dy, dx, /*accumulate_dx=*/false,
                    grads.dense, d_mlp_))
    return kernel_error(layer_, "dense mlp backward failed");
  return {};
}

caf::error mlp_training_block::backward_moe(const float* dy, float* dx, mlp_half_grads& grads) {
  const size_t T = num_tokens_, D = hidden_, R = rows_.size();

  // Shared experts: d(out) = dy on every token; they write dx, the rest adds to it.
  if (shared_) {
    if (auto err = shared_->backward(shared_pass_, dy, dx, [&](int64_t) { return &grads.shared; }))
      return err;
  } else {
    std::fill_n(dx, T * D, 0.0f);
  }

  // Routed rows: d(out_r) = w_r * dy_t, and dL/dw_r = dy_t . out_r (out_r unweighted).
  ensure_size(rows_buf_, R * D);  // d(out) of each row
  d_weight_.resize(R);       // by row (t * k + j): the gate's (T, top_k) order
  for (size_t r = 0; r < R; ++r) {
    const float* dyt = dy + static_cast<size_t>(rows_.token_of_row[r]) * D;
    const float* out = rows_out_.data() + r * D;
    const float w = rows_.weight_of_row[r];
    float* d_out = rows_buf_.data() + r * D;
    double g = 0.0;
    for (size_t d = 0; d < D; ++d) {
      d_out[d] = w * dyt[d];
      g += static_cast<double>(dyt[d]) * out[d];
    }
    d_weight_[r] = static_cast<float>(g);
  }
  ensure_size(d_rows_in_, R * D);
  if (auto err =
          routed_->backward(routed_pass_, rows_buf_.data(), d_rows_in_.data(),
                            [&](int64_t e) { return &grads.experts[static_cast<size_t>(e)]; }))
    return err;
  for (size_t r = 0; r < R; ++r) {
    float* dst = dx + static_cast<size_t>(rows_.token_of_row[r]) * D;
    const float* src = d_rows_in_.data() + r * D;
    for (size_t d = 0; d < D; ++d) dst[d] += src[d];
  }

  // Gate (and the balance loss, when the forward had one): += into dx.
  return gate_->backward(d_weight_.data(), dx, grads.gate);
}

}  // namespace moe::model
