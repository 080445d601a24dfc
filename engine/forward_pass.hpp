// The GPU engine's forward pass over one step's tokens, kernel by kernel: the device mirror of
// model/reference_engine.cpp (same blocks, same order), for prefill (decompressed K/V, causal
// within each packed sequence) and decode (one token per sequence, absorbed attention over the
// paged latent cache). Internal to engine/: gpu_engine.cpp prepares the step (host checks,
// cache blocks, the metadata) and queues it with enqueue_step, eagerly or into a decode graph.
//
// Differences from the reference's order of operations, all within rounding:
//  - the residual add after each FFN is fused into the next RMSNorm (the next layer's input
//    norm, or the final norm): x += ffn_out, then norm(x), as one kernel; the sum is rounded to
//    the storage dtype before it is normed, exactly as the reference's separate add;
//  - q_a_proj (q_proj without q_lora_rank) and kv_a_proj are one product over their stacked
//    weights (device_weights.hpp), each row's slices read in place with the row's stride;
//  - q's heads and k_pe are rotated in one launch (rope_pair_run), and kv_a_layernorm is
//    applied by the cache append (mla_cache_append_args::latent_norm), which also writes the
//    normed latent that prefill's kv_b product reads;
//  - gate and up projections are one product over their stacked weights;
//  - with block-scaled FP8 products (model_state::fp8_block_scaled), o_proj and the shared
//    experts' down projection cannot add into their output: they write a scratch that a
//    separate kernel adds (the sum rounded once, as the reference's add).
//
// Thread safety: none; every call queues work on the one stream in `model_state`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/error.hpp"
#include "engine/device_weights.hpp"
#include "engine/gpu_engine.hpp"
#include "kernels/cpu/mla_attention.hpp"
#include "kernels/cuda/gemm.hpp"
#include "kernels/cuda/grouped_gemm_cublas.hpp"
#include "kernels/cuda/sampling.hpp"
#include "kernels/dtype.hpp"
#include "model/config.hpp"

namespace moe::engine {
class expert_parallel_moe;
}  // namespace moe::engine

namespace moe::engine::detail {

/// What the kernels of every step read and that outlives a step.
struct model_state {
  const model::model_config* config = nullptr;
  kernels::dtype dt = kernels::dtype::bf16;
  const device_weights* weights = nullptr;
  kernels::cpu::mla_cache_layout cache_layout;
  void* cache = nullptr;  ///< (num_layers, num_blocks, block_size, R + dr) of dt
  const float* rope_cos = nullptr;  ///< (rope_positions, dr / 2) f32
  const float* rope_sin = nullptr;
  int64_t rope_positions = 0;
  float softmax_scale = 0.0f;
  float eps = 1e-6f;
  kernels::cuda::gemm_lt* gemm = nullptr;
  void* gemm_workspace = nullptr;
  size_t gemm_workspace_bytes = 0;
  cudaStream_t stream = nullptr;
  /// Decode steps run the shared experts' first two kernels on side_stream, forked after
  /// shared_start and joined at shared_done (both recorded by the step), with a cuBLASLt
  /// workspace of their own (gemm_workspace_bytes); null: no overlap
  /// (gpu_engine_options::overlap_shared_experts off).
  cudaStream_t side_stream = nullptr;
  cudaEvent_t shared_start = nullptr;
  cudaEvent_t shared_done = nullptr;
  void* side_gemm_workspace = nullptr;
  /// FP8 weights' products outside the grouped GEMM: block-scaled (inputs quantized to e4m3)
  /// where cuBLASLt takes them, else the weight expanded into fp8_expanded and a bf16 product.
  bool fp8_block_scaled = false;
  void* fp8_expanded = nullptr;  ///< weights->max_fp8_linear_elements() bf16, or null
  /// Products of at most this many rows run on kernels/cuda/skinny_linear.hpp (0: none).
  int64_t skinny_rows = 0;
  /// Prefill's routed experts through cuBLAS's grouped GEMM when set: the expert offsets come
  /// to host_offsets ((E + 1) int32, pinned), the operands' addresses go through
  /// host_pointers (pinned) and device_pointers (device), 6 * E each (gate|up, then down).
  /// Products of (skinny_rows, grouped_dense_rows] rows run on the grouped GEMM as one expert,
  /// its offsets {0, rows} at one_expert_offsets + 2 * rows (device, rows <= grouped_dense_rows).
  int64_t grouped_dense_rows = 0;
  const int32_t* one_expert_offsets = nullptr;
  kernels::cuda::cublas_grouped_gemm* blas = nullptr;
  /// The routed experts' wide products on wgmma where the card has it (grouped_gemm_args::wgmma).
  bool wgmma_experts = false;
  /// With expert parallelism (gpu_engine_options::expert_parallel), what runs every MoE layer's
  /// routed experts across the world: one collective round a layer, on the step's stream; the
  /// weights then hold this rank's experts only. Null: the local grouped GEMM, every expert.
  expert_parallel_moe* expert_parallel = nullptr;
  /// Counts the products queued, by kernel (the engine's, outliving the steps).
  gpu_kernel_stats* kernels = nullptr;
  int32_t* host_offsets = nullptr;
  const void** host_pointers = nullptr;
  void** device_pointers = nullptr;

  /// Layer l's pool in the cache.
  [[nodiscard]] void* cache_pool(int64_t layer) const noexcept;
};

/// The shape of one step.
struct step_shape {
  bool decode = false;
  int64_t num_tokens = 0;      ///< T; decode: B
  int64_t num_seqs = 0;        ///< S; decode: B
  int64_t max_seq_len = 0;     ///< prefill: the longest prompt; decode: the longest cached length
  int64_t max_blocks = 0;      ///< decode: the block table's width
  int64_t num_logit_rows = 0;  ///< S, T (all positions) or B
  int64_t num_moe_layers = 0;  ///< layers with routed experts (each keeps its top-k choices)
};

/// One step's device memory, carved out of one allocation. Metadata first (the host fills the
/// same layout in pinned memory and uploads it with one copy), then the activations. Pointers
/// a step's kind does not use are null.
struct step_buffers {
  // Metadata, uploaded each step.
  int32_t* token_ids = nullptr;    ///< (T)
  int32_t* positions = nullptr;    ///< (T) position of each token in its sequence
  int64_t* slots = nullptr;        ///< (T) cache slot of each token
  int32_t* cu_seqlens = nullptr;   ///< prefill: (S + 1)
  int32_t* last_rows = nullptr;    ///< prefill: (S) each sequence's last token
  int32_t* block_table = nullptr;  ///< decode: (B, max_blocks)
  int32_t* seq_lens = nullptr;     ///< decode: (B) cached tokens, the new one included
  /// (num_logit_rows): how each row's token is drawn (greedy by default)
  kernels::cuda::sample_row* sampling = nullptr;
  size_t metadata_bytes = 0;

  // Activations, of dt unless noted.
  void* x = nullptr;         ///< (T, hidden): the residual stream
  void* ffn_out = nullptr;   ///< (T, hidden): the last FFN's output, not yet added to x
  void* normed = nullptr;    ///< (T, hidden)
  void* mlp_in = nullptr;    ///< (T, hidden): post-attention-normed
  void* proj = nullptr;      ///< (T, Q + R + dr): [q or q_a | latent | k_pe], the latter roped
  void* q_a = nullptr;       ///< (T, q_lora_rank) normed; with q_lora_rank only
  void* q = nullptr;         ///< (T, H, dn + dr); with q_lora_rank only (else inside proj)
  void* latent = nullptr;    ///< (T, R) normed
  void* kv = nullptr;        ///< prefill: (T, H, dn + dv)
  void* attn = nullptr;      ///< (T, H * dv)
  void* q_latent = nullptr;  ///< decode: (B, H, R)
  void* out_latent = nullptr;
  void* mla_workspace = nullptr;
  size_t mla_workspace_bytes = 0;
  float* mlp_in_f32 = nullptr;     ///< (T, hidden) f32: the router's input (bf16 steps only)
  float* router_logits = nullptr;  ///< (T, E) f32
  int32_t* topk_idx = nullptr;     ///< (num MoE layers, T, top_k): every layer's choices kept
  float* topk_weight = nullptr;    ///< (T, top_k) f32
  int32_t* expert_offsets = nullptr;    ///< (E + 1)
  int32_t* expert_positions = nullptr;  ///< (T, top_k)
  int32_t* expert_inverse = nullptr;    ///< (T * top_k)
  /// (T * top_k, hidden): the routed rows grouped by expert, for the kernels that do not gather
  /// (prefill with cuBLAS's grouped GEMM or wgmma_experts); null otherwise
  void* expert_rows = nullptr;
  void* gate_up = nullptr;      ///< (rows, 2 * intermediate), the widest MLP's
  void* act = nullptr;          ///< (rows, intermediate)
  /// Decode with the shared experts overlapped (model_state::side_stream): their own
  /// (T, 2 * shared intermediate) and (T, shared intermediate); null otherwise.
  void* shared_gate_up = nullptr;
  void* shared_act = nullptr;
  void* expert_out = nullptr;   ///< (T * top_k, hidden)
  void* head_in = nullptr;      ///< (num_logit_rows, hidden) when not every row gets logits
  // Block-scaled FP8 products: T padded to 32 rows (fp8_linear_rows; the buffers such a product
  // writes have that many rows), the quantized input and the output of those that add.
  uint8_t* fp8_x = nullptr;        ///< (Tp, widest input) e4m3
  float* fp8_x_scale = nullptr;    ///< (widest input / 128 groups, Tp) f32, group-major
  void* fp8_y = nullptr;           ///< (Tp, hidden)
  float* logits = nullptr;      ///< (num_logit_rows, vocab) f32
  int32_t* tokens = nullptr;    ///< (num_logit_rows): each row's token (sampling.hpp's sample_run)
};

/// Sets every pointer of `b` for `shape`, from `base` (null: only measures), and returns the
/// bytes needed. Each buffer is 256-byte aligned; metadata_bytes covers the metadata.
size_t carve_step_buffers(const model_state& m, const step_shape& shape, char* base,
                          step_buffers& b);

/// Embedding, every decoder layer and the head: logits and greedy tokens of the rows the step
/// asks for. Requires the metadata uploaded (queued before) and the step's cache slots owned.
[[nodiscard]] caf::error run_forward(const model_state& m, const step_shape& shape,
                                     const step_buffers& b);

/// Where a step's results land in its pinned staging buffer, from the start: logits, greedy
/// tokens, routing. They overwrite the metadata the step uploaded from there, which stream
/// order makes safe (the upload is queued first).
struct step_results_layout {
  int64_t rows = 0;                  ///< the shape's num_logit_rows
  size_t logits_bytes = 0;           ///< 0 unless the step returns logits
  size_t tokens_bytes = 0;
  size_t routing_bytes = 0;          ///< 0 unless the step captures routing
  size_t routing_per_layer = 0;      ///< entries: tokens * top_k
  [[nodiscard]] size_t total_bytes() const noexcept {
    return logits_bytes + tokens_bytes + routing_bytes;
  }
};

[[nodiscard]] step_results_layout results_layout(const model_state& m, const step_shape& shape,
                                                 bool return_logits, bool capture_routing);

/// The whole step on m.stream: the metadata upload from `staging` (pinned; filled in `b`'s
/// metadata layout), run_forward, the result downloads into `staging`. An eager step queues it
/// and synchronises; a decode graph captures exactly this, so both run the same work. Nothing
/// in it allocates or synchronises (capturable), but for expert parallelism's rounds
/// (model_state::expert_parallel), which wait for their counts: such steps are never captured. On
/// an error, work already queued stays queued: the caller drains the stream before it reuses
/// `staging` or the arena.
[[nodiscard]] caf::error enqueue_step(const model_state& m, const step_shape& shape,
                                      const step_buffers& b, const step_results_layout& r,
                                      void* staging);

}  // namespace moe::engine::detail
