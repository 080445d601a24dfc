#include "kernels/cpu/elementwise.hpp"

namespace moe::kernels::cpu {

kernel_status add(const float* a, const float* b, float* out, size_t n) noexcept {
  if (n == 0) return kernel_status::ok;
  if (a == nullptr || b == nullptr || out == nullptr) return kernel_status::unsupported_shape;
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  return kernel_status::ok;
}

kernel_status axpy(float alpha, const float* x, float* y, size_t n) noexcept {
  if (n == 0) return kernel_status::ok;
  if (x == nullptr || y == nullptr) return kernel_status::unsupported_shape;
  for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  return kernel_status::ok;
}

kernel_status scale(float alpha, float* x, size_t n) noexcept {
  if (n == 0) return kernel_status::ok;
  if (x == nullptr) return kernel_status::unsupported_shape;
  for (size_t i = 0; i < n; ++i) x[i] *= alpha;
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
