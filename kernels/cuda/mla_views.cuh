// The strided q, k_nope, k_pe and v views every MLA prefill kernel (forward and backward) reads:
// the base of each kernel's parameter block, set from a call's arguments (any struct with
// mla_prefill_args' field names: q, its token and head strides, ..., num_heads, nope_dim,
// rope_dim, v_dim), a 0 stride meaning packed.
// Internal to kernels/cuda: .cu files only. Host functions.
#pragma once

#include <cstdint>

namespace moe::kernels::cuda::detail {

inline int64_t or_packed(int64_t stride, int64_t packed) noexcept {
  return stride == 0 ? packed : stride;
}

/// Elements of T; strides in elements.
template <typename T>
struct mla_qkv_views {
  const T* q;
  int64_t q_token_stride, q_head_stride;
  const T* k_nope;
  int64_t k_nope_token_stride, k_nope_head_stride;
  const T* k_pe;
  int64_t k_pe_token_stride;
  const T* v;
  int64_t v_token_stride, v_head_stride;
};

template <typename T, class Args>
void set_qkv_views(mla_qkv_views<T>& p, const Args& a) noexcept {
  const int64_t h = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  p.q = static_cast<const T*>(a.q);
  p.q_token_stride = or_packed(a.q_token_stride, h * (dn + dr));
  p.q_head_stride = or_packed(a.q_head_stride, dn + dr);
  p.k_nope = static_cast<const T*>(a.k_nope);
  p.k_nope_token_stride = or_packed(a.k_nope_token_stride, h * dn);
  p.k_nope_head_stride = or_packed(a.k_nope_head_stride, dn);
  p.k_pe = static_cast<const T*>(a.k_pe);
  p.k_pe_token_stride = or_packed(a.k_pe_token_stride, dr);
  p.v = static_cast<const T*>(a.v);
  p.v_token_stride = or_packed(a.v_token_stride, h * dv);
  p.v_head_stride = or_packed(a.v_head_stride, dv);
}

}  // namespace moe::kernels::cuda::detail
