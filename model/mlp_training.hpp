// Training forward and backward of one decoder layer's MLP half: the dense SwiGLU MLP of the
// first_k_dense_replace layers, or the DeepSeekMoE block (gate, routed experts, shared experts).
//
// forward() computes what the inference path computes (mlp_block for dense layers; router_block
// + the routed experts + the shared MLP + moe_layer_output for MoE layers, in the same order of
// additions) and keeps what backward() needs: a copy of the input, each token's chosen experts,
// routing weights and unbiased sigmoid scores, and every MLP's gate/up pre-activations and SwiGLU
// output. backward() then propagates dL/dy to dL/dx and accumulates the weight gradients.
//
// Gate: the top-k choice (and with it e_score_correction_bias) is piecewise constant, so it
// carries no gradient; the chosen experts' weights do. With s = sigmoid(x . W_gate^T) (no bias),
//   w_k = s_k / (sum_j s_j + 1e-20) * routed_scaling_factor   (norm_topk_prob; else s_k * rsf),
// dL/dw_k = dy . expert_k(x), which flows through the normalisation and the sigmoid to the
// chosen logits and from there into dW_gate and dx.
//
// Ownership: borrows its weights (see weight_lookup), which must outlive it; owns the saved
// activations. Thread safety: one thread at a time (forward and backward share state).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "base/error.hpp"
#include "model/config.hpp"
#include "model/moe_blocks.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

/// Gradients of one SwiGLU MLP (dense MLP, routed expert or the shared experts), shaped as its
/// weights: gate_proj, up_proj (inter, hidden), down_proj (hidden, inter).
struct mlp_grads {
  std::vector<float> gate_proj, up_proj, down_proj;

  [[nodiscard]] static mlp_grads zeros(int64_t hidden, int64_t intermediate);
  void zero();
};

/// Gradients of one layer's MLP half. Dense layers use `dense` only. MoE layers use `gate`
/// (n_routed_experts, hidden), `experts` (one per routed expert, all kept; experts that
/// received no rows stay untouched) and `shared` (empty vectors when n_shared_experts == 0).
/// e_score_correction_bias has no gradient and so no entry.
struct mlp_half_grads {
  mlp_grads dense;
  std::vector<float> gate;
  std::vector<mlp_grads> experts;
  mlp_grads shared;

  /// Zero-filled gradients shaped for layer `layer` of `c`.
  [[nodiscard]] static mlp_half_grads zeros(const model_config& c, int64_t layer);
  /// Sets every entry to 0, keeping the shapes.
  void zero();
};

/// The weights of one SwiGLU MLP as the training path borrows them.
struct mlp_weight_refs {
  const float* gate_proj = nullptr;  // (inter, hidden)
  const float* up_proj = nullptr;    // (inter, hidden)
  const float* down_proj = nullptr;  // (hidden, inter)
  int64_t hidden = 0;
  int64_t intermediate = 0;
};

/// What one MLP's backward needs from its forward over `rows` rows.
struct mlp_saved {
  std::vector<float> gate, up, act;  // (rows, inter): gate(x), up(x), silu(gate) * up
};

class mlp_training_block {
 public:
  /// Binds layer `layer`'s MLP half: the dense MLP, or the gate (weight and bias), every routed
  /// expert and the shared experts. Errors are those of `weights` (missing or misshapen tensors).
  [[nodiscard]] static caf::expected<mlp_training_block> bind(const model_config& c, int64_t layer,
                                                              const weight_lookup& weights);

  /// x: (T, hidden) post-attention-normed input -> y: (T, hidden), the layer's MLP output (what
  /// is added to the residual); y is written. Replaces the state kept for backward.
  /// model_errc::bad_input for null pointers with T > 0; kernel_failed if a kernel refuses.
  [[nodiscard]] caf::error forward(const float* x, float* y, size_t num_tokens);

  /// dy: dL/dy (T, hidden) for the last forward's T. dx (T, hidden) <- dL/dx (written; must
  /// not overlap dy).
  /// Accumulates (+=) into `grads`, which must be shaped as mlp_half_grads::zeros(c, layer).
  /// model_errc::bad_input before any forward, for null pointers or misshapen grads.
  /// May be called more than once per forward (each call adds the same gradients again).
  [[nodiscard]] caf::error backward(const float* dy, float* dx, mlp_half_grads& grads);

  [[nodiscard]] int64_t layer() const noexcept { return layer_; }
  [[nodiscard]] bool is_moe() const noexcept { return router_.has_value(); }
  [[nodiscard]] size_t top_k() const noexcept { return router_ ? router_->top_k() : 0; }
  /// The last forward's choices: (T, top_k) expert ids and routing weights, in the router's
  /// order. Empty for dense layers or before a forward.
  [[nodiscard]] std::span<const int32_t> routing() const noexcept { return topk_idx_; }
  [[nodiscard]] std::span<const float> routing_weights() const noexcept { return topk_weight_; }

 private:
  [[nodiscard]] caf::error forward_moe(const float* x, float* y, size_t T);
  [[nodiscard]] caf::error backward_moe(const float* dy, float* dx, mlp_half_grads& grads);
  [[nodiscard]] bool grads_fit(const mlp_half_grads& g) const noexcept;

  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  size_t num_tokens_ = 0;
  bool have_forward_ = false;
  std::vector<float> x_;  // (T, hidden): the last forward's input

  // Dense layers.
  mlp_weight_refs dense_;
  mlp_saved dense_saved_;

  // MoE layers.
  std::optional<router_block> router_;  // selection and weights exactly as inference does
  const float* gate_weight_ = nullptr;  // (E, hidden), for the gate's backward
  bool norm_topk_prob_ = true;
  float routed_scaling_factor_ = 1.0f;
  std::vector<mlp_weight_refs> experts_;  // every routed expert, by logical id
  std::optional<mlp_weight_refs> shared_;
  mlp_saved shared_saved_;
  std::vector<int32_t> topk_idx_;    // (T, k)
  std::vector<float> topk_weight_;   // (T, k)
  std::vector<float> topk_score_;    // (T, k): sigmoid(logit) of each choice, without the bias
  expert_rows rows_;                 // token-major (T * k rows)
  std::vector<int32_t> order_;       // rows grouped by expert (stable), as expert_set runs them
  std::vector<float> rows_in_;       // (R, hidden), in `order_`
  std::vector<float> rows_out_;      // (R, hidden), unweighted expert outputs, in `order_`
  mlp_saved rows_saved_;             // (R, inter), in `order_`

  // Scratch of forward and backward (contents meaningless between calls).
  std::vector<float> rows_buf_, shared_buf_, d_rows_in_, d_logits_, d_weight_;
  mlp_saved d_mlp_;  // dL/d(act), dL/d(gate), dL/d(up) of the MLP being differentiated
};

}  // namespace moe::model
