// Training forward and backward of one decoder layer's MLP half: the dense SwiGLU MLP of the
// first_k_dense_replace layers, or the DeepSeekMoE block (gate, routed experts, shared experts).
//
// forward() computes what the inference path computes (mlp_block for dense layers; router_block
// + the routed experts + the shared MLP + moe_layer_output for MoE layers, in the same order of
// additions) and keeps what backward() needs: a copy of the input, each token's chosen experts,
// routing weights and unbiased sigmoid scores, and every MLP's gate/up pre-activations and SwiGLU
// output. backward() then propagates dL/dy to dL/dx and accumulates the weight gradients.
//
// MoE layers are gate_training, one expert_training_set holding every routed expert and one
// holding the shared experts (moe_training.hpp, which also gives the gate's gradient and the
// balance loss), joined by the weighted combine: routed row r of token t contributes
// w_r * out_r to y_t, so dL/d(out_r) = w_r * dy_t and dL/dw_r = dy_t . out_r. The caller's total
// loss is CE + sum over MoE layers of balance_loss().
//
// Ownership: borrows its weights (see weight_lookup), which must outlive it; owns the saved
// activations (for MoE layers, through its gate, its expert sets and their passes).
// Thread safety: one thread at a time (forward and backward share state).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "base/error.hpp"
#include "model/config.hpp"
#include "model/moe_blocks.hpp"
#include "model/moe_training.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

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
  /// balance loss factor (see moe_training.hpp); 0 computes no balance loss and leaves the
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
  [[nodiscard]] bool is_moe() const noexcept { return gate_.has_value(); }
  [[nodiscard]] size_t top_k() const noexcept { return gate_ ? gate_->top_k() : 0; }
  /// The last forward's choices: (T, top_k) expert ids and routing weights, in the router's
  /// order. Empty for dense layers or before a forward.
  [[nodiscard]] std::span<const int32_t> routing() const noexcept {
    return gate_ ? gate_->routing() : std::span<const int32_t>{};
  }
  [[nodiscard]] std::span<const float> routing_weights() const noexcept {
    return gate_ ? gate_->routing_weights() : std::span<const float>{};
  }
  /// The last forward's balance loss (alpha times the mean over its non-empty sequences of
  /// sum_i f_i P_i); 0 for dense layers, balance_alpha == 0, T == 0, before a forward or after
  /// a failed one.
  [[nodiscard]] double balance_loss() const noexcept {
    // A forward refused before it reached the gate leaves the gate's previous loss there.
    return gate_ && have_forward_ ? gate_->balance_loss() : 0.0;
  }
  /// The last forward's load per routed expert: how many of the T * top_k choices named each
  /// expert, over all its tokens (sums to T * top_k). For the bias update and balance statistics.
  /// (n_routed_experts) for MoE layers (zeros before a forward), empty for dense layers.
  [[nodiscard]] std::span<const int64_t> expert_load() const noexcept {
    return gate_ ? gate_->expert_load() : std::span<const int64_t>{};
  }

 private:
  [[nodiscard]] caf::error forward_moe(const float* x, float* y, size_t T,
                                       std::span<const int32_t> cu_seqlens, double balance_alpha);
  [[nodiscard]] caf::error backward_moe(const float* dy, float* dx, mlp_half_grads& grads);
  [[nodiscard]] bool grads_fit(const mlp_half_grads& g) const noexcept;

  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  size_t num_tokens_ = 0;
  bool have_forward_ = false;

  // Dense layers.
  mlp_weight_refs dense_;
  std::vector<float> x_;  // (T, hidden): the last forward's input
  mlp_saved dense_saved_;

  // MoE layers: the gate and both passes keep what their backward needs.
  std::optional<gate_training> gate_;          // selection and weights exactly as inference does
  std::optional<expert_training_set> routed_;  // every routed expert
  std::optional<expert_training_set> shared_;  // the shared experts, when the layer has them
  expert_rows rows_;                           // token-major (T * k rows)
  expert_pass routed_pass_, shared_pass_;
  std::vector<float> rows_out_;       // (R, hidden), row order: unweighted, as dL/dw needs them
  std::vector<int32_t> shared_rows_;  // (T) shared_experts_id: every token is a shared row

  // Scratch of forward and backward (contents meaningless between calls).
  std::vector<float> rows_buf_, d_rows_in_, shared_buf_, d_weight_;
  mlp_saved d_mlp_;  // the dense MLP's backward
};

}  // namespace moe::model
