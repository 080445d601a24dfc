#include "kernels/cpu/grouped_gemm.hpp"

#include <climits>

#include "kernels/cpu/gemm.hpp"

namespace moe::kernels::cpu {

kernel_status grouped_gemm(const float* x, const int32_t* expert_offsets, size_t num_experts,
                           const float* weights, float* y, size_t num_rows, size_t n,
                           size_t k) noexcept {
  if (num_experts == 0 || expert_offsets == nullptr) return kernel_status::unsupported_shape;
  // Rows are int32 (the offsets are), and cpu::linear takes int-sized dimensions.
  const auto int_max = static_cast<size_t>(INT_MAX);
  if (num_rows > int_max || n > int_max || k > int_max) return kernel_status::unsupported_shape;
  // Every check before the first write, so a refused call leaves y as it was.
  if (expert_offsets[0] != 0) return kernel_status::unsupported_shape;
  for (size_t e = 0; e < num_experts; ++e)
    if (expert_offsets[e + 1] < expert_offsets[e]) return kernel_status::unsupported_shape;
  const auto rows_in_use = static_cast<size_t>(expert_offsets[num_experts]);
  if (rows_in_use > num_rows) return kernel_status::unsupported_shape;
  if (rows_in_use == 0 || n == 0) return kernel_status::ok;
  if (y == nullptr || (k > 0 && (x == nullptr || weights == nullptr)))
    return kernel_status::unsupported_shape;

  for (size_t e = 0; e < num_experts; ++e) {
    const auto begin = static_cast<size_t>(expert_offsets[e]);
    const auto rows = static_cast<size_t>(expert_offsets[e + 1]) - begin;
    if (rows == 0) continue;
    // With k == 0 cpu::linear reads neither operand: no offsets from a possibly null pointer.
    const float* xe = k > 0 ? x + begin * k : x;
    const float* we = k > 0 ? weights + e * n * k : weights;
    if (auto s = linear(xe, we, y + begin * n, rows, k, n); s != kernel_status::ok) return s;
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
