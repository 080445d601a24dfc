#include <algorithm>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/moe_gate.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::ranks_before;

constexpr int max_threads_per_block = 256;

// One thread per expert up to 256 (whole warps, at least top_k for the final step): v2-lite's 64
// experts in 256-thread blocks left three quarters of each block idle and fit a quarter as many
// blocks (tokens) on an SM at once.
int threads_for(int num_experts, int top_k) {
  const int wanted = std::max(num_experts, top_k);
  return std::min(max_threads_per_block, (wanted + 31) / 32 * 32);
}
constexpr int max_groups = static_cast<int>(moe_gate_max_experts / 2);  // groups hold >= 2

// One block per token; the token's scores live in shared memory. The selections are rank
// counts under the total order ranks_before (an element's rank is how many others rank before
// it), which is exactly what the host's partial_sort with that comparator produces, needs no
// sorting network, and is independent of the thread schedule.
__global__ void moe_gate_kernel(const float* logits, const float* bias, int32_t* topk_idx,
                                float* topk_weight, int num_experts, int num_groups, int topk_group,
                                int top_k, bool norm_topk_prob, float routed_scaling_factor) {
  __shared__ float scores[moe_gate_max_experts];
  __shared__ float biased[moe_gate_max_experts];
  __shared__ float group_scores[max_groups];
  __shared__ bool group_kept[max_groups];
  __shared__ int32_t chosen[moe_gate_max_top_k];

  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const float* row = logits + t * num_experts;
  const int group_size = num_experts / num_groups;

  for (int e = tid; e < num_experts; e += blockDim.x) {
    // exp in double, rounded once: the correctly rounded expf, which glibc's expf (the host's
    // std::exp(float)) matches but in the rare last-ulp case. CUDA's expf is up to 2 ulp off.
    const float ex = static_cast<float>(exp(-static_cast<double>(row[e])));
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, ex));
    scores[e] = s;
    biased[e] = __fadd_rn(s, bias != nullptr ? bias[e] : 0.0f);
  }
  __syncthreads();

  // Every group kept (v2-lite's one group, say): nothing to mask, and the group scores (a serial
  // scan of each group by one thread) are not needed. The condition is the block's, so its
  // barriers are reached by every thread or by none.
  if (topk_group < num_groups) {
    // Group score: the two best biased scores of each group (one thread per group).
    for (int g = tid; g < num_groups; g += blockDim.x) {
      const int first = g * group_size;
      int best = first, second = first + 1;
      if (ranks_before(biased[second], second, biased[best], best)) {
        best = first + 1;
        second = first;
      }
      for (int e = first + 2; e < first + group_size; ++e) {
        if (ranks_before(biased[e], e, biased[best], best)) {
          second = best;
          best = e;
        } else if (ranks_before(biased[e], e, biased[second], second)) {
          second = e;
        }
      }
      group_scores[g] = __fadd_rn(biased[best], biased[second]);
    }
    __syncthreads();

    for (int g = tid; g < num_groups; g += blockDim.x) {
      int rank = 0;
      for (int h = 0; h < num_groups; ++h)
        rank += ranks_before(group_scores[h], h, group_scores[g], g) ? 1 : 0;
      group_kept[g] = rank < topk_group;
    }
    __syncthreads();

    for (int e = tid; e < num_experts; e += blockDim.x)
      if (!group_kept[e / group_size]) biased[e] = __int_as_float(0xff800000);  // -inf
    __syncthreads();
  }

  // Every expert is ranked, masked ones included: when kept experts are NaN, a masked -inf
  // ranks before them, as on the host. The count stops once it reaches top_k (not chosen).
  for (int e = tid; e < num_experts; e += blockDim.x) {
    const float v = biased[e];
    int rank = 0;
    for (int f = 0; f < num_experts && rank < top_k; ++f)
      rank += ranks_before(biased[f], f, v, e) ? 1 : 0;
    if (rank < top_k) chosen[rank] = e;
  }
  __syncthreads();

  // Each of the first top_k threads sums the same scores in the same order (the host's), so
  // all see one denominator, and writes its own entry.
  if (tid < top_k) {
    float sum = 0.0f;
    for (int i = 0; i < top_k; ++i) sum = __fadd_rn(sum, scores[chosen[i]]);
    const float denom = norm_topk_prob ? __fadd_rn(sum, 1e-20f) : 1.0f;
    const int32_t e = chosen[tid];
    topk_idx[t * top_k + tid] = e;
    topk_weight[t * top_k + tid] = __fmul_rn(__fdiv_rn(scores[e], denom), routed_scaling_factor);
  }
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

}  // namespace moe::kernels::cuda
