#include "kernels/cpu/permute.hpp"

#include <climits>

#include <algorithm>

namespace moe::kernels::cpu {
namespace {

bool entries_ok(size_t num_tokens, size_t top_k) noexcept {
  return top_k == 0 || num_tokens <= static_cast<size_t>(INT32_MAX) / top_k;
}

bool positions_ok(const int32_t* positions, size_t num_entries, size_t num_rows) noexcept {
  for (size_t j = 0; j < num_entries; ++j)
    if (positions[j] < -1 || (positions[j] >= 0 && static_cast<size_t>(positions[j]) >= num_rows))
      return false;
  return true;
}

}  // namespace

kernel_status permute_plan(const int32_t* topk_idx, size_t num_tokens, size_t top_k,
                           size_t num_experts, int32_t* expert_offsets, int32_t* positions,
                           int32_t* inverse) noexcept {
  if (num_experts == 0 || num_experts > static_cast<size_t>(INT32_MAX) ||
      !entries_ok(num_tokens, top_k) || expert_offsets == nullptr)
    return kernel_status::unsupported_shape;
  const size_t n = num_tokens * top_k;
  if (n > 0 && (topk_idx == nullptr || positions == nullptr || inverse == nullptr))
    return kernel_status::unsupported_shape;
  const auto in_range = [&](int32_t e) { return e >= 0 && static_cast<size_t>(e) < num_experts; };

  // Counts at e + 1, then an inclusive scan: offsets[e + 1] is the end of expert e's rows.
  std::fill(expert_offsets, expert_offsets + num_experts + 1, 0);
  for (size_t j = 0; j < n; ++j)
    if (in_range(topk_idx[j])) ++expert_offsets[topk_idx[j] + 1];
  for (size_t e = 0; e < num_experts; ++e) expert_offsets[e + 1] += expert_offsets[e];
  const int32_t num_rows = expert_offsets[num_experts];

  // Placed back to front from each expert's end, so a later entry gets a later row (stable)
  // without a cursor array; afterwards offsets[e + 1] has come down to the start of expert e,
  // and one shift restores the exclusive offsets.
  for (size_t j = n; j-- > 0;) {
    const int32_t e = topk_idx[j];
    if (!in_range(e)) {
      positions[j] = -1;
      continue;
    }
    const int32_t row = --expert_offsets[e + 1];
    positions[j] = row;
    inverse[row] = static_cast<int32_t>(j);
  }
  for (size_t e = 0; e < num_experts; ++e) expert_offsets[e] = expert_offsets[e + 1];
  expert_offsets[num_experts] = num_rows;
  std::fill(inverse + num_rows, inverse + n, -1);
  return kernel_status::ok;
}

kernel_status permute_rows(const float* x, size_t num_tokens, size_t top_k, size_t dim,
                           const int32_t* positions, float* permuted, size_t num_rows) noexcept {
  if (!entries_ok(num_tokens, top_k)) return kernel_status::unsupported_shape;
  const size_t n = num_tokens * top_k;
  if (n == 0 || dim == 0) return kernel_status::ok;
  if (x == nullptr || positions == nullptr || permuted == nullptr)
    return kernel_status::unsupported_shape;
  if (!positions_ok(positions, n, num_rows)) return kernel_status::unsupported_shape;
  for (size_t j = 0; j < n; ++j) {
    if (positions[j] < 0) continue;
    const float* src = x + (j / top_k) * dim;
    std::copy(src, src + dim, permuted + static_cast<size_t>(positions[j]) * dim);
  }
  return kernel_status::ok;
}

kernel_status unpermute(const float* y, size_t num_rows, const float* weight,
                        const int32_t* positions, size_t num_tokens, size_t top_k, size_t dim,
                        float* out) noexcept {
  if (!entries_ok(num_tokens, top_k)) return kernel_status::unsupported_shape;
  if (num_tokens == 0 || dim == 0) return kernel_status::ok;
  if (out == nullptr || (top_k > 0 && (y == nullptr || positions == nullptr)))
    return kernel_status::unsupported_shape;
  if (!positions_ok(positions, num_tokens * top_k, num_rows))
    return kernel_status::unsupported_shape;
  for (size_t t = 0; t < num_tokens; ++t) {
    float* o = out + t * dim;
    std::fill(o, o + dim, 0.0f);
    for (size_t k = 0; k < top_k; ++k) {
      const size_t j = t * top_k + k;
      if (positions[j] < 0) continue;
      const float w = weight != nullptr ? weight[j] : 1.0f;
      const float* src = y + static_cast<size_t>(positions[j]) * dim;
      for (size_t i = 0; i < dim; ++i) o[i] += w * src[i];
    }
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
