#include <cuda_bf16.h>

#include "kernels/cuda/element_access.cuh"
#include "kernels/cuda/sampling.hpp"

namespace moe::kernels::cuda {
namespace {

using detail::load;
using detail::ranks_before;

// One block per row reads the whole row once: its speed is how many loads the block keeps in
// flight. On an H200 (2026-11-30) a 512-thread block with one load per step took 85 us for one
// 102400-entry row; 1024 threads with 4 vector loads (16 elements) per step keep ~32x as many
// bytes in flight.
constexpr int threads_per_row = 1024;
constexpr int warps_per_row = threads_per_row / 32;
constexpr int vectors_in_flight = 4;

// The candidate of a thread that saw no element: a NaN at an index past any real one, so
// every real element (NaN included) ranks before it. vocab <= INT32_MAX - 1 keeps it distinct.
constexpr int32_t no_index = INT32_MAX;

struct candidate {
  float value;
  int32_t index;
};

__device__ candidate better_of(candidate a, candidate b) {
  return ranks_before(b.value, b.index, a.value, a.index) ? b : a;
}

__device__ candidate warp_best(candidate c) {
  for (int offset = 16; offset > 0; offset /= 2) {
    candidate other;
    other.value = __shfl_xor_sync(0xffffffff, c.value, offset);
    other.index = __shfl_xor_sync(0xffffffff, c.index, offset);
    c = better_of(c, other);
  }
  return c;
}

// Four consecutive elements from a 4-element-aligned position (16 bytes of f32, 8 of bf16).
__device__ void load4(const float* p, float (&v)[4]) {
  detail::load16(p, v);
}
__device__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 q = *reinterpret_cast<const uint2*>(p);
  v[0] = detail::bf16_low(q.x);
  v[1] = detail::bf16_high(q.x);
  v[2] = detail::bf16_low(q.y);
  v[3] = detail::bf16_high(q.y);
}

// The best of one row for a block of threads_per_row threads. ranks_before is a total order, so
// the best of any partition of the row, combined in any order, is the row's single best: the
// result does not depend on the schedule (nor on which thread reads which element).
// Vectorized: the row starts 4-element aligned (the host checks), each thread reads
// vectors_in_flight 4-element vectors before it compares; the last vocab % 4 elements are read
// one by one. Every thread gets the result (`best` is the block's shared slot).
template <typename T, bool Vectorized>
__device__ candidate row_best(const T* row, int64_t vocab, candidate* partial, candidate* best_s) {
  candidate best{__int_as_float(0x7fc00000), no_index};  // quiet NaN
  int64_t tail = 0;
  if constexpr (Vectorized) {
    const int64_t vectors = vocab / 4;
    int64_t v = threadIdx.x;
    for (; v + (vectors_in_flight - 1) * threads_per_row < vectors;
         v += vectors_in_flight * threads_per_row) {
      float x[vectors_in_flight][4];
#pragma unroll
      for (int u = 0; u < vectors_in_flight; ++u) load4(row + 4 * (v + u * threads_per_row), x[u]);
#pragma unroll
      for (int u = 0; u < vectors_in_flight; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          best = better_of(
              best, candidate{x[u][j], static_cast<int32_t>(4 * (v + u * threads_per_row) + j)});
    }
    for (; v < vectors; v += threads_per_row) {
      float x[4];
      load4(row + 4 * v, x);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        best = better_of(best, candidate{x[j], static_cast<int32_t>(4 * v + j)});
    }
    tail = vectors * 4;
  }
  for (int64_t i = tail + threadIdx.x; i < vocab; i += threads_per_row)
    best = better_of(best, candidate{load(row, i), static_cast<int32_t>(i)});
  best = warp_best(best);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    candidate c = threadIdx.x < warps_per_row ? partial[threadIdx.x]
                                              : candidate{__int_as_float(0x7fc00000), no_index};
    c = warp_best(c);
    if (threadIdx.x == 0) *best_s = c;
  }
  __syncthreads();
  return *best_s;
}

template <typename T, bool Vectorized>
__global__ void __launch_bounds__(threads_per_row)
    sample_greedy_kernel(const T* logits, int32_t* tokens, int64_t vocab) {
  __shared__ candidate partial[warps_per_row];
  __shared__ candidate best;
  const candidate c =
      row_best<T, Vectorized>(logits + int64_t{blockIdx.x} * vocab, vocab, partial, &best);
  if (threadIdx.x == 0) tokens[blockIdx.x] = c.index;
}

// ---------------------------------------------------------------------------------------------
// sample_run: cpu::sample on the device, one block of threads_per_row threads per row.
//
// The row's best first (row_best): greedy rows, and rows whose best logit is not finite, stop
// there, as on the CPU. Then one of two draws, each the CPU's algorithm:
//  - temperature alone: the CDF in vocabulary order. Each thread sums the weights of its
//    contiguous chunk of the row; thread 0 adds the chunk sums in order (the total, and where
//    each chunk starts); the chunk where u * total falls walks its elements once more.
//  - top-k and/or top-p: the n most likely tokens by cpu::ranks_before (n = top_k, or
//    sample_max_candidates for top-p alone) are found by a radix select over a 32-bit key that
//    orders the values as ranks_before does (integer histograms of 8 bits at a time, so the
//    counts do not depend on the schedule), gathered, and sorted in shared memory (bitonic, on
//    (key, index): ties by index). From there thread 0 runs the CPU's loops over the ranked
//    candidates: their total (top-p alone: the whole row's, summed in chunks as above), the
//    nucleus, the draw. A top-p nucleus wider than the candidates is found by its mass over the
//    whole row instead (first_crossing), and the draw in it likewise.
// Weights are exp((double(l) - max) / T) in double, NaN weighs 0: the CPU's expression.

constexpr int sample_candidates = static_cast<int>(sample_max_candidates);
static_assert(sample_candidates == threads_per_row, "one candidate per thread in the sort");

// A 32-bit key in ranks_before's order, ascending: larger values first, NaN last; +0 and -0
// are one value (they compare equal there too).
__device__ inline uint32_t rank_key(float v) {
  if (isnan(v)) return 0xffffffffu;
  const uint32_t bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  const uint32_t increasing = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return ~increasing;
}

// cpu::sampling_uniform: the offset-th output of splitmix64 seeded with seed, 53 bits in [0, 1).
__device__ inline double uniform(uint64_t seed, uint64_t offset) {
  uint64_t z = seed + (offset + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

__device__ inline double weight(float l, float max_logit, double inv_temperature) {
  return isnan(l)
             ? 0.0
             : exp((static_cast<double>(l) - static_cast<double>(max_logit)) * inv_temperature);
}

struct sample_shared {
  candidate partial[warps_per_row];
  candidate best;
  unsigned long long ranked[sample_candidates];  // (key << 32 | index), sorted ascending
  double w[sample_candidates];                   // chunk sums, then the ranked candidates' weights
  double start[sample_candidates + 1];  // where each chunk's sum starts; start[threads] = total
  int32_t less[threads_per_row];        // per thread: its chunk's keys below the selected one
  int32_t equal[threads_per_row];       // ... and equal to it
  int32_t hist[256];
  double bins[warps_per_row][16];  // mass histograms, one per warp
  double before;                   // the mass ranked before the selected bucket
  float value;                     // the selected value
  uint32_t digit;
  int32_t remaining;
  int32_t chosen;
  int32_t token;
};

// Sums this thread's chunk of weights into s.w[tid], then thread 0 adds them in order into
// s.start. Returns the total to every thread.
__device__ double chunked_total(const float* row, int64_t vocab, int64_t chunk, float max_logit,
                                double inv_t, sample_shared& s) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
  double sum = 0.0;
  for (int64_t i = begin; i < end; ++i) sum += weight(row[i], max_logit, inv_t);
  s.w[tid] = sum;
  __syncthreads();
  if (tid == 0) {
    double cum = 0.0;
    for (int t = 0; t < threads_per_row; ++t) {
      s.start[t] = cum;
      cum += s.w[t];
    }
    s.start[threads_per_row] = cum;
  }
  __syncthreads();
  return s.start[threads_per_row];
}

// Temperature alone: cpu::sample's vocabulary-order CDF.
__device__ int32_t draw_in_vocabulary_order(const float* row, int64_t vocab, float max_logit,
                                            double inv_t, double u, sample_shared& s) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t chunk = (vocab + threads_per_row - 1) / threads_per_row;
  const double total = chunked_total(row, vocab, chunk, max_logit, inv_t, s);
  const double target = u * total;
  if (tid == 0) {
    // The first chunk whose end passes the target; none (the target reached the rounded total):
    // the last chunk with any mass, whose last weighted element the CPU takes too.
    int chosen = -1, last = -1;
    for (int t = 0; t < threads_per_row && chosen < 0; ++t) {
      if (target < s.start[t + 1]) chosen = t;
      if (s.w[t] > 0.0) last = t;
    }
    s.chosen = chosen >= 0 ? chosen : -2 - last;  // the fallback's chunk, encoded below -1
  }
  __syncthreads();
  const int chosen = s.chosen;
  const bool walk = chosen == tid, fallback = chosen < -1 && -2 - chosen == tid;
  if (walk || fallback) {
    const int64_t begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
    double cum = s.start[tid];
    int32_t token = no_index, last_weighted = no_index;
    for (int64_t i = begin; i < end; ++i) {
      const double w = weight(row[i], max_logit, inv_t);
      if (w > 0.0) last_weighted = static_cast<int32_t>(i);
      cum += w;
      if (walk && target < cum) {
        token = static_cast<int32_t>(i);
        break;
      }
    }
    // The walk's own sums can round just under the chunk's end: its last weighted element then.
    s.token = token != no_index ? token : last_weighted;
  }
  __syncthreads();
  return s.token;
}

// The element, in rank order, at which the prefix mass first reaches `mass` (>=; with strict,
// first passes it), and the prefix mass through it: top-p alone over a nucleus wider than the
// candidates. Its key is found 4 bits at a time from mass histograms over the row (each thread
// sums its chunk in index order, a warp adds its lanes in a fixed tree of shuffles, one thread
// adds the warps in order: the same sums every run), the rounding of the sums being the only
// difference from the CPU's running sum; then, among the elements of that value (one weight
// each), the one in index order. Where no bucket reaches the mass (it rounds past the row's
// total), the last element with any. Every thread gets the result.
struct mass_hit {
  uint64_t rank = 0;  // (key << 32 | index): the rank order
  double through = 0.0;
};

__device__ mass_hit first_crossing(const float* row, int64_t vocab, int64_t chunk, float max_logit,
                                   double inv_t, double mass, bool strict, sample_shared& s) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int64_t begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
  const auto reaches = [&](double v) { return strict ? v > mass : v >= mass; };
  uint32_t prefix = 0, mask = 0;
  double before = 0.0;
  for (int shift = 28; shift >= 0; shift -= 4) {
    double bins[16];
#pragma unroll
    for (int d = 0; d < 16; ++d) bins[d] = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const float l = row[i];
      const uint32_t key = rank_key(l);
      if ((key & mask) == prefix) bins[(key >> shift) & 0xfu] += weight(l, max_logit, inv_t);
    }
#pragma unroll
    for (int d = 0; d < 16; ++d) {
      double v = bins[d];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) s.bins[warp][d] = v;
    }
    __syncthreads();
    if (tid == 0) {
      int chosen = -1, last = -1;
      double at = before, at_last = before;
      for (int d = 0; d < 16 && chosen < 0; ++d) {
        double bucket = 0.0;
        for (int w = 0; w < warps_per_row; ++w) bucket += s.bins[w][d];
        if (bucket > 0.0) {
          last = d;
          at_last = at;
        }
        if (reaches(at + bucket) && bucket > 0.0)
          chosen = d;
        else
          at += bucket;
      }
      s.digit = static_cast<uint32_t>(chosen >= 0 ? chosen : last);
      s.before = chosen >= 0 ? at : at_last;
    }
    __syncthreads();
    prefix |= s.digit << shift;
    mask = mask | (0xfu << shift);
    before = s.before;
    __syncthreads();  // s.digit and s.before are rewritten by the next pass
  }
  // The elements of the selected value: which of them, in index order, reaches the mass.
  const uint32_t selected = prefix;
  int32_t ties = 0;
  for (int64_t i = begin; i < end; ++i) ties += rank_key(row[i]) == selected;
  s.less[tid] = ties;
  __syncthreads();
  if (tid == 0) {
    int32_t count = 0;
    for (int t = 0; t < threads_per_row; ++t) {
      const int32_t c = s.less[t];
      s.less[t] = count;
      count += c;
    }
    s.remaining = count;
  }
  __syncthreads();
  const int32_t count = s.remaining;
  if (ties > 0 && s.less[tid] == 0)  // the thread holding the first of them
    for (int64_t i = begin; i < end; ++i)
      if (rank_key(row[i]) == selected) {
        s.value = row[i];
        break;
      }
  __syncthreads();
  if (tid == 0) {
    const double w = weight(s.value, max_logit, inv_t);
    // The first j whose prefix before + (j + 1) w reaches the mass; the last where none does.
    int32_t j = count - 1;
    if (w > 0.0) {
      const double need = (mass - before) / w;
      int64_t guess = need <= 0.0 ? 0 : static_cast<int64_t>(ceil(need)) - 1;
      guess = guess < 0 ? 0 : guess > count - 1 ? count - 1 : guess;
      while (guess > 0 && reaches(before + static_cast<double>(guess) * w)) --guess;
      while (guess < count - 1 && !reaches(before + static_cast<double>(guess + 1) * w)) ++guess;
      j = static_cast<int32_t>(guess);
    }
    s.chosen = j;
    s.before = before + static_cast<double>(j + 1) * w;
  }
  __syncthreads();
  const int32_t j = s.chosen;
  if (j >= s.less[tid] && j < s.less[tid] + ties) {
    int32_t seen = s.less[tid];
    for (int64_t i = begin; i < end; ++i)
      if (rank_key(row[i]) == selected && seen++ == j) {
        s.token = static_cast<int32_t>(i);
        break;
      }
  }
  __syncthreads();
  mass_hit hit;
  hit.rank = (static_cast<uint64_t>(selected) << 32) | static_cast<uint32_t>(s.token);
  hit.through = s.before;
  __syncthreads();  // s is reused by the caller
  return hit;
}

// top-k and/or top-p over the n most likely tokens (n <= sample_candidates).
__device__ int32_t draw_ranked(const float* row, int64_t vocab, int n, const sample_row& p,
                               float max_logit, double inv_t, double u, sample_shared& s) {
  const int tid = static_cast<int>(threadIdx.x);
  // 1. The n-th key in rank order, 8 bits at a time: `remaining` of the elements equal to it,
  //    the lowest indices, are in; every element below it is.
  uint32_t prefix = 0, mask = 0;
  int32_t remaining = n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) s.hist[tid] = 0;
    __syncthreads();
    for (int64_t i = tid; i < vocab; i += threads_per_row) {
      const uint32_t key = rank_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & 0xffu], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int32_t before = 0;
      uint32_t d = 0;
      while (before + s.hist[d] < remaining) before += s.hist[d++];
      s.digit = d;
      s.remaining = remaining - before;
    }
    __syncthreads();
    prefix |= s.digit << shift;
    mask |= 0xffu << shift;
    remaining = s.remaining;
  }
  const uint32_t selected = prefix;

  // 2. Gather them: each thread counts its chunk, thread 0 turns the counts into positions.
  const int64_t chunk = (vocab + threads_per_row - 1) / threads_per_row;
  const int64_t begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
  int32_t less = 0, equal = 0;
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t key = rank_key(row[i]);
    less += key < selected;
    equal += key == selected;
  }
  s.less[tid] = less;
  s.equal[tid] = equal;
  s.ranked[tid] = ~0ull;  // past n: sorts last
  __syncthreads();
  if (tid == 0) {
    int32_t l = 0, e = 0;
    for (int t = 0; t < threads_per_row; ++t) {
      const int32_t nl = l + s.less[t], ne = e + s.equal[t];
      s.less[t] = l;
      s.equal[t] = e;
      l = nl;
      e = ne;
    }
  }
  __syncthreads();
  {
    int32_t at_less = s.less[tid], tie = s.equal[tid];
    const int32_t first_tie = n - remaining;  // every element below the key comes first
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = rank_key(row[i]);
      const unsigned long long entry =
          (static_cast<unsigned long long>(key) << 32) | static_cast<uint32_t>(i);
      if (key < selected) {
        s.ranked[at_less++] = entry;
      } else if (key == selected) {
        if (tie < remaining) s.ranked[first_tie + tie] = entry;
        ++tie;
      }
    }
  }
  __syncthreads();

  // 3. Rank order: (key, index) ascending.
  for (int size = 2; size <= sample_candidates; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const int partner = tid ^ stride;
      if (partner > tid) {
        const unsigned long long a = s.ranked[tid], b = s.ranked[partner];
        if ((a > b) == ((tid & size) == 0)) {
          s.ranked[tid] = b;
          s.ranked[partner] = a;
        }
      }
      __syncthreads();
    }
  }
  // Top-p alone over more tokens than the candidates normalises by the whole row's weights
  // (summed through s.w, so before the candidates' weights go there).
  const bool all_ranked = p.top_k > 0 || n == vocab;
  const double row_total = all_ranked ? 0.0 : chunked_total(row, vocab, chunk, max_logit, inv_t, s);
  if (tid < n) s.w[tid] = weight(row[static_cast<uint32_t>(s.ranked[tid])], max_logit, inv_t);
  __syncthreads();

  // 4. The CPU's loops.
  if (tid == 0) {
    double total = row_total;
    if (all_ranked) {
      total = 0.0;
      for (int j = 0; j < n; ++j) total += s.w[j];
    }
    int kept = n;
    double kept_total = total;
    bool beyond = false;
    if (p.top_p < 1.0f) {
      const double cut = static_cast<double>(p.top_p) * total;
      double cum = 0.0;
      bool reached = false;
      for (int j = 0; j < n && !reached; ++j) {
        cum += s.w[j];
        if (cum >= cut) {
          kept = j + 1;
          reached = true;
        }
      }
      kept_total = cum;
      beyond = !reached && !all_ranked;  // the nucleus goes on past the candidates
    }
    int32_t token = sample_on_host;  // with `beyond`: drawn below, over the whole row
    if (!beyond) {
      const double target = u * kept_total;
      double cum = 0.0;
      int chosen = -1;
      for (int j = 0; j < kept && chosen < 0; ++j) {
        cum += s.w[j];
        if (target < cum) chosen = j;
      }
      for (int j = kept; chosen < 0 && j-- > 0;)  // rounding: the last one with any mass
        if (s.w[j] > 0.0) chosen = j;
      token =
          chosen < 0 ? s.best.index : static_cast<int32_t>(static_cast<uint32_t>(s.ranked[chosen]));
    }
    s.token = token;
  }
  __syncthreads();
  const int32_t token = s.token;
  if (token != sample_on_host) return token;
  __syncthreads();  // s.token is read: first_crossing may write it
  // Top-p alone with a nucleus wider than the candidates: the nucleus's end, then the draw in
  // it, by the mass over the whole row (never past the nucleus's end, whatever the rounding).
  const mass_hit last =
      first_crossing(row, vocab, chunk, max_logit, inv_t, static_cast<double>(p.top_p) * row_total,
                     /*strict=*/false, s);
  const mass_hit drawn =
      first_crossing(row, vocab, chunk, max_logit, inv_t, u * last.through, /*strict=*/true, s);
  return static_cast<int32_t>(
      static_cast<uint32_t>(drawn.rank <= last.rank ? drawn.rank : last.rank));
}

__global__ void __launch_bounds__(threads_per_row)
    sample_kernel(const float* logits, const sample_row* params, int32_t* tokens,
                              int64_t vocab, bool vectorized) {
  __shared__ sample_shared s;
  const float* row = logits + int64_t{blockIdx.x} * vocab;
  const candidate best = vectorized ? row_best<float, true>(row, vocab, s.partial, &s.best)
                                    : row_best<float, false>(row, vocab, s.partial, &s.best);
  const sample_row p = params[blockIdx.x];
  int32_t* out = tokens + blockIdx.x;
  // cpu::sample's refusals (NaN fails every comparison) go back to the host, which says why.
  if (!(p.temperature >= 0.0f) || !(p.top_p > 0.0f && p.top_p <= 1.0f) || p.top_k < 0) {
    if (threadIdx.x == 0) *out = sample_on_host;
    return;
  }
  if (p.temperature == 0.0f || p.top_k == 1 || !isfinite(best.value)) {
    if (threadIdx.x == 0) *out = best.index;
    return;
  }
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  const double u = uniform(p.seed, p.offset);
  int32_t token;
  if (p.top_k == 0 && p.top_p >= 1.0f) {
    token = draw_in_vocabulary_order(row, vocab, best.value, inv_t, u, s);
  } else {
    const int64_t limit = p.top_k > 0 ? int64_t{p.top_k} : sample_max_candidates;
    const int64_t n = limit < vocab ? limit : vocab;
    token = n > sample_max_candidates
                ? sample_on_host
                : draw_ranked(row, vocab, static_cast<int>(n), p, best.value, inv_t, u, s);
  }
  if (threadIdx.x == 0) *out = token;
}

template <typename T>
kernel_status launch(const sample_greedy_args& a, cudaStream_t stream) {
  const auto rows = static_cast<unsigned>(a.rows);
  const auto* logits = static_cast<const T*>(a.logits);
  const bool aligned =
      reinterpret_cast<uintptr_t>(a.logits) % (4 * sizeof(T)) == 0 && a.vocab % 4 == 0;
  if (aligned)
    sample_greedy_kernel<T, true><<<rows, threads_per_row, 0, stream>>>(logits, a.tokens, a.vocab);
  else
    sample_greedy_kernel<T, false><<<rows, threads_per_row, 0, stream>>>(logits, a.tokens, a.vocab);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace

kernel_status sample_can_run(const sample_args& a) noexcept {
  if (a.vocab < 1 || a.vocab >= INT32_MAX || a.rows < 0 || a.rows > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (a.rows == 0) return kernel_status::ok;
  if (a.logits == nullptr || a.params == nullptr || a.tokens == nullptr)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status sample_run(const sample_args& a, cudaStream_t stream) noexcept {
  if (auto s = sample_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0) return kernel_status::ok;
  const bool vectorized = reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 && a.vocab % 4 == 0;
  sample_kernel<<<static_cast<unsigned>(a.rows), threads_per_row, 0, stream>>>(
      a.logits, a.params, a.tokens, a.vocab, vectorized);
  return cudaGetLastError() == cudaSuccess ? kernel_status::ok : kernel_status::launch_failed;
}

kernel_status sample_greedy_can_run(const sample_greedy_args& a) noexcept {
  if (a.dt != dtype::f32 && a.dt != dtype::bf16) return kernel_status::unsupported_dtype;
  if (a.vocab < 1 || a.vocab >= INT32_MAX || a.rows < 0 || a.rows > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (a.rows == 0) return kernel_status::ok;
  if (a.logits == nullptr || a.tokens == nullptr) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status sample_greedy_run(const sample_greedy_args& a, cudaStream_t stream) noexcept {
  if (auto s = sample_greedy_can_run(a); s != kernel_status::ok) return s;
  if (a.rows == 0) return kernel_status::ok;
  switch (a.dt) {
    case dtype::f32: return launch<float>(a, stream);
    case dtype::bf16: return launch<__nv_bfloat16>(a, stream);
    default: return kernel_status::unsupported_dtype;
  }
}

}  // namespace moe::kernels::cuda
