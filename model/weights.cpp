#include "model/weights.hpp"

namespace moe::model {

namespace {

struct spec_builder {
  const model_config& c;
  std::vector<weight_spec>& out;
  bool mtp = false;

  void add(std::string name, std::vector<int64_t> shape, weight_kind kind, int64_t layer,
           int64_t expert = -1, bool optional = false) {
    out.push_back(weight_spec{std::move(name), std::move(shape), kind, layer, expert, mtp,
                              optional});
  }

  void mlp(int64_t layer, const std::string& prefix, int64_t inner, int64_t expert = -1) {
    add(prefix + "gate_proj.weight", {inner, c.hidden_size}, weight_kind::projection, layer,
        expert);
    add(prefix + "up_proj.weight", {inner, c.hidden_size}, weight_kind::projection, layer, expert);
    add(prefix + "down_proj.weight", {c.hidden_size, inner}, weight_kind::projection, layer,
        expert);
  }

  void decoder_block(int64_t layer) {
    const int64_t h = c.hidden_size;
    const int64_t heads = c.num_attention_heads;
    auto name = [&](std::string_view suffix) { return layer_weight_name(layer, suffix); };
    add(name("input_layernorm.weight"), {h}, weight_kind::norm, layer);
    if (c.q_lora_rank) {
      add(name("self_attn.q_a_proj.weight"), {*c.q_lora_rank, h}, weight_kind::projection, layer);
      add(name("self_attn.q_a_layernorm.weight"), {*c.q_lora_rank}, weight_kind::norm, layer);
      add(name("self_attn.q_b_proj.weight"), {heads * c.qk_head_dim(), *c.q_lora_rank},
          weight_kind::projection, layer);
    } else {
      add(name("self_attn.q_proj.weight"), {heads * c.qk_head_dim(), h}, weight_kind::projection,
          layer);
    }
    add(name("self_attn.kv_a_proj_with_mqa.weight"), {c.kv_lora_rank + c.qk_rope_head_dim, h},
        weight_kind::projection, layer);
    add(name("self_attn.kv_a_layernorm.weight"), {c.kv_lora_rank}, weight_kind::norm, layer);
    add(name("self_attn.kv_b_proj.weight"),
        {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, weight_kind::projection,
        layer);
    add(name("self_attn.o_proj.weight"), {h, heads * c.v_head_dim}, weight_kind::projection,
        layer);
    add(name("post_attention_layernorm.weight"), {h}, weight_kind::norm, layer);
    if (!c.is_moe_layer(layer)) {
      mlp(layer, name("mlp."), c.intermediate_size);
      return;
    }
    add(name("mlp.gate.weight"), {c.n_routed_experts, h}, weight_kind::router, layer);
    add(name("mlp.gate.e_score_correction_bias"), {c.n_routed_experts}, weight_kind::router_bias,
        layer);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      mlp(layer, name("mlp.experts." + std::to_string(e) + "."), c.moe_intermediate_size, e);
    }
    if (c.n_shared_experts > 0) {
      mlp(layer, name("mlp.shared_experts."), c.shared_intermediate_size());
    }
  }

  void mtp_module(int64_t layer) {
    const int64_t h = c.hidden_size;
    auto name = [&](std::string_view suffix) { return layer_weight_name(layer, suffix); };
    add(name("embed_tokens.weight"), {c.vocab_size, h}, weight_kind::embedding, layer, -1, true);
    add(name("enorm.weight"), {h}, weight_kind::norm, layer);
    add(name("hnorm.weight"), {h}, weight_kind::norm, layer);
    add(name("eh_proj.weight"), {h, 2 * h}, weight_kind::projection, layer);
    decoder_block(layer);
    add(name("shared_head.norm.weight"), {h}, weight_kind::norm, layer);
    add(name("shared_head.head.weight"), {c.vocab_size, h}, weight_kind::embedding, layer, -1,
        true);
  }
};

}  // namespace

int64_t weight_spec::num_elements() const noexcept {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string layer_weight_name(int64_t layer, std::string_view suffix) {
  std::string out = "model.layers." + std::to_string(layer) + ".";
  out.append(suffix);
  return out;
}

std::string expert_weight_name(int64_t layer, int64_t expert, std::string_view projection) {
  std::string out = layer_weight_name(layer, "mlp.experts.") + std::to_string(expert) + ".";
  out.append(projection);
  return out + ".weight";
}

std::string scale_name(std::string_view weight_name) {
  return std::string(weight_name) + "_scale_inv";
}

std::vector<weight_spec> expected_weights(const model_config& c, bool include_mtp) {
  std::vector<weight_spec> out;
  spec_builder b{c, out};
  b.add("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, weight_kind::embedding, -1);
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) b.decoder_block(layer);
  b.add("model.norm.weight", {c.hidden_size}, weight_kind::norm, -1);
  if (!c.tie_word_embeddings) {
    b.add("lm_head.weight", {c.vocab_size, c.hidden_size}, weight_kind::embedding, -1);
  }
  if (include_mtp) {
    b.mtp = true;
    for (int64_t d = 0; d < c.num_nextn_predict_layers; ++d) {
      b.mtp_module(c.num_hidden_layers + d);
    }
  }
  return out;
}

int64_t count_parameters(const model_config& config, bool include_mtp) {
  int64_t n = 0;
  for (const auto& w : expected_weights(config, include_mtp)) {
    if (!w.optional) n += w.num_elements();
  }
  return n;
}

int64_t count_active_parameters(const model_config& config, bool include_mtp) {
  int64_t n = 0;
  for (const auto& w : expected_weights(config, include_mtp)) {
    if (!w.optional && w.expert < config.num_experts_per_tok) n += w.num_elements();
  }
  return n;
}

}  // namespace moe::model
