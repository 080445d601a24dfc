#include "kernels/cpu/rmsnorm.hpp"

#include <cmath>

namespace moe::kernels::cpu {

kernel_status rmsnorm(const float* x, const float* weight, float* out, size_t rows, size_t dim,
                      float eps) noexcept {
  if (dim == 0) return kernel_status::unsupported_shape;
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* outr = out + r * dim;
    double sum_sq = 0.0;
    for (size_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    // float32 rsqrt of the float32 mean, as transformers computes it.
    const float mean_sq = static_cast<float>(sum_sq / static_cast<double>(dim));
    const float inv = 1.0f / std::sqrt(mean_sq + eps);
    for (size_t i = 0; i < dim; ++i) outr[i] = weight[i] * (xr[i] * inv);
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
