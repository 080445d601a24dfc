#include "kernels/cpu/sampling.hpp"

#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cpu/ranking.hpp"

namespace moe::kernels::cpu {
namespace {

constexpr uint64_t splitmix64_gamma = 0x9E3779B97F4A7C15ull;

uint64_t splitmix64_mix(uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

bool vocab_ok(const float* logits, size_t vocab) noexcept {
  return logits != nullptr && vocab > 0 && vocab <= static_cast<size_t>(INT32_MAX);
}

// Probability weights (unnormalised, the best has weight 1) of the first n ranked candidates.
double fill_weights(const sample_args& a, size_t n, float max_logit) noexcept {
  const double inv_temperature = 1.0 / a.params.temperature;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const float l = a.logits[a.order_workspace[i]];
    const double w = std::isnan(l) ? 0.0 : std::exp((static_cast<double>(l) - max_logit) *
                                                    inv_temperature);
    a.probs_workspace[i] = w;
    total += w;
  }
  return total;
}

// The shortest prefix whose mass reaches top_p of the total; at least one candidate.
size_t nucleus_size(const double* weights, size_t n, double total, double top_p,
                    double* kept_total) noexcept {
  double cum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    cum += weights[i];
    if (cum >= top_p * total) {
      *kept_total = cum;
      return i + 1;
    }
  }
  *kept_total = cum;  // rounding kept the sum just under top_p * total: keep everything
  return n;
}

}  // namespace

kernel_status sample_greedy(const float* logits, size_t vocab, int32_t* token) noexcept {
  if (!vocab_ok(logits, vocab) || token == nullptr) return kernel_status::unsupported_shape;
  const ranks_before better{logits};
  int32_t best = 0;
  for (size_t i = 1; i < vocab; ++i)
    if (better(static_cast<int32_t>(i), best)) best = static_cast<int32_t>(i);
  *token = best;
  return kernel_status::ok;
}

double sampling_uniform(uint64_t seed, uint64_t offset) noexcept {
  const uint64_t bits = splitmix64_mix(seed + (offset + 1) * splitmix64_gamma);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

kernel_status sample(const sample_args& a, int32_t* token) noexcept {
  const sampling_params& p = a.params;
  if (!vocab_ok(a.logits, a.vocab) || token == nullptr) return kernel_status::unsupported_shape;
  if (!(p.temperature >= 0.0f) || !(p.top_p > 0.0f && p.top_p <= 1.0f))  // NaN fails too
    return kernel_status::unsupported_shape;
  if (p.temperature == 0.0f || p.top_k == 1) return sample_greedy(a.logits, a.vocab, token);
  if (a.probs_workspace == nullptr || a.order_workspace == nullptr)
    return kernel_status::unsupported_shape;

  int32_t best = 0;
  (void)sample_greedy(a.logits, a.vocab, &best);
  const float max_logit = a.logits[best];
  if (!std::isfinite(max_logit)) {
    *token = best;
    return kernel_status::ok;
  }

  int32_t* order = a.order_workspace;
  for (size_t i = 0; i < a.vocab; ++i) order[i] = static_cast<int32_t>(i);
  size_t n = a.vocab;
  if (p.top_k > 0 || p.top_p < 1.0f) {
    n = p.top_k > 0 ? std::min(p.top_k, a.vocab) : a.vocab;
    std::partial_sort(order, order + n, order + a.vocab, ranks_before{a.logits});
  }
  double total = fill_weights(a, n, max_logit);
  if (p.top_p < 1.0f) n = nucleus_size(a.probs_workspace, n, total, p.top_p, &total);

  const double target = sampling_uniform(a.seed, a.offset) * total;
  double cum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    cum += a.probs_workspace[i];
    if (target < cum) {
      *token = order[i];
      return kernel_status::ok;
    }
  }
  // target can reach the rounded sum only through rounding: take the last candidate that has
  // any mass (the best one always has weight 1).
  for (size_t i = n; i-- > 0;) {
    if (a.probs_workspace[i] > 0.0) {
      *token = order[i];
      return kernel_status::ok;
    }
  }
  *token = best;
  return kernel_status::ok;
}

kernel_status sampler::draw(const float* logits, const sampling_params& params, uint64_t seed,
                            uint64_t offset, int32_t* token) {
  sample_args a;
  a.logits = logits;
  a.vocab = vocab_;
  a.params = params;
  a.seed = seed;
  a.offset = offset;
  const bool greedy = params.temperature == 0.0f || params.top_k == 1;
  if (!greedy && vocab_ <= INT32_MAX && probs_.size() != vocab_) {  // else refused below
    probs_.resize(vocab_);
    order_.resize(vocab_);
  }
  a.probs_workspace = probs_.empty() ? nullptr : probs_.data();
  a.order_workspace = order_.empty() ? nullptr : order_.data();
  return sample(a, token);
}

}  // namespace moe::kernels::cpu
