// Multi-head latent attention (DeepSeek-V2/V3 MLA) on the CPU: the reference for every backend.
//
// Names: H heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim,
// R = kv_lora_rank (the latent width). kv_b_proj's weight is (H * (dn + dv), R), row-major,
// with per head h the rows [h*(dn+dv), h*(dn+dv)+dn) = W_UK[h] (dn, R) producing k_nope, then
// the rows [h*(dn+dv)+dn, (h+1)*(dn+dv)) = W_UV[h] (dv, R) producing v.
//
// Two ways to the same attention:
//  - prefill (mla_prefill): decompressed keys/values, causal within each packed sequence;
//  - decode (mla_decode): one query per sequence against the compressed, paged latent cache,
//    with kv_b_proj absorbed: q_latent = q_nope . W_UK[h] (mla_absorb_q), then
//    out_latent = softmax(scale * (q_latent . c + q_pe . k_pe)) . c, then
//    out = out_latent . W_UV[h]^T (mla_absorb_out). q_latent . c == q_nope . (W_UK[h] c).
//
// Strided views: every (tokens, heads, dim) input takes element strides; a stride of 0 means
// packed (token_stride = heads * dim, head_stride = dim). So kv_b_proj's output
// kv (T, H, dn + dv) is passed as k_nope = kv, v = kv + dn, both with token_stride
// H * (dn + dv) and head_stride dn + dv, without a copy. Outputs are always packed.
//
// Precision: float32 inputs, dot products and softmax in double (online softmax), outputs
// rounded to float once. No allocation: dims are bounded by mla_max_dim.
// Thread safety: pure functions of their arguments; safe to call concurrently on disjoint
// outputs (mla_cache_append: on disjoint slots). The caller owns every buffer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// The largest dn, dr, dv or R accepted (DeepSeek-V3: 128, 64, 128, 512).
inline constexpr size_t mla_max_dim = 2048;

// ---------------------------------------------------------------------------------------------
// Prefill: decompressed keys and values.

struct mla_prefill_args {
  const float* q = nullptr;         ///< (Tq, H, dn + dr): nope part, then rope part (rotated)
  size_t q_token_stride = 0;
  size_t q_head_stride = 0;
  const float* k_nope = nullptr;    ///< (Tk, H, dn)
  size_t k_nope_token_stride = 0;
  size_t k_nope_head_stride = 0;
  const float* k_pe = nullptr;      ///< (Tk, dr): one rotary key shared by every head (rotated)
  size_t k_pe_token_stride = 0;
  const float* v = nullptr;         ///< (Tk, H, dv)
  size_t v_token_stride = 0;
  size_t v_head_stride = 0;
  float* out = nullptr;             ///< (Tq, H, dv), packed
  /// (Tq, H), packed; may be null. Each row's log-sum-exp of its scaled scores, natural log,
  /// in double: what mla_prefill_backward recomputes the probabilities from (exp(score - lse)),
  /// so training keeps O(T) per head rather than the probabilities. -inf for a row without keys.
  double* lse = nullptr;
  size_t num_heads = 0;
  size_t nope_dim = 0;
  size_t rope_dim = 0;
  size_t v_dim = 0;
  float softmax_scale = 0.0f;       ///< (dn + dr)^-0.5 * rope_softmax_scale_multiplier
};

/// Causal attention over `num_seqs` sequences packed along the token axis.
/// cu_seqlens_q: (num_seqs + 1) offsets into q/out, from 0, non-decreasing; Tq is the last.
/// cu_seqlens_k: (num_seqs + 1) offsets into k_nope/k_pe/v, or null for the same as q.
/// A sequence with Lq queries and Lk >= Lq keys has an already-cached prefix of Lk - Lq tokens:
/// its query i (0-based) sees keys [0, Lk - Lq + i] (bottom-right aligned, as FlashAttention's
/// varlen). Without a prefix, query i sees keys [0, i].
/// unsupported_shape (out untouched) for bad offsets, Lk < Lq, a dim that is 0 (H, dv) or above
/// mla_max_dim, a missing pointer or a non-finite scale.
[[nodiscard]] kernel_status mla_prefill(const mla_prefill_args& a, const int32_t* cu_seqlens_q,
                                        const int32_t* cu_seqlens_k, size_t num_seqs) noexcept;
[[nodiscard]] kernel_status mla_prefill(const mla_prefill_args& a, const int64_t* cu_seqlens_q,
                                        const int64_t* cu_seqlens_k, size_t num_seqs) noexcept;

// ---------------------------------------------------------------------------------------------
// Prefill backward: the training reference of the attention core (FlashAttention's backward).
//
// Per sequence and head, with S = scale * (q_nope . k_nope + q_pe . k_pe), P = softmax(S) over
// the causal keys, out = P v, and dout the gradient with respect to out:
//   P_ij = exp(S_ij - lse_i)          (recomputed from the forward's log-sum-exp)
//   dP_ij = dout_i . v_j,  D_i = dout_i . out_i  (= sum_j P_ij dP_ij)
//   dS_ij = P_ij (dP_ij - D_i)
//   dq_i = scale * sum_j dS_ij k_j,  dk_j = scale * sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i
// dk's rope part sums over heads as well, since every head reads the one shared k_pe.
// D comes from the forward's out rather than from the row's P and dP, so that no pass needs a
// per-row buffer (this function allocates nothing) and the CUDA twin sweeps the keys once: out
// is rounded to float once, so D moves by at most 2^-24 sum_c |dout_ic out_ic|.
//
// Only Lk == Lq (no cached prefix): training sees whole sequences. Dot products and sums are in
// double, over the keys (dq) or the queries (dk, dv; then the heads for dk_pe) in ascending
// order, and every output is rounded to float once.

struct mla_prefill_backward_args {
  // The forward's inputs, as mla_prefill_args (strides 0 = packed).
  const float* q = nullptr;         ///< (T, H, dn + dr)
  size_t q_token_stride = 0;
  size_t q_head_stride = 0;
  const float* k_nope = nullptr;    ///< (T, H, dn)
  size_t k_nope_token_stride = 0;
  size_t k_nope_head_stride = 0;
  const float* k_pe = nullptr;      ///< (T, dr), shared by every head
  size_t k_pe_token_stride = 0;
  const float* v = nullptr;         ///< (T, H, dv)
  size_t v_token_stride = 0;
  size_t v_head_stride = 0;
  // What the forward produced, and the gradient of its output.
  const float* out = nullptr;       ///< (T, H, dv), packed
  const double* lse = nullptr;      ///< (T, H), packed: mla_prefill_args::lse
  const float* dout = nullptr;      ///< (T, H, dv), packed
  // Gradients, written (=); each may be null, which skips it; none may overlap an input. Strides
  // 0 = packed, so that dk_nope and dv can land in kv_b_proj's gradient (T, H, dn + dv) and dk_pe
  // in kv_a_proj's.
  float* dq = nullptr;              ///< (T, H, dn + dr), packed
  float* dk_nope = nullptr;         ///< (T, H, dn)
  size_t dk_nope_token_stride = 0;
  size_t dk_nope_head_stride = 0;
  float* dk_pe = nullptr;           ///< (T, dr): summed over heads
  size_t dk_pe_token_stride = 0;
  float* dv = nullptr;              ///< (T, H, dv)
  size_t dv_token_stride = 0;
  size_t dv_head_stride = 0;
  size_t num_heads = 0;
  size_t nope_dim = 0;
  size_t rope_dim = 0;
  size_t v_dim = 0;
  float softmax_scale = 0.0f;       ///< the forward's
};

/// cu_seqlens: (num_seqs + 1) offsets from 0, non-decreasing; T is the last. Query i of a
/// sequence sees its keys [0, i], as the forward without cu_seqlens_k. Rows past T are untouched.
/// unsupported_shape (nothing written) for bad offsets, H or dv of 0, a dim above mla_max_dim, a
/// missing input (k_nope only when dn > 0, k_pe only when dr > 0), or a non-finite scale.
[[nodiscard]] kernel_status mla_prefill_backward(const mla_prefill_backward_args& a,
                                                 const int32_t* cu_seqlens,
                                                 size_t num_seqs) noexcept;

// ---------------------------------------------------------------------------------------------
// The compressed, paged latent KV cache (one per layer).
//
// pool: (num_blocks, block_size, R + dr) float. A token's entry is [c (R) | k_pe (dr)]: c is the
// kv_a_layernorm-normed latent, k_pe the rotary key after rope_apply (de-interleaved order).
// A slot is block_id * block_size + offset_in_block (vLLM's slot mapping). A sequence's token j
// lives in block block_table[b, j / block_size] at offset j % block_size.

struct mla_cache_layout {
  size_t num_blocks = 0;
  size_t block_size = 0;
  size_t latent_dim = 0;  ///< R
  size_t rope_dim = 0;    ///< dr
};

/// Writes tokens' latents and rotary keys into their slots.
/// latent: (num_tokens, R) with row stride latent_stride (0 = R);
/// k_pe:   (num_tokens, dr) with row stride k_pe_stride (0 = dr);
/// slot_mapping: (num_tokens); a negative slot skips that token (padding).
/// unsupported_shape (pool untouched) for a slot >= num_blocks * block_size or a bad layout.
[[nodiscard]] kernel_status mla_cache_append(const mla_cache_layout& layout, float* pool,
                                             const float* latent, size_t latent_stride,
                                             const float* k_pe, size_t k_pe_stride,
                                             const int64_t* slot_mapping,
                                             size_t num_tokens) noexcept;

/// Reads one sequence's first `num_tokens` entries back into packed latent (num_tokens, R) and
/// k_pe (num_tokens, dr), e.g. to decompress a cached prefix for mla_prefill.
/// block_ids: that sequence's row of the block table (>= ceil(num_tokens / block_size) ids).
[[nodiscard]] kernel_status mla_cache_gather(const mla_cache_layout& layout, const float* pool,
                                             const int32_t* block_ids, size_t num_tokens,
                                             float* latent, float* k_pe) noexcept;

// ---------------------------------------------------------------------------------------------
// Decode: one query per sequence, absorbed, against the paged cache.

struct mla_decode_args {
  const float* q_latent = nullptr;      ///< (B, H, R), packed: from mla_absorb_q
  const float* q_pe = nullptr;          ///< (B, H, dr), rotated
  size_t q_pe_token_stride = 0;         ///< q_pe = q + dn: token stride H * (dn + dr)
  size_t q_pe_head_stride = 0;          ///<                 head stride dn + dr
  const int32_t* block_table = nullptr; ///< (B, max_blocks_per_seq)
  size_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;    ///< (B): cached tokens, the current one included
  float* out_latent = nullptr;          ///< (B, H, R), packed
  size_t batch = 0;
  size_t num_heads = 0;
  float softmax_scale = 0.0f;           ///< (dn + dr)^-0.5 * multiplier, as in prefill
};

/// Append the current token (mla_cache_append) before calling this: each query attends to all
/// seq_lens[b] cached tokens. seq_lens[b] == 0 gives a zero output (an idle batch slot).
/// unsupported_shape (out untouched) when a sequence needs more than max_blocks_per_seq blocks,
/// a needed block id is outside [0, num_blocks), or dims/strides/pointers are bad.
[[nodiscard]] kernel_status mla_decode(const mla_cache_layout& layout, const float* pool,
                                       const mla_decode_args& a) noexcept;

// ---------------------------------------------------------------------------------------------
// Weight absorption: per-head batched products with kv_b_proj's slices (through OpenBLAS).

struct mla_absorb_dims {
  size_t num_heads = 0;
  size_t nope_dim = 0;    ///< dn
  size_t v_dim = 0;       ///< dv
  size_t latent_dim = 0;  ///< R
};

/// q_latent[t, h, :] (R) = q_nope[t, h, :] (dn) . W_UK[h] (dn, R)
/// q_nope: (T, H, dn) inside q: pass q with token_stride H * (dn + dr), head_stride dn + dr
/// (0 = packed). kv_b_weight: (H * (dn + dv), R). q_latent: (T, H, R), packed.
[[nodiscard]] kernel_status mla_absorb_q(const mla_absorb_dims& d, const float* q_nope,
                                         size_t q_token_stride, size_t q_head_stride,
                                         const float* kv_b_weight, float* q_latent,
                                         size_t num_tokens) noexcept;

/// out[t, h, :] (dv) = out_latent[t, h, :] (R) . W_UV[h]^T (R, dv)
/// out_latent: (T, H, R) packed; out: (T, H, dv) packed, ready for o_proj as (T, H * dv).
[[nodiscard]] kernel_status mla_absorb_out(const mla_absorb_dims& d, const float* out_latent,
                                           const float* kv_b_weight, float* out,
                                           size_t num_tokens) noexcept;

}  // namespace moe::kernels::cpu
