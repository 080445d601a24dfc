// The one deterministic "best first" order the CPU kernels rank by (router top-k, greedy
// argmax, top-k/top-p sampling), so that a tie resolves the same way everywhere: larger value
// first, lower index first on equal values, NaN after every number. torch.topk leaves ties
// unspecified; this order is what the numpy reference (stable argsort of -x) gives.
// Header-only, internal to kernels/cpu; a pure comparator, safe from any thread.
#pragma once

#include <cmath>
#include <cstdint>

namespace moe::kernels::cpu {

/// Strict weak (in fact total) order on indices into `values`, for std::sort and friends.
struct ranks_before {
  const float* values;
  [[nodiscard]] bool operator()(int32_t a, int32_t b) const noexcept {
    const float va = values[a], vb = values[b];
    const bool nan_a = std::isnan(va), nan_b = std::isnan(vb);
    if (nan_a != nan_b) return nan_b;
    if (!nan_a && va != vb) return va > vb;
    return a < b;
  }
};

}  // namespace moe::kernels::cpu
