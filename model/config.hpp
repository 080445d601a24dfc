// The configuration of a DeepSeek-V3-family model: the hub's config.json as a validated value.
//
// parse_config/load_config read the config.json of a DeepSeek-V3 hub checkpoint, or one written by
// transformers 5 (which spells RoPE as `rope_parameters` with `rope_theta` inside and may write
// `dtype` for `torch_dtype`), and return a model_config whose fields are mutually consistent, or
// an error naming the file and the key ("config.json: rope_scaling.type: unsupported value 'foo'
// (expected yarn or default)").
//
// Key policy. Every key of config.json falls in one of three sets:
//  - parsed: it changes tensor shapes or the math. It is read and validated, and a value this
//    runtime does not implement (scoring_func softmax, topk_method greedy, hidden_act gelu, RoPE
//    type linear, attention_bias true, an FP8 block other than 128x128, ...) is an error naming
//    the key, never a silent fallback.
//  - known and inert: bookkeeping (architectures, auto_map, transformers_version, use_cache,
//    ep_size, pretraining_tp, ...) and training-only settings that do not change the forward pass
//    (aux_loss_alpha, seq_aux). Accepted and listed in model_config::inert_keys for logging.
//    initializer_range is parsed (init_model uses it) although inference ignores it.
//  - unknown: an error by default, because ignoring a key we do not know might change the math.
//    config_parse_options::allow_unknown_keys accepts them and lists them in
//    model_config::unknown_keys, for configs from a newer transformers that adds bookkeeping keys.
//
// model_type deepseek_v3 is the target. deepseek_v2 is accepted when the config describes the
// same structure, which means V3 routing (scoring_func sigmoid, topk_method noaux_tc, written
// explicitly since V2's defaults differ); real V2 checkpoints route with softmax/greedy and are
// rejected at those keys.
//
// Field names follow config.json (n_routed_experts, not num_routed_experts) so that a reader can
// grep one name across the hub file, transformers and this code.
//
// Thread safety: plain values; every function is pure and may run on any thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "base/error.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/dtype.hpp"

namespace moe::model {

enum class rope_kind : uint8_t {
  none,  ///< Plain RoPE ("rope_scaling": null, or rope_type "default").
  yarn,  ///< YaRN, as DeepSeek-V3 ships it.
};

/// RoPE for the qk_rope_head_dim part of queries and keys.
struct rope_config {
  rope_kind kind = rope_kind::none;
  double theta = 10000.0;
  // YaRN only (ignored when kind == none):
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  /// 0 means absent: transformers tests these with Python truthiness, so 0.0 and a missing key
  /// select the same formula, and keeping one representation keeps the two formulas in one place.
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
  /// Overrides the cos/sin multiplier when present (transformers' yarn `attention_factor`).
  std::optional<double> attention_factor;
  /// Floor/ceil the correction range (transformers' yarn `truncate`, default true).
  bool truncate = true;

  bool operator==(const rope_config&) const = default;
};

enum class scoring_func : uint8_t { sigmoid };  ///< DeepSeek-V3 gate; softmax is V2 and rejected.
enum class topk_method : uint8_t { noaux_tc };  ///< Group-limited top-k with the bias correction.

/// DeepSeek-V3's FP8 checkpoint format: float8_e4m3fn weights, one float32 `weight_scale_inv`
/// per block (dequantised = fp8 value x scale of its block).
struct fp8_quant_config {
  int64_t block_rows = 128;
  int64_t block_cols = 128;
  bool operator==(const fp8_quant_config&) const = default;
};

struct model_config {
  std::string model_type = "deepseek_v3";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      ///< Dense MLP layers (layer < first_k_dense_replace).
  int64_t moe_intermediate_size = 0;  ///< One routed expert; shared experts are n_shared times it.
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  ///< Equals num_attention_heads: MLA expands K/V per head.
  std::optional<int64_t> q_lora_rank;  ///< nullopt: plain q_proj, no query compression.
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  scoring_func scoring = scoring_func::sigmoid;
  topk_method topk = topk_method::noaux_tc;
  double rms_norm_eps = 1e-6;
  rope_config rope;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  int64_t num_nextn_predict_layers = 0;  ///< Multi-token-prediction modules after the last layer.
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  ///< config.json may hold one id or a list.
  kernels::dtype torch_dtype = kernels::dtype::bf16;
  double initializer_range = 0.02;
  std::optional<fp8_quant_config> quantization;

  /// Keys present in config.json that were accepted without effect (see the key policy above).
  std::vector<std::string> inert_keys;
  /// Unknown keys, only ever non-empty with allow_unknown_keys.
  std::vector<std::string> unknown_keys;

  [[nodiscard]] int64_t qk_head_dim() const noexcept { return qk_nope_head_dim + qk_rope_head_dim; }
  [[nodiscard]] int64_t experts_per_group() const noexcept { return n_routed_experts / n_group; }
  [[nodiscard]] int64_t shared_intermediate_size() const noexcept {
    return moe_intermediate_size * n_shared_experts;
  }
  /// DeepSeek's rule: layer >= first_k_dense_replace and layer % moe_layer_freq == 0. Applies to
  /// MTP blocks too (their index continues after the last hidden layer).
  [[nodiscard]] bool is_moe_layer(int64_t layer) const noexcept {
    return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
};

struct config_parse_options {
  /// Accept unknown keys (listed in model_config::unknown_keys) instead of failing on them.
  bool allow_unknown_keys = false;
  /// Names the source in error messages.
  std::string source = "config.json";
};

[[nodiscard]] caf::expected<model_config> parse_config(const nlohmann::json& json,
                                                       const config_parse_options& options = {});
[[nodiscard]] caf::expected<model_config> parse_config(std::string_view json_text,
                                                       const config_parse_options& options = {});

/// Reads `dir_or_file`/config.json (or the file itself); messages name the file's path.
[[nodiscard]] caf::expected<model_config> load_config(const std::filesystem::path& dir_or_file,
                                                      config_parse_options options = {});

/// Checks the cross-field invariants parse_config enforces; for configs built in code (presets).
[[nodiscard]] caf::expected<void> validate_config(const model_config& config);

/// A hub-style config.json (rope_scaling form, DeepseekV3ForCausalLM) that parse_config reads
/// back to an equal config; inert and unknown keys are not written.
[[nodiscard]] nlohmann::json to_json(const model_config& config);
[[nodiscard]] caf::expected<void> save_config(const model_config& config,
                                              const std::filesystem::path& file);

/// The RoPE kernel's parameters for this model (kernels/cpu/rope.hpp holds the YaRN formulas,
/// once). model_errc::bad_config for the variants the kernel lacks: an explicit
/// attention_factor or truncate = false.
[[nodiscard]] caf::expected<kernels::cpu::rope_params> rope_kernel_params(const model_config& config);
/// qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim set.
/// Requires rope_kernel_params(config) to succeed (asserted).
[[nodiscard]] double attention_softmax_scale(const model_config& config);

}  // namespace moe::model
