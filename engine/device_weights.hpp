// A loaded checkpoint's tensors in device memory, laid out for the GPU engine's kernels.
//
// The checkpoint (model::checkpoint, float32 on the host; FP8 weights arrive dequantised) is
// converted to the engine's dtype on the host (bf16: round to nearest even, as
// model::float_to_bf16; f32: a copy, for exactness checks) and copied into ONE device
// allocation, each tensor 256-byte aligned. Some tensors are rearranged on the way:
//  - every MLP (dense layers, shared experts, each routed expert) keeps gate_proj and up_proj
//    stacked as one (2 * intermediate, hidden) matrix, gate rows first, so one product gives
//    the [gate | up] rows the fused SwiGLU kernel takes;
//  - a MoE layer's routed experts are stacked as (num_experts, 2 * moe_intermediate, hidden)
//    and (num_experts, hidden, moe_intermediate): the grouped GEMM's (E, n, k) weights;
//  - kv_a_proj_with_mqa is split into its latent rows and its k_pe rows, two tensors, so that
//    the latent comes out of its product contiguous for the norm kernel and both operands keep
//    the allocation's alignment (cuBLASLt's heuristics assume 256-byte aligned operands);
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

/// One MLP: down(silu(gate(x)) * up(x)).
struct device_mlp {
  const void* gate_up = nullptr;  ///< (2 * intermediate, hidden): gate rows, then up rows
  const void* down = nullptr;     ///< (hidden, intermediate)
  int64_t intermediate = 0;
};

struct device_attention {
  const float* input_norm = nullptr;  ///< (hidden) f32
  const void* q_a_proj = nullptr;     ///< (q_lora_rank, hidden); null without q_lora_rank
  const float* q_a_norm = nullptr;    ///< (q_lora_rank) f32; null without q_lora_rank
  const void* q_proj = nullptr;       ///< (H * (dn + dr), q_lora_rank) q_b_proj, or (.., hidden)
  const void* kv_a_latent = nullptr;  ///< (R, hidden): kv_a_proj_with_mqa's first R rows
  const void* kv_a_rope = nullptr;    ///< (dr, hidden): its last dr rows (k_pe)
  const float* kv_a_norm = nullptr;   ///< (R) f32
  const void* kv_b_proj = nullptr;    ///< (H * (dn + dv), R)
  const void* o_proj = nullptr;       ///< (hidden, H * dv)
  const float* post_norm = nullptr;   ///< (hidden) f32
};

struct device_moe {
  const float* router = nullptr;         ///< (E, hidden) f32
  const float* router_bias = nullptr;    ///< (E) f32: e_score_correction_bias
  const void* experts_gate_up = nullptr; ///< (E, 2 * moe_intermediate, hidden)
  const void* experts_down = nullptr;    ///< (E, hidden, moe_intermediate)
  std::optional<device_mlp> shared;      ///< the shared experts as one MLP, when n_shared > 0
};

struct device_layer {
  device_attention attention;
  std::optional<device_mlp> dense;  ///< layers before first_k_dense_replace (and off-frequency)
  std::optional<device_moe> moe;
};

class device_weights {
 public:
  /// Converts and copies every tensor the forward pass needs (MTP modules are not uploaded),
  /// through a pinned staging buffer on `stream`; returns when the copies are done.
  /// dtype: bf16 or f32. Errors: model_errc::missing_tensor / bad_tensor naming the tensor,
  /// model_errc::bad_input for another dtype, CUDA errors (out_of_memory is transient).
  [[nodiscard]] static caf::expected<device_weights> upload(const model::checkpoint& ckpt,
                                                            kernels::dtype dtype,
                                                            cudaStream_t stream);

  [[nodiscard]] kernels::dtype storage_dtype() const noexcept { return dtype_; }
  [[nodiscard]] const void* embed() const noexcept { return embed_; }     ///< (vocab, hidden)
  [[nodiscard]] const void* lm_head() const noexcept { return lm_head_; } ///< (vocab, hidden)
  [[nodiscard]] const float* final_norm() const noexcept { return final_norm_; }
  [[nodiscard]] const device_layer& layer(int64_t l) const { return layers_.at(static_cast<size_t>(l)); }
  /// Bytes of device memory the weights take (padding included).
  [[nodiscard]] size_t size_bytes() const noexcept { return storage_.size_bytes(); }

 private:
  kernels::dtype dtype_ = kernels::dtype::bf16;
  runtime::device_buffer storage_;
  const void* embed_ = nullptr;
  const void* lm_head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<device_layer> layers_;
};

}  // namespace moe::engine
