// A loaded checkpoint's tensors in device memory, laid out for the GPU engine's kernels.
//
// The checkpoint (model::checkpoint: float32 on the host, and the FP8 weights of one loaded with
// model::load_options::keep_fp8 as stored) is converted to the engine's dtype on the host (bf16:
// round to nearest even, as model::float_to_bf16; f32: a copy, for exactness checks) and copied
// into ONE device allocation, each tensor 256-byte aligned.
//
// FP8 weights stay FP8 on the device in a bf16 engine: their e4m3 bytes as stored, and their
// float32 block scales (device_matrix), half of bf16's bytes. Two exceptions are expanded on the
// host to bf16 (bf16(e4m3 * scale), what the GPU's expansion gives): kv_b_proj, which the
// absorbed decode multiplies per head as strided batches (as DeepSeek's own inference expands
// it), and any projection whose rows mix FP8 and non-FP8 sources. An f32 engine expands every
// FP8 weight to float32, exactly as loading without keep_fp8 does.
// Stacking FP8 weights stacks their scale grids: the stacked matrix gets a grid of blocks
// block_rows high, where block_rows is the checkpoint's block height or the largest divisor of
// it that every stacked part's row count (but the last's) is a multiple of, each grid row copied
// from the scale row of the checkpoint block it lies in. So a gate of 1408 rows (11 x 128) keeps
// 128-row blocks, and small-v3-fp8's 160-row experts get 32-row ones; the values are the same.
// Each scale row is padded to a multiple of 4 floats (cuBLASLt reads block scales that way).
//
// Some tensors are rearranged on the way:
//  - every MLP (dense layers, shared experts, each routed expert) keeps gate_proj and up_proj
//    stacked as one (2 * intermediate, hidden) matrix, gate rows first, so one product gives
//    the [gate | up] rows the fused SwiGLU kernel takes;
//  - a MoE layer's routed experts are stacked as (num_experts, 2 * moe_intermediate, hidden)
//    and (num_experts, hidden, moe_intermediate): the grouped GEMM's (E, n, k) weights;
//  - the projections of a layer's normed input, q_a_proj (q_proj without q_lora_rank) and
//    kv_a_proj_with_mqa, are stacked as one (Q + R + dr, hidden) matrix, so that one product
//    gives each token's [q (or q_a) | latent | k_pe] row: one launch instead of three per layer
//    (a decode step's products are short, so each launch costs about as much as its bytes);
//    the consumers read their slice with the row's stride. Q (3072 or 1536 for the DeepSeek
//    shapes) is a multiple of 128, so FP8 weights keep their 128-row blocks, and an FP8 stack
//    gets zero rows up to whole blocks (576 of kv_a's rows end in half a block), so that the
//    block-scaled product, which takes whole blocks only, takes it;
//  - RMSNorm scales, the router's weight and its correction bias stay float32 whatever the
//    dtype (the norm kernel takes float32 scales; the gate runs in float32, as transformers).
//
// Ownership: owns the device allocation (released when destroyed; the caller makes sure no
// kernel still reads it); the pointers below point into it and live as long as this object.
// Thread safety: immutable after upload(); share it freely between readers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "base/error.hpp"
#include "kernels/dtype.hpp"
#include "model/checkpoint.hpp"
#include "runtime/cuda_memory.hpp"

namespace moe::engine {

/// A projection's weight, (rows, cols) row-major: elements of the weights' dtype, or FP8 when
/// `scale` is set: e4m3 bytes, value[r, c] = e4m3(data[r, c]) * scale[(r / block_rows) *
/// scale_ld + c / block_cols].
struct device_matrix {
  const void* data = nullptr;
  const float* scale = nullptr;  ///< FP8 only: (ceil(rows / block_rows), scale_ld) float32
  int64_t scale_ld = 0;          ///< FP8: ceil(cols / block_cols) rounded up to a multiple of 4
  int64_t block_rows = 0;        ///< FP8: the checkpoint's block height or a divisor of it
  int64_t block_cols = 0;        ///< FP8: the checkpoint's block width
  [[nodiscard]] bool fp8() const noexcept { return scale != nullptr; }
};

/// One MLP: down(silu(gate(x)) * up(x)).
struct device_mlp {
  device_matrix gate_up;  ///< (2 * intermediate, hidden): gate rows, then up rows
  device_matrix down;     ///< (hidden, intermediate)
  int64_t intermediate = 0;
};

struct device_attention {
  const float* input_norm = nullptr;  ///< (hidden) f32
  /// (Q + R + dr, hidden): q_a_proj's (Q = q_lora_rank) or q_proj's (Q = H * (dn + dr)) rows,
  /// then kv_a_proj_with_mqa's (the latent's R rows, k_pe's dr).
  device_matrix input_proj;
  int64_t input_proj_rows = 0;        ///< Q + R + dr, or FP8's rounded up to whole blocks
  const float* q_a_norm = nullptr;    ///< (q_lora_rank) f32; null without q_lora_rank
  device_matrix q_b_proj;             ///< (H * (dn + dr), q_lora_rank); null without it
  const float* kv_a_norm = nullptr;   ///< (R) f32
  const void* kv_b_proj = nullptr;    ///< (H * (dn + dv), R) of the dtype, never FP8 (see above)
  device_matrix o_proj;               ///< (hidden, H * dv)
  const float* post_norm = nullptr;   ///< (hidden) f32
};

struct device_moe {
  const float* router = nullptr;       ///< (E, hidden) f32
  const float* router_bias = nullptr;  ///< (E) f32: e_score_correction_bias
  /// (E, 2 * moe_intermediate, hidden) and (E, hidden, moe_intermediate); FP8 ones with one
  /// grid over the stacked (E * n, k) matrix, as the grouped GEMM reads it.
  device_matrix experts_gate_up;
  device_matrix experts_down;
  std::optional<device_mlp> shared;    ///< the shared experts as one MLP, when n_shared > 0
};

struct device_layer {
  device_attention attention;
  std::optional<device_mlp> dense;  ///< layers before first_k_dense_replace (and off-frequency)
  std::optional<device_moe> moe;
};

/// Which of each MoE layer's routed experts a device holds: [first, first + count), stacked from
/// 0 (expert parallelism: engine/expert_parallel.hpp). count 0: all of them.
struct expert_range {
  int64_t first = 0;
  int64_t count = 0;
};

class device_weights {
 public:
  /// Converts and copies every tensor the forward pass needs (MTP modules are not uploaded),
  /// through a pinned staging buffer on `stream`; returns when the copies are done. FP8
  /// weights (ckpt.fp8) stay FP8 when dtype is bf16. Of the routed experts, those of `experts`
  /// only (the router keeps every expert's row).
  /// dtype: bf16 or f32. Errors: model_errc::missing_tensor / bad_tensor naming the tensor,
  /// model_errc::bad_input for another dtype or a range outside the experts, CUDA errors
  /// (out_of_memory is transient).
  [[nodiscard]] static caf::expected<device_weights> upload(const model::checkpoint& ckpt,
                                                            kernels::dtype dtype,
                                                            cudaStream_t stream,
                                                            expert_range experts = {});

  [[nodiscard]] kernels::dtype storage_dtype() const noexcept { return dtype_; }
  [[nodiscard]] const void* embed() const noexcept { return embed_; }     ///< (vocab, hidden)
  [[nodiscard]] const void* lm_head() const noexcept { return lm_head_; } ///< (vocab, hidden)
  [[nodiscard]] const float* final_norm() const noexcept { return final_norm_; }
  [[nodiscard]] const device_layer& layer(int64_t l) const { return layers_.at(static_cast<size_t>(l)); }
  /// Bytes of device memory the weights take (padding included).
  [[nodiscard]] size_t size_bytes() const noexcept { return storage_.size_bytes(); }
  /// Projections kept in FP8, and the most elements (rows x cols) of one outside the routed
  /// experts: what expanding any of them to bf16 needs (the fallback of the FP8 products).
  [[nodiscard]] int64_t num_fp8_matrices() const noexcept { return num_fp8_; }
  [[nodiscard]] int64_t max_fp8_linear_elements() const noexcept { return max_fp8_linear_; }

 private:
  kernels::dtype dtype_ = kernels::dtype::bf16;
  runtime::device_buffer storage_;
  const void* embed_ = nullptr;
  const void* lm_head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<device_layer> layers_;
  int64_t num_fp8_ = 0;
  int64_t max_fp8_linear_ = 0;
};

}  // namespace moe::engine
