// The whole model's training step on one process, the reference the distributed training runs
// against: the forward over packed sequences with what backward needs kept (embedding, every
// layer's attention half and MLP half, final norm, LM head), the mean next-token cross-entropy,
// and the backward in reverse, gradients in hub names.
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
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "model/attention_training.hpp"
#include "model/checkpoint.hpp"
#include "model/mlp_training.hpp"
#include "model/optimizer.hpp"

namespace moe::model {

class training_model {
 public:
  /// Binds every block to `weights` (which must hold the whole model, MTP aside).
  [[nodiscard]] static caf::expected<training_model> bind(std::shared_ptr<checkpoint> weights);

  /// Forward, loss and backward over `sequences` (each at least 1 token; tokens in [0, vocab)).
  /// Adds the gradients of the mean loss to grads(); returns the loss. model_errc::bad_input for
  /// an empty batch, a bad token or no predicted position at all.
  [[nodiscard]] caf::expected<double> forward_backward(std::span<const std::vector<int32_t>> sequences);

  /// Sets every gradient to zero.
  void zero_grads();

  /// Every trainable parameter in a stable order, with its hub name, its values (in the
  /// checkpoint) and its gradient: what the optimizer steps. e_score_correction_bias is not
  /// among them (it moves by the load-balancing rule, not by gradients).
  [[nodiscard]] std::vector<parameter_ref> parameters();

  [[nodiscard]] const model_config& config() const noexcept { return weights_->config; }

 private:
  struct layer {
    attention_training_block attention;
    mlp_training_block mlp;
    attention_grads attention_grad;
    mlp_half_grads mlp_grad;
  };

  std::shared_ptr<checkpoint> weights_;
  std::vector<layer> layers_;
  const float* embed_ = nullptr;  // (vocab, hidden)
  const float* norm_ = nullptr;   // (hidden)
  const float* head_ = nullptr;   // (vocab, hidden)
  std::vector<float> embed_grad_, norm_grad_, head_grad_;
  // Activations of the last forward.
  std::vector<float> x_, mlp_in_, mlp_out_, normed_, logits_;
  std::vector<int32_t> ids_, targets_, cu_seqlens_;
};

}  // namespace moe::model
