// MLA decode on the GPU: the device twins of cpu::mla_cache_append and cpu::mla_decode
// (kernels/cpu/mla_attention.hpp), which define the paged latent cache, the slot mapping and the
// absorbed attention; read that header first. Per sequence b and head h:
//   out_latent[b, h, :] = softmax_j(scale * (q_latent[b, h, :] . c_j + q_pe[b, h, :] . k_pe_j)) . c_j
// over the seq_lens[b] cached tokens j, each found at pool[block_table[b, j / block_size],
// j % block_size] = [c_j (R) | k_pe_j (dr)].
//
// Decode reads every cached entry and does little arithmetic with it, so the kernel is laid out
// to read each entry from memory once per (sequence, group of up to 16 heads): one block per
// (sequence, split of the sequence, head group) walks its tokens in tiles staged through shared
// memory, with an online softmax in float32 (flash-decoding). With more than one split, each
// block leaves an unnormalised partial result, its running max and its sum in the workspace, and
// a second kernel combines the splits. The number of splits is chosen on the host from the
// shapes alone (mla_decode_plan), so mla_decode_workspace_bytes is known before the launch.
//
// Numerics: inputs are read in their storage dtype (f32 or bf16) and widened; dot products, the
// softmax (exp2 of log2(e)-scaled scores) and the weighted sums accumulate in float32, where the
// CPU reference uses double; the result is rounded to the storage dtype once. Expect float32
// rounding of dot products over R + dr terms and sums over up to a few thousand tokens: errors
// below 1e-6 of the latents' magnitude in practice (tests/unit/kernels/cuda_mla_test.cpp derives
// its 5e-6 bound). bf16 storage with R a multiple of 128 and R + dr a multiple of 16 (DeepSeek's
// 512 + 64) runs on tensor cores: the products of bf16 values are exact and summed in float32
// as before; the softmax weights, float32, enter the weighted sum as two bf16 terms (hi and the
// remainder lo), which carry them to ~2^-17 relative, so the bound above still holds (one bf16
// term alone would not: it moves outputs by up to 2^-9 of the weights).
//
// Device data the host cannot check are the caller's guarantee: block ids in [0, num_blocks),
// 0 <= seq_lens[b] <= max_blocks_per_seq * block_size, slots distinct and < num_blocks *
// block_size. Nothing outside the pool, the table row or the arguments is ever read or written
// when they are broken: a slot outside the pool is skipped (as a negative one); a token whose
// block id is outside [0, num_blocks) is left out of the softmax (as if not cached); seq_lens[b]
// is clamped to [0, max_blocks_per_seq * block_size]. The CPU kernels refuse such calls instead.
//
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: each launch is asynchronous on `stream`; the caller owns every buffer and the
// workspace and keeps them alive until the stream has passed the kernels. Concurrent decodes
// need distinct workspaces; concurrent appends need disjoint slots.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cpu/mla_attention.hpp"
#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The widest latent (R) the decode kernel accepts: each thread keeps 8 of a head's R
/// accumulators in registers (DeepSeek-V2/V3: 512).
inline constexpr int64_t mla_decode_max_latent_dim = 512;
/// The widest cache entry (R + dr) the decode kernel accepts: each lane keeps a 32nd of two
/// heads' queries in registers (DeepSeek-V2/V3: 512 + 64).
inline constexpr int64_t mla_decode_max_entry_dim = 576;
/// The most splits of one sequence (each adds R + 2 floats per head to the workspace).
inline constexpr int64_t mla_decode_max_splits = 64;

/// Writes tokens' latents and rotary keys into their slots of the pool: the raw element type is
/// copied, so bf16 moves bit for bit. Slots outside [0, num_blocks * block_size) are skipped.
/// With latent_norm, the latent is RMSNormed on the way (kv_a_layernorm: one launch instead of
/// a norm and a copy): weight * (v * rsqrt(mean(v^2) + eps)) in float32, as rmsnorm.hpp's kernel
/// (the sum of squares reduced in another order), rounded once to `dt`, into the entry and into
/// latent_out, which gets every token's normed latent, skipped slots' too.
struct mla_cache_append_args {
  cpu::mla_cache_layout layout;          ///< num_blocks, block_size, latent_dim R, rope_dim dr
  void* pool = nullptr;                  ///< (num_blocks, block_size, R + dr) of `dt`, device
  const void* latent = nullptr;          ///< (num_tokens, R) of `dt`, row stride latent_stride
  int64_t latent_stride = 0;             ///< elements; 0 = R
  const void* k_pe = nullptr;            ///< (num_tokens, dr) of `dt`, row stride k_pe_stride
  int64_t k_pe_stride = 0;               ///< elements; 0 = dr
  const int64_t* slot_mapping = nullptr; ///< (num_tokens) int64, device; negative skips
  int64_t num_tokens = 0;
  dtype dt = dtype::f32;                 ///< f32 or bf16, for the pool and both inputs
  const float* latent_norm = nullptr;    ///< optional (R) float32: norm the latent with it
  float latent_norm_eps = 1e-6f;
  void* latent_out = nullptr;            ///< with latent_norm: (num_tokens, R) of `dt`, packed
};

/// ok, unsupported_dtype, or unsupported_shape for a bad layout (a zero size, R or dr above
/// cpu::mla_max_dim, a pool past int64 elements), negative sizes or strides, a stride below its
/// row width, num_tokens > INT32_MAX, a null pointer (null is accepted when num_tokens == 0,
/// and k_pe when dr == 0), or latent_norm without latent_out or with a negative or non-finite
/// eps.
[[nodiscard]] kernel_status mla_cache_append_can_run(const mla_cache_append_args& a) noexcept;
[[nodiscard]] kernel_status mla_cache_append_run(const mla_cache_append_args& a,
                                                 cudaStream_t stream) noexcept;

struct mla_decode_args {
  cpu::mla_cache_layout layout;           ///< num_blocks, block_size, latent_dim R, rope_dim dr
  const void* pool = nullptr;             ///< (num_blocks, block_size, R + dr) of `dt`, device
  const void* q_latent = nullptr;         ///< (B, H, R) of `dt`, packed: from the absorption
  const void* q_pe = nullptr;             ///< (B, H, dr) of `dt`, rotated, strided:
  int64_t q_pe_token_stride = 0;          ///< elements; 0 = H * dr (q_pe = q + dn: H * (dn + dr))
  int64_t q_pe_head_stride = 0;           ///< elements; 0 = dr     (q_pe = q + dn: dn + dr)
  const int32_t* block_table = nullptr;   ///< (B, max_blocks_per_seq) int32, device
  int64_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;      ///< (B) int32, device: cached tokens, current included
  void* out_latent = nullptr;             ///< (B, H, R) of `dt`, packed
  int64_t batch = 0;
  int64_t num_heads = 0;
  float softmax_scale = 0.0f;             ///< (dn + dr)^-0.5 * multiplier, as on the CPU
  /// A bound on every seq_lens[b] the host knows (e.g. the scheduler's longest sequence), used
  /// only to size the splits; 0 = the table's capacity, max_blocks_per_seq * block_size. A
  /// longer sequence is still attended in full, its last split doing the extra tokens.
  int64_t max_seq_len = 0;
  dtype dt = dtype::f32;                  ///< f32 or bf16, for the pool, q and out_latent
  /// The fewest tokens the plan gives a split (rounded up to the 32-token tile); 0: the default,
  /// mla_decode_default_min_split_tokens. Fewer tokens a split make more, shorter blocks: at a
  /// short context and a small batch the grid is a few blocks, each walking its tiles one after
  /// another while the card idles (the kernel benchmark measures both at 160 tokens).
  int64_t min_split_tokens = 0;
};

/// The plan's shortest split unless mla_decode_args::min_split_tokens says otherwise.
inline constexpr int64_t mla_decode_default_min_split_tokens = 128;

/// How a decode is cut: one block per (sequence, split, head group). Splits cover split_len
/// tokens each (a multiple of the 32-token tile), the last one up to the end of its sequence.
/// Chosen to give the GPU a few hundred blocks (tuned for ~132 SMs), each split at least
/// min_split_tokens (128 by default), at most mla_decode_max_splits.
struct mla_decode_plan {
  int64_t num_head_groups = 0;  ///< ceil(H / 16)
  int64_t num_splits = 0;       ///< >= 1
  int64_t split_len = 0;        ///< tokens per split, a multiple of 32
};

/// ok, unsupported_dtype, or unsupported_shape for a bad layout (as for mla_cache_append), R or
/// R + dr above the limits above, num_heads < 1, batch < 0, more than INT32_MAX blocks in the
/// grid or the table, a null pointer (null is accepted when batch == 0; block_table when
/// max_blocks_per_seq == 0; q_pe when dr == 0), negative strides or min_split_tokens, or a
/// non-finite scale.
[[nodiscard]] kernel_status mla_decode_can_run(const mla_decode_args& a) noexcept;
/// The cut run() makes; meaningful only where mla_decode_can_run answers ok.
[[nodiscard]] mla_decode_plan mla_decode_make_plan(const mla_decode_args& a) noexcept;
/// Device bytes of scratch run() needs (256-byte aligned is enough): B * splits * H * (R + 2)
/// float32 with more than one split, else 0.
[[nodiscard]] size_t mla_decode_workspace_bytes(const mla_decode_args& a) noexcept;
/// One or two launches on `stream`. unsupported_shape also when `workspace_bytes` is below
/// mla_decode_workspace_bytes(a) (workspace may be null when that is 0).
[[nodiscard]] kernel_status mla_decode_run(const mla_decode_args& a, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
