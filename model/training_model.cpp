#include "model/training_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "base/assert.hpp"
#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "model/model_errc.hpp"
#include "model/routing_bias.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

namespace {

namespace kc = kernels::cpu;
using kernels::kernel_status;

caf::error kernel_error(const char* what) {
  return make_error(model_errc::kernel_failed, std::string("training: ") + what + " failed");
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
  auto trunk = trunk_training::bind(c, lookup);
  if (!trunk) return trunk.error();
  m.trunk_ = std::move(*trunk);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;  // the trunk holds the dense MLPs
    auto mlp = mlp_training_block::bind(c, l, lookup);
    if (!mlp) return mlp.error();
    m.moe_layers_.push_back(moe_layer{std::move(*mlp), mlp_half_grads::zeros(c, l)});
  }
  for (int64_t d = 1; d <= options.mtp_depth; ++d) {
    auto module = mtp_training_module::bind(c, d, lookup);
    if (!module) return module.error();
    m.mtp_.push_back(mtp_depth{std::move(*module), mtp_grads::zeros(c, d), {}, {}, {}, {}, {}});
  }
  m.weights_ = std::move(weights);
  return m;
}

void training_model::zero_grads() {
  trunk_.zero_grads();
  for (auto& l : moe_layers_) l.grads.zero();
  for (auto& d : mtp_) d.grads.zero();
}

int64_t training_model::predicted_positions(std::span<const std::vector<int32_t>> sequences) noexcept {
  int64_t n = 0;
  for (const auto& s : sequences) n += s.empty() ? 0 : static_cast<int64_t>(s.size()) - 1;
  return n;
}

caf::expected<double> training_model::forward_backward(std::span<const std::vector<int32_t>> sequences,
                                                      double balance_alpha, double loss_scale) {
  // The MoE blocks refuse a bad alpha too, but a model without MoE layers would not see it.
  if (!std::isfinite(balance_alpha) || balance_alpha < 0)
    return make_error(model_errc::bad_input, "training: balance_alpha must be finite and >= 0");
  balance_loss_ = 0;
  mtp_loss_ = 0;
  if (auto err = trunk_.begin(sequences)) return err;
  if (auto err = forward_layers(balance_alpha)) return err;
  auto loss = trunk_.loss(loss_scale);
  if (!loss) return loss.error();
  if (auto err = forward_mtp(balance_alpha, loss_scale)) return err;
  if (auto err = backward_mtp()) return err;
  if (auto err = backward_layers()) return err;
  if (auto err = trunk_.end_backward()) return err;
  return *loss;
}

caf::error training_model::forward_layers(double balance_alpha) {
  const auto& c = weights_->config;
  const size_t T = trunk_.num_tokens();
  moe_out_.resize(T * static_cast<size_t>(c.hidden_size));
  auto moe = moe_layers_.begin();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) {
      if (auto err = trunk_.forward_dense_layer(l)) return err;
      continue;
    }
    if (auto err = trunk_.forward_attention(l)) return err;
    if (auto err = moe->mlp.forward(trunk_.mlp_input().data(), moe_out_.data(), T, trunk_.cu_seqlens(), balance_alpha))
      return err;
    balance_loss_ += moe->mlp.balance_loss();
    if (auto err = trunk_.add_moe_output(moe_out_)) return err;
    ++moe;
  }
  return {};
}

caf::error training_model::backward_layers() {
  const auto& c = weights_->config;
  dmoe_in_.resize(trunk_.hidden_grad().size());
  auto moe = moe_layers_.rbegin();
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    if (!c.is_moe_layer(l)) {
      if (auto err = trunk_.backward_dense_layer(l)) return err;
      continue;
    }
    // The residual passes hidden_grad() on as the layer's dL/dy; the MoE adds through its input.
    if (auto err = moe->mlp.backward(trunk_.hidden_grad().data(), dmoe_in_.data(), moe->grads)) return err;
    if (auto err = trunk_.backward_attention(l, dmoe_in_)) return err;
    ++moe;
  }
  return {};
}

// Multi-token prediction: depth k from depth k-1's hidden state (depth 1: the trunk's, before its
// final norm) and the embedding of token i + k, predicting token i + k + 1, through the trunk's
// head.
caf::error training_model::forward_mtp(double balance_alpha, double loss_scale) {
  if (mtp_.empty()) return {};
  const auto& c = weights_->config;
  const size_t T = trunk_.num_tokens();
  const auto V = static_cast<size_t>(c.vocab_size), D = static_cast<size_t>(c.hidden_size);
  const float* embed = trunk_.embedding();
  const double mtp_scale = options_.mtp_weight / static_cast<double>(mtp_.size());
  next_emb_.resize(T * D);
  mtp_logits_.resize(T * V);
  for (size_t k = 0; k < mtp_.size(); ++k) {
    auto& d = mtp_[k];
    auto rows = make_mtp_token_rows(trunk_.tokens(), trunk_.cu_seqlens(), static_cast<int64_t>(k + 1));
    if (!rows) return rows.error();
    d.next_tokens = std::move(rows->next_tokens);
    d.targets = std::move(rows->targets);
    for (size_t t = 0; t < T; ++t) {
      const int32_t id = d.next_tokens[t];
      if (id >= 0) std::memcpy(next_emb_.data() + t * D, embed + static_cast<size_t>(id) * D, D * sizeof(float));
      else std::fill_n(next_emb_.data() + t * D, D, 0.0f);
    }
    d.h.resize(T * D);
    d.normed.resize(T * D);
    const float* h_prev = k == 0 ? trunk_.hidden().data() : mtp_[k - 1].h.data();
    if (auto err = d.module.forward(h_prev, next_emb_.data(), d.h.data(), d.normed.data(), T, trunk_.cu_seqlens(),
                                    balance_alpha))
      return err;
    balance_loss_ += d.module.balance_loss();
    if (kc::linear(d.normed.data(), trunk_.head(), mtp_logits_.data(), T, D, V) != kernel_status::ok)
      return kernel_error("MTP head");
    double depth_loss = 0;
    d.dlogits.resize(T * V);
    if (kc::cross_entropy(mtp_logits_.data(), d.targets.data(), T, V, &depth_loss, d.dlogits.data()) !=
        kernel_status::ok)
      return kernel_error("MTP cross-entropy");
    for (auto& g : d.dlogits) g = static_cast<float>(g * mtp_scale * loss_scale);
    mtp_loss_ += mtp_scale * depth_loss;
  }
  return {};
}

// MTP depths in reverse: each hands dL/dh to the depth before it; depth 1 to the trunk's last
// hidden state. The head's and the embedding's gradients are the trunk's.
caf::error training_model::backward_mtp() {
  if (mtp_.empty()) return {};
  const auto& c = weights_->config;
  const size_t T = trunk_.num_tokens();
  const auto V = static_cast<size_t>(c.vocab_size), D = static_cast<size_t>(c.hidden_size);
  dmtp_normed_.resize(T * D);
  dh_next_.resize(T * D);
  dh_prev_.resize(T * D);
  dnext_emb_.resize(T * D);
  float* head_grad = trunk_.head_grad().data();
  auto& embed_grad = trunk_.embedding_grad();
  for (size_t k = mtp_.size(); k-- > 0;) {
    auto& d = mtp_[k];
    if (kc::linear_backward(d.normed.data(), trunk_.head(), d.dlogits.data(), dmtp_normed_.data(), head_grad, T, D,
                            V) != kernel_status::ok)
      return kernel_error("MTP head backward");
    const float* dh_out = k + 1 == mtp_.size() ? nullptr : dh_next_.data();  // the deepest has no successor
    if (auto err = d.module.backward(dmtp_normed_.data(), dh_out, dh_prev_.data(), dnext_emb_.data(), d.grads))
      return err;
    for (size_t t = 0; t < T; ++t) {
      const int32_t id = d.next_tokens[t];
      if (id < 0) continue;  // outside the depth: its gradient is zero
      float* row = embed_grad.data() + static_cast<size_t>(id) * D;
      for (size_t i = 0; i < D; ++i) row[i] += dnext_emb_[t * D + i];
    }
    std::swap(dh_next_, dh_prev_);
  }
  auto dx = trunk_.hidden_grad();
  for (size_t i = 0; i < dx.size(); ++i) dx[i] += dh_next_[i];
  return {};
}

void training_model::for_each_grad(const std::function<void(const std::string&, std::vector<float>&)>& f) {
  trunk_.for_each_grad(f);
  auto each_mlp = [&](const std::string& prefix, mlp_grads& g) {
    f(prefix + "gate_proj.weight", g.gate_proj);
    f(prefix + "up_proj.weight", g.up_proj);
    f(prefix + "down_proj.weight", g.down_proj);
  };
  for (auto& l : moe_layers_) {
    const std::string prefix = "model.layers." + std::to_string(l.mlp.layer()) + ".mlp.";
    f(prefix + "gate.weight", l.grads.gate);
    for (size_t e = 0; e < l.grads.experts.size(); ++e)
      each_mlp(prefix + "experts." + std::to_string(e) + ".", l.grads.experts[e]);
    if (!l.grads.shared.gate_proj.empty()) each_mlp(prefix + "shared_experts.", l.grads.shared);
  }
  for (auto& d : mtp_) {
    const std::string prefix = "model.layers." + std::to_string(d.module.layer()) + ".";
    d.grads.for_each([&](std::string_view suffix, std::vector<float>& g) { f(prefix + std::string(suffix), g); });
  }
}

double training_model::clip_gradients(double max_norm) {
  std::vector<std::span<float>> grads;
  for_each_grad([&](const std::string&, std::vector<float>& g) { grads.emplace_back(g); });
  return clip_grad_norm(grads, max_norm);
}

std::vector<std::vector<int64_t>> training_model::expert_loads() const {
  const auto E = static_cast<size_t>(weights_->config.n_routed_experts);
  std::vector<std::vector<int64_t>> out;
  for (const auto& l : moe_layers_) {
    std::vector<int64_t> load(E, 0);
    for (int32_t e : l.mlp.routing())
      if (e >= 0 && static_cast<size_t>(e) < E) ++load[static_cast<size_t>(e)];
    out.push_back(std::move(load));
  }
  return out;
}

void training_model::update_routing_bias(double speed) {
  if (speed == 0) return;
  for (const auto& l : moe_layers_) {
    if (l.mlp.routing().empty()) continue;
    host_tensor* bias =
        weights_->find("model.layers." + std::to_string(l.mlp.layer()) + ".mlp.gate.e_score_correction_bias");
    MOE_ASSERT(bias != nullptr);  // bind found it
    model::update_routing_bias(bias->data(), l.mlp.expert_load(), speed);
  }
}

std::vector<parameter_ref> training_model::parameters() {
  std::vector<parameter_ref> out;
  for_each_grad([&](const std::string& name, std::vector<float>& grad) {
    host_tensor* t = weights_->find(name);
    MOE_ASSERT(t != nullptr && t->data().size() == grad.size());  // bind found it
    out.push_back(parameter_ref{name, t->data(), grad});
  });
  return out;
}

}  // namespace moe::model
