// Next-token sampling over one row of logits: greedy, temperature, top-k, top-p (nucleus).
//
// Randomness is counter-based, not a stateful engine: a draw is a pure function of
// (seed, offset), u = sampling_uniform(seed, offset), the offset-th output of a splitmix64 stream
// started at seed. A request keeps its seed and uses the number of tokens it has sampled as the
// offset, so its tokens do not depend on which other requests share the batch, it can resume
// after a failover from (seed, offset) alone, and a GPU sampler can reproduce the same u.
//
// Thread safety: pure functions; the caller owns the logits, the workspace and the output.
// Concurrent calls need distinct workspaces (a sampler each).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

struct sampling_params {
  float temperature = 1.0f;  ///< >= 0; 0 means greedy
  size_t top_k = 0;          ///< keep the k most likely tokens; 0 = no limit; 1 = greedy
  float top_p = 1.0f;        ///< in (0, 1]; keep the smallest set whose mass reaches top_p
};

/// argmax over logits (vocab); the lowest index wins ties; NaN never wins (an all-NaN row gives
/// 0). unsupported_shape for vocab == 0, vocab > INT32_MAX or a null pointer.
[[nodiscard]] kernel_status sample_greedy(const float* logits, size_t vocab,
                                          int32_t* token) noexcept;

/// Uniform in [0, 1) from 53 bits of the offset-th (0-based) output of splitmix64 seeded with
/// seed, i.e. mix(seed + (offset + 1) * 0x9E3779B97F4A7C15) with splitmix64's finaliser.
/// A GPU sampler that wants the same tokens computes exactly this.
[[nodiscard]] double sampling_uniform(uint64_t seed, uint64_t offset) noexcept;

struct sample_args {
  const float* logits = nullptr;      ///< (vocab)
  size_t vocab = 0;
  sampling_params params;
  uint64_t seed = 0;
  uint64_t offset = 0;
  double* probs_workspace = nullptr;  ///< (vocab), caller-owned scratch, reusable across calls
  int32_t* order_workspace = nullptr; ///< (vocab), caller-owned scratch, reusable across calls
};

/// Draws one token:
///  1. temperature == 0 or top_k == 1: sample_greedy (no draw, workspaces unused).
///  2. Candidates are ranked by logit, descending, lower index first on ties (NaN and -inf
///     logits have probability 0). top_k > 0 keeps the first top_k.
///  3. p = softmax(logit / temperature) over the kept candidates (in double). top_p < 1 then
///     keeps the shortest prefix of the ranking whose renormalised mass is >= top_p: at least
///     one token, so a tiny top_p is greedy. (top-k first, then top-p on what is left, as
///     Hugging Face's and vLLM's samplers order them.)
///  4. u = sampling_uniform(seed, offset) picks by inverse CDF along the ranking. Without top-k
///     and top-p the ranking is skipped and the CDF runs in vocabulary order: the same
///     distribution, a different (still deterministic) token for a given u.
/// unsupported_shape for a bad vocab, temperature (< 0 or NaN), top_p outside (0, 1] or a null
/// pointer. A row whose largest logit is not finite (all -inf or NaN, or a +inf) falls back to
/// greedy.
[[nodiscard]] kernel_status sample(const sample_args& a, int32_t* token) noexcept;

/// sample() with its two workspaces owned: one per thread (or step, or request loop) drawing
/// any number of rows of one vocabulary. The workspaces are allocated on the first draw that
/// needs them (greedy rows never do) and reused after.
class sampler {
 public:
  explicit sampler(size_t vocab) : vocab_(vocab) {}

  /// sample()'s token for vocab() logits with these parameters and this draw; its status.
  [[nodiscard]] kernel_status draw(const float* logits, const sampling_params& params,
                                   uint64_t seed, uint64_t offset, int32_t* token);

  [[nodiscard]] size_t vocab() const noexcept { return vocab_; }

 private:
  size_t vocab_;
  std::vector<double> probs_;
  std::vector<int32_t> order_;
};

}  // namespace moe::kernels::cpu
