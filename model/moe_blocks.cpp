#include "model/moe_blocks.hpp"

#include <algorithm>
#include <numeric>

#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/gather.hpp"
#include "kernels/cpu/gemm.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace kc = kernels::cpu;
using kernels::kernel_status;

caf::expected<router_block> router_block::bind(const model_config& c, int64_t layer,
                                               const weight_lookup& weights) {
  router_block r;
  r.layer_ = layer;
  r.hidden_ = c.hidden_size;
  r.params_.num_experts = static_cast<size_t>(c.n_routed_experts);
  r.params_.num_groups = static_cast<size_t>(c.n_group);
  r.params_.topk_group = static_cast<size_t>(c.topk_group);
  r.params_.top_k = static_cast<size_t>(c.num_experts_per_tok);
  r.params_.norm_topk_prob = c.norm_topk_prob;
  r.params_.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.gate.";
  const int64_t w_shape[] = {c.n_routed_experts, c.hidden_size};
  const int64_t b_shape[] = {c.n_routed_experts};
  auto w = weights(p + "weight", w_shape);
  if (!w) return w.error();
  auto b = weights(p + "e_score_correction_bias", b_shape);
  if (!b) return b.error();
  r.gate_ = *w;
  r.bias_ = *b;
  return r;
}

caf::error router_block::route(const float* x, size_t T, int32_t* topk_idx, float* topk_weight) {
  if (T == 0) return {};
  const size_t E = params_.num_experts;
  if (logits_.size() < T * E) logits_.resize(T * E);
  if (kc::linear(x, gate_, logits_.data(), T, hidden_, E) != kernel_status::ok ||
      kc::moe_gate(params_, logits_.data(), bias_, T, topk_idx, topk_weight) != kernel_status::ok) {
    return make_error(model_errc::kernel_failed,
                      "router layer " + std::to_string(layer_) + ": gate kernel failed");
  }
  return {};
}

expert_rows make_expert_rows(std::span<const int32_t> topk_idx, std::span<const float> topk_weight,
                             size_t top_k) {
  expert_rows rows;
  const size_t n = topk_idx.size();
  rows.token_of_row.resize(n);
  rows.expert_of_row.assign(topk_idx.begin(), topk_idx.end());
  rows.weight_of_row.assign(topk_weight.begin(), topk_weight.end());
  for (size_t r = 0; r < n; ++r) rows.token_of_row[r] = static_cast<int32_t>(r / top_k);
  return rows;
}

caf::expected<expert_set> expert_set::bind(const model_config& c, int64_t layer,
                                           std::span<const int64_t> experts,
                                           const weight_lookup& weights) {
  expert_set s;
  s.layer_ = layer;
  s.hidden_ = c.hidden_size;
  for (int64_t e : experts) {
    if (e < 0 || e >= c.n_routed_experts) {
      return make_error(model_errc::bad_input, "expert " + std::to_string(e) + " of layer " +
                                                   std::to_string(layer) + " does not exist");
    }
    auto m = mlp_block::bind("model.layers." + std::to_string(layer) + ".mlp.experts." +
                                 std::to_string(e) + ".",
                             c.hidden_size, c.moe_intermediate_size, weights);
    if (!m) return m.error();
    s.experts_.emplace(e, *m);
  }
  return s;
}

caf::error expert_set::run(const float* x, size_t n, const int32_t* expert_of_row,
                           const float* weight_of_row, float* out) {
  if (n == 0) return {};
  const size_t D = hidden_;
  for (size_t r = 0; r < n; ++r) {
    if (!holds(expert_of_row[r])) {
      return make_error(model_errc::bad_input, "layer " + std::to_string(layer_) + ": expert " +
                                                   std::to_string(expert_of_row[r]) +
                                                   " is not held here");
    }
  }
  // Group rows by expert (stable, so each expert sees its rows in arrival order).
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  std::stable_sort(order_.begin(), order_.end(),
                   [&](int32_t a, int32_t b) { return expert_of_row[a] < expert_of_row[b]; });
  if (in_.size() < n * D) in_.resize(n * D);
  if (out_.size() < n * D) out_.resize(n * D);
  if (kc::gather_rows(x, n, D, order_.data(), n, in_.data()) != kernel_status::ok) {
    return make_error(model_errc::kernel_failed, "expert dispatch: gather failed");
  }
  size_t begin = 0;
  while (begin < n) {
    const int32_t e = expert_of_row[order_[begin]];
    size_t end = begin;
    while (end < n && expert_of_row[order_[end]] == e) ++end;
    if (auto err = experts_.at(e).forward(in_.data() + begin * D, end - begin,
                                          out_.data() + begin * D, 0.0f, scratch_))
      return err;
    begin = end;
  }
  // Back to row order, scaled by each row's routing weight.
  for (size_t i = 0; i < n; ++i) {
    const size_t r = static_cast<size_t>(order_[i]);
    const float w = weight_of_row[r];
    const float* src = out_.data() + i * D;
    float* dst = out + r * D;
    for (size_t d = 0; d < D; ++d) dst[d] = w * src[d];
  }
  return {};
}

caf::error combine_expert_rows(const float* rows_out, const expert_rows& rows, float* y,
                               size_t num_tokens, size_t hidden) {
  if (kc::scatter_add_rows(rows_out, hidden, rows.token_of_row.data(), nullptr, rows.size(), y,
                           num_tokens) != kernel_status::ok) {
    return make_error(model_errc::kernel_failed, "expert combine: a token index is out of range");
  }
  return {};
}

caf::error moe_layer_output(const float* routed_rows_out, const expert_rows& rows,
                            const float* shared_out, float* y, size_t num_tokens, size_t hidden) {
  std::fill_n(y, num_tokens * hidden, 0.0f);
  if (auto err = combine_expert_rows(routed_rows_out, rows, y, num_tokens, hidden)) return err;
  if (shared_out && kc::add(y, shared_out, y, num_tokens * hidden) != kernel_status::ok)
    return make_error(model_errc::kernel_failed, "moe output: add failed");
  return {};
}

}  // namespace moe::model
