// The model without its MoE MLPs, in training: token embedding, every layer's attention half,
// the dense MLPs of the first_k_dense_replace layers, the final norm, the LM head and the
// next-token cross-entropy. What one attention shard runs (its MoE layers go to its router and
// the expert groups), and what training_model runs with its MoE layers local.
//
// Driven phase by phase, layers in order, then in reverse:
//   begin(sequences)
//   for l = 0 .. L-1:  dense layer: forward_dense_layer(l)
//                      MoE layer:   forward_attention(l); y = MoE(mlp_input()); add_moe_output(y)
//   loss(loss_scale)            (final norm, head, cross-entropy, and their backward)
//   [extra losses on hidden(), e.g. MTP, add their gradient to hidden_grad()]
//   for l = L-1 .. 0:  dense layer: backward_dense_layer(l)
//                      MoE layer:   dmlp_in = MoE backward of hidden_grad(); backward_attention(l, dmlp_in)
//   end_backward()              (embedding)
// A phase out of order is model_errc::bad_input. Any error (out of order, a misshapen argument, a
// block's or kernel's failure) leaves the pass unusable until the next begin(): the activations
// and gradients a half-run phase leaves are not a state to continue from.
//
// The loss is transformers' causal-LM loss: within each sequence, position p predicts token
// p + 1 (a sequence's last position predicts nothing), the mean over every predicted position.
// Gradients are those of loss_scale * loss (gradient accumulation over micro-batches, or data-
// parallel shards each scaling by their share of the batch's predicted positions).
//
// Ownership: borrows its weights (weight_lookup.hpp), which must outlive it; owns its gradients
// and the activations of the pass. Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "model/attention_training.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/mlp_training.hpp"
#include "model/optimizer.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

class trunk_training {
 public:
  /// Binds the embedding, every layer's attention half and dense MLP, the final norm and the head
  /// (the embedding when tie_word_embeddings). Errors are the lookup's.
  [[nodiscard]] static caf::expected<trunk_training> bind(const model_config& c, const weight_lookup& weights);

  /// Starts a pass over `sequences` (each at least 1 token, tokens in [0, vocab)): embeds them.
  /// model_errc::bad_input for an empty batch, an empty sequence, a bad token, or no predicted
  /// position at all.
  [[nodiscard]] caf::error begin(std::span<const std::vector<int32_t>> sequences);

  /// Layer `layer` (the next one) of a dense layer: attention half and dense MLP.
  [[nodiscard]] caf::error forward_dense_layer(int64_t layer);
  /// Layer `layer` (the next one) of an MoE layer: its attention half; mlp_input() is then the
  /// MoE MLP's input, and add_moe_output() must follow with its output.
  [[nodiscard]] caf::error forward_attention(int64_t layer);
  /// (T, hidden) the current MoE layer's MLP input (post-attention-normed), valid until the next
  /// phase call.
  [[nodiscard]] std::span<const float> mlp_input() const noexcept { return mlp_in_; }
  /// Adds the MoE layer's output y (T, hidden; bad_input for another size) to the residual stream.
  [[nodiscard]] caf::error add_moe_output(std::span<const float> y);

  /// After the last layer: the mean cross-entropy of the next-token predictions (returned, not
  /// scaled), and the backward through the head and the final norm with loss_scale (bad_input
  /// when not finite).
  [[nodiscard]] caf::expected<double> loss(double loss_scale = 1.0);

  /// (T, hidden) the last layer's output (the final norm's input): MTP's h_0.
  [[nodiscard]] std::span<const float> hidden() const noexcept { return x_; }
  /// (T, hidden) dL/d(residual stream) at the current point of the backward: after loss(), at
  /// the last layer's output; after backward of layer l, at layer l's input. An MoE layer's dL/dy
  /// is this before its backward_attention.
  [[nodiscard]] std::span<float> hidden_grad() noexcept { return dx_; }

  /// Backward of dense layer `layer` (the next one in reverse).
  [[nodiscard]] caf::error backward_dense_layer(int64_t layer);
  /// Backward of MoE layer `layer`'s attention half, given dmlp_in (T, hidden) = dL/d(mlp_input())
  /// from the MoE MLP's backward (not overlapping hidden_grad(), which this updates).
  [[nodiscard]] caf::error backward_attention(int64_t layer, std::span<const float> dmlp_in);
  /// After layer 0's backward: the embedding's gradient. The pass is over.
  [[nodiscard]] caf::error end_backward();

  [[nodiscard]] size_t num_tokens() const noexcept { return ids_.size(); }
  /// The pass's packed tokens, next-token targets (-1: none) and (S + 1) sequence boundaries.
  [[nodiscard]] std::span<const int32_t> tokens() const noexcept { return ids_; }
  [[nodiscard]] std::span<const int32_t> targets() const noexcept { return targets_; }
  [[nodiscard]] std::span<const int32_t> cu_seqlens() const noexcept { return cu_seqlens_; }

  /// The embedding (vocab, hidden) and the head (vocab, hidden; the embedding when tied), and
  /// their gradients (the same vector when tied), for heads that share them (MTP).
  [[nodiscard]] const float* embedding() const noexcept { return embed_; }
  [[nodiscard]] const float* head() const noexcept { return head_; }
  [[nodiscard]] std::vector<float>& embedding_grad() noexcept { return embed_grad_; }
  [[nodiscard]] std::vector<float>& head_grad() noexcept;

  void zero_grads();
  /// Calls f(hub name, gradient) for every trainable tensor of the trunk, in a fixed order
  /// (embedding, layers in order, final norm, head when untied): what an all-reduce walks.
  void for_each_grad(const std::function<void(const std::string&, std::vector<float>&)>& f);
  /// The trunk's parameters for an optimizer: values found by name in `weights` (the checkpoint
  /// the trunk is bound to), gradients the trunk's, in for_each_grad's order.
  [[nodiscard]] std::vector<parameter_ref> parameters(checkpoint& weights);

  [[nodiscard]] const model_config& config() const noexcept { return config_; }

 private:
  struct layer {
    attention_training_block attention;
    std::optional<mlp_training_block> dense;  // dense layers only
    attention_grads attention_grad;
    mlp_half_grads dense_grad;                // dense layers only
  };
  // moe_output: forward_attention ran, add_moe_output is due. backward: from loss() on.
  enum class phase : uint8_t { idle, forward, moe_output, backward };

  /// bad_input: `call` is not what the pass expects now (the error says what is).
  [[nodiscard]] caf::error out_of_order(const std::string& call) const;
  /// bad_input unless the pass is in `want` and `layer` is the next layer, of the kind `moe`.
  [[nodiscard]] caf::error check_next(phase want, int64_t layer, bool moe, const char* call) const;
  /// Ends the pass (see the file comment) and returns `err`.
  [[nodiscard]] caf::error fail(caf::error err);

  model_config config_;
  std::vector<layer> layers_;
  const float* embed_ = nullptr;  // (vocab, hidden)
  const float* norm_ = nullptr;   // (hidden)
  const float* head_ = nullptr;   // (vocab, hidden)
  std::vector<float> embed_grad_, norm_grad_, head_grad_;
  phase phase_ = phase::idle;
  int64_t next_layer_ = 0;  // forward: the next layer to run; backward: the next layer to undo
  // Activations and scratch of the pass, kept across passes so that equal batches reallocate
  // nothing: x_ the residual stream, mlp_out_ a dense MLP's output, dlogits_ (T, vocab).
  std::vector<float> x_, mlp_in_, mlp_out_, normed_, logits_, dlogits_, dnormed_, dx_, dmlp_in_;
  std::vector<int32_t> ids_, targets_, cu_seqlens_;
};

}  // namespace moe::model
