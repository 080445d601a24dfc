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
// Balance loss (MoE layers, balance_alpha > 0): DeepSeek-V3's complementary sequence-wise
// balance loss (report eqs. 17-20). For each packed sequence of T_s tokens, with N_r routed
// experts, K_r = top_k and s the unbiased sigmoid scores over all N_r experts,
//   f_i  = N_r / (K_r * T_s) * #{t in s : i among t's top-K_r choices}   (a constant: no gradient)
//   s'_i = s_i / sum_j s_j,  P_i = (1 / T_s) * sum_{t in s} s'_{i,t},  L_s = alpha * sum_i f_i P_i
// and the layer's balance loss is the MEAN of L_s over the non-empty sequences (DeepSeek averages
// over the batch's sequences; an empty sequence has neither f nor P and is not counted).
// backward() adds dL_bal/d(logits) of every expert (not only the chosen ones) to the gate path,
// so the caller's total loss is CE + sum over MoE layers of balance_loss().
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
  /// cu_seqlens: (num_seqs + 1) boundaries of the packed sequences, sequence s holding tokens
  /// [cu_seqlens[s], cu_seqlens[s+1]); empty: one sequence of all T tokens. balance_alpha: the
  /// balance loss factor (see the file comment); 0 computes no balance loss and leaves the
  /// gradients exactly as without it. Dense layers check both and otherwise ignore them.
  /// model_errc::bad_input (no state kept) for null pointers with T > 0, non-empty cu_seqlens
  /// that do not rise from 0 to T, or a negative or non-finite balance_alpha; kernel_failed if a
  /// kernel refuses.
  [[nodiscard]] caf::error forward(const float* x, float* y, size_t num_tokens,
                                   std::span<const int32_t> cu_seqlens = {},
                                   double balance_alpha = 0.0);

  /// dy: dL/dy (T, hidden) for the last forward's T. dx (T, hidden) <- dL/dx (written; must
  /// not overlap dy). When the last forward had balance_alpha > 0, dx and the gate gradient also
  /// include d balance_loss() / d(x, W_gate): L = <dy, y> + balance_loss().
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
  /// The last forward's balance loss (alpha times the mean over its non-empty sequences of
  /// sum_i f_i P_i); 0 for dense layers, balance_alpha == 0, T == 0 or before a forward.
  [[nodiscard]] double balance_loss() const noexcept { return balance_loss_; }
  /// The last forward's load per routed expert: how many of the T * top_k choices named each
  /// expert, over all its tokens (sums to T * top_k). For the bias update and balance statistics.
  /// (n_routed_experts) for MoE layers (zeros before a forward), empty for dense layers.
  [[nodiscard]] std::span<const int64_t> expert_load() const noexcept { return expert_load_; }

 private:
  [[nodiscard]] caf::error forward_moe(const float* x, float* y, size_t T);
  [[nodiscard]] caf::error backward_moe(const float* dy, float* dx, mlp_half_grads& grads);
  void gate_scores(const float* x, size_t T);
  void balance_forward();
  void balance_backward();
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
  std::vector<int64_t> expert_load_;  // (E): choices per expert in the last forward

  // Balance loss of the last forward (kept only with balance_alpha_ > 0).
  double balance_alpha_ = 0.0;
  double balance_loss_ = 0.0;
  std::vector<int32_t> cu_seqlens_;    // (S + 1); {0, T} for a forward given none
  std::vector<double> scores_;         // (T, E): sigmoid(logit) of every expert, without the bias
  std::vector<double> balance_coef_;   // (S, E): dL_bal/ds'_{i,t} of sequence s's tokens
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
