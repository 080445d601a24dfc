// DeepSeek-V3 expert routing ("noaux_tc") on the GPU: the device twin of cpu::moe_gate
// (kernels/cpu/moe_gate.hpp), which specifies the algorithm, the tie rules and the float32
// arithmetic order; see there for the formulas. The gate logits (hidden . W_gate^T) come from a
// float32 GEMM, so the input is float32 only and there is no dtype to dispatch on.
//
// Numerics: every step runs in the host's order with explicitly rounded float32 operations (no
// FMA contraction), and sigmoid's exp is evaluated in double and rounded once, i.e. the
// correctly rounded expf. glibc's expf is within 0.502 ulp, so it differs from that in the last
// bit for a small fraction of inputs (~6e-4 measured on glibc 2.36); that is the only source of
// difference from the CPU result: a weight may then differ by an ulp or two, and an index only
// where two biased scores tie to within that ulp.
//
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// The largest number of routed experts (as cpu::moe_gate_max_experts): the block keeps a
/// token's scores in shared memory.
inline constexpr int64_t moe_gate_max_experts = 1024;
/// The largest top_k: the block keeps the chosen indices in shared memory.
inline constexpr int64_t moe_gate_max_top_k = 32;

struct moe_gate_args {
  cpu::moe_gate_params params;    ///< as for the CPU kernel
  const float* logits = nullptr;  ///< (num_tokens, num_experts) float32, device
  const float* bias = nullptr;    ///< (num_experts) float32, device; null for zeros
  int32_t* topk_idx = nullptr;    ///< (num_tokens, top_k) int32, device
  float* topk_weight = nullptr;   ///< (num_tokens, top_k) float32, device
  int64_t num_tokens = 0;
};

/// ok, or unsupported_shape for params the CPU kernel rejects (num_groups must divide
/// num_experts with >= 2 experts per group, 1 <= topk_group <= num_groups,
/// 1 <= top_k <= topk_group * group size), num_experts > 1024, top_k > 32, num_tokens < 0 or
/// > INT32_MAX, or a null logits/topk_idx/topk_weight (null is accepted when num_tokens == 0).
[[nodiscard]] kernel_status moe_gate_can_run(const moe_gate_args& a) noexcept;
[[nodiscard]] kernel_status moe_gate_run(const moe_gate_args& a, cudaStream_t stream) noexcept;

/// The most entries (num_tokens * top_k) moe_gate_plan_run takes: a decode step's.
inline constexpr int64_t moe_gate_plan_max_entries = 1024;

/// moe_gate_run, then permute_plan_run (permute.hpp) over the topk_idx it wrote, in ONE launch
/// of one block: the tokens' gates a few at a time (each as moe_gate_run's block computes it),
/// their choices kept in shared memory for the plan. The outputs of both, bit for bit, one
/// launch fewer per MoE layer at decode. ok; what moe_gate_can_run or permute_plan_can_run
/// refuses; unsupported_shape where the plan is not over the gate's output (another topk_idx,
/// num_tokens or top_k) or num_tokens * top_k passes moe_gate_plan_max_entries.
[[nodiscard]] kernel_status moe_gate_plan_can_run(const moe_gate_args& gate,
                                                  const permute_plan_args& plan) noexcept;
[[nodiscard]] kernel_status moe_gate_plan_run(const moe_gate_args& gate,
                                              const permute_plan_args& plan,
                                              cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
