// Training forward and backward of one DeepSeek-V3 multi-token-prediction (MTP) module, depth
// k = 1..num_nextn_predict_layers, stored at hub layer index L = num_hidden_layers + k - 1:
//
//   h_k(i)  = block_L( eh_proj . [ enorm(emb(t_{i+k})) | hnorm(h_{k-1}(i)) ] )     (T, hidden)
//   out_k(i) = shared_head.norm(h_k(i))        -> the caller's LM head (shared with the model)
//
// h_0 is the main model's last hidden state BEFORE model.norm; h_k feeds depth k + 1 (unnormed).
// The concatenation puts the embedding first, as DeepSeek's code: torch.cat([enorm(e), hnorm(h)]).
// block_L is a whole decoder layer (attention_training_block + mlp_training_block bound to L,
// dense or MoE by model_config::is_moe_layer(L)). The embedding and the LM head are the main
// model's (an MTP module's own embed_tokens / shared_head.head copies, which V3 checkpoints may
// hold, are not used), so they stay with the caller: it passes emb(t_{i+k}) in and takes out_k.
//
// Sequence handling. Calls take the caller's full packed layout: T rows, sequence s holding rows
// [cu_seqlens[s], cu_seqlens[s+1]) at positions 0..n_s-1. Depth k exists at positions
// i = 0..n_s-1-k (token i + k must exist); the module runs the block on those rows only, as
// sequences of length max(n_s - k, 0) at positions 0.. (attention is causal within them), and
// writes zeros into the other rows of every (T, hidden) output. So depth k + 1 takes depth k's
// h_out as is, and the caller maps no rows. Position i at depth k predicts t_{i+k+1}, so the
// last row computed per sequence (i = n_s-1-k) has no target (its normed output gets a zero
// gradient) and depth k + 1 does not read it either: the price of one row per sequence for a
// layout in which every depth's row i is position i. make_mtp_token_rows() gives, per row, the
// token whose embedding next_emb needs and the target.
//
// The MTP loss the caller assembles: (lambda / D) * sum_k mean over rows with a target of
// CE(head(out_k(i)), t_{i+k+1}). Per step, with h_0 = the final norm's input:
//   forward,  k = 1..D: rows_k = make_mtp_token_rows(ids, cu, k); next_emb = embed rows of
//             rows_k.next_tokens (any finite value where -1); forward(h_{k-1}, next_emb, h_k,
//             out_k); logits = linear(out_k, head); cross_entropy(logits, rows_k.targets) * lambda/D;
//   backward, k = D..1: dout_k from the head (linear_backward also adds to the head's gradient);
//             backward(dout_k, k < D ? dh_k : nullptr, dh_{k-1}, dnext_emb, grads_k);
//             embedding gradient += dnext_emb at rows_k.next_tokens; dh_0 adds to the main
//             model's gradient at the final norm's input.
//
// Ownership: borrows its weights (see weight_lookup.hpp), which must outlive it; owns the
// activations saved by forward, valid until the next forward.
// Thread safety: one thread at a time (forward and backward share state).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "model/attention_training.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/mlp_training.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

/// Hub layer index of MTP depth `depth` (1-based): num_hidden_layers + depth - 1.
[[nodiscard]] inline int64_t mtp_layer(const model_config& c, int64_t depth) noexcept {
  return c.num_hidden_layers + depth - 1;
}

/// Gradients of one MTP module's weights, each shaped as its weight (row-major, flattened).
struct mtp_grads {
  std::vector<float> enorm;             ///< enorm.weight (hidden)
  std::vector<float> hnorm;             ///< hnorm.weight (hidden)
  std::vector<float> eh_proj;           ///< eh_proj.weight (hidden, 2 * hidden)
  attention_grads attention;            ///< the block's attention half and its norms
  mlp_half_grads mlp;                   ///< the block's dense MLP or MoE
  std::vector<float> shared_head_norm;  ///< shared_head.norm.weight (hidden)

  /// Zero-filled gradients shaped for MTP depth `depth` of `c` (depth is not checked here; a
  /// module's backward refuses gradients of the wrong shapes).
  [[nodiscard]] static mtp_grads zeros(const model_config& c, int64_t depth);
  void zero();

  /// Calls f(suffix, tensor) for every trainable tensor, suffix being the hub name after
  /// "model.layers.{mtp_layer}." (e.g. "eh_proj.weight", "mlp.experts.3.up_proj.weight");
  /// e_score_correction_bias has no gradient and no entry.
  template <class F>
  void for_each(F&& f) {
    f(std::string_view{"enorm.weight"}, enorm);
    f(std::string_view{"hnorm.weight"}, hnorm);
    f(std::string_view{"eh_proj.weight"}, eh_proj);
    attention.for_each(f);
    auto each_mlp = [&](const std::string& prefix, mlp_grads& g) {
      f(std::string_view{prefix + "gate_proj.weight"}, g.gate_proj);
      f(std::string_view{prefix + "up_proj.weight"}, g.up_proj);
      f(std::string_view{prefix + "down_proj.weight"}, g.down_proj);
    };
    if (!mlp.dense.gate_proj.empty()) each_mlp("mlp.", mlp.dense);
    if (!mlp.gate.empty()) f(std::string_view{"mlp.gate.weight"}, mlp.gate);
    for (size_t e = 0; e < mlp.experts.size(); ++e)
      each_mlp("mlp.experts." + std::to_string(e) + ".", mlp.experts[e]);
    if (!mlp.shared.gate_proj.empty()) each_mlp("mlp.shared_experts.", mlp.shared);
    f(std::string_view{"shared_head.norm.weight"}, shared_head_norm);
  }
};

/// Per row of a packed batch at MTP depth k: the token whose embedding the row's next_emb must
/// hold (ids[i + k] of its sequence) and the row's target (ids[i + k + 1]), -1 where none.
struct mtp_token_rows {
  std::vector<int32_t> next_tokens;  ///< (T) -1: the row is outside depth k
  std::vector<int32_t> targets;      ///< (T) -1: nothing to predict (cross_entropy ignores it)
};

/// model_errc::bad_input for depth < 1 or cu_seqlens that do not rise from 0 to ids.size().
[[nodiscard]] caf::expected<mtp_token_rows> make_mtp_token_rows(std::span<const int32_t> ids,
                                                                std::span<const int32_t> cu_seqlens,
                                                                int64_t depth);

class mtp_training_module {
 public:
  /// Binds depth `depth` (1 <= depth <= c.num_nextn_predict_layers, else model_errc::bad_input)
  /// at layer mtp_layer(c, depth): enorm, hnorm, eh_proj, the decoder block and
  /// shared_head.norm. Errors of `weights` (missing_tensor / bad_tensor naming the tensor).
  [[nodiscard]] static caf::expected<mtp_training_module> bind(const model_config& c, int64_t depth,
                                                               const weight_lookup& weights);

  /// h_prev: (T, hidden) the previous depth's h (depth 1: the main model's last hidden state,
  /// before model.norm). next_emb: (T, hidden) row i holds emb(t_{i+depth}) of its sequence
  /// (rows outside the depth are not read). Writes h_out (T, hidden), this depth's h, and
  /// normed (T, hidden) = shared_head.norm(h_out), for the LM head; rows outside the depth are 0.
  /// Outputs must not overlap the inputs. balance_alpha: the MoE block's sequence-wise balance
  /// loss factor (mlp_training.hpp), over each sequence's rows of this depth; 0: none.
  /// model_errc::bad_input (nothing saved) for null pointers or cu_seqlens that do not rise from
  /// 0 to num_tokens, and the block's errors; kernel_failed if a kernel refuses.
  [[nodiscard]] caf::error forward(const float* h_prev, const float* next_emb, float* h_out,
                                   float* normed, size_t num_tokens,
                                   std::span<const int32_t> cu_seqlens, double balance_alpha = 0.0);

  /// dnormed: (T, hidden) dL/d(normed) (from the head); dh_out: (T, hidden) dL/d(h_out) (from
  /// depth + 1); either may be null, meaning zero. Writes dh_prev and dnext_emb (T, hidden),
  /// zero outside the depth; they must not overlap the inputs. Accumulates (+=) the weight
  /// gradients into `grads` (shaped as mtp_grads::zeros(c, depth)). model_errc::bad_input
  /// without a successful forward, for null outputs or misshapen grads.
  [[nodiscard]] caf::error backward(const float* dnormed, const float* dh_out, float* dh_prev,
                                    float* dnext_emb, mtp_grads& grads);

  [[nodiscard]] int64_t depth() const noexcept { return depth_; }
  [[nodiscard]] int64_t layer() const noexcept { return attention_.layer(); }
  [[nodiscard]] const mlp_training_block& mlp() const noexcept { return mlp_; }
  /// The last forward's balance loss (0 without balance_alpha or for a dense block); backward
  /// includes its gradient, so the caller's loss adds it.
  [[nodiscard]] double balance_loss() const noexcept { return mlp_.balance_loss(); }
  /// Rows of the last forward inside the depth, in order (the block's packed rows; the MLP's
  /// routing() is indexed by them).
  [[nodiscard]] std::span<const int32_t> rows() const noexcept { return rows_; }

 private:
  [[nodiscard]] bool grads_fit(const mtp_grads& g) const noexcept;

  int64_t depth_ = 0;
  int64_t hidden_ = 0;
  float eps_ = 1e-6f;
  const float* enorm_ = nullptr;        // (hidden)
  const float* hnorm_ = nullptr;        // (hidden)
  const float* eh_proj_ = nullptr;      // (hidden, 2 * hidden)
  const float* head_norm_ = nullptr;    // (hidden)
  attention_training_block attention_;
  mlp_training_block mlp_;

  // Saved by forward (packed rows of the depth); num_tokens_ is set after a successful forward.
  std::optional<size_t> num_tokens_;
  std::vector<int32_t> rows_;        // (R) caller's row of each packed row
  std::vector<int32_t> cu_seqlens_;  // (num_seqs + 1) of the packed rows
  std::vector<float> e_in_, h_in_;   // (R, hidden) gathered next_emb, h_prev
  std::vector<float> cat_;           // (R, 2 * hidden) [enorm(e) | hnorm(h)]
  std::vector<float> x_;             // (R, hidden) the block's output (h_out packed)

  // Scratch.
  std::vector<float> mlp_in_, mlp_out_, normed_, dx_, dmlp_in_, dcat_, de_, dh_;
};

/// Adds random weights for MTP depth `depth` of ckpt.config (1 <= depth <=
/// num_nextn_predict_layers, else bad_input) to `ckpt`, hub names and shapes of
/// expected_weights(): norms ones, e_score_correction_bias zeros, matrices (eh_proj, the block's
/// projections, experts, gate) uniform on +-sqrt(3) * initializer_range, init_model's
/// distribution (not its values: init_model's counter-based sampler is private to it and writes
/// files). Replaces tensors of that module already present; the optional own embedding and head
/// are not created (the main model's are shared). Deterministic in (seed, depth, config).
[[nodiscard]] caf::error add_random_mtp_weights(checkpoint& ckpt, int64_t depth, uint64_t seed);

}  // namespace moe::model
