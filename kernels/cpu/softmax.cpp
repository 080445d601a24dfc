#include "kernels/cpu/softmax.hpp"

#include <cmath>

namespace moe::kernels::cpu {
namespace {

float row_max(const float* x, size_t dim) noexcept {
  float m = x[0];
  for (size_t i = 1; i < dim; ++i) m = std::fmax(m, x[i]);  // fmax skips NaN
  return m;
}

double row_exp_sum(const float* x, size_t dim, float max) noexcept {
  double sum = 0.0;
  for (size_t i = 0; i < dim; ++i) sum += std::exp(static_cast<double>(x[i]) - max);
  return sum;
}

kernel_status check(const float* x, const float* out, size_t rows, size_t dim) noexcept {
  if (rows > 0 && dim == 0) return kernel_status::unsupported_shape;
  if (rows > 0 && (x == nullptr || out == nullptr)) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

}  // namespace

kernel_status softmax_rows(const float* x, float* out, size_t rows, size_t dim) noexcept {
  if (auto s = check(x, out, rows, dim); s != kernel_status::ok) return s;
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* outr = out + r * dim;
    const float max = row_max(xr, dim);
    const double inv_sum = 1.0 / row_exp_sum(xr, dim, max);
    for (size_t i = 0; i < dim; ++i)
      outr[i] = static_cast<float>(std::exp(static_cast<double>(xr[i]) - max) * inv_sum);
  }
  return kernel_status::ok;
}

kernel_status log_softmax_rows(const float* x, float* out, size_t rows, size_t dim) noexcept {
  if (auto s = check(x, out, rows, dim); s != kernel_status::ok) return s;
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* outr = out + r * dim;
    const float max = row_max(xr, dim);
    const double log_sum = std::log(row_exp_sum(xr, dim, max)) + max;
    for (size_t i = 0; i < dim; ++i) outr[i] = static_cast<float>(xr[i] - log_sum);
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
