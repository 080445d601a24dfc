#include "model/attention_training.hpp"

#include <algorithm>
#include <string>

#include "kernels/cpu/backward.hpp"
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

// Where q's and k_pe's rotary vectors sit, for rope_apply and rope_backward alike.
kc::rope_apply_args q_rope_args(float* q, size_t T, size_t H, size_t dn, size_t dr) {
  kc::rope_apply_args a;
  a.x = q + dn;
  a.num_tokens = T;
  a.num_heads = H;
  a.token_stride = H * (dn + dr);
  a.head_stride = dn + dr;
  return a;
}

kc::rope_apply_args k_rope_args(float* ckv, size_t T, size_t R, size_t dr) {
  kc::rope_apply_args a;
  a.x = ckv + R;
  a.num_tokens = T;
  a.num_heads = 1;
  a.token_stride = R + dr;
  a.head_stride = dr;
  return a;
}

}  // namespace

// --- attention_grads ------------------------------------------------------------------------

attention_grads attention_grads::for_config(const model_config& c) {
  const auto D = static_cast<size_t>(c.hidden_size), H = static_cast<size_t>(c.num_attention_heads);
  const auto dn = static_cast<size_t>(c.qk_nope_head_dim), dr = static_cast<size_t>(c.qk_rope_head_dim);
  const auto dv = static_cast<size_t>(c.v_head_dim), R = static_cast<size_t>(c.kv_lora_rank);
  const auto QR = static_cast<size_t>(c.q_lora_rank.value_or(0));
  attention_grads g;
  g.input_layernorm.assign(D, 0.0f);
  if (QR > 0) {
    g.q_a_proj.assign(QR * D, 0.0f);
    g.q_a_layernorm.assign(QR, 0.0f);
    g.q_b_proj.assign(H * (dn + dr) * QR, 0.0f);
  } else {
    g.q_b_proj.assign(H * (dn + dr) * D, 0.0f);
  }
  g.kv_a_proj_with_mqa.assign((R + dr) * D, 0.0f);
  g.kv_a_layernorm.assign(R, 0.0f);
  g.kv_b_proj.assign(H * (dn + dv) * R, 0.0f);
  g.o_proj.assign(D * H * dv, 0.0f);
  g.post_attention_layernorm.assign(D, 0.0f);
  return g;
}

void attention_grads::zero() {
  for_each([](std::string_view, std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); });
}

// --- binding --------------------------------------------------------------------------------

caf::expected<attention_training_block> attention_training_block::bind(
    const model_config& c, int64_t layer, const weight_lookup& weights) {
  // The lookups mirror attention_block::bind; the two blocks bind the same tensors.
  attention_training_block b;
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

// --- forward --------------------------------------------------------------------------------

caf::error attention_training_block::forward(float* x, float* mlp_in, size_t T,
                                             std::span<const int32_t> cu_seqlens) {
  saved_tokens_.reset();
  if (T == 0) {
    cu_seqlens_.assign({0});
    saved_tokens_ = 0;
    return {};
  }
  bool ok = cu_seqlens.size() >= 2 && cu_seqlens.front() == 0 &&
            cu_seqlens.back() == static_cast<int64_t>(T);
  for (size_t s = 1; ok && s < cu_seqlens.size(); ++s) ok = cu_seqlens[s] >= cu_seqlens[s - 1];
  if (!ok) {
    return make_error(model_errc::bad_input,
                      "attention training: cu_seqlens must rise from 0 to the token count");
  }
  if (x == nullptr || mlp_in == nullptr) {
    return make_error(model_errc::bad_input, "attention training: null activations");
  }
  cu_seqlens_.assign(cu_seqlens.begin(), cu_seqlens.end());
  positions_.resize(T);
  for (size_t s = 0; s + 1 < cu_seqlens_.size(); ++s) {
    for (int32_t t = cu_seqlens_[s]; t < cu_seqlens_[s + 1]; ++t) positions_[t] = t - cu_seqlens_[s];
  }

  const size_t D = hidden_, H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  const size_t qk = dn + dr;
  x_in_.assign(x, x + T * D);
  ensure(normed_, T * D);
  ensure(q_, T * H * qk);
  ensure(ckv_, T * (R + dr));
  ensure(latent_, T * R);
  ensure(kv_, T * H * (dn + dv));
  ensure(lse_, T * H);
  ensure(attn_, T * H * dv);
  caf::error err;
  if ((err = check(kc::rmsnorm(x, input_norm_, normed_.data(), T, D, eps_), "input norm", layer_)))
    return err;
  if (q_rank_ > 0) {
    const size_t QR = q_rank_;
    ensure(q_a_raw_, T * QR);
    ensure(q_a_, T * QR);
    if ((err = check(kc::linear(normed_.data(), q_a_proj_, q_a_raw_.data(), T, D, QR), "q_a_proj",
                     layer_)))
      return err;
    if ((err = check(kc::rmsnorm(q_a_raw_.data(), q_a_norm_, q_a_.data(), T, QR, eps_),
                     "q_a norm", layer_)))
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
  if ((err = check(kc::rope_apply(rope_params_, q_rope_args(q_.data(), T, H, dn, dr),
                                  positions_.data()),
                   "rope(q)", layer_)))
    return err;
  if ((err = check(kc::rope_apply(rope_params_, k_rope_args(ckv_.data(), T, R, dr),
                                  positions_.data()),
                   "rope(k)", layer_)))
    return err;
  if ((err = check(kc::linear(latent_.data(), kv_b_proj_, kv_.data(), T, R, H * (dn + dv)),
                   "kv_b_proj", layer_)))
    return err;
  if ((err = attend(T))) return err;
  // x += attn . o_proj^T: the residual add rides on the GEMM's beta, as in attention_block.
  if ((err = check(kc::linear(attn_.data(), o_proj_, x, T, H * dv, D, 1.0f), "o_proj", layer_)))
    return err;
  x_mid_.assign(x, x + T * D);
  if ((err = check(kc::rmsnorm(x, post_norm_, mlp_in, T, D, eps_), "post-attention norm", layer_)))
    return err;
  saved_tokens_ = T;
  return {};
}

// The attention core's views of the saved activations (attention_views.hpp), with the
// log-sum-exp the forward saves and the backward reads.
template <class Args>
Args attention_training_block::attention_args() {
  const size_t H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  auto a = detail::mla_attention_views<Args>(q_.data(), kv_.data(), ckv_.data(), attn_.data(),
                                             {H, dn, dr, dv, R}, softmax_scale_);
  a.lse = lse_.data();
  return a;
}

// Causal attention per sequence and head, saving each row's log-sum-exp so that backward
// recomputes the probabilities from it.
caf::error attention_training_block::attend(size_t /*T*/) {
  return check(kc::mla_prefill(attention_args<kc::mla_prefill_args>(), cu_seqlens_.data(),
                               nullptr, cu_seqlens_.size() - 1),
               "attention", layer_);
}

// --- backward -------------------------------------------------------------------------------

caf::error attention_training_block::check_grads(const attention_grads& g) const {
  const size_t D = hidden_, H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  const size_t QR = q_rank_, q_in = QR > 0 ? QR : D;
  const bool ok = g.input_layernorm.size() == D && g.q_a_proj.size() == QR * D &&
                  g.q_a_layernorm.size() == QR && g.q_b_proj.size() == H * (dn + dr) * q_in &&
                  g.kv_a_proj_with_mqa.size() == (R + dr) * D && g.kv_a_layernorm.size() == R &&
                  g.kv_b_proj.size() == H * (dn + dv) * R && g.o_proj.size() == D * H * dv &&
                  g.post_attention_layernorm.size() == D;
  if (ok) return {};
  return make_error(model_errc::bad_input,
                    "attention training: gradients not sized for layer " + std::to_string(layer_) +
                        " (use attention_grads::for_config)");
}

// dq (T, H, dn + dr); dk_nope and dv into dkv_ (kv_b_proj's output gradient) as k_nope and v
// sit in kv_; dk_pe, summed over the heads, into dckv_'s rope part (kv_a_proj's).
caf::error attention_training_block::attend_backward(size_t T) {
  const size_t H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  ensure(dq_, T * H * (dn + dr));
  ensure(dkv_, T * H * (dn + dv));
  ensure(dckv_, T * (R + dr));
  auto a = attention_args<kc::mla_prefill_backward_args>();
  a.dout = dattn_.data();
  a.dq = dq_.data();
  a.dk_nope = dkv_.data();
  a.dk_nope_token_stride = a.k_nope_token_stride;
  a.dk_nope_head_stride = a.k_nope_head_stride;
  a.dk_pe = dckv_.data() + R;
  a.dk_pe_token_stride = a.k_pe_token_stride;
  a.dv = dkv_.data() + dn;
  a.dv_token_stride = a.v_token_stride;
  a.dv_head_stride = a.v_head_stride;
  return check(kc::mla_prefill_backward(a, cu_seqlens_.data(), cu_seqlens_.size() - 1),
               "attention backward", layer_);
}

caf::error attention_training_block::backward(const float* dx_out, const float* dmlp_in,
                                              float* dx_in, attention_grads& grads) {
  if (!saved_tokens_) {
    return make_error(model_errc::bad_input,
                      "attention training: backward without a successful forward");
  }
  if (auto err = check_grads(grads)) return err;
  const size_t T = *saved_tokens_;
  if (T == 0) return {};
  if (dx_out == nullptr || dmlp_in == nullptr || dx_in == nullptr) {
    return make_error(model_errc::bad_input, "attention training: null gradients");
  }
  const size_t D = hidden_, H = num_heads_, dn = nope_, dr = rope_, dv = v_dim_, R = latent_dim_;
  const size_t qk = dn + dr;
  caf::error err;

  // Post-attention norm; dx_mid = dx_out + its input gradient.
  dx_mid_.assign(dx_out, dx_out + T * D);
  if ((err = check(kc::rmsnorm_backward(x_mid_.data(), post_norm_, dmlp_in, dx_mid_.data(),
                                        grads.post_attention_layernorm.data(), T, D, eps_,
                                        /*accumulate=*/true),
                   "post-attention norm backward", layer_)))
    return err;
  // o_proj; the residual passes dx_mid straight to dx_in.
  ensure(dattn_, T * H * dv);
  if ((err = check(kc::linear_backward(attn_.data(), o_proj_, dx_mid_.data(), dattn_.data(),
                                       grads.o_proj.data(), T, H * dv, D),
                   "o_proj backward", layer_)))
    return err;
  if ((err = attend_backward(T))) return err;

  // Rotary parts: undo the rotation of the gradients (dq's rope part, dk_pe in dckv_).
  if ((err = check(kc::rope_backward(rope_params_, q_rope_args(dq_.data(), T, H, dn, dr),
                                     positions_.data()),
                   "rope(q) backward", layer_)))
    return err;
  if ((err = check(kc::rope_backward(rope_params_, k_rope_args(dckv_.data(), T, R, dr),
                                     positions_.data()),
                   "rope(k) backward", layer_)))
    return err;

  // kv_b_proj, then kv_a_layernorm row by row into dckv_'s latent part.
  ensure(dlatent_, T * R);
  if ((err = check(kc::linear_backward(latent_.data(), kv_b_proj_, dkv_.data(), dlatent_.data(),
                                       grads.kv_b_proj.data(), T, R, H * (dn + dv)),
                   "kv_b_proj backward", layer_)))
    return err;
  for (size_t t = 0; t < T; ++t) {
    if ((err = check(kc::rmsnorm_backward(ckv_.data() + t * (R + dr), kv_a_norm_,
                                          dlatent_.data() + t * R, dckv_.data() + t * (R + dr),
                                          grads.kv_a_layernorm.data(), 1, R, eps_),
                     "kv_a norm backward", layer_)))
      return err;
  }
  ensure(dnormed_, T * D);
  if ((err = check(kc::linear_backward(normed_.data(), kv_a_proj_, dckv_.data(), dnormed_.data(),
                                       grads.kv_a_proj_with_mqa.data(), T, D, R + dr),
                   "kv_a_proj backward", layer_)))
    return err;

  // Query path, accumulating into dnormed.
  if (q_rank_ > 0) {
    const size_t QR = q_rank_;
    ensure(dq_a_, T * QR);
    ensure(dq_a_raw_, T * QR);
    if ((err = check(kc::linear_backward(q_a_.data(), q_b_proj_, dq_.data(), dq_a_.data(),
                                         grads.q_b_proj.data(), T, QR, H * qk),
                     "q_b_proj backward", layer_)))
      return err;
    if ((err = check(kc::rmsnorm_backward(q_a_raw_.data(), q_a_norm_, dq_a_.data(),
                                          dq_a_raw_.data(), grads.q_a_layernorm.data(), T, QR,
                                          eps_),
                     "q_a norm backward", layer_)))
      return err;
    if ((err = check(kc::linear_backward(normed_.data(), q_a_proj_, dq_a_raw_.data(),
                                         dnormed_.data(), grads.q_a_proj.data(), T, D, QR,
                                         /*accumulate=*/true),
                     "q_a_proj backward", layer_)))
      return err;
  } else if ((err = check(kc::linear_backward(normed_.data(), q_b_proj_, dq_.data(),
                                              dnormed_.data(), grads.q_b_proj.data(), T, D,
                                              H * qk, /*accumulate=*/true),
                          "q_proj backward", layer_))) {
    return err;
  }

  // Input norm on top of the residual's share (dx_in may alias dx_out, consumed above).
  std::copy(dx_mid_.begin(), dx_mid_.begin() + static_cast<ptrdiff_t>(T * D), dx_in);
  return check(kc::rmsnorm_backward(x_in_.data(), input_norm_, dnormed_.data(), dx_in,
                                    grads.input_layernorm.data(), T, D, eps_, /*accumulate=*/true),
               "input norm backward", layer_);
}

}  // namespace moe::model
