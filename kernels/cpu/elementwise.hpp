// Small elementwise float32 ops the model blocks need between the big kernels: the residual
// add and the weighted accumulation that combines expert outputs.
// Thread safety: pure functions; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// out[i] = a[i] + b[i] for i < n (the residual add). out may alias a or b.
[[nodiscard]] kernel_status add(const float* a, const float* b, float* out, size_t n) noexcept;

/// y[i] += alpha * x[i] for i < n (an expert's output scaled by its routing weight).
/// x must not partially overlap y; x == y is allowed.
[[nodiscard]] kernel_status axpy(float alpha, const float* x, float* y, size_t n) noexcept;

/// x[i] *= alpha for i < n.
[[nodiscard]] kernel_status scale(float alpha, float* x, size_t n) noexcept;

}  // namespace moe::kernels::cpu
