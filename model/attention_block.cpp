#include "model/attention_block.hpp"

#include <cmath>
#include <string>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/mla_attention.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/attention_views.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace kc = kernels::cpu;

namespace {

caf::error check(kernels::kernel_status s, const char* what, int64_t layer) {
  if (s == kernels::kernel_status::ok) return {};
  return make_error(model_errc::kernel_failed, "layer " + std::to_string(layer) + ": " + what +
                                                   ": " + std::string(kernels::to_string(s)));
}

template <class T>
void ensure(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

caf::expected<attention_block> attention_block::bind(const model_config& c, int64_t layer,
                                                     const weight_lookup& weights) {
  attention_block b;
  b.layer_ = layer;
  b.hidden_ = c.hidden_size;
  b.num_heads_ = c.num_attention_heads;
  b.nope_ = c.qk_nope_head_dim;
  b.rope_ = c.qk_rope_head_dim;
  b.v_dim_ = c.v_head_dim;
  b.latent_dim_ = c.kv_lora_rank;
  b.q_rank_ = c.q_lora_rank.value_or(0);
  b.eps_ = static_cast<float>(c.rms_norm_eps);
  auto rope = rope_kernel_params(c);
  if (!rope) return rope.error();
  b.rope_params_ = *rope;
  b.softmax_scale_ = static_cast<float>(attention_softmax_scale(c));

  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const std::string a = p + "self_attn.";
  const int64_t qk = b.nope_ + b.rope_;
  auto get = [&](const std::string& name, std::initializer_list<int64_t> shape,
                 const float*& out) -> caf::error {
    std::vector<int64_t> s(shape);
    auto r = weights(name, s);
    if (!r) return r.error();
    out = *r;
    return {};
  };
  caf::error err;
  if ((err = get(p + "input_layernorm.weight", {b.hidden_}, b.input_norm_))) return err;
  if (b.q_rank_ > 0) {
    if ((err = get(a + "q_a_proj.weight", {b.q_rank_, b.hidden_}, b.q_a_proj_))) return err;
    if ((err = get(a + "q_a_layernorm.weight", {b.q_rank_}, b.q_a_norm_))) return err;
    if ((err = get(a + "q_b_proj.weight", {b.num_heads_ * qk, b.q_rank_}, b.q_b_proj_))) return err;
  } else {
    if ((err = get(a + "q_proj.weight", {b.num_heads_ * qk, b.hidden_}, b.q_b_proj_))) return err;
  }
  if ((err = get(a + "kv_a_proj_with_mqa.weight", {b.latent_dim_ + b.rope_, b.hidden_},
                 b.kv_a_proj_)))
    return err;
  if ((err = get(a + "kv_a_layernorm.weight", {b.latent_dim_}, b.kv_a_norm_))) return err;
  if ((err = get(a + "kv_b_proj.weight", {b.num_heads_ * (b.nope_ + b.v_dim_), b.latent_dim_},
                 b.kv_b_proj_)))
    return err;
  if ((err = get(a + "o_proj.weight", {b.hidden_, b.num_heads_ * b.v_dim_}, b.o_proj_))) return err;
  if ((err = get(p + "post_attention_layernorm.weight", {b.hidden_}, b.post_norm_))) return err;
  return b;
}

caf::error attention_block::project(const float* x, size_t T, std::span<const int64_t> positions,
                                    std::span<const int64_t> slots, latent_cache& cache) {
  const size_t D = hidden_, H = num_heads_, dn = nope_, dr = rope_, R = latent_dim_;
  const size_t qk = dn + dr;
  if (positions.size() != T || slots.size() != T) {
    return make_error(model_errc::bad_input, "attention: positions/slots do not match the tokens");
  }
  ensure(normed_, T * D);
  ensure(q_, T * H * qk);
  ensure(ckv_, T * (R + dr));
  ensure(latent_, T * R);
  caf::error err;
  if ((err = check(kc::rmsnorm(x, input_norm_, normed_.data(), T, D, eps_), "input norm", layer_)))
    return err;
  if (q_rank_ > 0) {
    const size_t QR = q_rank_;
    ensure(q_a_, T * QR);
    if ((err = check(kc::linear(normed_.data(), q_a_proj_, q_a_.data(), T, D, QR), "q_a_proj",
                     layer_)))
      return err;
    if ((err = check(kc::rmsnorm(q_a_.data(), q_a_norm_, q_a_.data(), T, QR, eps_), "q_a norm",
                     layer_)))
      return err;
    if ((err = check(kc::linear(q_a_.data(), q_b_proj_, q_.data(), T, QR, H * qk), "q_b_proj",
                     layer_)))
      return err;
  } else if ((err = check(kc::linear(normed_.data(), q_b_proj_, q_.data(), T, D, H * qk),
                          "q_proj", layer_))) {
    return err;
  }
  if ((err = check(kc::linear(normed_.data(), kv_a_proj_, ckv_.data(), T, D, R + dr),
                   "kv_a_proj", layer_)))
    return err;
  for (size_t t = 0; t < T; ++t) {
    if ((err = check(kc::rmsnorm(ckv_.data() + t * (R + dr), kv_a_norm_, latent_.data() + t * R, 1,
                                 R, eps_),
                     "kv_a norm", layer_)))
      return err;
  }
  kc::rope_apply_args qa;
  qa.x = q_.data() + dn;
  qa.num_tokens = T;
  qa.num_heads = H;
  qa.token_stride = H * qk;
  qa.head_stride = qk;
  if ((err = check(kc::rope_apply(rope_params_, qa, positions.data()), "rope(q)", layer_)))
    return err;
  kc::rope_apply_args ka;
  ka.x = ckv_.data() + R;
  ka.num_tokens = T;
  ka.num_heads = 1;
  ka.token_stride = R + dr;
  ka.head_stride = dr;
  if ((err = check(kc::rope_apply(rope_params_, ka, positions.data()), "rope(k)", layer_)))
    return err;
  return check(kc::mla_cache_append(cache.layout(), cache.pool(layer_), latent_.data(), R,
                                    ckv_.data() + R, R + dr, slots.data(), T),
               "cache append", layer_);
}

caf::error attention_block::finish(float* x, float* mlp_in, size_t T) {
  const size_t D = hidden_, H = num_heads_, dv = v_dim_;
  // x += attn . o_proj^T: the residual add rides on the GEMM's beta.
  if (auto err = check(kc::linear(attn_.data(), o_proj_, x, T, H * dv, D, 1.0f), "o_proj", layer_))
    return err;
  return check(kc::rmsnorm(x, post_norm_, mlp_in, T, D, eps_), "post-attention norm", layer_);
}

caf::error attention_block::prefill(float* x, float* mlp_in, size_t T,
                                    const prefill_layout& layout, latent_cache& cache) {
  if (T == 0) return {};
  if (layout.cu_seqlens.size() < 2 || layout.cu_seqlens.back() != static_cast<int32_t>(T)) {
    return make_error(model_errc::bad_input, "attention: cu_seqlens do not cover the tokens");
  }
  if (auto err = project(x, T, layout.positions, layout.slots, cache)) return err;
  const size_t H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  ensure(kv_, T * H * (dn + dv));
  ensure(attn_, T * H * dv);
  if (auto err = check(kc::linear(latent_.data(), kv_b_proj_, kv_.data(), T, R, H * (dn + dv)),
                       "kv_b_proj", layer_))
    return err;
  const auto a = detail::mla_attention_views<kc::mla_prefill_args>(
      q_.data(), kv_.data(), ckv_.data(), attn_.data(), {H, dn, dr, dv, R}, softmax_scale_);
  const size_t num_seqs = layout.cu_seqlens.size() - 1;
  if (auto err = check(kc::mla_prefill(a, layout.cu_seqlens.data(), nullptr, num_seqs),
                       "mla prefill", layer_))
    return err;
  return finish(x, mlp_in, T);
}

caf::error attention_block::decode(float* x, float* mlp_in, size_t B, const decode_layout& layout,
                                   latent_cache& cache) {
  if (B == 0) return {};
  if (layout.seq_lens.size() != B || layout.block_table.size() < B * layout.max_blocks_per_seq) {
    return make_error(model_errc::bad_input, "attention: decode layout does not match the batch");
  }
  if (auto err = project(x, B, layout.positions, layout.slots, cache)) return err;
  const size_t H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  ensure(q_latent_, B * H * R);
  ensure(out_latent_, B * H * R);
  ensure(attn_, B * H * dv);
  const kc::mla_absorb_dims dims{H, dn, dv, R};
  if (auto err = check(kc::mla_absorb_q(dims, q_.data(), H * (dn + dr), dn + dr, kv_b_proj_,
                                        q_latent_.data(), B),
                       "absorb q", layer_))
    return err;
  kc::mla_decode_args a;
  a.q_latent = q_latent_.data();
  a.q_pe = q_.data() + dn;
  a.q_pe_token_stride = H * (dn + dr);
  a.q_pe_head_stride = dn + dr;
  a.block_table = layout.block_table.data();
  a.max_blocks_per_seq = layout.max_blocks_per_seq;
  a.seq_lens = layout.seq_lens.data();
  a.out_latent = out_latent_.data();
  a.batch = B;
  a.num_heads = H;
  a.softmax_scale = softmax_scale_;
  if (auto err = check(kc::mla_decode(cache.layout(), cache.pool(layer_), a), "mla decode", layer_))
    return err;
  if (auto err = check(kc::mla_absorb_out(dims, out_latent_.data(), kv_b_proj_, attn_.data(), B),
                       "absorb out", layer_))
    return err;
  return finish(x, mlp_in, B);
}

}  // namespace moe::model
