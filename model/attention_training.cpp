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
using detail::ensure_size;
using detail::k_rope_args;
using detail::q_rope_args;

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
  auto w = detail::attention_weights::bind(c, layer, weights);
  if (!w) return w.error();
  attention_training_block b;
  b.w_ = *w;
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

  const size_t D = w_.hidden, H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim,
               R = w_.latent_dim;
  const size_t qk = dn + dr;
  x_in_.assign(x, x + T * D);
  ensure_size(normed_, T * D);
  ensure_size(q_, T * H * qk);
  ensure_size(ckv_, T * (R + dr));
  ensure_size(latent_, T * R);
  ensure_size(kv_, T * H * (dn + dv));
  ensure_size(lse_, T * H);
  ensure_size(attn_, T * H * dv);
  if (w_.q_rank > 0) {
    ensure_size(q_a_raw_, T * w_.q_rank);
    ensure_size(q_a_, T * w_.q_rank);
  }
  caf::error err;
  if ((err = w_.project(
           x, T, positions_.data(),
           {normed_.data(), q_a_raw_.data(), q_a_.data(), q_.data(), ckv_.data(), latent_.data()})))
    return err;
  if ((err = w_.check(kc::linear(latent_.data(), w_.kv_b_proj, kv_.data(), T, R, H * (dn + dv)),
                      "kv_b_proj")))
    return err;
  if ((err = attend(T))) return err;
  // x += attn . o_proj^T: the residual add rides on the GEMM's beta, as in attention_block.
  if ((err = w_.check(kc::linear(attn_.data(), w_.o_proj, x, T, H * dv, D, 1.0f), "o_proj")))
    return err;
  x_mid_.assign(x, x + T * D);
  if ((err = w_.check(kc::rmsnorm(x, w_.post_norm, mlp_in, T, D, w_.eps), "post-attention norm")))
    return err;
  saved_tokens_ = T;
  return {};
}

// The attention core's views of the saved activations (attention_views.hpp), with the
// log-sum-exp the forward saves and the backward reads.
template <class Args>
Args attention_training_block::attention_args() {
  const size_t H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim, R = w_.latent_dim;
  auto a = detail::mla_attention_views<Args>(q_.data(), kv_.data(), ckv_.data(), attn_.data(),
                                             {H, dn, dr, dv, R}, w_.softmax_scale);
  a.lse = lse_.data();
  return a;
}

// Causal attention per sequence and head, saving each row's log-sum-exp so that backward
// recomputes the probabilities from it.
caf::error attention_training_block::attend(size_t /*T*/) {
  return w_.check(kc::mla_prefill(attention_args<kc::mla_prefill_args>(), cu_seqlens_.data(),
                                  nullptr, cu_seqlens_.size() - 1),
                  "attention");
}

// --- backward -------------------------------------------------------------------------------

caf::error attention_training_block::check_grads(const attention_grads& g) const {
  const size_t D = w_.hidden, H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim,
               R = w_.latent_dim;
  const size_t QR = w_.q_rank, q_in = QR > 0 ? QR : D;
  const bool ok = g.input_layernorm.size() == D && g.q_a_proj.size() == QR * D &&
                  g.q_a_layernorm.size() == QR && g.q_b_proj.size() == H * (dn + dr) * q_in &&
                  g.kv_a_proj_with_mqa.size() == (R + dr) * D && g.kv_a_layernorm.size() == R &&
                  g.kv_b_proj.size() == H * (dn + dv) * R && g.o_proj.size() == D * H * dv &&
                  g.post_attention_layernorm.size() == D;
  if (ok) return {};
  return make_error(model_errc::bad_input, "attention training: gradients not sized for layer " +
                                               std::to_string(w_.layer) +
                                               " (use attention_grads::for_config)");
}

// dq (T, H, dn + dr); dk_nope and dv into dkv_ (kv_b_proj's output gradient) as k_nope and v
// sit in kv_; dk_pe, summed over the heads, into dckv_'s rope part (kv_a_proj's).
caf::error attention_training_block::attend_backward(size_t T) {
  const size_t H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim, R = w_.latent_dim;
  ensure_size(dq_, T * H * (dn + dr));
  ensure_size(dkv_, T * H * (dn + dv));
  ensure_size(dckv_, T * (R + dr));
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
  return w_.check(kc::mla_prefill_backward(a, cu_seqlens_.data(), cu_seqlens_.size() - 1),
                  "attention backward");
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
  const size_t D = w_.hidden, H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim,
               R = w_.latent_dim;
  const size_t qk = dn + dr;
  caf::error err;

  // Post-attention norm; dx_mid = dx_out + its input gradient.
  dx_mid_.assign(dx_out, dx_out + T * D);
  if ((err = w_.check(kc::rmsnorm_backward(x_mid_.data(), w_.post_norm, dmlp_in, dx_mid_.data(),
                                           grads.post_attention_layernorm.data(), T, D, w_.eps,
                                           /*accumulate=*/true),
                      "post-attention norm backward")))
    return err;
  // o_proj; the residual passes dx_mid straight to dx_in.
  ensure_size(dattn_, T * H * dv);
  if ((err = w_.check(kc::linear_backward(attn_.data(), w_.o_proj, dx_mid_.data(), dattn_.data(),
                                          grads.o_proj.data(), T, H * dv, D),
                      "o_proj backward")))
    return err;
  if ((err = attend_backward(T))) return err;

  // Rotary parts: undo the rotation of the gradients (dq's rope part, dk_pe in dckv_).
  if ((err = w_.check(kc::rope_backward(w_.rope_params, q_rope_args(dq_.data(), T, H, dn, dr),
                                        positions_.data()),
                      "rope(q) backward")))
    return err;
  if ((err = w_.check(kc::rope_backward(w_.rope_params, k_rope_args(dckv_.data(), T, R, dr),
                                        positions_.data()),
                      "rope(k) backward")))
    return err;

  // kv_b_proj, then kv_a_layernorm row by row into dckv_'s latent part.
  ensure_size(dlatent_, T * R);
  if ((err =
           w_.check(kc::linear_backward(latent_.data(), w_.kv_b_proj, dkv_.data(), dlatent_.data(),
                                        grads.kv_b_proj.data(), T, R, H * (dn + dv)),
                    "kv_b_proj backward")))
    return err;
  for (size_t t = 0; t < T; ++t) {
    if ((err = w_.check(kc::rmsnorm_backward(ckv_.data() + t * (R + dr), w_.kv_a_norm,
                                             dlatent_.data() + t * R, dckv_.data() + t * (R + dr),
                                             grads.kv_a_layernorm.data(), 1, R, w_.eps),
                        "kv_a norm backward")))
      return err;
  }
  ensure_size(dnormed_, T * D);
  if ((err =
           w_.check(kc::linear_backward(normed_.data(), w_.kv_a_proj, dckv_.data(), dnormed_.data(),
                                        grads.kv_a_proj_with_mqa.data(), T, D, R + dr),
                    "kv_a_proj backward")))
    return err;

  // Query path, accumulating into dnormed.
  if (w_.q_rank > 0) {
    const size_t QR = w_.q_rank;
    ensure_size(dq_a_, T * QR);
    ensure_size(dq_a_raw_, T * QR);
    if ((err = w_.check(kc::linear_backward(q_a_.data(), w_.q_b_proj, dq_.data(), dq_a_.data(),
                                            grads.q_b_proj.data(), T, QR, H * qk),
                        "q_b_proj backward")))
      return err;
    if ((err = w_.check(
             kc::rmsnorm_backward(q_a_raw_.data(), w_.q_a_norm, dq_a_.data(), dq_a_raw_.data(),
                                  grads.q_a_layernorm.data(), T, QR, w_.eps),
             "q_a norm backward")))
      return err;
    if ((err = w_.check(kc::linear_backward(normed_.data(), w_.q_a_proj, dq_a_raw_.data(),
                                            dnormed_.data(), grads.q_a_proj.data(), T, D, QR,
                                            /*accumulate=*/true),
                        "q_a_proj backward")))
      return err;
  } else if ((err = w_.check(
                  kc::linear_backward(normed_.data(), w_.q_b_proj, dq_.data(), dnormed_.data(),
                                      grads.q_b_proj.data(), T, D, H * qk, /*accumulate=*/true),
                  "q_proj backward"))) {
    return err;
  }

  // Input norm on top of the residual's share (dx_in may alias dx_out, consumed above).
  std::copy(dx_mid_.begin(), dx_mid_.begin() + static_cast<ptrdiff_t>(T * D), dx_in);
  return w_.check(
      kc::rmsnorm_backward(x_in_.data(), w_.input_norm, dnormed_.data(), dx_in,
                           grads.input_layernorm.data(), T, D, w_.eps, /*accumulate=*/true),
      "input norm backward");
}

}  // namespace moe::model
