#include "model/training_model.hpp"

#include <algorithm>
#include <cstring>

#include "base/assert.hpp"
#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/model_errc.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

namespace {

namespace kc = kernels::cpu;
using kernels::kernel_status;

caf::error kernel_error(const char* what) {
  return make_error(model_errc::kernel_failed, std::string("training: ") + what + " failed");
}

caf::expected<const float*> find_weight(const checkpoint& w, const std::string& name, std::vector<int64_t> shape) {
  return lookup_in(w)(name, shape);
}

}  // namespace

caf::expected<training_model> training_model::bind(std::shared_ptr<checkpoint> weights, training_options options) {
  if (!weights) return make_error(model_errc::bad_input, "training: no weights");
  const auto& c = weights->config;
  if (options.mtp_depth < 0 || options.mtp_depth > c.num_nextn_predict_layers)
    return make_error(model_errc::bad_input, "training: " + std::to_string(options.mtp_depth) +
                                                 " MTP modules asked for, the model config has " +
                                                 std::to_string(c.num_nextn_predict_layers));
  training_model m;
  m.options_ = options;
  const auto lookup = lookup_in(*weights);
  auto embed = find_weight(*weights, "model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  if (!embed) return embed.error();
  auto norm = find_weight(*weights, "model.norm.weight", {c.hidden_size});
  if (!norm) return norm.error();
  m.embed_ = *embed;
  m.norm_ = *norm;
  if (c.tie_word_embeddings) {
    m.head_ = m.embed_;
  } else {
    auto head = find_weight(*weights, "lm_head.weight", {c.vocab_size, c.hidden_size});
    if (!head) return head.error();
    m.head_ = *head;
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto attention = attention_training_block::bind(c, l, lookup);
    if (!attention) return attention.error();
    auto mlp = mlp_training_block::bind(c, l, lookup);
    if (!mlp) return mlp.error();
    m.layers_.push_back(layer{std::move(*attention), std::move(*mlp), attention_grads::for_config(c),
                              mlp_half_grads::zeros(c, l)});
  }
  for (int64_t d = 1; d <= options.mtp_depth; ++d) {
    auto module = mtp_training_module::bind(c, d, lookup);
    if (!module) return module.error();
    m.mtp_.push_back(mtp_depth{std::move(*module), mtp_grads::zeros(c, d), {}, {}, {}, {}, {}});
  }
  const auto V = static_cast<size_t>(c.vocab_size), D = static_cast<size_t>(c.hidden_size);
  m.embed_grad_.assign(V * D, 0.0f);
  m.norm_grad_.assign(D, 0.0f);
  if (!c.tie_word_embeddings) m.head_grad_.assign(V * D, 0.0f);
  m.weights_ = std::move(weights);
  return m;
}

void training_model::zero_grads() {
  std::fill(embed_grad_.begin(), embed_grad_.end(), 0.0f);
  std::fill(norm_grad_.begin(), norm_grad_.end(), 0.0f);
  std::fill(head_grad_.begin(), head_grad_.end(), 0.0f);
  for (auto& l : layers_) {
    l.attention_grad.zero();
    l.mlp_grad.zero();
  }
  for (auto& d : mtp_) d.grads.zero();
}

int64_t training_model::predicted_positions(std::span<const std::vector<int32_t>> sequences) noexcept {
  int64_t n = 0;
  for (const auto& s : sequences) n += s.empty() ? 0 : static_cast<int64_t>(s.size()) - 1;
  return n;
}

caf::expected<double> training_model::forward_backward(std::span<const std::vector<int32_t>> sequences,
                                                      double balance_alpha, double loss_scale) {
  const auto& c = weights_->config;
  const auto V = static_cast<size_t>(c.vocab_size), D = static_cast<size_t>(c.hidden_size);
  if (sequences.empty()) return make_error(model_errc::bad_input, "training: an empty batch");
  ids_.clear();
  targets_.clear();
  cu_seqlens_.assign(1, 0);
  for (const auto& s : sequences) {
    if (s.empty()) return make_error(model_errc::bad_input, "training: an empty sequence");
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] < 0 || s[i] >= c.vocab_size)
        return make_error(model_errc::bad_input, "training: token id " + std::to_string(s[i]) +
                                                     " is outside the vocabulary [0, " + std::to_string(V) + ")");
      ids_.push_back(s[i]);
      targets_.push_back(i + 1 < s.size() ? s[i + 1] : -1);
    }
    cu_seqlens_.push_back(static_cast<int32_t>(ids_.size()));
  }
  if (std::all_of(targets_.begin(), targets_.end(), [](int32_t t) { return t < 0; }))
    return make_error(model_errc::bad_input, "training: no sequence has two tokens, so nothing is predicted");
  const size_t T = ids_.size();

  // Forward. x_ keeps the residual stream after the last layer (the final norm's input).
  x_.resize(T * D);
  for (size_t t = 0; t < T; ++t)
    std::memcpy(x_.data() + t * D, embed_ + static_cast<size_t>(ids_[t]) * D, D * sizeof(float));
  mlp_in_.resize(T * D);
  mlp_out_.resize(T * D);
  balance_loss_ = 0;
  for (auto& l : layers_) {
    if (auto err = l.attention.forward(x_.data(), mlp_in_.data(), T, cu_seqlens_)) return err;
    if (auto err = l.mlp.forward(mlp_in_.data(), mlp_out_.data(), T, cu_seqlens_, balance_alpha)) return err;
    balance_loss_ += l.mlp.balance_loss();
    for (size_t i = 0; i < T * D; ++i) x_[i] += mlp_out_[i];
  }
  normed_.resize(T * D);
  logits_.resize(T * V);
  const float eps = static_cast<float>(c.rms_norm_eps);
  if (kc::rmsnorm(x_.data(), norm_, normed_.data(), T, D, eps) != kernel_status::ok) return kernel_error("final norm");
  if (kc::linear(normed_.data(), head_, logits_.data(), T, D, V) != kernel_status::ok) return kernel_error("LM head");
  double loss = 0;
  std::vector<float> dlogits(T * V);
  if (kc::cross_entropy(logits_.data(), targets_.data(), T, V, &loss, dlogits.data()) != kernel_status::ok)
    return kernel_error("cross-entropy");
  if (loss_scale != 1.0)
    for (auto& g : dlogits) g = static_cast<float>(g * loss_scale);

  // Multi-token prediction: depth k from depth k-1's hidden state (depth 1: the main model's,
  // before its final norm) and the embedding of token i + k, predicting token i + k + 1.
  mtp_loss_ = 0;
  const double mtp_scale = mtp_.empty() ? 0.0 : options_.mtp_weight / static_cast<double>(mtp_.size());
  std::vector<float> next_emb, mtp_logits;  // only with MTP: (T, vocab) is large
  if (!mtp_.empty()) {
    next_emb.resize(T * D);
    mtp_logits.resize(T * V);
  }
  for (size_t k = 0; k < mtp_.size(); ++k) {
    auto& d = mtp_[k];
    auto rows = make_mtp_token_rows(ids_, cu_seqlens_, static_cast<int64_t>(k + 1));
    if (!rows) return rows.error();
    d.next_tokens = std::move(rows->next_tokens);
    d.targets = std::move(rows->targets);
    for (size_t t = 0; t < T; ++t) {
      const int32_t id = d.next_tokens[t];
      if (id >= 0) std::memcpy(next_emb.data() + t * D, embed_ + static_cast<size_t>(id) * D, D * sizeof(float));
      else std::fill_n(next_emb.data() + t * D, D, 0.0f);
    }
    d.h.resize(T * D);
    d.normed.resize(T * D);
    const float* h_prev = k == 0 ? x_.data() : mtp_[k - 1].h.data();
    if (auto err = d.module.forward(h_prev, next_emb.data(), d.h.data(), d.normed.data(), T, cu_seqlens_, balance_alpha))
      return err;
    balance_loss_ += d.module.balance_loss();
    if (kc::linear(d.normed.data(), head_, mtp_logits.data(), T, D, V) != kernel_status::ok) return kernel_error("MTP head");
    double depth_loss = 0;
    d.dlogits.resize(T * V);
    if (kc::cross_entropy(mtp_logits.data(), d.targets.data(), T, V, &depth_loss, d.dlogits.data()) != kernel_status::ok)
      return kernel_error("MTP cross-entropy");
    for (auto& g : d.dlogits) g = static_cast<float>(g * mtp_scale * loss_scale);
    mtp_loss_ += mtp_scale * depth_loss;
  }

  // Backward, in reverse.
  std::vector<float> dnormed(T * D), dx(T * D), dmlp_in(T * D);
  float* head_grad = c.tie_word_embeddings ? embed_grad_.data() : head_grad_.data();
  if (kc::linear_backward(normed_.data(), head_, dlogits.data(), dnormed.data(), head_grad, T, D, V) !=
      kernel_status::ok)
    return kernel_error("LM head backward");
  if (kc::rmsnorm_backward(x_.data(), norm_, dnormed.data(), dx.data(), norm_grad_.data(), T, D, eps) !=
      kernel_status::ok)
    return kernel_error("final norm backward");
  // MTP depths in reverse: each hands dL/dh to the depth before it; depth 1 to the main model.
  std::vector<float> dh_next, dh_prev(T * D), dnext_emb(T * D), dmtp_normed(T * D);
  for (size_t k = mtp_.size(); k-- > 0;) {
    auto& d = mtp_[k];
    if (kc::linear_backward(d.normed.data(), head_, d.dlogits.data(), dmtp_normed.data(), head_grad, T, D, V) !=
        kernel_status::ok)
      return kernel_error("MTP head backward");
    if (auto err = d.module.backward(dmtp_normed.data(), dh_next.empty() ? nullptr : dh_next.data(), dh_prev.data(),
                                     dnext_emb.data(), d.grads))
      return err;
    for (size_t t = 0; t < T; ++t) {
      const int32_t id = d.next_tokens[t];
      if (id < 0) continue;  // outside the depth: its gradient is zero
      float* row = embed_grad_.data() + static_cast<size_t>(id) * D;
      for (size_t i = 0; i < D; ++i) row[i] += dnext_emb[t * D + i];
    }
    dh_next = dh_prev;
  }
  if (!mtp_.empty())
    for (size_t i = 0; i < T * D; ++i) dx[i] += dh_next[i];
  for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) {
    // x_out = x_mid + mlp(mlp_in): the residual passes dx on; the MLP half adds through mlp_in.
    if (auto err = it->mlp.backward(dx.data(), dmlp_in.data(), it->mlp_grad)) return err;
    if (auto err = it->attention.backward(dx.data(), dmlp_in.data(), dx.data(), it->attention_grad)) return err;
  }
  if (kc::embedding_backward(ids_.data(), dx.data(), embed_grad_.data(), T, V, D) != kernel_status::ok)
    return kernel_error("embedding backward");
  return loss;
}

double training_model::clip_gradients(double max_norm) {
  std::vector<std::span<float>> grads = {embed_grad_, norm_grad_, head_grad_};
  for (auto& d : mtp_) d.grads.for_each([&](std::string_view, std::vector<float>& g) { grads.emplace_back(g); });
  for (auto& l : layers_) {
    l.attention_grad.for_each([&](std::string_view, std::vector<float>& g) { grads.emplace_back(g); });
    auto& m = l.mlp_grad;
    for (auto* g : {&m.dense, &m.shared}) {
      grads.emplace_back(g->gate_proj);
      grads.emplace_back(g->up_proj);
      grads.emplace_back(g->down_proj);
    }
    grads.emplace_back(m.gate);
    for (auto& e : m.experts) {
      grads.emplace_back(e.gate_proj);
      grads.emplace_back(e.up_proj);
      grads.emplace_back(e.down_proj);
    }
  }
  return clip_grad_norm(grads, max_norm);
}

std::vector<std::vector<int64_t>> training_model::expert_loads() const {
  const auto E = static_cast<size_t>(weights_->config.n_routed_experts);
  std::vector<std::vector<int64_t>> out;
  for (const auto& l : layers_) {
    if (!l.mlp.is_moe()) continue;
    std::vector<int64_t> load(E, 0);
    for (int32_t e : l.mlp.routing())
      if (e >= 0 && static_cast<size_t>(e) < E) ++load[static_cast<size_t>(e)];
    out.push_back(std::move(load));
  }
  return out;
}

void training_model::update_routing_bias(double speed) {
  if (speed == 0) return;
  for (const auto& l : layers_) {
    if (!l.mlp.is_moe() || l.mlp.routing().empty()) continue;
    host_tensor* bias =
        weights_->find("model.layers." + std::to_string(l.mlp.layer()) + ".mlp.gate.e_score_correction_bias");
    MOE_ASSERT(bias != nullptr);  // bind found it
    auto b = bias->data();
    std::vector<int64_t> load(b.size(), 0);
    for (int32_t e : l.mlp.routing())
      if (e >= 0 && static_cast<size_t>(e) < load.size()) ++load[static_cast<size_t>(e)];
    const double mean = static_cast<double>(l.mlp.routing().size()) / static_cast<double>(load.size());
    for (size_t i = 0; i < b.size(); ++i) {
      const double gap = mean - static_cast<double>(load[i]);
      const double sign = gap > 0 ? 1.0 : (gap < 0 ? -1.0 : 0.0);
      b[i] = static_cast<float>(b[i] + speed * sign);
    }
  }
}

std::vector<parameter_ref> training_model::parameters() {
  const auto& c = weights_->config;
  std::vector<parameter_ref> out;
  auto add = [&](const std::string& name, std::vector<float>& grad) {
    host_tensor* t = weights_->find(name);
    MOE_ASSERT(t != nullptr && t->data().size() == grad.size());
    out.push_back(parameter_ref{name, t->data(), grad});
  };
  add("model.embed_tokens.weight", embed_grad_);
  auto add_mlp = [&](const std::string& prefix, mlp_grads& g) {
    add(prefix + "gate_proj.weight", g.gate_proj);
    add(prefix + "up_proj.weight", g.up_proj);
    add(prefix + "down_proj.weight", g.down_proj);
  };
  for (size_t l = 0; l < layers_.size(); ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    layers_[l].attention_grad.for_each([&](std::string_view suffix, std::vector<float>& g) {
      add(prefix + std::string(suffix), g);
    });
    auto& m = layers_[l].mlp_grad;
    if (!layers_[l].mlp.is_moe()) {
      add_mlp(prefix + "mlp.", m.dense);
      continue;
    }
    add(prefix + "mlp.gate.weight", m.gate);
    for (size_t e = 0; e < m.experts.size(); ++e) add_mlp(prefix + "mlp.experts." + std::to_string(e) + ".", m.experts[e]);
    if (c.n_shared_experts > 0) add_mlp(prefix + "mlp.shared_experts.", m.shared);
  }
  for (auto& d : mtp_) {
    const std::string prefix = "model.layers." + std::to_string(mtp_layer(c, d.module.depth())) + ".";
    d.grads.for_each([&](std::string_view suffix, std::vector<float>& g) { add(prefix + std::string(suffix), g); });
  }
  add("model.norm.weight", norm_grad_);
  if (!c.tie_word_embeddings) add("lm_head.weight", head_grad_);
  return out;
}

}  // namespace moe::model
