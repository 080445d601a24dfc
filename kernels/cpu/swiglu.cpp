#include "kernels/cpu/swiglu.hpp"

#include <cmath>

namespace moe::kernels::cpu {
namespace {

// exp(-x) overflows to inf for x < -88, and x / inf = -0: the right limit, no NaN.
float silu(float x) noexcept { return x / (1.0f + std::exp(-x)); }

}  // namespace

kernel_status swiglu(const float* gate, const float* up, float* out, size_t rows,
                     size_t dim) noexcept {
  if (rows == 0 || dim == 0) return kernel_status::ok;
  if (gate == nullptr || up == nullptr || out == nullptr) return kernel_status::unsupported_shape;
  const size_t n = rows * dim;
  for (size_t i = 0; i < n; ++i) out[i] = silu(gate[i]) * up[i];
  return kernel_status::ok;
}

kernel_status swiglu_fused(const float* gate_up, float* out, size_t rows, size_t dim) noexcept {
  if (rows == 0 || dim == 0) return kernel_status::ok;
  if (gate_up == nullptr || out == nullptr) return kernel_status::unsupported_shape;
  // Row by row, front to back: in place, out[r, i] (offset r*dim + i) never passes the input
  // element it is computed from (offset 2*r*dim + i), so nothing unread is overwritten.
  for (size_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * 2 * dim;
    const float* up = gate + dim;
    float* o = out + r * dim;
    for (size_t i = 0; i < dim; ++i) o[i] = silu(gate[i]) * up[i];
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
