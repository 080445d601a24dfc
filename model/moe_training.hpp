// The two halves of a DeepSeekMoE layer in training, split the way the actors split it:
//  - gate_training: the router's half. The gate (exactly router_block's choice), each choice's
//    unbiased sigmoid score, the optional sequence-wise balance loss, the per-expert load, and
//    the backward from dL/d(routing weight) to dL/dx and dL/dW_gate.
//  - expert_training_set: an expert holder's half. SwiGLU experts over "expert rows" (one row per
//    (token, chosen expert) pair, or every token for the shared experts), forward keeping what
//    backward needs in an expert_pass the caller holds, so a holder can keep one pass per
//    requester and layer in flight.
// mlp_training_block (the single-process layer) is these two plus the weighted combine; the
// router and expert-group actors run the same two across processes.
//
// Gate math: with s = sigmoid(x . W_gate^T) (no bias) and
//   w_k = s_k / (sum_j s_j + 1e-20) * routed_scaling_factor   (norm_topk_prob; else s_k * rsf),
// dL/dw_k flows through the normalisation and the sigmoid to the chosen logits; the top-k
// choice (and with it e_score_correction_bias) is piecewise constant and carries no gradient.
//
// Balance loss (balance_alpha > 0): DeepSeek-V3's complementary sequence-wise balance loss
// (report eqs. 17-20). For each packed sequence of T_s tokens, with N_r routed experts,
// K_r = top_k and s the unbiased sigmoid scores over all N_r experts,
//   f_i  = N_r / (K_r * T_s) * #{t in s : i among t's top-K_r choices}   (a constant: no gradient)
//   s'_i = s_i / sum_j s_j,  P_i = (1 / T_s) * sum_{t in s} s'_{i,t},  L_s = alpha * sum_i f_i P_i
// and the layer's balance loss is the MEAN of L_s over the non-empty sequences (DeepSeek averages
// over the batch's sequences; an empty sequence has neither f nor P and is not counted). The
// backward adds dL_bal/d(logits) of every expert (not only the chosen ones) to the gate path.
//
// Ownership: blocks borrow their weights (weight_lookup.hpp), which must outlive them.
// Thread safety: one thread at a time per block (scratch is per block).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
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
  /// Whether the three vectors are shaped as zeros(hidden, intermediate) makes them.
  [[nodiscard]] bool fits(int64_t hidden, int64_t intermediate) const noexcept;
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

/// Looks up the three projections under `prefix` ("model.layers.3.mlp.experts.7.").
[[nodiscard]] caf::expected<mlp_weight_refs> bind_mlp_weights(const std::string& prefix,
                                                              int64_t hidden, int64_t intermediate,
                                                              const weight_lookup& weights);

/// y (rows, hidden) = down(silu(gate(x)) * up(x)), keeping gate(x), up(x) and the SwiGLU output
/// in `saved` (resized to rows * inter). false if a kernel refuses.
[[nodiscard]] bool mlp_forward(const mlp_weight_refs& m, const float* x, size_t rows, float* y,
                               mlp_saved& saved);

/// The transpose of mlp_forward over the same x and saved state: dx (rows, hidden) written
/// (+= with accumulate_dx), weight gradients +=. scratch: resized as needed. false if a kernel
/// refuses.
[[nodiscard]] bool mlp_backward(const mlp_weight_refs& m, const float* x, size_t rows,
                                const mlp_saved& saved, const float* dy, float* dx,
                                bool accumulate_dx, mlp_grads& grads, mlp_saved& scratch);

/// model_errc::bad_input unless cu_seqlens is empty or rises from 0 to num_tokens ((S + 1)
/// boundaries) and balance_alpha is finite and >= 0: the arguments gate_training::forward takes,
/// checked here too for dense layers, which accept and ignore them.
[[nodiscard]] caf::error check_balance_args(std::span<const int32_t> cu_seqlens, size_t num_tokens,
                                            double balance_alpha);

class gate_training {
 public:
  /// Binds layer `layer`'s gate (weight and e_score_correction_bias). Errors are the lookup's.
  [[nodiscard]] static caf::expected<gate_training> bind(const model_config& c, int64_t layer,
                                                         const weight_lookup& weights);

  /// x: (T, hidden) post-attention-normed states. Chooses each token's experts exactly as
  /// router_block::route does and keeps x, the choices, their weights and unbiased scores, the
  /// per-expert load and (balance_alpha > 0) the balance loss over the packed sequences
  /// cu_seqlens ((S + 1) boundaries rising from 0 to T; empty: one sequence).
  /// model_errc::bad_input (no state kept) for a null x with T > 0, malformed cu_seqlens, or a
  /// negative or non-finite balance_alpha.
  [[nodiscard]] caf::error forward(const float* x, size_t num_tokens,
                                   std::span<const int32_t> cu_seqlens = {},
                                   double balance_alpha = 0.0);

  /// d_weight: (T, top_k) dL/d(routing weight) of each choice, in routing() order.
  /// dx (T, hidden) += the gradient through the gate (and the balance loss, when the last forward
  /// had one); gate_grad (n_routed_experts, hidden) +=.
  /// model_errc::bad_input before any forward, for null pointers with T > 0 or a misshapen
  /// gate_grad.
  [[nodiscard]] caf::error backward(const float* d_weight, float* dx, std::span<float> gate_grad);

  [[nodiscard]] int64_t layer() const noexcept { return layer_; }
  [[nodiscard]] size_t top_k() const noexcept { return router_.top_k(); }
  [[nodiscard]] size_t num_experts() const noexcept { return router_.num_experts(); }
  [[nodiscard]] size_t num_tokens() const noexcept { return num_tokens_; }
  /// The last forward's (T, top_k) expert ids and routing weights, in the router's order.
  [[nodiscard]] std::span<const int32_t> routing() const noexcept { return topk_idx_; }
  [[nodiscard]] std::span<const float> routing_weights() const noexcept { return topk_weight_; }
  /// The last forward's balance loss (0 with balance_alpha 0 or T == 0).
  [[nodiscard]] double balance_loss() const noexcept { return balance_loss_; }
  /// The last forward's choices per routed expert (n_routed_experts; sums to T * top_k).
  [[nodiscard]] std::span<const int64_t> expert_load() const noexcept { return expert_load_; }

 private:
  gate_training(router_block router) : router_(std::move(router)) {}
  void gate_scores(size_t T);
  void balance_forward();
  void balance_backward();

  router_block router_;
  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  const float* gate_weight_ = nullptr;  // (E, hidden)
  bool norm_topk_prob_ = true;
  float routed_scaling_factor_ = 1.0f;
  bool have_forward_ = false;
  size_t num_tokens_ = 0;
  std::vector<float> x_;              // (T, hidden)
  std::vector<int32_t> topk_idx_;     // (T, k)
  std::vector<float> topk_weight_;    // (T, k)
  std::vector<float> topk_score_;     // (T, k): sigmoid(logit) of each choice, without the bias
  std::vector<int64_t> expert_load_;  // (E)
  double balance_alpha_ = 0.0;
  double balance_loss_ = 0.0;
  std::vector<int32_t> cu_seqlens_;   // (S + 1)
  std::vector<double> scores_;        // (T, E), only with the balance loss
  std::vector<double> balance_coef_;  // (S, E)
  std::vector<float> d_logits_;       // scratch (T, E)
};

/// What expert_training_set::backward needs from one forward: the rows grouped by expert, their
/// inputs and every expert's saved pre-activations. Owned by the caller (one per forward in
/// flight); valid for the set that filled it.
struct expert_pass {
  std::vector<int32_t> expert_of_row;  // (R) as given to forward
  std::vector<int32_t> order;          // rows grouped by expert (stable by expert id)
  std::vector<float> in;               // (R, hidden), in `order`
  mlp_saved saved;                     // (R, inter), in `order`
  [[nodiscard]] size_t num_rows() const noexcept { return expert_of_row.size(); }
};

/// The id the shared experts carry in an expert_training_set bound by bind_shared.
inline constexpr int64_t shared_experts_id = -1;

class expert_training_set {
 public:
  /// The routed experts `experts` (logical ids, each once) of MoE layer `layer`.
  [[nodiscard]] static caf::expected<expert_training_set> bind(const model_config& c, int64_t layer,
                                                               std::span<const int64_t> experts,
                                                               const weight_lookup& weights);
  /// The shared experts of MoE layer `layer` as one expert, id shared_experts_id.
  [[nodiscard]] static caf::expected<expert_training_set> bind_shared(const model_config& c,
                                                                      int64_t layer,
                                                                      const weight_lookup& weights);

  /// x: (R, hidden) rows, expert_of_row: (R) the expert of each. out (R, hidden) <- each row's
  /// expert output, unweighted, in row order; `pass` <- what backward needs (replaced).
  /// model_errc::bad_input (pass cleared) for a row naming an expert the set does not hold or
  /// null pointers with R > 0; kernel_failed if a kernel refuses.
  [[nodiscard]] caf::error forward(const float* x, std::span<const int32_t> expert_of_row,
                                   float* out, expert_pass& pass);

  /// d_out: (R, hidden) dL/d(out) in row order for `pass`'s rows. d_in (R, hidden) <- dL/dx in
  /// row order (written). Each expert's weight gradients += into *grad_of(expert), which must be
  /// shaped mlp_grads::zeros(hidden, intermediate()). model_errc::bad_input for null pointers
  /// with R > 0, a pass naming an expert not held, or a null or misshapen gradient.
  [[nodiscard]] caf::error backward(const expert_pass& pass, const float* d_out, float* d_in,
                                    const std::function<mlp_grads*(int64_t expert)>& grad_of);

  [[nodiscard]] int64_t layer() const noexcept { return layer_; }
  [[nodiscard]] int64_t hidden() const noexcept { return hidden_; }
  [[nodiscard]] int64_t intermediate() const noexcept { return intermediate_; }
  [[nodiscard]] bool holds(int64_t expert) const noexcept { return experts_.count(expert) != 0; }

 private:
  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  int64_t intermediate_ = 0;
  std::map<int64_t, mlp_weight_refs> experts_;
  // Scratch (contents meaningless between calls).
  std::vector<float> out_, d_out_, d_in_;  // (R, hidden), in `order`
  std::vector<mlp_grads*> group_grads_;    // one per run of rows of one expert, in `order`
  mlp_saved d_mlp_;
};

}  // namespace moe::model
