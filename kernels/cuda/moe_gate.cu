#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/routing.cuh"

namespace moe::kernels::cuda {
namespace {

constexpr int max_threads_per_block = 256;

// One thread per expert up to 256 (whole warps, at least top_k for the final step): v2-lite's 64
// experts in 256-thread blocks left three quarters of each block idle and fit a quarter as many
// blocks (tokens) on an SM at once.
int threads_for(int num_experts, int top_k) {
  const int wanted = std::max(num_experts, top_k);
  return std::min(max_threads_per_block, (wanted + 31) / 32 * 32);
}
constexpr int max_groups = static_cast<int>(moe_gate_max_experts / 2);  // groups hold >= 2

// Shared bytes of one token slot of moe_gate_plan_kernel, 16-byte aligned, and of the kernel.
__host__ __device__ constexpr size_t gate_plan_slot_bytes(int64_t num_experts, int64_t num_groups,
                                                          int64_t top_k) {
  const auto bytes = static_cast<size_t>((2 * num_experts + num_groups + top_k) * 4 + num_groups);
  return (bytes + 15) / 16 * 16;
}
constexpr size_t plan_shared_bytes(int64_t slots, size_t slot_bytes) {
  return static_cast<size_t>(slots) * slot_bytes +
         (detail::small_plan_entries + permute_max_experts) * sizeof(int32_t);
}

// One block per token; the token's scores live in shared memory.
__global__ void moe_gate_kernel(const float* logits, const float* bias, int32_t* topk_idx,
                                float* topk_weight, int num_experts, int num_groups, int topk_group,
                                int top_k, bool norm_topk_prob, float routed_scaling_factor) {
  __shared__ float scores[moe_gate_max_experts];
  __shared__ float biased[moe_gate_max_experts];
  __shared__ float group_scores[max_groups];
  __shared__ bool group_kept[max_groups];
  __shared__ int32_t chosen[moe_gate_max_top_k];
  const int64_t t = blockIdx.x;
  detail::gate_token(logits + t * num_experts, bias, topk_idx + t * top_k, topk_weight + t * top_k,
                     num_experts, num_groups, topk_group, top_k, norm_topk_prob,
                     routed_scaling_factor, static_cast<int>(threadIdx.x),
                     static_cast<int>(blockDim.x),
                     {scores, biased, group_scores, group_kept, chosen});
}

// The gate and the plan in one block of small_plan_entries threads: the tokens go through the
// gate `slots` at a time (each slot a group of `threads` threads with its own shared memory, as
// one moe_gate_kernel block), their choices also into shared memory, then the plan over them.
__global__ void __launch_bounds__(detail::small_plan_entries)
    moe_gate_plan_kernel(const float* logits, const float* bias, int32_t* topk_idx,
                         float* topk_weight, int num_tokens, int num_experts, int num_groups,
                         int topk_group, int top_k, bool norm_topk_prob,
                         float routed_scaling_factor, int threads, int32_t* expert_offsets,
                         int32_t* positions, int32_t* inverse) {
  extern __shared__ float4 gate_plan_shared[];
  const int slots = detail::small_plan_entries / threads;
  const int tid = static_cast<int>(threadIdx.x), slot = tid / threads, t = tid % threads;
  // Per slot: scores and biased (num_experts floats each), the group scores (num_groups floats),
  // the chosen (top_k ints), the kept flags (num_groups bools); then the ids and the plan's ends.
  const size_t per_slot = gate_plan_slot_bytes(num_experts, num_groups, top_k);
  unsigned char* mine = reinterpret_cast<unsigned char*>(gate_plan_shared) + slot * per_slot;
  detail::gate_scratch s;
  s.scores = reinterpret_cast<float*>(mine);
  s.biased = s.scores + num_experts;
  s.group_scores = s.biased + num_experts;
  s.chosen = reinterpret_cast<int32_t*>(s.group_scores + num_groups);
  s.group_kept = reinterpret_cast<bool*>(s.chosen + top_k);
  int32_t* ids = reinterpret_cast<int32_t*>(reinterpret_cast<unsigned char*>(gate_plan_shared) +
                                            slots * per_slot);
  int32_t* ends = ids + detail::small_plan_entries;
  const int n = num_tokens * top_k;
  for (int t0 = 0; t0 < num_tokens; t0 += slots) {
    const int token = t0 + slot;
    const bool active = slot < slots && token < num_tokens;
    detail::gate_token(active ? logits + int64_t{token} * num_experts : nullptr, bias,
                       topk_idx + int64_t{token} * top_k, topk_weight + int64_t{token} * top_k,
                       num_experts, num_groups, topk_group, top_k, norm_topk_prob,
                       routed_scaling_factor, t, threads, s);
    // The token's choices, as the plan reads them (complete since gate_token's last barrier).
    if (active && t < top_k) ids[token * top_k + t] = s.chosen[t];
    __syncthreads();  // the slots' scratch is reused by the next round
  }
  if (tid >= n) ids[tid] = -1;
  __syncthreads();
  detail::small_plan(ids, n, num_experts, ends, expert_offsets, positions, inverse);
}
}  // namespace

kernel_status moe_gate_can_run(const moe_gate_args& a) noexcept {
  const cpu::moe_gate_params& p = a.params;
  if (p.num_experts == 0 || p.num_experts > static_cast<size_t>(moe_gate_max_experts) ||
      p.num_groups == 0 || p.num_experts % p.num_groups != 0)
    return kernel_status::unsupported_shape;
  const size_t group_size = p.num_experts / p.num_groups;
  if (group_size < 2) return kernel_status::unsupported_shape;  // the group score needs 2
  if (p.topk_group == 0 || p.topk_group > p.num_groups) return kernel_status::unsupported_shape;
  if (p.top_k == 0 || p.top_k > p.topk_group * group_size ||
      p.top_k > static_cast<size_t>(moe_gate_max_top_k))
    return kernel_status::unsupported_shape;
  if (a.num_tokens < 0 || a.num_tokens > INT32_MAX) return kernel_status::unsupported_shape;
  if (a.num_tokens == 0) return kernel_status::ok;
  if (a.logits == nullptr || a.topk_idx == nullptr || a.topk_weight == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status moe_gate_run(const moe_gate_args& a, cudaStream_t stream) noexcept {
  if (auto s = moe_gate_can_run(a); s != kernel_status::ok) return s;
  if (a.num_tokens == 0) return kernel_status::ok;
  const cpu::moe_gate_params& p = a.params;
  const int threads = threads_for(static_cast<int>(p.num_experts), static_cast<int>(p.top_k));
  moe_gate_kernel<<<static_cast<unsigned>(a.num_tokens), threads, 0, stream>>>(
      a.logits, a.bias, a.topk_idx, a.topk_weight, static_cast<int>(p.num_experts),
      static_cast<int>(p.num_groups), static_cast<int>(p.topk_group), static_cast<int>(p.top_k),
      p.norm_topk_prob, p.routed_scaling_factor);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

kernel_status moe_gate_plan_can_run(const moe_gate_args& gate,
                                    const permute_plan_args& plan) noexcept {
  if (auto s = moe_gate_can_run(gate); s != kernel_status::ok) return s;
  if (auto s = permute_plan_can_run(plan); s != kernel_status::ok) return s;
  if (plan.topk_idx != gate.topk_idx || plan.num_tokens != gate.num_tokens ||
      plan.top_k != static_cast<int64_t>(gate.params.top_k) ||
      gate.num_tokens * plan.top_k > moe_gate_plan_max_entries)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status moe_gate_plan_run(const moe_gate_args& gate, const permute_plan_args& plan,
                                cudaStream_t stream) noexcept {
  if (auto s = moe_gate_plan_can_run(gate, plan); s != kernel_status::ok) return s;
  const cpu::moe_gate_params& p = gate.params;
  const auto experts = static_cast<int>(p.num_experts), groups = static_cast<int>(p.num_groups),
             top_k = static_cast<int>(p.top_k);
  const int threads = threads_for(experts, top_k);
  const int slots = detail::small_plan_entries / threads;
  const size_t bytes = plan_shared_bytes(slots, gate_plan_slot_bytes(experts, groups, top_k));
  // Past 48 KiB (hundreds of experts) the kernel must opt in: to the most any call can ask (the
  // widest gate, four slots of 256 threads), the same value from every caller.
  constexpr size_t most =
      plan_shared_bytes(detail::small_plan_entries / max_threads_per_block,
                        gate_plan_slot_bytes(moe_gate_max_experts, max_groups, moe_gate_max_top_k));
  static_assert(most <= 227 * 1024);
  if (bytes > 48 * 1024 &&
      cudaFuncSetAttribute(moe_gate_plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(most)) != cudaSuccess)
    return kernel_status::launch_failed;
  moe_gate_plan_kernel<<<1, detail::small_plan_entries, bytes, stream>>>(
      gate.logits, gate.bias, gate.topk_idx, gate.topk_weight, static_cast<int>(gate.num_tokens),
      experts, groups, static_cast<int>(p.topk_group), top_k, p.norm_topk_prob,
      p.routed_scaling_factor, threads, plan.expert_offsets, plan.positions, plan.inverse);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace moe::kernels::cuda
