#include "kernels/cpu/mla_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/gemm.hpp"

namespace moe::kernels::cpu {
namespace {

size_t packed_or(size_t stride, size_t packed) noexcept { return stride == 0 ? packed : stride; }

bool dim_ok(size_t d) noexcept { return d <= mla_max_dim; }

double dot(const float* a, const float* b, size_t n) noexcept {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Softmax-weighted sum of value rows in one pass: keeps the running max so exp never overflows,
// and rescales what was accumulated when the max grows.
class online_softmax {
 public:
  explicit online_softmax(size_t dim) noexcept : dim_(dim) { reset(); }

  void reset() noexcept {
    max_ = -std::numeric_limits<double>::infinity();
    sum_ = 0.0;
    for (size_t i = 0; i < dim_; ++i) acc_[i] = 0.0;
  }

  void add(double score, const float* value) noexcept {
    if (score > max_) {
      const double rescale = std::exp(max_ - score);  // 0 on the first key (max_ = -inf)
      sum_ *= rescale;
      for (size_t i = 0; i < dim_; ++i) acc_[i] *= rescale;
      max_ = score;
    }
    const double p = std::exp(score - max_);
    sum_ += p;
    for (size_t i = 0; i < dim_; ++i) acc_[i] += p * value[i];
  }

  /// -inf when nothing was added.
  [[nodiscard]] double log_sum_exp() const noexcept {
    return sum_ > 0.0 ? max_ + std::log(sum_) : -std::numeric_limits<double>::infinity();
  }

  /// Zeros when nothing was added (an empty sequence).
  void write(float* out) const noexcept {
    for (size_t i = 0; i < dim_; ++i)
      out[i] = sum_ > 0.0 ? static_cast<float>(acc_[i] / sum_) : 0.0f;
  }

 private:
  size_t dim_;
  double max_;
  double sum_;
  double acc_[mla_max_dim];
};

template <class Offset>
kernel_status check_offsets(const Offset* cu, size_t num_seqs) noexcept {
  if (cu == nullptr || cu[0] != 0) return kernel_status::unsupported_shape;
  for (size_t s = 0; s < num_seqs; ++s)
    if (cu[s + 1] < cu[s]) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status check_prefill(const mla_prefill_args& a) noexcept {
  if (a.num_heads == 0 || a.v_dim == 0 || !dim_ok(a.nope_dim) || !dim_ok(a.rope_dim) ||
      !dim_ok(a.v_dim))
    return kernel_status::unsupported_shape;
  if (a.q == nullptr || a.v == nullptr || a.out == nullptr) return kernel_status::unsupported_shape;
  if ((a.nope_dim > 0 && a.k_nope == nullptr) || (a.rope_dim > 0 && a.k_pe == nullptr))
    return kernel_status::unsupported_shape;
  if (!std::isfinite(a.softmax_scale)) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

template <class Offset>
kernel_status prefill(const mla_prefill_args& a, const Offset* cu_q, const Offset* cu_k,
                      size_t num_seqs) noexcept {
  if (num_seqs == 0) return kernel_status::ok;
  if (cu_k == nullptr) cu_k = cu_q;
  if (auto s = check_offsets(cu_q, num_seqs); s != kernel_status::ok) return s;
  if (auto s = check_offsets(cu_k, num_seqs); s != kernel_status::ok) return s;
  for (size_t s = 0; s < num_seqs; ++s)
    if (cu_k[s + 1] - cu_k[s] < cu_q[s + 1] - cu_q[s]) return kernel_status::unsupported_shape;
  if (cu_q[num_seqs] == 0) return kernel_status::ok;
  if (auto s = check_prefill(a); s != kernel_status::ok) return s;

  const size_t num_heads = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  const size_t q_ts = packed_or(a.q_token_stride, num_heads * (dn + dr));
  const size_t q_hs = packed_or(a.q_head_stride, dn + dr);
  const size_t kn_ts = packed_or(a.k_nope_token_stride, num_heads * dn);
  const size_t kn_hs = packed_or(a.k_nope_head_stride, dn);
  const size_t kp_ts = packed_or(a.k_pe_token_stride, dr);
  const size_t v_ts = packed_or(a.v_token_stride, num_heads * dv);
  const size_t v_hs = packed_or(a.v_head_stride, dv);

  online_softmax acc(dv);
  for (size_t s = 0; s < num_seqs; ++s) {
    const auto q_begin = static_cast<size_t>(cu_q[s]);
    const auto k_begin = static_cast<size_t>(cu_k[s]);
    const auto num_q = static_cast<size_t>(cu_q[s + 1] - cu_q[s]);
    const auto num_k = static_cast<size_t>(cu_k[s + 1] - cu_k[s]);
    const size_t num_prefix = num_k - num_q;
    for (size_t i = 0; i < num_q; ++i) {
      const size_t t = q_begin + i;
      for (size_t h = 0; h < num_heads; ++h) {
        const float* q_nope = a.q + t * q_ts + h * q_hs;
        const float* q_pe = q_nope + dn;
        acc.reset();
        for (size_t j = 0; j <= num_prefix + i; ++j) {
          const size_t k = k_begin + j;
          const double score = dot(q_nope, a.k_nope + k * kn_ts + h * kn_hs, dn) +
                               dot(q_pe, a.k_pe + k * kp_ts, dr);
          acc.add(score * a.softmax_scale, a.v + k * v_ts + h * v_hs);
        }
        acc.write(a.out + (t * num_heads + h) * dv);
        if (a.lse != nullptr) a.lse[t * num_heads + h] = acc.log_sum_exp();
      }
    }
  }
  return kernel_status::ok;
}

// The backward's strided views, resolved once; `dS_ij` and `P_ij` recomputed per pair.
struct backward_views {
  const mla_prefill_backward_args& a;
  size_t q_ts, q_hs, kn_ts, kn_hs, kp_ts, v_ts, v_hs;

  explicit backward_views(const mla_prefill_backward_args& args) noexcept
      : a(args),
        q_ts(packed_or(a.q_token_stride, a.num_heads * (a.nope_dim + a.rope_dim))),
        q_hs(packed_or(a.q_head_stride, a.nope_dim + a.rope_dim)),
        kn_ts(packed_or(a.k_nope_token_stride, a.num_heads * a.nope_dim)),
        kn_hs(packed_or(a.k_nope_head_stride, a.nope_dim)),
        kp_ts(packed_or(a.k_pe_token_stride, a.rope_dim)),
        v_ts(packed_or(a.v_token_stride, a.num_heads * a.v_dim)),
        v_hs(packed_or(a.v_head_stride, a.v_dim)) {}

  const float* q(size_t t, size_t h) const noexcept { return a.q + t * q_ts + h * q_hs; }
  const float* k_nope(size_t t, size_t h) const noexcept {
    return a.k_nope + t * kn_ts + h * kn_hs;
  }
  const float* k_pe(size_t t) const noexcept { return a.k_pe + t * kp_ts; }
  const float* v(size_t t, size_t h) const noexcept { return a.v + t * v_ts + h * v_hs; }
  const float* dout(size_t t, size_t h) const noexcept {
    return a.dout + (t * a.num_heads + h) * a.v_dim;
  }

  // D_i = dout_i . out_i.
  double row_delta(size_t t, size_t h) const noexcept {
    return dot(dout(t, h), a.out + (t * a.num_heads + h) * a.v_dim, a.v_dim);
  }

  // P_ij for query t and key k (same head), and dS_ij = P_ij (dP_ij - D_i).
  void pair(size_t t, size_t k, size_t h, double delta, double& p, double& ds) const noexcept {
    const size_t dn = a.nope_dim, dr = a.rope_dim;
    const float* qt = q(t, h);
    const double score = (dot(qt, k_nope(k, h), dn) + dot(qt + dn, k_pe(k), dr)) * a.softmax_scale;
    p = std::exp(score - a.lse[t * a.num_heads + h]);
    ds = p * (dot(dout(t, h), v(k, h), a.v_dim) - delta);
  }
};

kernel_status check_backward(const mla_prefill_backward_args& a) noexcept {
  if (a.num_heads == 0 || a.v_dim == 0 || !dim_ok(a.nope_dim) || !dim_ok(a.rope_dim) ||
      !dim_ok(a.v_dim) || !dim_ok(a.nope_dim + a.rope_dim))
    return kernel_status::unsupported_shape;
  if (a.q == nullptr || a.v == nullptr || a.out == nullptr || a.lse == nullptr ||
      a.dout == nullptr || (a.nope_dim > 0 && a.k_nope == nullptr) ||
      (a.rope_dim > 0 && a.k_pe == nullptr))
    return kernel_status::unsupported_shape;
  if (!std::isfinite(a.softmax_scale)) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status check_layout(const mla_cache_layout& l, const void* pool) noexcept {
  if (pool == nullptr || l.num_blocks == 0 || l.block_size == 0 || l.latent_dim == 0 ||
      !dim_ok(l.latent_dim) || !dim_ok(l.rope_dim))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

size_t entry_floats(const mla_cache_layout& l) noexcept { return l.latent_dim + l.rope_dim; }

size_t blocks_for(size_t num_tokens, size_t block_size) noexcept {
  return (num_tokens + block_size - 1) / block_size;
}

bool block_ids_ok(const mla_cache_layout& l, const int32_t* ids, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || static_cast<size_t>(ids[i]) >= l.num_blocks) return false;
  return true;
}

// The cache entry of a sequence's token j.
const float* entry_of(const mla_cache_layout& l, const float* pool, const int32_t* block_ids,
                      size_t j) noexcept {
  const auto block = static_cast<size_t>(block_ids[j / l.block_size]);
  return pool + (block * l.block_size + j % l.block_size) * entry_floats(l);
}

kernel_status check_decode(const mla_cache_layout& l, const float* pool,
                           const mla_decode_args& a) noexcept {
  if (auto s = check_layout(l, pool); s != kernel_status::ok) return s;
  if (a.num_heads == 0 || a.q_latent == nullptr || a.out_latent == nullptr ||
      a.seq_lens == nullptr || (l.rope_dim > 0 && a.q_pe == nullptr) ||
      !std::isfinite(a.softmax_scale))
    return kernel_status::unsupported_shape;
  for (size_t b = 0; b < a.batch; ++b) {
    if (a.seq_lens[b] < 0) return kernel_status::unsupported_shape;
    const size_t needed = blocks_for(static_cast<size_t>(a.seq_lens[b]), l.block_size);
    if (needed == 0) continue;
    if (needed > a.max_blocks_per_seq || a.block_table == nullptr)
      return kernel_status::unsupported_shape;
    if (!block_ids_ok(l, a.block_table + b * a.max_blocks_per_seq, needed))
      return kernel_status::unsupported_shape;
  }
  return kernel_status::ok;
}

}  // namespace

kernel_status mla_prefill(const mla_prefill_args& a, const int32_t* cu_seqlens_q,
                          const int32_t* cu_seqlens_k, size_t num_seqs) noexcept {
  return prefill(a, cu_seqlens_q, cu_seqlens_k, num_seqs);
}

kernel_status mla_prefill(const mla_prefill_args& a, const int64_t* cu_seqlens_q,
                          const int64_t* cu_seqlens_k, size_t num_seqs) noexcept {
  return prefill(a, cu_seqlens_q, cu_seqlens_k, num_seqs);
}

kernel_status mla_prefill_backward(const mla_prefill_backward_args& a, const int32_t* cu_seqlens,
                                   size_t num_seqs) noexcept {
  if (num_seqs == 0) return kernel_status::ok;
  if (auto s = check_offsets(cu_seqlens, num_seqs); s != kernel_status::ok) return s;
  if (cu_seqlens[num_seqs] == 0) return kernel_status::ok;
  if (auto s = check_backward(a); s != kernel_status::ok) return s;

  const backward_views w(a);
  const size_t num_heads = a.num_heads, dn = a.nope_dim, dr = a.rope_dim, dv = a.v_dim;
  const double scale = a.softmax_scale;
  double acc[3 * mla_max_dim];  // dq (dn + dr), or one head's dk_nope | dk_pe | dv
  double acc_pe[mla_max_dim];   // dk_pe summed over the heads so far
  for (size_t s = 0; s < num_seqs; ++s) {
    const auto begin = static_cast<size_t>(cu_seqlens[s]);
    const auto end = static_cast<size_t>(cu_seqlens[s + 1]);
    // Queries: dq_i sums over the keys j <= i.
    for (size_t t = begin; a.dq != nullptr && t < end; ++t) {
      for (size_t h = 0; h < num_heads; ++h) {
        const double delta = w.row_delta(t, h);
        std::fill(acc, acc + dn + dr, 0.0);
        for (size_t k = begin; k <= t; ++k) {
          double p, ds;
          w.pair(t, k, h, delta, p, ds);
          const float* kn = w.k_nope(k, h);
          const float* kp = w.k_pe(k);
          for (size_t i = 0; i < dn; ++i) acc[i] += ds * kn[i];
          for (size_t i = 0; i < dr; ++i) acc[dn + i] += ds * kp[i];
        }
        float* dq = a.dq + (t * num_heads + h) * (dn + dr);
        for (size_t i = 0; i < dn + dr; ++i) dq[i] = static_cast<float>(acc[i] * scale);
      }
    }
    // Keys: dk_j and dv_j sum over the queries i >= j of each head; dk_pe_j then over the heads
    // (the CUDA twin's order, there in float32).
    if (a.dk_nope == nullptr && a.dk_pe == nullptr && a.dv == nullptr) continue;
    for (size_t k = begin; k < end; ++k) {
      std::fill(acc_pe, acc_pe + dr, 0.0);
      for (size_t h = 0; h < num_heads; ++h) {
        std::fill(acc, acc + dn + dr + dv, 0.0);
        for (size_t t = k; t < end; ++t) {
          double p, ds;
          w.pair(t, k, h, w.row_delta(t, h), p, ds);
          const float* qt = w.q(t, h);
          const float* g = w.dout(t, h);
          for (size_t i = 0; i < dn + dr; ++i) acc[i] += ds * qt[i];
          for (size_t i = 0; i < dv; ++i) acc[dn + dr + i] += p * g[i];
        }
        for (size_t i = 0; i < dr; ++i) acc_pe[i] += acc[dn + i];
        if (a.dk_nope != nullptr) {
          float* d = a.dk_nope + k * packed_or(a.dk_nope_token_stride, num_heads * dn) +
                     h * packed_or(a.dk_nope_head_stride, dn);
          for (size_t i = 0; i < dn; ++i) d[i] = static_cast<float>(acc[i] * scale);
        }
        if (a.dv != nullptr) {
          float* d = a.dv + k * packed_or(a.dv_token_stride, num_heads * dv) +
                     h * packed_or(a.dv_head_stride, dv);
          for (size_t i = 0; i < dv; ++i) d[i] = static_cast<float>(acc[dn + dr + i]);
        }
      }
      if (a.dk_pe != nullptr) {
        float* d = a.dk_pe + k * packed_or(a.dk_pe_token_stride, dr);
        for (size_t i = 0; i < dr; ++i) d[i] = static_cast<float>(acc_pe[i] * scale);
      }
    }
  }
  return kernel_status::ok;
}

kernel_status mla_cache_append(const mla_cache_layout& layout, float* pool, const float* latent,
                               size_t latent_stride, const float* k_pe, size_t k_pe_stride,
                               const int64_t* slot_mapping, size_t num_tokens) noexcept {
  if (num_tokens == 0) return kernel_status::ok;
  if (auto s = check_layout(layout, pool); s != kernel_status::ok) return s;
  if (slot_mapping == nullptr || latent == nullptr || (layout.rope_dim > 0 && k_pe == nullptr))
    return kernel_status::unsupported_shape;
  const size_t num_slots = layout.num_blocks * layout.block_size;
  for (size_t t = 0; t < num_tokens; ++t)
    if (slot_mapping[t] >= 0 && static_cast<size_t>(slot_mapping[t]) >= num_slots)
      return kernel_status::unsupported_shape;

  const size_t r = layout.latent_dim, dr = layout.rope_dim;
  const size_t lat_stride = packed_or(latent_stride, r);
  const size_t pe_stride = packed_or(k_pe_stride, dr);
  for (size_t t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] < 0) continue;
    float* entry = pool + static_cast<size_t>(slot_mapping[t]) * entry_floats(layout);
    const float* src_latent = latent + t * lat_stride;
    for (size_t i = 0; i < r; ++i) entry[i] = src_latent[i];
    for (size_t i = 0; i < dr; ++i) entry[r + i] = k_pe[t * pe_stride + i];
  }
  return kernel_status::ok;
}

kernel_status mla_cache_gather(const mla_cache_layout& layout, const float* pool,
                               const int32_t* block_ids, size_t num_tokens, float* latent,
                               float* k_pe) noexcept {
  if (num_tokens == 0) return kernel_status::ok;
  if (auto s = check_layout(layout, pool); s != kernel_status::ok) return s;
  if (block_ids == nullptr || latent == nullptr || (layout.rope_dim > 0 && k_pe == nullptr))
    return kernel_status::unsupported_shape;
  if (!block_ids_ok(layout, block_ids, blocks_for(num_tokens, layout.block_size)))
    return kernel_status::unsupported_shape;
  const size_t r = layout.latent_dim, dr = layout.rope_dim;
  for (size_t j = 0; j < num_tokens; ++j) {
    const float* entry = entry_of(layout, pool, block_ids, j);
    for (size_t i = 0; i < r; ++i) latent[j * r + i] = entry[i];
    for (size_t i = 0; i < dr; ++i) k_pe[j * dr + i] = entry[r + i];
  }
  return kernel_status::ok;
}

kernel_status mla_decode(const mla_cache_layout& layout, const float* pool,
                         const mla_decode_args& a) noexcept {
  if (a.batch == 0) return kernel_status::ok;
  if (auto s = check_decode(layout, pool, a); s != kernel_status::ok) return s;

  const size_t num_heads = a.num_heads, r = layout.latent_dim, dr = layout.rope_dim;
  const size_t pe_ts = packed_or(a.q_pe_token_stride, num_heads * dr);
  const size_t pe_hs = packed_or(a.q_pe_head_stride, dr);
  online_softmax acc(r);
  for (size_t b = 0; b < a.batch; ++b) {
    const auto seq_len = static_cast<size_t>(a.seq_lens[b]);
    const int32_t* block_ids = a.block_table + b * a.max_blocks_per_seq;
    for (size_t h = 0; h < num_heads; ++h) {
      const float* q_latent = a.q_latent + (b * num_heads + h) * r;
      const float* q_pe = a.q_pe + b * pe_ts + h * pe_hs;
      acc.reset();
      for (size_t j = 0; j < seq_len; ++j) {
        const float* c = entry_of(layout, pool, block_ids, j);
        const double score = dot(q_latent, c, r) + dot(q_pe, c + r, dr);
        acc.add(score * a.softmax_scale, c);  // the values are the latents themselves
      }
      acc.write(a.out_latent + (b * num_heads + h) * r);
    }
  }
  return kernel_status::ok;
}

kernel_status mla_absorb_q(const mla_absorb_dims& d, const float* q_nope, size_t q_token_stride,
                           size_t q_head_stride, const float* kv_b_weight, float* q_latent,
                           size_t num_tokens) noexcept {
  if (d.num_heads == 0 || d.latent_dim == 0) return kernel_status::unsupported_shape;
  gemm_args g;
  g.m = num_tokens;
  g.n = d.latent_dim;
  g.k = d.nope_dim;
  g.a = q_nope;
  g.lda = packed_or(q_token_stride, d.num_heads * d.nope_dim);
  g.b = kv_b_weight;  // W_UK[h]: (dn, R), row-major, ldb = R
  g.ldb = d.latent_dim;
  g.c = q_latent;
  g.ldc = d.num_heads * d.latent_dim;
  return gemm_strided_batched(g, d.num_heads, packed_or(q_head_stride, d.nope_dim),
                              (d.nope_dim + d.v_dim) * d.latent_dim, d.latent_dim);
}

kernel_status mla_absorb_out(const mla_absorb_dims& d, const float* out_latent,
                             const float* kv_b_weight, float* out, size_t num_tokens) noexcept {
  if (d.num_heads == 0 || d.latent_dim == 0 || d.v_dim == 0 || kv_b_weight == nullptr)
    return kernel_status::unsupported_shape;
  gemm_args g;
  g.trans_b = transpose::yes;
  g.m = num_tokens;
  g.n = d.v_dim;
  g.k = d.latent_dim;
  g.a = out_latent;
  g.lda = d.num_heads * d.latent_dim;
  g.b = kv_b_weight + d.nope_dim * d.latent_dim;  // W_UV[0]: (dv, R) after W_UK[0]
  g.ldb = d.latent_dim;
  g.c = out;
  g.ldc = d.num_heads * d.v_dim;
  return gemm_strided_batched(g, d.num_heads, d.latent_dim,
                              (d.nope_dim + d.v_dim) * d.latent_dim, d.v_dim);
}

}  // namespace moe::kernels::cpu
