// The routed half of a DeepSeekMoE layer, split the way the actors split it:
//  - router_block: the gate (logits, sigmoid, bias, group-limited top-k) for one layer;
//  - expert_set: the routed experts one holder (an expert group, or the whole model) keeps for
//    one layer, run as a grouped batch over "expert rows";
//  - dispatch/combine: the router turns (token, k-th choice) pairs into expert rows and adds the
//    weighted outputs back, always in token-major order, so every placement of experts across
//    holders gives bit-identical sums.
// Ownership: blocks borrow their weights. Thread safety: a block is used by one thread at a
// time (scratch is per block).
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/moe_gate.hpp"
#include "model/config.hpp"
#include "model/mlp_block.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

class router_block {
 public:
  [[nodiscard]] static caf::expected<router_block> bind(const model_config& c, int64_t layer,
                                                        const weight_lookup& weights);

  /// x: (T, hidden) post-attention-normed states -> topk_idx, topk_weight: (T, top_k),
  /// each token's choices in descending (biased) score order.
  [[nodiscard]] caf::error route(const float* x, size_t num_tokens, int32_t* topk_idx,
                                 float* topk_weight);

  [[nodiscard]] int64_t layer() const noexcept { return layer_; }
  [[nodiscard]] size_t top_k() const noexcept { return params_.top_k; }
  [[nodiscard]] size_t num_experts() const noexcept { return params_.num_experts; }

 private:
  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  kernels::cpu::moe_gate_params params_;
  const float* gate_ = nullptr;  // (E, hidden)
  const float* bias_ = nullptr;  // (E)
  std::vector<float> logits_;
};

/// Rows sent to experts: row r carries the input of token token_of_row[r] for expert
/// expert_of_row[r] with routing weight weight_of_row[r]. Token-major: the rows of token t are
/// contiguous and in the router's choice order.
struct expert_rows {
  std::vector<int32_t> token_of_row;
  std::vector<int32_t> expert_of_row;
  std::vector<float> weight_of_row;
  [[nodiscard]] size_t size() const noexcept { return token_of_row.size(); }
};

/// Expands a router's choices into token-major expert rows.
[[nodiscard]] expert_rows make_expert_rows(std::span<const int32_t> topk_idx,
                                           std::span<const float> topk_weight, size_t top_k);

class expert_set {
 public:
  /// Binds the routed experts `experts` (logical ids) of `layer`.
  [[nodiscard]] static caf::expected<expert_set> bind(const model_config& c, int64_t layer,
                                                      std::span<const int64_t> experts,
                                                      const weight_lookup& weights);

  /// out[r, :] = weight[r] * expert[expert_of_row[r]](x[r, :]) for r < num_rows.
  /// x, out: (num_rows, hidden). Experts run one grouped GEMM chain each over their rows.
  /// model_errc::bad_input if a row names an expert this set does not hold.
  [[nodiscard]] caf::error run(const float* x, size_t num_rows, const int32_t* expert_of_row,
                               const float* weight_of_row, float* out);

  [[nodiscard]] bool holds(int64_t expert) const noexcept { return experts_.count(expert) != 0; }
  [[nodiscard]] int64_t layer() const noexcept { return layer_; }

 private:
  int64_t layer_ = 0;
  int64_t hidden_ = 0;
  std::map<int64_t, mlp_block> experts_;
  mlp_scratch scratch_;
  std::vector<int32_t> order_;
  std::vector<float> in_, out_;
};

/// y (T, hidden) += sum over the rows r of token t of rows_out[r, :], in row order.
[[nodiscard]] caf::error combine_expert_rows(const float* rows_out, const expert_rows& rows,
                                             float* y, size_t num_tokens, size_t hidden);

/// The MoE layer's output in the one order of additions every execution path uses (the
/// reference engine and the router actor alike), so outputs do not depend on placement:
/// y (T, hidden) = (sum of each token's routed rows, token-major) + shared_out (may be null).
[[nodiscard]] caf::error moe_layer_output(const float* routed_rows_out, const expert_rows& rows,
                                          const float* shared_out, float* y, size_t num_tokens,
                                          size_t hidden);

}  // namespace moe::model
