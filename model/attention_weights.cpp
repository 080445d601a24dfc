#include "model/attention_weights.hpp"

#include <initializer_list>
#include <string>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/model_errc.hpp"

namespace moe::model::detail {

caf::expected<attention_weights> attention_weights::bind(const model_config& c, int64_t layer,
                                                         const weight_lookup& weights) {
  attention_weights w;
  w.layer = layer;
  w.hidden = c.hidden_size;
  w.num_heads = c.num_attention_heads;
  w.nope = c.qk_nope_head_dim;
  w.rope = c.qk_rope_head_dim;
  w.v_dim = c.v_head_dim;
  w.latent_dim = c.kv_lora_rank;
  w.q_rank = c.q_lora_rank.value_or(0);
  w.eps = static_cast<float>(c.rms_norm_eps);
  auto rope = rope_kernel_params(c);
  if (!rope) return rope.error();
  w.rope_params = *rope;
  w.softmax_scale = static_cast<float>(attention_softmax_scale(c));

  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const std::string a = p + "self_attn.";
  const int64_t qk = w.nope + w.rope;
  auto get = [&](const std::string& name, std::initializer_list<int64_t> shape,
                 const float*& out) -> caf::error {
    std::vector<int64_t> s(shape);
    auto r = weights(name, s);
    if (!r) return r.error();
    out = *r;
    return {};
  };
  caf::error err;
  if ((err = get(p + "input_layernorm.weight", {w.hidden}, w.input_norm))) return err;
  if (w.q_rank > 0) {
    if ((err = get(a + "q_a_proj.weight", {w.q_rank, w.hidden}, w.q_a_proj))) return err;
    if ((err = get(a + "q_a_layernorm.weight", {w.q_rank}, w.q_a_norm))) return err;
    if ((err = get(a + "q_b_proj.weight", {w.num_heads * qk, w.q_rank}, w.q_b_proj))) return err;
  } else {
    if ((err = get(a + "q_proj.weight", {w.num_heads * qk, w.hidden}, w.q_b_proj))) return err;
  }
  if ((err = get(a + "kv_a_proj_with_mqa.weight", {w.latent_dim + w.rope, w.hidden}, w.kv_a_proj)))
    return err;
  if ((err = get(a + "kv_a_layernorm.weight", {w.latent_dim}, w.kv_a_norm))) return err;
  if ((err = get(a + "kv_b_proj.weight", {w.num_heads * (w.nope + w.v_dim), w.latent_dim},
                 w.kv_b_proj)))
    return err;
  if ((err = get(a + "o_proj.weight", {w.hidden, w.num_heads * w.v_dim}, w.o_proj))) return err;
  if ((err = get(p + "post_attention_layernorm.weight", {w.hidden}, w.post_norm))) return err;
  return w;
}

caf::error attention_weights::check(kernels::kernel_status s, const char* what) const {
  if (s == kernels::kernel_status::ok) return {};
  return make_error(model_errc::kernel_failed, "layer " + std::to_string(layer) + ": " + what +
                                                   ": " + std::string(kernels::to_string(s)));
}

template <class Position>
caf::error attention_weights::project(const float* x, size_t T, const Position* positions,
                                      const projections& out) const {
  namespace kc = kernels::cpu;
  const size_t D = hidden, H = num_heads, dn = nope, dr = rope, R = latent_dim;
  const size_t qk = dn + dr;
  caf::error err;
  if ((err = check(kc::rmsnorm(x, input_norm, out.normed, T, D, eps), "input norm"))) return err;
  if (q_rank > 0) {
    const size_t QR = q_rank;
    if ((err = check(kc::linear(out.normed, q_a_proj, out.q_a_raw, T, D, QR), "q_a_proj")))
      return err;
    if ((err = check(kc::rmsnorm(out.q_a_raw, q_a_norm, out.q_a, T, QR, eps), "q_a norm")))
      return err;
    if ((err = check(kc::linear(out.q_a, q_b_proj, out.q, T, QR, H * qk), "q_b_proj"))) return err;
  } else if ((err = check(kc::linear(out.normed, q_b_proj, out.q, T, D, H * qk), "q_proj"))) {
    return err;
  }
  if ((err = check(kc::linear(out.normed, kv_a_proj, out.ckv, T, D, R + dr), "kv_a_proj")))
    return err;
  // The latent rows are strided inside ckv: one norm call per token.
  for (size_t t = 0; t < T; ++t) {
    if ((err = check(kc::rmsnorm(out.ckv + t * (R + dr), kv_a_norm, out.latent + t * R, 1, R, eps),
                     "kv_a norm")))
      return err;
  }
  if ((err = check(kc::rope_apply(rope_params, q_rope_args(out.q, T, H, dn, dr), positions),
                   "rope(q)")))
    return err;
  return check(kc::rope_apply(rope_params, k_rope_args(out.ckv, T, R, dr), positions), "rope(k)");
}

template caf::error attention_weights::project<int32_t>(const float*, size_t, const int32_t*,
                                                        const projections&) const;
template caf::error attention_weights::project<int64_t>(const float*, size_t, const int64_t*,
                                                        const projections&) const;

kernels::cpu::rope_apply_args q_rope_args(float* q, size_t T, size_t H, size_t dn, size_t dr) {
  kernels::cpu::rope_apply_args a;
  a.x = q + dn;
  a.num_tokens = T;
  a.num_heads = H;
  a.token_stride = H * (dn + dr);
  a.head_stride = dn + dr;
  return a;
}

kernels::cpu::rope_apply_args k_rope_args(float* ckv, size_t T, size_t R, size_t dr) {
  kernels::cpu::rope_apply_args a;
  a.x = ckv + R;
  a.num_tokens = T;
  a.num_heads = 1;
  a.token_stride = R + dr;
  a.head_stride = dr;
  return a;
}

}  // namespace moe::model::detail
