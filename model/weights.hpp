// The tensors of a DeepSeek-V3-family checkpoint: hub names and shapes, derived from a
// model_config. The single place that knows the hub naming; the loader, the initialiser and the
// blocks that look weights up by name all go through it.
//
// Per decoder layer i (prefix "model.layers.{i}."):
//   input_layernorm.weight                          [hidden]
//   self_attn.q_a_proj.weight                       [q_lora_rank, hidden]        (q_lora_rank set)
//   self_attn.q_a_layernorm.weight                  [q_lora_rank]
//   self_attn.q_b_proj.weight                       [heads * qk_head_dim, q_lora_rank]
//   self_attn.q_proj.weight                         [heads * qk_head_dim, hidden] (q_lora_rank null)
//   self_attn.kv_a_proj_with_mqa.weight             [kv_lora_rank + qk_rope_head_dim, hidden]
//   self_attn.kv_a_layernorm.weight                 [kv_lora_rank]
//   self_attn.kv_b_proj.weight                      [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
//   self_attn.o_proj.weight                         [hidden, heads * v_head_dim]
//   post_attention_layernorm.weight                 [hidden]
//   dense layers: mlp.{gate,up}_proj.weight         [intermediate, hidden], mlp.down_proj [hidden, intermediate]
//   MoE layers:   mlp.gate.weight                   [n_routed_experts, hidden]
//                 mlp.gate.e_score_correction_bias  [n_routed_experts]
//                 mlp.experts.{e}.{gate,up,down}_proj.weight   (moe_intermediate_size)
//                 mlp.shared_experts.{gate,up,down}_proj.weight (moe_intermediate_size * n_shared)
// Global: model.embed_tokens.weight [vocab, hidden], model.norm.weight [hidden],
//         lm_head.weight [vocab, hidden] unless tie_word_embeddings.
// Multi-token prediction module d (layer index num_hidden_layers + d), as DeepSeek-V3 ships it:
//   enorm.weight, hnorm.weight [hidden], eh_proj.weight [hidden, 2 * hidden],
//   shared_head.norm.weight [hidden], a full decoder block (MoE or dense by the same
//   is_moe_layer rule; in V3 it is MoE), and optionally its own embed_tokens.weight and
//   shared_head.head.weight [vocab, hidden] (V3 stores copies of the main model's; when absent
//   the main model's are shared).
// FP8 checkpoints add "<name>_scale_inv" for projection weights stored as F8_E4M3.
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/config.hpp"

namespace moe::model {

enum class weight_kind : uint8_t {
  embedding,    ///< [vocab, hidden]: embed_tokens, lm_head, shared_head.head.
  norm,         ///< RMSNorm scale.
  projection,   ///< A linear layer's [out, in] matrix; may be stored as FP8 with block scales.
  router,       ///< The gate's [n_routed_experts, hidden] matrix, always high precision.
  router_bias,  ///< e_score_correction_bias [n_routed_experts].
};

struct weight_spec {
  std::string name;
  std::vector<int64_t> shape;
  weight_kind kind = weight_kind::projection;
  int64_t layer = -1;   ///< Decoder layer (MTP blocks continue the numbering); -1: global.
  int64_t expert = -1;  ///< Routed expert index; -1 otherwise.
  bool mtp = false;     ///< Belongs to a multi-token-prediction module.
  bool optional = false;  ///< May be absent (an MTP module's own embedding and head).

  [[nodiscard]] int64_t num_elements() const noexcept;
};

/// Every tensor of the checkpoint in a stable order (global first, then layer by layer, MTP
/// modules last when include_mtp).
[[nodiscard]] std::vector<weight_spec> expected_weights(const model_config& config,
                                                        bool include_mtp = true);

/// "model.layers.{layer}.{suffix}"
[[nodiscard]] std::string layer_weight_name(int64_t layer, std::string_view suffix);
/// "model.layers.{layer}.mlp.experts.{expert}.{projection}.weight", projection gate_proj/up_proj/down_proj.
[[nodiscard]] std::string expert_weight_name(int64_t layer, int64_t expert,
                                             std::string_view projection);
/// "<weight name>_scale_inv": the FP8 block scales of a projection weight.
[[nodiscard]] std::string scale_name(std::string_view weight_name);

/// Parameters of the model: the non-optional tensors (MTP modules when include_mtp).
[[nodiscard]] int64_t count_parameters(const model_config& config, bool include_mtp = true);
/// Of which activated per token: embedding and head, attention, dense MLPs, shared experts,
/// num_experts_per_tok routed experts, gates and norms.
[[nodiscard]] int64_t count_active_parameters(const model_config& config,
                                              bool include_mtp = true);

}  // namespace moe::model
