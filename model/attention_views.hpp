// Where the attention core finds its operands in a layer's activations, for kernels/cpu's MLA
// prefill and its backward alike (attention_block and attention_training_block lay them out the
// same way): q (T, H, dn + dr) packed; k_nope and v inside kv_b_proj's output kv (T, H, dn + dv),
// each head's k_nope first; k_pe inside kv_a_proj's output ckv (T, R + dr), after the latent;
// the output (T, H, dv) packed. Internal to model/. Pure function.
#pragma once

#include <cstddef>

namespace moe::model::detail {

struct mla_dims {
  size_t heads = 0, nope = 0, rope = 0, v = 0, latent = 0;
};

/// Args: kernels::cpu::mla_prefill_args or mla_prefill_backward_args (what they share).
template <class Args>
Args mla_attention_views(const float* q, const float* kv, const float* ckv, float* out,
                         const mla_dims& d, float softmax_scale) {
  Args a;
  a.q = q;
  a.k_nope = kv;
  a.k_nope_token_stride = d.heads * (d.nope + d.v);
  a.k_nope_head_stride = d.nope + d.v;
  a.k_pe = ckv + d.latent;
  a.k_pe_token_stride = d.latent + d.rope;
  a.v = kv + d.nope;
  a.v_token_stride = d.heads * (d.nope + d.v);
  a.v_head_stride = d.nope + d.v;
  a.out = out;
  a.num_heads = d.heads;
  a.nope_dim = d.nope;
  a.rope_dim = d.rope;
  a.v_dim = d.v;
  a.softmax_scale = softmax_scale;
  return a;
}

}  // namespace moe::model::detail
