#include "model/config.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include <nlohmann/json.hpp>

#include "model/weights.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

using testing::error_of;
using testing::read_file;

const std::filesystem::path data_dir = MOE_TEST_DATA_DIR;

nlohmann::json tiny_json() {
  return nlohmann::json::parse(read_file(data_dir / "tiny-v3" / "config.json"));
}

TEST(config, tiny_v3_fixture) {
  auto c = load_config(data_dir / "tiny-v3");
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->model_type, "deepseek_v3");
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 128);
  EXPECT_EQ(c->moe_intermediate_size, 32);
  EXPECT_EQ(c->num_hidden_layers, 3);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->q_lora_rank, 32);
  EXPECT_EQ(c->kv_lora_rank, 16);
  EXPECT_EQ(c->qk_nope_head_dim, 16);
  EXPECT_EQ(c->qk_rope_head_dim, 8);
  EXPECT_EQ(c->v_head_dim, 16);
  EXPECT_EQ(c->qk_head_dim(), 24);
  EXPECT_EQ(c->n_routed_experts, 16);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->n_group, 4);
  EXPECT_EQ(c->topk_group, 2);
  EXPECT_EQ(c->experts_per_group(), 4);
  EXPECT_EQ(c->first_k_dense_replace, 1);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->max_position_embeddings, 163840);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->num_nextn_predict_layers, 0);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{1});
  EXPECT_EQ(c->torch_dtype, kernels::dtype::f32);
  EXPECT_DOUBLE_EQ(c->initializer_range, 0.1);
  EXPECT_FALSE(c->quantization);
  EXPECT_EQ(c->rope.kind, rope_kind::yarn);
  EXPECT_DOUBLE_EQ(c->rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(c->rope.factor, 40.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c->rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c->rope.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c->rope.mscale, 1.0);
  EXPECT_DOUBLE_EQ(c->rope.mscale_all_dim, 1.0);
  EXPECT_TRUE(c->rope.truncate);
  EXPECT_FALSE(c->rope.attention_factor);
  EXPECT_EQ(c->inert_keys, std::vector<std::string>{"architectures"});
  EXPECT_TRUE(c->unknown_keys.empty());
  EXPECT_FALSE(c->is_moe_layer(0));
  EXPECT_TRUE(c->is_moe_layer(1));
  EXPECT_TRUE(c->is_moe_layer(2));
}

TEST(config, small_v3_fp8_fixture) {
  auto c = load_config(data_dir / "small-v3-fp8" / "config.json");
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->vocab_size, 1024);
  EXPECT_EQ(c->hidden_size, 256);
  EXPECT_EQ(c->intermediate_size, 512);
  EXPECT_EQ(c->moe_intermediate_size, 160);
  EXPECT_EQ(c->num_hidden_layers, 2);
  EXPECT_EQ(c->q_lora_rank, 192);
  EXPECT_EQ(c->kv_lora_rank, 128);
  EXPECT_EQ(c->qk_nope_head_dim, 32);
  EXPECT_EQ(c->qk_rope_head_dim, 16);
  EXPECT_EQ(c->v_head_dim, 32);
  EXPECT_EQ(c->n_routed_experts, 8);
  EXPECT_EQ(c->n_group, 2);
  EXPECT_EQ(c->topk_group, 1);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->torch_dtype, kernels::dtype::bf16);
  EXPECT_DOUBLE_EQ(c->initializer_range, 0.05);
  ASSERT_TRUE(c->quantization);
  EXPECT_EQ(c->quantization->block_rows, 128);
  EXPECT_EQ(c->quantization->block_cols, 128);
}

// DeepSeek-V3's own hub config.json (config only; the weights are 700 GB): every key is known,
// and the tensor list adds up to the published 671B parameters, 37B active.
TEST(config, deepseek_v3_hub_config) {
  auto c = load_config(data_dir / "deepseek-v3");
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->num_hidden_layers, 61);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  EXPECT_EQ(c->rope.kind, rope_kind::yarn);
  EXPECT_DOUBLE_EQ(c->rope.factor, 40.0);
  ASSERT_TRUE(c->quantization);
  EXPECT_TRUE(c->unknown_keys.empty());
  EXPECT_EQ(c->inert_keys.size(), 8u);  // architectures, auto_map, aux_loss_alpha, ep_size, ...
  EXPECT_EQ(count_parameters(*c, /*include_mtp=*/false), 671'026'419'200);
  EXPECT_EQ(count_active_parameters(*c, false), 37'552'297'472);
  // The MTP module: one MoE block plus enorm/hnorm/eh_proj/shared_head.norm (its embedding and
  // head copies are optional and not counted).
  EXPECT_EQ(count_parameters(*c) - count_parameters(*c, false), 11'610'068'224);
  EXPECT_TRUE(c->is_moe_layer(61));
}

TEST(config, yarn_scales_follow_the_reference_formulas) {
  auto c = load_config(data_dir / "tiny-v3");
  ASSERT_TRUE(c) << error_of(c);
  const double m = 0.1 * std::log(40.0) + 1.0;
  auto factor = [&] { return kernels::cpu::rope_attention_factor(*rope_kernel_params(*c)); };
  EXPECT_DOUBLE_EQ(factor(), 1.0);  // mscale / mscale_all_dim
  EXPECT_DOUBLE_EQ(attention_softmax_scale(*c), m * m / std::sqrt(24.0));
  c->rope.mscale_all_dim = 0.0;  // falsy: default attention factor, no softmax correction
  EXPECT_DOUBLE_EQ(factor(), m);
  EXPECT_DOUBLE_EQ(attention_softmax_scale(*c), 1.0 / std::sqrt(24.0));
  c->rope.kind = rope_kind::none;
  EXPECT_DOUBLE_EQ(factor(), 1.0);
  c->rope.kind = rope_kind::yarn;
  c->rope.attention_factor = 0.5;  // a transformers-5 override the kernel does not implement
  ASSERT_FALSE(rope_kernel_params(*c));
  EXPECT_NE(error_of(rope_kernel_params(*c)).find("attention_factor"), std::string::npos);
}

TEST(config, transformers5_rope_parameters) {
  auto j = tiny_json();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "yarn"},   {"rope_theta", 50000.0},
                          {"factor", 8.0},        {"original_max_position_embeddings", 2048},
                          {"beta_fast", 16.0},    {"beta_slow", 2.0},
                          {"mscale", 0.707},      {"mscale_all_dim", 0.707},
                          {"truncate", false}};
  j["dtype"] = "bfloat16";
  j.erase("torch_dtype");
  auto c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->rope.kind, rope_kind::yarn);
  EXPECT_DOUBLE_EQ(c->rope.theta, 50000.0);
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c->rope.beta_fast, 16.0);
  EXPECT_DOUBLE_EQ(c->rope.beta_slow, 2.0);
  EXPECT_DOUBLE_EQ(c->rope.mscale, 0.707);
  EXPECT_FALSE(c->rope.truncate);
  EXPECT_EQ(c->torch_dtype, kernels::dtype::bf16);

  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 20000.0}};
  c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->rope.kind, rope_kind::none);
  EXPECT_DOUBLE_EQ(c->rope.theta, 20000.0);
}

TEST(config, null_rope_scaling_and_missing_yarn_defaults) {
  auto j = tiny_json();
  j["rope_scaling"] = nullptr;
  auto c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->rope.kind, rope_kind::none);

  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}};
  c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 163840);  // max_position_embeddings
  EXPECT_DOUBLE_EQ(c->rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c->rope.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c->rope.mscale, 0.0);
}

TEST(config, null_q_lora_rank_selects_plain_q_proj) {
  auto j = tiny_json();
  j["q_lora_rank"] = nullptr;
  auto c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_FALSE(c->q_lora_rank);
  bool has_q_proj = false;
  for (const auto& w : expected_weights(*c)) {
    EXPECT_EQ(w.name.find("q_a_proj"), std::string::npos) << w.name;
    if (w.name == "model.layers.0.self_attn.q_proj.weight") {
      has_q_proj = true;
      EXPECT_EQ(w.shape, (std::vector<int64_t>{4 * 24, 64}));
    }
  }
  EXPECT_TRUE(has_q_proj);
}

TEST(config, deepseek_v2_only_with_v3_routing) {
  auto j = tiny_json();
  j["model_type"] = "deepseek_v2";
  j.erase("scoring_func");
  auto c = parse_config(j);
  ASSERT_FALSE(c);
  EXPECT_NE(error_of(c).find("scoring_func: missing"), std::string::npos) << error_of(c);

  j = tiny_json();
  j["model_type"] = "deepseek_v2";
  c = parse_config(j);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->model_type, "deepseek_v2");
}

TEST(config, unknown_keys_rejected_unless_allowed) {
  auto j = tiny_json();
  j["use_cache"] = true;
  j["sliding_window"] = 4096;
  auto c = parse_config(j);
  ASSERT_FALSE(c);
  EXPECT_EQ(error_of(c),
            "config.json: sliding_window: unknown key (it might change the model's math, so it is "
            "not ignored; allow_unknown_keys accepts it)");
  config_parse_options lenient;
  lenient.allow_unknown_keys = true;
  c = parse_config(j, lenient);
  ASSERT_TRUE(c) << error_of(c);
  EXPECT_EQ(c->unknown_keys, std::vector<std::string>{"sliding_window"});
  EXPECT_EQ(c->inert_keys, (std::vector<std::string>{"architectures", "use_cache"}));
}

struct bad_case {
  const char* what;
  std::function<void(nlohmann::json&)> mutate;
  const char* message;  ///< Expected substring of the error text.
};

class config_errors : public ::testing::TestWithParam<bad_case> {};

TEST_P(config_errors, name_the_field) {
  auto j = tiny_json();
  GetParam().mutate(j);
  auto c = parse_config(j);
  ASSERT_FALSE(c) << GetParam().what;
  EXPECT_EQ(testing::code_of(c), model_errc::bad_config);
  EXPECT_NE(error_of(c).find(GetParam().message), std::string::npos)
      << GetParam().what << ": " << error_of(c);
  EXPECT_EQ(error_of(c).rfind("config.json: ", 0), 0u) << error_of(c);
}

const bad_case bad_cases[] = {
    {"unknown rope type", [](auto& j) { j["rope_scaling"]["type"] = "foo"; j["rope_scaling"].erase("rope_type"); },
     "rope_scaling.type: unsupported value 'foo' (expected yarn or default)"},
    {"linear rope", [](auto& j) { j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}}; },
     "rope_scaling.rope_type: unsupported value 'linear'"},
    {"type vs rope_type", [](auto& j) { j["rope_scaling"]["rope_type"] = "dynamic"; },
     "rope_scaling.rope_type: 'dynamic' disagrees with type 'yarn'"},
    {"yarn without factor", [](auto& j) { j["rope_scaling"].erase("factor"); },
     "rope_scaling.factor: missing"},
    {"unknown yarn key", [](auto& j) { j["rope_scaling"]["low_freq_factor"] = 1.0; },
     "rope_scaling.low_freq_factor: unknown key"},
    {"rope theta disagreement", [](auto& j) { j["rope_scaling"]["rope_theta"] = 500.0; },
     "rope_scaling.rope_theta: 500 disagrees with rope_theta 10000"},
    {"both rope spellings disagree",
     [](auto& j) { j["rope_parameters"] = {{"rope_type", "default"}}; },
     "rope_parameters: disagrees with rope_scaling"},
    {"missing field", [](auto& j) { j.erase("hidden_size"); }, "hidden_size: missing"},
    {"null field", [](auto& j) { j["kv_lora_rank"] = nullptr; }, "kv_lora_rank: is null"},
    {"missing q_lora_rank", [](auto& j) { j.erase("q_lora_rank"); },
     "q_lora_rank: missing (null selects a plain q_proj)"},
    {"string for integer", [](auto& j) { j["vocab_size"] = "512"; },
     "vocab_size: expected an integer, got string \"512\""},
    {"fractional integer", [](auto& j) { j["n_group"] = 2.5; }, "n_group: expected an integer"},
    {"bool for number", [](auto& j) { j["routed_scaling_factor"] = true; },
     "routed_scaling_factor: expected a number"},
    {"block size", [](auto& j) {
       j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"},
                                   {"weight_block_size", {64, 64}}};
     },
     "quantization_config.weight_block_size: unsupported value [64,64] (expected [128, 128]"},
    {"block size shape", [](auto& j) {
       j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128}}};
     },
     "quantization_config.weight_block_size: expected [128, 128]"},
    {"quant method", [](auto& j) { j["quantization_config"] = {{"quant_method", "gptq"}}; },
     "quantization_config.quant_method: unsupported value 'gptq' (expected fp8)"},
    {"quant fmt", [](auto& j) {
       j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e5m2"},
                                   {"weight_block_size", {128, 128}}};
     },
     "quantization_config.fmt: unsupported value 'e5m2'"},
    {"static activations", [](auto& j) {
       j["quantization_config"] = {{"quant_method", "fp8"}, {"activation_scheme", "static"},
                                   {"weight_block_size", {128, 128}}};
     },
     "quantization_config.activation_scheme: unsupported value 'static'"},
    {"softmax scoring", [](auto& j) { j["scoring_func"] = "softmax"; },
     "scoring_func: unsupported value 'softmax' (expected sigmoid; softmax is DeepSeek-V2"},
    {"greedy topk", [](auto& j) { j["topk_method"] = "greedy"; },
     "topk_method: unsupported value 'greedy' (expected noaux_tc; greedy is DeepSeek-V2"},
    {"gelu", [](auto& j) { j["hidden_act"] = "gelu"; },
     "hidden_act: unsupported value 'gelu' (expected silu)"},
    {"attention bias", [](auto& j) { j["attention_bias"] = true; }, "attention_bias: true"},
    {"rope not interleaved", [](auto& j) { j["rope_interleave"] = false; }, "rope_interleave"},
    {"dropout", [](auto& j) { j["attention_dropout"] = 0.1; }, "attention_dropout: 0.1"},
    {"model type", [](auto& j) { j["model_type"] = "llama"; },
     "model_type: unsupported value 'llama' (expected deepseek_v3)"},
    {"torch dtype", [](auto& j) { j["torch_dtype"] = "int8"; },
     "torch_dtype: unsupported value 'int8'"},
    {"experts not divisible", [](auto& j) { j["n_group"] = 3; },
     "n_routed_experts: 16 is not divisible by n_group 3"},
    {"one expert per group", [](auto& j) { j["n_group"] = 16; j["topk_group"] = 4; },
     "n_group: 16 leaves 1 expert per group"},
    {"topk_group > n_group", [](auto& j) { j["topk_group"] = 5; },
     "topk_group: 5 exceeds n_group 4"},
    {"top-k beyond the chosen groups", [](auto& j) { j["topk_group"] = 1; j["num_experts_per_tok"] = 5; },
     "num_experts_per_tok: 5 exceeds the 4 experts in topk_group 1 groups of 4"},
    {"zero dim", [](auto& j) { j["hidden_size"] = 0; }, "hidden_size: 0 must be positive"},
    {"negative dim", [](auto& j) { j["n_shared_experts"] = -1; },
     "n_shared_experts: -1 must not be negative"},
    {"odd rope dim", [](auto& j) { j["qk_rope_head_dim"] = 7; }, "qk_rope_head_dim: 7 must be even"},
    {"kv heads", [](auto& j) { j["num_key_value_heads"] = 2; },
     "num_key_value_heads: 2 differs from num_attention_heads 4"},
    {"dense layers beyond depth", [](auto& j) { j["first_k_dense_replace"] = 4; },
     "first_k_dense_replace: 4 exceeds num_hidden_layers 3"},
    {"eos outside vocab", [](auto& j) { j["eos_token_id"] = 512; },
     "eos_token_id: 512 is outside the vocabulary [0, 512)"},
    {"eos type", [](auto& j) { j["eos_token_id"] = "x"; }, "eos_token_id: expected an integer"},
    {"negative yarn factor", [](auto& j) { j["rope_scaling"]["factor"] = -1.0; },
     "rope_scaling.factor: -1 must be positive"},
    {"head_dim disagrees", [](auto& j) { j["head_dim"] = 64; },
     "head_dim: 64 disagrees with qk_rope_head_dim 8"},
    {"not an object", [](auto& j) { j["rope_scaling"] = 3; },
     "rope_scaling: expected an object or null, got number 3"},
    // Found by tests/fuzz/model_config_fuzz: each value alone is plausible, but the loaders would
    // list billions of tensors, or shapes would overflow int64.
    {"too many tensors", [](auto& j) { j["num_hidden_layers"] = 2147483647; },
     "num_hidden_layers: 2147483647 layers and 0 MTP modules of 16 routed experts make more than"},
    {"shapes beyond int64", [](auto& j) {
       j["num_attention_heads"] = 2147483647;
       j["num_key_value_heads"] = 2147483647;
       j["qk_nope_head_dim"] = 2147483646;
     },
     "hidden_size: the shapes this config gives its tensors"},
};

INSTANTIATE_TEST_SUITE_P(all, config_errors, ::testing::ValuesIn(bad_cases));

TEST(config, invalid_json_text) {
  auto c = parse_config(std::string_view{"{\"vocab_size\": 5,"});
  ASSERT_FALSE(c);
  EXPECT_EQ(testing::code_of(c), model_errc::bad_config);
  EXPECT_NE(error_of(c).find("config.json: invalid JSON"), std::string::npos) << error_of(c);
  auto top = parse_config(std::string_view{"[1, 2]"});
  ASSERT_FALSE(top);
  EXPECT_NE(error_of(top).find("expected a JSON object"), std::string::npos);
  // Found by fuzzing: messages describing a value printed it recursively, one stack frame per
  // level, so a file of brackets crashed the process that reported it.
  const std::string deep = "{\"vocab_size\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  auto nested = parse_config(std::string_view{deep});
  ASSERT_FALSE(nested);
  EXPECT_NE(error_of(nested).find("config.json: invalid JSON: nested deeper than 64 levels"), std::string::npos)
      << error_of(nested);
}

TEST(config, load_names_the_file) {
  testing::scratch_dir dir;
  auto missing = load_config(dir.path());
  ASSERT_FALSE(missing);
  EXPECT_EQ(testing::code_of(missing), model_errc::io_error);
  EXPECT_NE(error_of(missing).find((dir.path() / "config.json").string()), std::string::npos);

  auto j = tiny_json();
  j["hidden_act"] = "relu";
  testing::write_file(dir / "config.json", j.dump());
  auto bad = load_config(dir.path());
  ASSERT_FALSE(bad);
  EXPECT_EQ(error_of(bad), (dir.path() / "config.json").string() +
                               ": hidden_act: unsupported value 'relu' (expected silu)");
}

TEST(config, to_json_round_trips) {
  for (const char* name : {"tiny-v3", "small-v3-fp8"}) {
    auto c = load_config(data_dir / name);
    ASSERT_TRUE(c) << error_of(c);
    auto j = to_json(*c);
    auto again = parse_config(j);
    ASSERT_TRUE(again) << name << ": " << error_of(again);
    EXPECT_EQ(to_json(*again), j) << name;
    EXPECT_EQ(again->rope, c->rope);
    EXPECT_EQ(again->quantization, c->quantization);
  }
  auto c = parse_config(tiny_json());
  ASSERT_TRUE(c);
  c->q_lora_rank.reset();
  c->rope = rope_config{};
  c->eos_token_ids = {1, 2};
  c->bos_token_id.reset();
  auto j = to_json(*c);
  EXPECT_TRUE(j["q_lora_rank"].is_null());
  EXPECT_TRUE(j["rope_scaling"].is_null());
  auto again = parse_config(j);
  ASSERT_TRUE(again) << error_of(again);
  EXPECT_FALSE(again->q_lora_rank);
  EXPECT_EQ(again->eos_token_ids, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(to_json(*again), j);
}

TEST(config, save_and_load) {
  testing::scratch_dir dir;
  auto c = load_config(data_dir / "small-v3-fp8");
  ASSERT_TRUE(c);
  ASSERT_TRUE(save_config(*c, dir / "config.json"));
  auto again = load_config(dir.path());
  ASSERT_TRUE(again) << error_of(again);
  EXPECT_EQ(to_json(*again), to_json(*c));
}

TEST(config, validate_config_checks_code_built_configs) {
  auto c = parse_config(tiny_json());
  ASSERT_TRUE(c);
  EXPECT_TRUE(validate_config(*c));
  c->topk_group = 9;
  auto ok = validate_config(*c);
  ASSERT_FALSE(ok);
  EXPECT_EQ(moe::error_text(ok.error()), "model config: topk_group: 9 exceeds n_group 4");
}

}  // namespace
}  // namespace moe::model
