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
using detail::ensure_size;

caf::expected<attention_block> attention_block::bind(const model_config& c, int64_t layer,
                                                     const weight_lookup& weights) {
  auto w = detail::attention_weights::bind(c, layer, weights);
  if (!w) return w.error();
  attention_block b;
  b.w_ = *w;
  return b;
}

caf::error attention_block::project(const float* x, size_t T, std::span<const int64_t> positions,
                                    std::span<const int64_t> slots, latent_cache& cache) {
  const size_t D = w_.hidden, H = w_.num_heads, dn = w_.nope, dr = w_.rope, R = w_.latent_dim;
  const size_t qk = dn + dr;
  if (positions.size() != T || slots.size() != T) {
    return make_error(model_errc::bad_input, "attention: positions/slots do not match the tokens");
  }
  ensure_size(normed_, T * D);
  ensure_size(q_, T * H * qk);
  ensure_size(ckv_, T * (R + dr));
  ensure_size(latent_, T * R);
  if (w_.q_rank > 0) ensure_size(q_a_, T * w_.q_rank);
  if (auto err = w_.project(
          x, T, positions.data(),
          {normed_.data(), q_a_.data(), q_a_.data(), q_.data(), ckv_.data(), latent_.data()}))
    return err;
  return w_.check(kc::mla_cache_append(cache.layout(), cache.pool(w_.layer), latent_.data(), R,
                                       ckv_.data() + R, R + dr, slots.data(), T),
                  "cache append");
}

caf::error attention_block::finish(float* x, float* mlp_in, size_t T) {
  const size_t D = w_.hidden, H = w_.num_heads, dv = w_.v_dim;
  // x += attn . o_proj^T: the residual add rides on the GEMM's beta.
  if (auto err = w_.check(kc::linear(attn_.data(), w_.o_proj, x, T, H * dv, D, 1.0f), "o_proj"))
    return err;
  return w_.check(kc::rmsnorm(x, w_.post_norm, mlp_in, T, D, w_.eps), "post-attention norm");
}

caf::error attention_block::prefill(float* x, float* mlp_in, size_t T,
                                    const prefill_layout& layout, latent_cache& cache) {
  if (T == 0) return {};
  if (layout.cu_seqlens.size() < 2 || layout.cu_seqlens.back() != static_cast<int32_t>(T)) {
    return make_error(model_errc::bad_input, "attention: cu_seqlens do not cover the tokens");
  }
  if (auto err = project(x, T, layout.positions, layout.slots, cache)) return err;
  const size_t H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim, R = w_.latent_dim;
  ensure_size(kv_, T * H * (dn + dv));
  ensure_size(attn_, T * H * dv);
  if (auto err = w_.check(kc::linear(latent_.data(), w_.kv_b_proj, kv_.data(), T, R, H * (dn + dv)),
                          "kv_b_proj"))
    return err;
  const auto a = detail::mla_attention_views<kc::mla_prefill_args>(
      q_.data(), kv_.data(), ckv_.data(), attn_.data(), {H, dn, dr, dv, R}, w_.softmax_scale);
  const size_t num_seqs = layout.cu_seqlens.size() - 1;
  if (auto err =
          w_.check(kc::mla_prefill(a, layout.cu_seqlens.data(), nullptr, num_seqs), "mla prefill"))
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
  const size_t H = w_.num_heads, dn = w_.nope, dr = w_.rope, dv = w_.v_dim, R = w_.latent_dim;
  ensure_size(q_latent_, B * H * R);
  ensure_size(out_latent_, B * H * R);
  ensure_size(attn_, B * H * dv);
  const kc::mla_absorb_dims dims{H, dn, dv, R};
  if (auto err = w_.check(kc::mla_absorb_q(dims, q_.data(), H * (dn + dr), dn + dr, w_.kv_b_proj,
                                           q_latent_.data(), B),
                          "absorb q"))
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
  a.softmax_scale = w_.softmax_scale;
  if (auto err = w_.check(kc::mla_decode(cache.layout(), cache.pool(w_.layer), a), "mla decode"))
    return err;
  if (auto err =
          w_.check(kc::mla_absorb_out(dims, out_latent_.data(), w_.kv_b_proj, attn_.data(), B),
                   "absorb out"))
    return err;
  return finish(x, mlp_in, B);
}

}  // namespace moe::model
