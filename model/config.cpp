#include "model/config.hpp"

#include "base/assert.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/json_reader.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace {

// Bookkeeping and training-only keys of hub and transformers configs: present in real files,
// without effect on the forward pass. Anything not parsed and not listed here is unknown.
constexpr std::string_view inert_key_list[] = {
    // hub / remote-code bookkeeping
    "architectures", "auto_map", "transformers_version", "_name_or_path", "use_cache",
    "pretraining_tp", "ep_size", "num_experts", "pad_token_id", "tokenizer_class",
    // training-only: the sequence-wise auxiliary loss (weight and switch)
    "aux_loss_alpha", "seq_aux",
    // generic PretrainedConfig fields transformers writes with to_dict()
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "tie_encoder_decoder", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "chunk_size_feed_forward",
    "finetuning_task", "id2label", "label2id", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "output_router_logits", "router_aux_loss_coef",
    // generation defaults older transformers wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens"};

constexpr int64_t max_size = std::numeric_limits<int32_t>::max();

std::optional<kernels::dtype> dtype_from_torch_name(std::string_view name) {
  if (name == "float32" || name == "float") return kernels::dtype::f32;
  if (name == "bfloat16") return kernels::dtype::bf16;
  if (name == "float16" || name == "half") return kernels::dtype::f16;
  return std::nullopt;
}

std::string_view torch_name(kernels::dtype t) {
  switch (t) {
    case kernels::dtype::f32: return "float32";
    case kernels::dtype::f16: return "float16";
    default: return "bfloat16";
  }
}

std::string format_number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// The RoPE one of `rope_scaling` / `rope_parameters` describes; nullopt when absent or null.
// `theta` is set when the object names rope_theta.
struct parsed_rope {
  rope_config rope;
  std::optional<double> theta;
};

std::optional<parsed_rope> read_rope(json_object_reader& parent, std::string_view key,
                                     int64_t max_position_embeddings,
                                     const config_parse_options& options, model_config& out) {
  const nlohmann::json* v = parent.child(key);
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (!v->is_object()) {
    parent.fail(key, "expected an object or null, got " + json_object_reader::describe(*v));
    return std::nullopt;
  }
  json_object_reader r(*v, parent.source(), std::string(key) + ".", model_errc::bad_config);
  std::string type = r.string_or("type", "");
  std::string rope_type = r.string_or("rope_type", "");
  if (!type.empty() && !rope_type.empty() && type != rope_type) {
    r.fail("rope_type", "'" + rope_type + "' disagrees with type '" + type + "'");
  }
  std::string_view kind_key = rope_type.empty() ? "type" : "rope_type";
  std::string kind = rope_type.empty() ? type : rope_type;
  parsed_rope out_rope;
  out_rope.theta = r.optional_number("rope_theta");
  if (kind.empty()) {
    r.fail("rope_type", "missing (expected yarn or default)");
  } else if (kind == "yarn") {
    rope_config& y = out_rope.rope;
    y.kind = rope_kind::yarn;
    y.factor = r.number("factor");
    y.original_max_position_embeddings =
        r.integer_or("original_max_position_embeddings", max_position_embeddings);
    y.beta_fast = r.number_or("beta_fast", 32.0);
    y.beta_slow = r.number_or("beta_slow", 1.0);
    y.mscale = r.number_or("mscale", 0.0);
    y.mscale_all_dim = r.number_or("mscale_all_dim", 0.0);
    y.attention_factor = r.optional_number("attention_factor");
    y.truncate = r.boolean_or("truncate", true);
  } else if (kind != "default") {
    r.fail(kind_key, "unsupported value '" + kind + "' (expected yarn or default)");
  }
  for (const auto& k : r.unread_keys()) {
    if (options.allow_unknown_keys) {
      out.unknown_keys.push_back(std::string(key) + "." + k);
    } else {
      r.fail(k, "unknown key for rope type '" + kind + "'");
    }
  }
  if (!r.ok()) {
    parent.absorb(r);
    return std::nullopt;
  }
  return out_rope;
}

std::optional<fp8_quant_config> read_quantization(json_object_reader& parent,
                                                  const config_parse_options& options,
                                                  model_config& out) {
  const nlohmann::json* v = parent.child("quantization_config");
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (!v->is_object()) {
    parent.fail("quantization_config",
                "expected an object or null, got " + json_object_reader::describe(*v));
    return std::nullopt;
  }
  json_object_reader r(*v, parent.source(), "quantization_config.", model_errc::bad_config);
  fp8_quant_config q;
  std::string method = r.string("quant_method");
  if (r.ok() && method != "fp8") {
    r.fail("quant_method", "unsupported value '" + method + "' (expected fp8)");
  }
  std::string fmt = r.string_or("fmt", "e4m3");
  if (fmt != "e4m3") r.fail("fmt", "unsupported value '" + fmt + "' (expected e4m3)");
  // Static activation scales would arrive as extra input_scale tensors we do not read.
  std::string scheme = r.string_or("activation_scheme", "dynamic");
  if (scheme != "dynamic") {
    r.fail("activation_scheme", "unsupported value '" + scheme + "' (expected dynamic)");
  }
  const nlohmann::json* block = r.child("weight_block_size");
  if (block == nullptr || block->is_null()) {
    r.fail("weight_block_size", "missing (expected [128, 128])");
  } else if (!block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
             !(*block)[1].is_number_integer()) {
    r.fail("weight_block_size", "expected [128, 128], got " + json_object_reader::describe(*block));
  } else {
    q.block_rows = (*block)[0].get<int64_t>();
    q.block_cols = (*block)[1].get<int64_t>();
    if (q.block_rows != 128 || q.block_cols != 128) {
      r.fail("weight_block_size",
             "unsupported value " + block->dump() + " (expected [128, 128], DeepSeek-V3's blocks)");
    }
  }
  for (const auto& k : r.unread_keys()) {
    if (options.allow_unknown_keys) {
      out.unknown_keys.push_back("quantization_config." + k);
    } else {
      r.fail(k, "unknown key");
    }
  }
  if (!r.ok()) {
    parent.absorb(r);
    return std::nullopt;
  }
  return q;
}

// Resolves rope_theta (top level, or inside rope_scaling / rope_parameters: all given values
// must agree) and the two spellings of the RoPE object (which must agree when both are given).
void read_rope_fields(json_object_reader& r, const config_parse_options& options,
                      model_config& c) {
  std::optional<double> theta = r.optional_number("rope_theta");
  auto scaling = read_rope(r, "rope_scaling", c.max_position_embeddings, options, c);
  auto parameters = read_rope(r, "rope_parameters", c.max_position_embeddings, options, c);
  std::string theta_from = "rope_theta";
  const std::pair<const std::optional<parsed_rope>*, std::string_view> objects[] = {
      {&scaling, "rope_scaling"}, {&parameters, "rope_parameters"}};
  for (const auto& [p, name] : objects) {
    if (!*p || !(*p)->theta) continue;
    double inner = *(*p)->theta;
    if (theta && *theta != inner) {
      r.fail(std::string(name) + ".rope_theta",
             format_number(inner) + " disagrees with " + theta_from + " " + format_number(*theta));
    }
    theta = inner;
    theta_from = std::string(name) + ".rope_theta";
  }
  if (scaling && parameters && !(scaling->rope == parameters->rope)) {
    r.fail("rope_parameters", "disagrees with rope_scaling; give one of them");
  }
  if (parameters) c.rope = parameters->rope;
  if (scaling) c.rope = scaling->rope;
  c.rope.theta = theta.value_or(10000.0);
}

void read_token_ids(json_object_reader& r, model_config& c) {
  c.bos_token_id = r.optional_integer("bos_token_id");
  const nlohmann::json* eos = r.child("eos_token_id");
  if (eos == nullptr || eos->is_null()) return;
  if (eos->is_number_integer()) {
    c.eos_token_ids = {eos->get<int64_t>()};
  } else if (eos->is_array() && std::all_of(eos->begin(), eos->end(),
                                            [](const auto& e) { return e.is_number_integer(); })) {
    for (const auto& e : *eos) c.eos_token_ids.push_back(e.get<int64_t>());
  } else {
    r.fail("eos_token_id", "expected an integer or a list of integers, got " +
                               json_object_reader::describe(*eos));
  }
}

// Keys transformers derives from others and writes back; they must agree with their sources.
void check_derived_keys(json_object_reader& r, const model_config& c) {
  if (auto head_dim = r.optional_integer("head_dim"); head_dim && *head_dim != c.qk_rope_head_dim) {
    r.fail("head_dim", std::to_string(*head_dim) + " disagrees with qk_rope_head_dim " +
                           std::to_string(c.qk_rope_head_dim));
  }
  if (auto qk = r.optional_integer("qk_head_dim"); qk && *qk != c.qk_head_dim()) {
    r.fail("qk_head_dim", std::to_string(*qk) + " disagrees with qk_nope_head_dim + " +
                              "qk_rope_head_dim = " + std::to_string(c.qk_head_dim()));
  }
}

// Keys whose only supported value is the V3 one: any other value would change the math.
void check_fixed_keys(json_object_reader& r, bool v3_defaults, model_config& c) {
  std::string act = r.string_or("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", "unsupported value '" + act + "' (expected silu)");
  if (r.boolean_or("attention_bias", false)) {
    r.fail("attention_bias", "true is not supported (DeepSeek-V3 projections have no bias)");
  }
  if (r.boolean_or("mlp_bias", false)) {
    r.fail("mlp_bias", "true is not supported (DeepSeek-V3 projections have no bias)");
  }
  if (double p = r.number_or("attention_dropout", 0.0); p != 0.0) {
    r.fail("attention_dropout", format_number(p) + " is not supported (expected 0.0)");
  }
  if (!r.boolean_or("rope_interleave", true)) {
    r.fail("rope_interleave",
           "false is not supported (DeepSeek checkpoints store rotary dims interleaved)");
  }
  // DeepSeek-V2's defaults are softmax/greedy, so a V2 config must name V3 routing explicitly.
  const char* why_v2 = " is DeepSeek-V2 routing, not implemented";
  std::string scoring = v3_defaults ? r.string_or("scoring_func", "sigmoid")
                                    : r.string("scoring_func");
  if (r.ok() && scoring != "sigmoid") {
    r.fail("scoring_func", "unsupported value '" + scoring + "' (expected sigmoid; " + scoring +
                               (scoring == "softmax" ? why_v2 : "") + ")");
  }
  std::string method = v3_defaults ? r.string_or("topk_method", "noaux_tc")
                                   : r.string("topk_method");
  if (r.ok() && method != "noaux_tc") {
    bool v2 = method == "greedy" || method == "group_limited_greedy";
    r.fail("topk_method", "unsupported value '" + method + "' (expected noaux_tc" +
                              (v2 ? std::string("; ") + method + why_v2 : std::string()) + ")");
  }
  c.scoring = scoring_func::sigmoid;
  c.topk = topk_method::noaux_tc;
}

caf::error config_error(const std::string& source, std::string_view field,
                        const std::string& message) {
  return make_error(model_errc::bad_config,
                    source + ": " + std::string(field) + ": " + message);
}

// Each dimension is plausible on its own (validate_impl), but their products are what the runtime
// computes: expected_weights() lists (layers + MTP modules) x routed experts tensors, and shape
// extents, element counts, byte counts and their sums are int64. A config.json must not make a
// loader list billions of tensors or overflow a size, so both are bounded here, in long double
// (exact enough for a bound). The extents are those of expected_weights() (model/weights.cpp).
template <class Fail>
caf::expected<void> check_model_size(const model_config& c, Fail&& err) {
  constexpr long double max_tensors = 1 << 22;        // DeepSeek-V3: about 49 thousand
  constexpr long double max_parameters = 1ull << 60;  // DeepSeek-V3: 6.7e11
  using real = long double;
  const real layers = static_cast<real>(c.num_hidden_layers) + static_cast<real>(c.num_nextn_predict_layers);
  // Per block at most 9 attention tensors and norms, the gate and its bias, 3 per routed expert
  // and 3 shared; an MTP module adds 6; embedding, final norm and head.
  const real num_tensors = layers * (20 + 3 * static_cast<real>(c.n_routed_experts)) + 8;
  if (num_tensors > max_tensors) {
    return err("num_hidden_layers",
               std::to_string(c.num_hidden_layers) + " layers and " + std::to_string(c.num_nextn_predict_layers) +
                   " MTP modules of " + std::to_string(c.n_routed_experts) + " routed experts make more than " +
                   std::to_string(static_cast<int64_t>(max_tensors)) + " tensors, more than this runtime lists");
  }
  const real h = static_cast<real>(c.hidden_size);
  const real heads = static_cast<real>(c.num_attention_heads);
  const real extents[] = {
      2 * h,
      static_cast<real>(c.vocab_size),
      static_cast<real>(c.q_lora_rank.value_or(0)),
      heads * static_cast<real>(c.qk_head_dim()),
      static_cast<real>(c.kv_lora_rank) + static_cast<real>(c.qk_rope_head_dim),
      heads * (static_cast<real>(c.qk_nope_head_dim) + static_cast<real>(c.v_head_dim)),
      static_cast<real>(c.intermediate_size),
      static_cast<real>(c.moe_intermediate_size) * std::max<real>(1, static_cast<real>(c.n_shared_experts)),
      static_cast<real>(c.n_routed_experts),
  };
  const real max_extent = *std::max_element(std::begin(extents), std::end(extents));
  // Every tensor is a vector or a matrix: at most max_extent^2 elements each.
  if (num_tensors * max_extent * max_extent > max_parameters) {
    return err("hidden_size", "the shapes this config gives its tensors (the largest extent is " +
                                  format_number(static_cast<double>(max_extent)) +
                                  ") may add up to more than 2^60 parameters, more than this runtime sizes");
  }
  return {};
}

caf::expected<void> validate_impl(const model_config& c, const std::string& source) {
  auto err = [&](std::string_view field, const std::string& message) -> caf::expected<void> {
    return config_error(source, field, message);
  };
  if (c.model_type != "deepseek_v3" && c.model_type != "deepseek_v2") {
    return err("model_type", "unsupported value '" + c.model_type + "' (expected deepseek_v3)");
  }
  bool any_dense = std::min(c.first_k_dense_replace, c.num_hidden_layers) > 0 ||
                   c.moe_layer_freq > 1;
  const std::pair<std::string_view, int64_t> positive[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"n_routed_experts", c.n_routed_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"n_group", c.n_group},
      {"topk_group", c.topk_group},
      {"moe_layer_freq", c.moe_layer_freq},
      {"max_position_embeddings", c.max_position_embeddings},
      {"q_lora_rank", c.q_lora_rank.value_or(1)},
      {"intermediate_size", any_dense ? c.intermediate_size : 1},
  };
  for (const auto& [name, value] : positive) {
    if (value <= 0) return err(name, std::to_string(value) + " must be positive");
  }
  const std::pair<std::string_view, int64_t> non_negative[] = {
      {"n_shared_experts", c.n_shared_experts},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers},
      {"intermediate_size", c.intermediate_size},
  };
  for (const auto& [name, value] : non_negative) {
    if (value < 0) return err(name, std::to_string(value) + " must not be negative");
  }
  for (const auto& [name, value] : positive) {
    if (value > max_size) return err(name, std::to_string(value) + " is implausibly large");
  }
  for (const auto& [name, value] : non_negative) {
    if (value > max_size) return err(name, std::to_string(value) + " is implausibly large");
  }
  if (c.num_key_value_heads != c.num_attention_heads) {
    return err("num_key_value_heads",
               std::to_string(c.num_key_value_heads) + " differs from num_attention_heads " +
                   std::to_string(c.num_attention_heads) +
                   " (MLA expands keys and values to every head)");
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return err("qk_rope_head_dim", std::to_string(c.qk_rope_head_dim) + " must be even");
  }
  if (c.first_k_dense_replace > c.num_hidden_layers) {
    return err("first_k_dense_replace", std::to_string(c.first_k_dense_replace) +
                                            " exceeds num_hidden_layers " +
                                            std::to_string(c.num_hidden_layers));
  }
  if (c.n_routed_experts % c.n_group != 0) {
    return err("n_routed_experts", std::to_string(c.n_routed_experts) +
                                       " is not divisible by n_group " + std::to_string(c.n_group));
  }
  if (c.experts_per_group() < 2) {
    return err("n_group", std::to_string(c.n_group) + " leaves " +
                              std::to_string(c.experts_per_group()) +
                              " expert per group; a group's score sums its top 2 experts");
  }
  if (c.topk_group > c.n_group) {
    return err("topk_group", std::to_string(c.topk_group) + " exceeds n_group " +
                                 std::to_string(c.n_group));
  }
  if (c.num_experts_per_tok > c.topk_group * c.experts_per_group()) {
    return err("num_experts_per_tok",
               std::to_string(c.num_experts_per_tok) + " exceeds the " +
                   std::to_string(c.topk_group * c.experts_per_group()) +
                   " experts in topk_group " + std::to_string(c.topk_group) + " groups of " +
                   std::to_string(c.experts_per_group()));
  }
  auto positive_finite = [](double v) { return std::isfinite(v) && v > 0.0; };
  if (!positive_finite(c.routed_scaling_factor)) {
    return err("routed_scaling_factor", format_number(c.routed_scaling_factor) + " must be positive");
  }
  if (!positive_finite(c.rms_norm_eps)) {
    return err("rms_norm_eps", format_number(c.rms_norm_eps) + " must be positive");
  }
  if (!std::isfinite(c.initializer_range) || c.initializer_range < 0.0) {
    return err("initializer_range", format_number(c.initializer_range) + " must be >= 0");
  }
  if (!positive_finite(c.rope.theta)) {
    return err("rope_theta", format_number(c.rope.theta) + " must be positive");
  }
  if (c.rope.kind == rope_kind::yarn) {
    const std::pair<std::string_view, double> yarn_positive[] = {
        {"rope_scaling.factor", c.rope.factor},
        {"rope_scaling.original_max_position_embeddings",
         static_cast<double>(c.rope.original_max_position_embeddings)},
        {"rope_scaling.beta_fast", c.rope.beta_fast},
        {"rope_scaling.beta_slow", c.rope.beta_slow},
        {"rope_scaling.attention_factor", c.rope.attention_factor.value_or(1.0)},
    };
    for (const auto& [name, value] : yarn_positive) {
      if (!positive_finite(value)) return err(name, format_number(value) + " must be positive");
    }
    if (!std::isfinite(c.rope.mscale) || c.rope.mscale < 0.0) {
      return err("rope_scaling.mscale", format_number(c.rope.mscale) + " must be >= 0");
    }
    if (!std::isfinite(c.rope.mscale_all_dim) || c.rope.mscale_all_dim < 0.0) {
      return err("rope_scaling.mscale_all_dim",
                 format_number(c.rope.mscale_all_dim) + " must be >= 0");
    }
  }
  auto check_token = [&](std::string_view name, int64_t id) -> caf::expected<void> {
    if (id < 0 || id >= c.vocab_size) {
      return err(name, std::to_string(id) + " is outside the vocabulary [0, " +
                           std::to_string(c.vocab_size) + ")");
    }
    return {};
  };
  if (c.bos_token_id) {
    if (auto ok = check_token("bos_token_id", *c.bos_token_id); !ok) return ok;
  }
  for (int64_t id : c.eos_token_ids) {
    if (auto ok = check_token("eos_token_id", id); !ok) return ok;
  }
  if (c.torch_dtype != kernels::dtype::f32 && c.torch_dtype != kernels::dtype::bf16 &&
      c.torch_dtype != kernels::dtype::f16) {
    return err("torch_dtype", "unsupported value '" + std::string(kernels::to_string(c.torch_dtype)) +
                                  "' (expected float32, bfloat16 or float16)");
  }
  if (c.quantization && (c.quantization->block_rows != 128 || c.quantization->block_cols != 128)) {
    return err("quantization_config.weight_block_size",
               "unsupported value [" + std::to_string(c.quantization->block_rows) + ", " +
                   std::to_string(c.quantization->block_cols) + "] (expected [128, 128])");
  }
  return check_model_size(c, err);
}


}  // namespace

caf::expected<model_config> parse_config(const nlohmann::json& json,
                                         const config_parse_options& options) {
  if (!json.is_object()) {
    return make_error(model_errc::bad_config,
                      options.source + ": expected a JSON object, got " +
                          json_object_reader::describe(json));
  }
  json_object_reader r(json, options.source, "", model_errc::bad_config);
  model_config c;
  c.model_type = r.string("model_type");
  if (r.ok() && c.model_type != "deepseek_v3" && c.model_type != "deepseek_v2") {
    r.fail("model_type", "unsupported value '" + c.model_type + "' (expected deepseek_v3)");
  }
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.moe_intermediate_size = r.integer("moe_intermediate_size");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_key_value_heads = r.integer_or("num_key_value_heads", c.num_attention_heads);
  // transformers' default for an absent q_lora_rank is 1536, which is never what a small config
  // means; requiring the key (null for "no compression") removes the ambiguity.
  if (!r.has("q_lora_rank")) r.fail("q_lora_rank", "missing (null selects a plain q_proj)");
  c.q_lora_rank = r.optional_integer("q_lora_rank");
  c.kv_lora_rank = r.integer("kv_lora_rank");
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim");
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim");
  c.v_head_dim = r.integer("v_head_dim");
  c.n_routed_experts = r.integer("n_routed_experts");
  c.n_shared_experts = r.integer("n_shared_experts");
  c.num_experts_per_tok = r.integer("num_experts_per_tok");
  c.n_group = r.integer("n_group");
  c.topk_group = r.integer("topk_group");
  c.first_k_dense_replace = r.integer("first_k_dense_replace");
  c.moe_layer_freq = r.integer_or("moe_layer_freq", 1);
  c.norm_topk_prob = r.boolean("norm_topk_prob");
  c.routed_scaling_factor = r.number("routed_scaling_factor");
  c.rms_norm_eps = r.number_or("rms_norm_eps", 1e-6);
  c.max_position_embeddings = r.integer_or("max_position_embeddings", 4096);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.num_nextn_predict_layers = r.integer_or("num_nextn_predict_layers", 0);
  c.initializer_range = r.number_or("initializer_range", 0.02);
  check_fixed_keys(r, c.model_type != "deepseek_v2", c);
  check_derived_keys(r, c);
  read_rope_fields(r, options, c);
  read_token_ids(r, c);
  // transformers 5 writes `dtype`, earlier versions `torch_dtype`.
  std::string dtype_key = r.has_non_null("dtype") ? "dtype" : "torch_dtype";
  std::string dtype_name = r.string_or(dtype_key, "bfloat16");
  if (r.has_non_null("dtype") && r.has_non_null("torch_dtype") &&
      r.string("torch_dtype") != dtype_name) {
    r.fail("torch_dtype", "disagrees with dtype '" + dtype_name + "'");
  }
  if (auto t = dtype_from_torch_name(dtype_name)) {
    c.torch_dtype = *t;
  } else if (r.ok()) {
    r.fail(dtype_key, "unsupported value '" + dtype_name +
                          "' (expected float32, bfloat16 or float16)");
  }
  c.quantization = read_quantization(r, options, c);
  for (std::string_view key : inert_key_list) {
    if (r.has(key)) {
      r.skip(key);
      c.inert_keys.emplace_back(key);
    }
  }
  for (const auto& key : r.unread_keys()) {
    if (options.allow_unknown_keys) {
      c.unknown_keys.push_back(key);
    } else {
      r.fail(key, "unknown key (it might change the model's math, so it is not ignored; "
                  "allow_unknown_keys accepts it)");
    }
  }
  if (!r.ok()) return r.error();
  if (auto ok = validate_impl(c, options.source); !ok) return ok.error();
  return c;
}

caf::expected<model_config> parse_config(std::string_view json_text,
                                         const config_parse_options& options) {
  parsed_json parsed = parse_json_file_text(json_text);
  if (parsed.too_deep) {
    return make_error(model_errc::bad_config, options.source + ": invalid JSON: nested deeper than " +
                                                  std::to_string(max_json_depth) + " levels");
  }
  if (!parsed.ok()) {
    // Re-parse with exceptions only to obtain the position of the syntax error.
    try {
      [[maybe_unused]] auto unused = nlohmann::json::parse(json_text);
    } catch (const nlohmann::json::exception& e) {
      return make_error(model_errc::bad_config, options.source + ": invalid JSON: " + e.what());
    }
    return make_error(model_errc::bad_config, options.source + ": invalid JSON");
  }
  return parse_config(parsed.value, options);
}

caf::expected<model_config> load_config(const std::filesystem::path& dir_or_file,
                                        config_parse_options options) {
  std::error_code ec;
  std::filesystem::path file = dir_or_file;
  if (std::filesystem::is_directory(dir_or_file, ec)) file /= "config.json";
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    return make_error(model_errc::io_error, file.string() + ": cannot open for reading");
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return make_error(model_errc::io_error, file.string() + ": read failed");
  if (options.source == config_parse_options{}.source) options.source = file.string();
  return parse_config(std::string_view{text.str()}, options);
}

caf::expected<void> validate_config(const model_config& config) {
  return validate_impl(config, "model config");
}

nlohmann::json to_json(const model_config& c) {
  nlohmann::json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["q_lora_rank"] = c.q_lora_rank ? nlohmann::json(*c.q_lora_rank) : nlohmann::json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope.theta;
  if (c.rope.kind == rope_kind::yarn) {
    nlohmann::json y;
    y["type"] = "yarn";
    y["factor"] = c.rope.factor;
    y["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
    y["beta_fast"] = c.rope.beta_fast;
    y["beta_slow"] = c.rope.beta_slow;
    if (c.rope.mscale != 0.0) y["mscale"] = c.rope.mscale;
    if (c.rope.mscale_all_dim != 0.0) y["mscale_all_dim"] = c.rope.mscale_all_dim;
    if (c.rope.attention_factor) y["attention_factor"] = *c.rope.attention_factor;
    if (!c.rope.truncate) y["truncate"] = false;
    j["rope_scaling"] = y;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["bos_token_id"] = c.bos_token_id ? nlohmann::json(*c.bos_token_id) : nlohmann::json(nullptr);
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids.front();
  } else if (c.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  j["torch_dtype"] = torch_name(c.torch_dtype);
  j["initializer_range"] = c.initializer_range;
  if (c.quantization) {
    j["quantization_config"] = {
        {"quant_method", "fp8"},
        {"fmt", "e4m3"},
        {"activation_scheme", "dynamic"},
        {"weight_block_size", {c.quantization->block_rows, c.quantization->block_cols}}};
  }
  return j;
}

caf::expected<void> save_config(const model_config& config, const std::filesystem::path& file) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) return make_error(model_errc::io_error, file.string() + ": cannot open for writing");
  out << to_json(config).dump(2) << '\n';
  out.close();
  if (!out) return make_error(model_errc::io_error, file.string() + ": write failed");
  return {};
}

caf::expected<kernels::cpu::rope_params> rope_kernel_params(const model_config& c) {
  kernels::cpu::rope_params p;
  p.head_dim = static_cast<size_t>(c.qk_rope_head_dim);
  p.theta = c.rope.theta;
  if (c.rope.kind == rope_kind::yarn) {
    if (c.rope.attention_factor || !c.rope.truncate) {
      return make_error(model_errc::bad_config,
                        "rope_scaling: attention_factor and truncate=false are not supported");
    }
    p.has_yarn = true;
    p.factor = c.rope.factor;
    p.original_max_pos = static_cast<double>(c.rope.original_max_position_embeddings);
    p.beta_fast = c.rope.beta_fast;
    p.beta_slow = c.rope.beta_slow;
    p.mscale = c.rope.mscale;
    p.mscale_all_dim = c.rope.mscale_all_dim;
  }
  if (kernels::cpu::rope_check(p) != kernels::kernel_status::ok)
    return make_error(model_errc::bad_config, "rope parameters rejected by the RoPE kernel");
  return p;
}

double attention_softmax_scale(const model_config& c) {
  auto p = rope_kernel_params(c);
  MOE_ASSERT(p);
  return std::pow(static_cast<double>(c.qk_head_dim()), -0.5) *
         kernels::cpu::rope_softmax_scale_multiplier(*p);
}

}  // namespace moe::model
