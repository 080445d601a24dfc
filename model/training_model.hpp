// The whole model's training step on one process, the reference the distributed training runs
// against: the forward over packed sequences with what backward needs kept, the mean next-token
// cross-entropy, and the backward in reverse, gradients in hub names. It is trunk_training
// (embedding, attention halves, dense MLPs, final norm, LM head, cross-entropy) driven with each
// MoE layer's MLP local, plus the multi-token-prediction depths on the trunk's last hidden state,
// so that it runs the same math as the distributed path, whose attention shards run the trunk.
//
// The loss is transformers' causal-LM loss: within each sequence, position p predicts token p + 1
// (a sequence's last position predicts nothing), averaged over every predicted position of
// every sequence of the call.
//
// Ownership: shares the checkpoint, whose tensors are the parameters: an optimizer updates them
// in place (parameters()) and the blocks, bound to them, see the new values.
// Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "model/mlp_training.hpp"
#include "model/mtp_training.hpp"
#include "model/optimizer.hpp"
#include "model/trunk_training.hpp"

namespace moe::model {

/// What the training step adds to the language-model loss.
struct training_options {
  /// Multi-token prediction modules trained (DeepSeek-V3: depth 1); each must be in the weights
  /// (model.layers.{num_hidden_layers + d - 1}.*). 0: none.
  int64_t mtp_depth = 0;
  /// The MTP loss weight lambda: the step's loss adds (lambda / depth) * sum of the depths' mean
  /// cross-entropies.
  double mtp_weight = 0.3;
};

class training_model {
 public:
  /// Binds every block to `weights` (which must hold the whole model, and the MTP modules that
  /// options.mtp_depth asks for).
  [[nodiscard]] static caf::expected<training_model> bind(std::shared_ptr<checkpoint> weights,
                                                          training_options options = {});

  /// Forward, loss and backward over `sequences` (each at least 1 token; tokens in [0, vocab)).
  /// Adds the gradients of the loss to grads(): the mean next-token cross-entropy plus, with
  /// balance_alpha > 0, every MoE layer's sequence-wise balance loss (DeepSeek-V3's complementary
  /// loss, mlp_training.hpp), plus the MTP loss (training_options). Returns the main model's
  /// cross-entropy; balance_loss() and mtp_loss() have the rest.
  /// model_errc::bad_input for an empty batch, a bad token, no predicted position at all, a
  /// negative or non-finite balance_alpha or a non-finite loss_scale.
  ///
  /// Gradient accumulation over micro-batches: the gradients of the cross-entropy and MTP terms
  /// are multiplied by `loss_scale`, so that calls over the micro-batches of one batch, each with
  /// loss_scale = its predicted positions / the batch's, add up to the whole batch's gradient
  /// (predicted_positions() says how many a call has; split balance_alpha by sequences likewise).
  [[nodiscard]] caf::expected<double> forward_backward(std::span<const std::vector<int32_t>> sequences,
                                                       double balance_alpha = 0.0, double loss_scale = 1.0);

  /// Positions `sequences` predict (every token but each sequence's last).
  [[nodiscard]] static int64_t predicted_positions(std::span<const std::vector<int32_t>> sequences) noexcept;

  /// The last forward_backward's balance loss, summed over the MoE layers (0 with alpha 0).
  [[nodiscard]] double balance_loss() const noexcept { return balance_loss_; }
  /// The last forward_backward's MTP loss, (lambda / depth) * sum of the depths' mean
  /// cross-entropies (0 without MTP).
  [[nodiscard]] double mtp_loss() const noexcept { return mtp_loss_; }

  /// Sets every gradient to zero.
  void zero_grads();

  /// Every trainable parameter in a stable order, with its hub name, its values (in the
  /// checkpoint) and its gradient: what the optimizer steps. e_score_correction_bias is not
  /// among them (it moves by the load-balancing rule, not by gradients).
  [[nodiscard]] std::vector<parameter_ref> parameters();

  /// Clips every gradient to `max_norm` in global norm (clip_grad_norm); returns the norm before.
  double clip_gradients(double max_norm);

  /// The parameters' tensors (shapes included), as the optimizer updates them.
  [[nodiscard]] const checkpoint& weights() const noexcept { return *weights_; }

  /// Per MoE layer (ascending layer id), the last forward's load of each routed expert: how many
  /// tokens chose it among their top-k. Empty before the first forward.
  [[nodiscard]] std::vector<std::vector<int64_t>> expert_loads() const;

  /// DeepSeek-V3's auxiliary-loss-free balancing, after a step: in every MoE layer each expert's
  /// e_score_correction_bias moves by `speed` toward balance, b_i += speed * sign(mean load -
  /// load_i), from the last forward's loads (the bias steers the top-k choice only; it carries no
  /// gradient). speed 0 changes nothing.
  void update_routing_bias(double speed);

  [[nodiscard]] const model_config& config() const noexcept { return weights_->config; }

 private:
  struct moe_layer {
    mlp_training_block mlp;
    mlp_half_grads grads;
  };

  struct mtp_depth {
    mtp_training_module module;
    mtp_grads grads;
    std::vector<int32_t> next_tokens, targets;  // per row; -1: none
    std::vector<float> h, normed, dlogits;       // the depth's hidden, its normed output, dL/dlogits
  };

  [[nodiscard]] caf::error forward_layers(double balance_alpha);
  [[nodiscard]] caf::error forward_mtp(double balance_alpha, double loss_scale);
  [[nodiscard]] caf::error backward_mtp();
  [[nodiscard]] caf::error backward_layers();
  /// f(hub name, gradient) for every trainable tensor: the trunk's, the MoE layers', the MTP's.
  void for_each_grad(const std::function<void(const std::string&, std::vector<float>&)>& f);

  std::shared_ptr<checkpoint> weights_;
  training_options options_;
  trunk_training trunk_;
  std::vector<moe_layer> moe_layers_;  // ascending layer id
  std::vector<mtp_depth> mtp_;
  // Scratch of forward_backward, kept so that equal batches reallocate nothing: an MoE layer's
  // output and input gradient, and with MTP the next tokens' embeddings, the depth's logits
  // (T, vocab) and the gradients passed between depths.
  std::vector<float> moe_out_, dmoe_in_;
  std::vector<float> next_emb_, mtp_logits_, dmtp_normed_, dh_next_, dh_prev_, dnext_emb_;
  double balance_loss_ = 0;
  double mtp_loss_ = 0;
};

}  // namespace moe::model
