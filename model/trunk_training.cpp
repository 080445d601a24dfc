#include "model/trunk_training.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "base/assert.hpp"
#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace {

namespace kc = kernels::cpu;
using kernels::kernel_status;

caf::error bad_input(std::string text) { return make_error(model_errc::bad_input, "trunk training: " + std::move(text)); }

caf::error kernel_error(const char* what) {
  return make_error(model_errc::kernel_failed, std::string("trunk training: ") + what + " failed");
}

caf::expected<const float*> find_weight(const weight_lookup& weights, const std::string& name,
                                 std::initializer_list<int64_t> shape) {
  return weights(name, std::span<const int64_t>(shape.begin(), shape.size()));
}

}  // namespace

caf::expected<trunk_training> trunk_training::bind(const model_config& c, const weight_lookup& weights) {
  trunk_training t;
  t.config_ = c;
  auto embed = find_weight(weights, "model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  if (!embed) return embed.error();
  auto norm = find_weight(weights, "model.norm.weight", {c.hidden_size});
  if (!norm) return norm.error();
  t.embed_ = *embed;
  t.norm_ = *norm;
  if (c.tie_word_embeddings) {
    t.head_ = t.embed_;
  } else {
    auto head = find_weight(weights, "lm_head.weight", {c.vocab_size, c.hidden_size});
    if (!head) return head.error();
    t.head_ = *head;
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto attention = attention_training_block::bind(c, l, weights);
    if (!attention) return attention.error();
    std::optional<mlp_training_block> dense;
    mlp_half_grads dense_grad;
    if (!c.is_moe_layer(l)) {
      auto mlp = mlp_training_block::bind(c, l, weights);
      if (!mlp) return mlp.error();
      dense = std::move(*mlp);
      dense_grad = mlp_half_grads::zeros(c, l);
    }
    t.layers_.push_back(layer{std::move(*attention), std::move(dense), attention_grads::for_config(c),
                              std::move(dense_grad)});
  }
  const auto V = static_cast<size_t>(c.vocab_size), D = static_cast<size_t>(c.hidden_size);
  t.embed_grad_.assign(V * D, 0.0f);
  t.norm_grad_.assign(D, 0.0f);
  if (!c.tie_word_embeddings) t.head_grad_.assign(V * D, 0.0f);
  return t;
}

caf::error trunk_training::begin(std::span<const std::vector<int32_t>> sequences) {
  phase_ = phase::idle;
  const auto V = config_.vocab_size;
  const auto D = static_cast<size_t>(config_.hidden_size);
  if (sequences.empty()) return bad_input("an empty batch");
  ids_.clear();
  targets_.clear();
  cu_seqlens_.assign(1, 0);
  for (const auto& s : sequences) {
    if (s.empty()) return bad_input("an empty sequence");
    if (s.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) - ids_.size())
      return bad_input("more than 2^31 - 1 tokens in one batch");
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] < 0 || s[i] >= V)
        return bad_input("token id " + std::to_string(s[i]) + " is outside the vocabulary [0, " + std::to_string(V) +
                         ")");
      ids_.push_back(s[i]);
      targets_.push_back(i + 1 < s.size() ? s[i + 1] : -1);
    }
    cu_seqlens_.push_back(static_cast<int32_t>(ids_.size()));
  }
  if (std::all_of(targets_.begin(), targets_.end(), [](int32_t t) { return t < 0; }))
    return bad_input("no sequence has two tokens, so nothing is predicted");
  const size_t T = ids_.size();
  x_.resize(T * D);
  for (size_t t = 0; t < T; ++t)
    std::memcpy(x_.data() + t * D, embed_ + static_cast<size_t>(ids_[t]) * D, D * sizeof(float));
  mlp_in_.resize(T * D);
  phase_ = phase::forward;
  next_layer_ = 0;
  return {};
}

caf::error trunk_training::forward_dense_layer(int64_t layer) {
  if (auto err = check_next(phase::forward, layer, false, "forward_dense_layer")) return fail(std::move(err));
  auto& l = layers_[static_cast<size_t>(layer)];
  const size_t T = ids_.size(), n = x_.size();
  mlp_out_.resize(n);
  if (auto err = l.attention.forward(x_.data(), mlp_in_.data(), T, cu_seqlens_)) return fail(std::move(err));
  if (auto err = l.dense->forward(mlp_in_.data(), mlp_out_.data(), T, cu_seqlens_)) return fail(std::move(err));
  for (size_t i = 0; i < n; ++i) x_[i] += mlp_out_[i];
  ++next_layer_;
  return {};
}

caf::error trunk_training::forward_attention(int64_t layer) {
  if (auto err = check_next(phase::forward, layer, true, "forward_attention")) return fail(std::move(err));
  auto& l = layers_[static_cast<size_t>(layer)];
  if (auto err = l.attention.forward(x_.data(), mlp_in_.data(), ids_.size(), cu_seqlens_)) return fail(std::move(err));
  phase_ = phase::moe_output;
  return {};
}

caf::error trunk_training::add_moe_output(std::span<const float> y) {
  if (phase_ != phase::moe_output) return fail(out_of_order("add_moe_output"));
  if (y.size() != x_.size())
    return fail(bad_input("add_moe_output: " + std::to_string(y.size()) + " values for " +
                          std::to_string(x_.size()) + " (tokens x hidden)"));
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += y[i];
  ++next_layer_;
  phase_ = phase::forward;
  return {};
}

caf::expected<double> trunk_training::loss(double loss_scale) {
  if (phase_ != phase::forward || next_layer_ != static_cast<int64_t>(layers_.size()))
    return fail(out_of_order("loss"));
  if (!std::isfinite(loss_scale)) return fail(bad_input("loss: loss_scale is not finite"));
  const size_t T = ids_.size();
  const auto V = static_cast<size_t>(config_.vocab_size), D = static_cast<size_t>(config_.hidden_size);
  const float eps = static_cast<float>(config_.rms_norm_eps);
  normed_.resize(T * D);
  logits_.resize(T * V);
  dlogits_.resize(T * V);
  dnormed_.resize(T * D);
  dx_.resize(T * D);
  if (kc::rmsnorm(x_.data(), norm_, normed_.data(), T, D, eps) != kernel_status::ok)
    return fail(kernel_error("final norm"));
  if (kc::linear(normed_.data(), head_, logits_.data(), T, D, V) != kernel_status::ok)
    return fail(kernel_error("LM head"));
  double loss = 0;
  if (kc::cross_entropy(logits_.data(), targets_.data(), T, V, &loss, dlogits_.data()) != kernel_status::ok)
    return fail(kernel_error("cross-entropy"));
  if (loss_scale != 1.0)
    for (auto& g : dlogits_) g = static_cast<float>(g * loss_scale);
  if (kc::linear_backward(normed_.data(), head_, dlogits_.data(), dnormed_.data(), head_grad().data(), T, D, V) !=
      kernel_status::ok)
    return fail(kernel_error("LM head backward"));
  if (kc::rmsnorm_backward(x_.data(), norm_, dnormed_.data(), dx_.data(), norm_grad_.data(), T, D, eps) !=
      kernel_status::ok)
    return fail(kernel_error("final norm backward"));
  phase_ = phase::backward;
  next_layer_ = static_cast<int64_t>(layers_.size()) - 1;
  return loss;
}

caf::error trunk_training::backward_dense_layer(int64_t layer) {
  if (auto err = check_next(phase::backward, layer, false, "backward_dense_layer")) return fail(std::move(err));
  auto& l = layers_[static_cast<size_t>(layer)];
  dmlp_in_.resize(dx_.size());
  // x_out = x_mid + mlp(mlp_in): the residual passes dx on; the MLP half adds through mlp_in.
  if (auto err = l.dense->backward(dx_.data(), dmlp_in_.data(), l.dense_grad)) return fail(std::move(err));
  if (auto err = l.attention.backward(dx_.data(), dmlp_in_.data(), dx_.data(), l.attention_grad))
    return fail(std::move(err));
  --next_layer_;
  return {};
}

caf::error trunk_training::backward_attention(int64_t layer, std::span<const float> dmlp_in) {
  if (auto err = check_next(phase::backward, layer, true, "backward_attention")) return fail(std::move(err));
  if (dmlp_in.size() != dx_.size())
    return fail(bad_input("backward_attention: " + std::to_string(dmlp_in.size()) + " values for " +
                          std::to_string(dx_.size()) + " (tokens x hidden)"));
  const float* dx_end = dx_.data() + dx_.size();
  if (dmlp_in.data() < dx_end && dx_.data() < dmlp_in.data() + dmlp_in.size())
    return fail(bad_input("backward_attention: dmlp_in overlaps hidden_grad()"));
  auto& l = layers_[static_cast<size_t>(layer)];
  if (auto err = l.attention.backward(dx_.data(), dmlp_in.data(), dx_.data(), l.attention_grad))
    return fail(std::move(err));
  --next_layer_;
  return {};
}

caf::error trunk_training::end_backward() {
  if (phase_ != phase::backward || next_layer_ != -1) return fail(out_of_order("end_backward"));
  const auto V = static_cast<size_t>(config_.vocab_size), D = static_cast<size_t>(config_.hidden_size);
  if (kc::embedding_backward(ids_.data(), dx_.data(), embed_grad_.data(), ids_.size(), V, D) != kernel_status::ok)
    return fail(kernel_error("embedding backward"));
  phase_ = phase::idle;
  return {};
}

std::vector<float>& trunk_training::head_grad() noexcept {
  return config_.tie_word_embeddings ? embed_grad_ : head_grad_;
}

void trunk_training::zero_grads() {
  std::fill(embed_grad_.begin(), embed_grad_.end(), 0.0f);
  std::fill(norm_grad_.begin(), norm_grad_.end(), 0.0f);
  std::fill(head_grad_.begin(), head_grad_.end(), 0.0f);
  for (auto& l : layers_) {
    l.attention_grad.zero();
    l.dense_grad.zero();
  }
}

void trunk_training::for_each_grad(const std::function<void(const std::string&, std::vector<float>&)>& f) {
  f("model.embed_tokens.weight", embed_grad_);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    layers_[l].attention_grad.for_each(
        [&](std::string_view suffix, std::vector<float>& g) { f(prefix + std::string(suffix), g); });
    if (!layers_[l].dense) continue;
    auto& g = layers_[l].dense_grad.dense;
    f(prefix + "mlp.gate_proj.weight", g.gate_proj);
    f(prefix + "mlp.up_proj.weight", g.up_proj);
    f(prefix + "mlp.down_proj.weight", g.down_proj);
  }
  f("model.norm.weight", norm_grad_);
  if (!config_.tie_word_embeddings) f("lm_head.weight", head_grad_);
}

std::vector<parameter_ref> trunk_training::parameters(checkpoint& weights) {
  std::vector<parameter_ref> out;
  for_each_grad([&](const std::string& name, std::vector<float>& grad) {
    host_tensor* t = weights.find(name);
    MOE_ASSERT(t != nullptr && t->data().size() == grad.size());  // the checkpoint bind found it in
    out.push_back(parameter_ref{name, t->data(), grad});
  });
  return out;
}

caf::error trunk_training::out_of_order(const std::string& call) const {
  const auto L = static_cast<int64_t>(layers_.size());
  std::string due;
  switch (phase_) {
    case phase::idle:
      due = "no pass is in progress (begin() starts one, also after an error)";
      break;
    case phase::forward:
      due = next_layer_ < L ? "the forward of layer " + std::to_string(next_layer_) + " is due" : "loss() is due";
      break;
    case phase::moe_output:
      due = "add_moe_output() of layer " + std::to_string(next_layer_) + " is due";
      break;
    case phase::backward:
      due = next_layer_ >= 0 ? "the backward of layer " + std::to_string(next_layer_) + " is due"
                             : "end_backward() is due";
      break;
  }
  return bad_input(call + " out of order: " + due);
}

caf::error trunk_training::check_next(phase want, int64_t layer, bool moe, const char* call) const {
  const std::string what = std::string(call) + "(" + std::to_string(layer) + ")";
  const bool layer_due = want == phase::backward ? next_layer_ >= 0 : next_layer_ < static_cast<int64_t>(layers_.size());
  if (phase_ != want || !layer_due || layer != next_layer_) return out_of_order(what);
  if (config_.is_moe_layer(layer) != moe)
    return bad_input(what + ": layer " + std::to_string(layer) + (moe ? " is dense" : " is an MoE layer"));
  return {};
}

caf::error trunk_training::fail(caf::error err) {
  phase_ = phase::idle;
  return err;
}

}  // namespace moe::model
