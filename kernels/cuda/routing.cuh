// Device code shared by the routing kernels: one token's gate (moe_gate.cu) and a decode-sized
// permute plan in one block (permute.cu), so that moe_gate_plan_run can run both in one launch
// with the very arithmetic of the two separate kernels. Internal to kernels/cuda.
#pragma once

#include <cstdint>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"

namespace moe::kernels::cuda::detail {

/// The most entries (tokens x top_k) a one-block plan sorts: one thread each.
inline constexpr int small_plan_entries = 1024;

/// buf[0 .. n) becomes its inclusive prefix sum (Hillis-Steele), one thread per entry of a block
/// of at least n threads; every thread of the block calls it.
__device__ inline void block_inclusive_scan(int32_t* buf, int n) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int d = 1; d < n; d *= 2) {
    const int32_t add = tid >= d && tid < n ? buf[tid - d] : 0;
    __syncthreads();
    if (tid < n) buf[tid] += add;
    __syncthreads();
  }
}

/// A decode-sized plan in one block of small_plan_entries threads, the entries' ids already in
/// shared memory (ids[j] for j < n; -1 beyond): thread e counts expert e's entries; a scan of the
/// counts over the experts; thread j places entry j after the earlier entries of its expert
/// (counted in index order: the stable order of the CPU plan, as the three-launch form gives).
/// `ends` holds permute_max_experts ints of shared memory. Every thread of the block calls it.
__device__ inline void small_plan(const int32_t* ids, int n, int num_experts, int32_t* ends,
                                  int32_t* expert_offsets, int32_t* positions, int32_t* inverse) {
  const int tid = static_cast<int>(threadIdx.x);
  int32_t count = 0;
  if (tid < num_experts)
    for (int j = 0; j < n; ++j) count += ids[j] == tid ? 1 : 0;
  ends[tid] = count;
  __syncthreads();
  block_inclusive_scan(ends, num_experts);
  if (tid == 0) expert_offsets[0] = 0;
  if (tid < num_experts) expert_offsets[tid + 1] = ends[tid];
  if (tid >= n) return;  // after the last barrier
  const int32_t id = ids[tid];
  if (id < 0 || id >= num_experts) {
    positions[tid] = -1;
  } else {
    int32_t before = 0;
    for (int j = 0; j < tid; ++j) before += ids[j] == id ? 1 : 0;
    const int32_t row = (id == 0 ? 0 : ends[id - 1]) + before;
    positions[tid] = row;
    inverse[row] = tid;
  }
  // Rows past the last in use: disjoint from the rows written above.
  if (tid >= ends[num_experts - 1]) inverse[tid] = -1;
}

/// One token's shared memory for gate_token.
struct gate_scratch {
  float* scores;        // (num_experts)
  float* biased;        // (num_experts)
  float* group_scores;  // (num_groups)
  bool* group_kept;     // (num_groups)
  int32_t* chosen;      // (top_k)
};

/// The token's noaux_tc routing (cpu::moe_gate's order and arithmetic) by `threads` threads of
/// the block (this one is `t` of them; `row` null when the group has no token this round: it
/// still meets every barrier). The selections are rank counts under the total order
/// ranks_before (an element's rank is how many others rank before it), which is exactly what the
/// host's partial_sort with that comparator produces, needs no sorting network, and is
/// independent of the thread schedule. Every thread of the block calls it, with the same
/// num_groups and topk_group (the barriers are the block's).
__device__ inline void gate_token(const float* row, const float* bias, int32_t* topk_idx,
                                  float* topk_weight, int num_experts, int num_groups,
                                  int topk_group, int top_k, bool norm_topk_prob,
                                  float routed_scaling_factor, int t, int threads,
                                  const gate_scratch& s) {
  const bool active = row != nullptr;
  const int group_size = num_experts / num_groups;
  if (active)
    for (int e = t; e < num_experts; e += threads) {
      // exp in double, rounded once: the correctly rounded expf, which glibc's expf (the host's
      // std::exp(float)) matches but in the rare last-ulp case. CUDA's expf is up to 2 ulp off.
      const float ex = static_cast<float>(exp(-static_cast<double>(row[e])));
      const float v = __fdiv_rn(1.0f, __fadd_rn(1.0f, ex));
      s.scores[e] = v;
      s.biased[e] = __fadd_rn(v, bias != nullptr ? bias[e] : 0.0f);
    }
  __syncthreads();

  // Every group kept (v2-lite's one group, say): nothing to mask, and the group scores (a serial
  // scan of each group by one thread) are not needed. The condition is the block's, so its
  // barriers are reached by every thread or by none.
  if (topk_group < num_groups) {
    // Group score: the two best biased scores of each group (one thread per group).
    if (active)
      for (int g = t; g < num_groups; g += threads) {
        const int first = g * group_size;
        int best = first, second = first + 1;
        if (ranks_before(s.biased[second], second, s.biased[best], best)) {
          best = first + 1;
          second = first;
        }
        for (int e = first + 2; e < first + group_size; ++e) {
          if (ranks_before(s.biased[e], e, s.biased[best], best)) {
            second = best;
            best = e;
          } else if (ranks_before(s.biased[e], e, s.biased[second], second)) {
            second = e;
          }
        }
        s.group_scores[g] = __fadd_rn(s.biased[best], s.biased[second]);
      }
    __syncthreads();

    if (active)
      for (int g = t; g < num_groups; g += threads) {
        int rank = 0;
        for (int h = 0; h < num_groups; ++h)
          rank += ranks_before(s.group_scores[h], h, s.group_scores[g], g) ? 1 : 0;
        s.group_kept[g] = rank < topk_group;
      }
    __syncthreads();

    if (active)
      for (int e = t; e < num_experts; e += threads)
        if (!s.group_kept[e / group_size]) s.biased[e] = __int_as_float(0xff800000);  // -inf
    __syncthreads();
  }

  // Every expert is ranked, masked ones included: when kept experts are NaN, a masked -inf
  // ranks before them, as on the host. The count stops once it reaches top_k (not chosen).
  if (active)
    for (int e = t; e < num_experts; e += threads) {
      const float v = s.biased[e];
      int rank = 0;
      for (int f = 0; f < num_experts && rank < top_k; ++f)
        rank += ranks_before(s.biased[f], f, v, e) ? 1 : 0;
      if (rank < top_k) s.chosen[rank] = e;
    }
  __syncthreads();

  // Each of the first top_k threads sums the same scores in the same order (the host's), so
  // all see one denominator, and writes its own entry.
  if (active && t < top_k) {
    float sum = 0.0f;
    for (int i = 0; i < top_k; ++i) sum = __fadd_rn(sum, s.scores[s.chosen[i]]);
    const float denom = norm_topk_prob ? __fadd_rn(sum, 1e-20f) : 1.0f;
    const int32_t e = s.chosen[t];
    topk_idx[t] = e;
    topk_weight[t] = __fmul_rn(__fdiv_rn(s.scores[e], denom), routed_scaling_factor);
  }
}

}  // namespace moe::kernels::cuda::detail
