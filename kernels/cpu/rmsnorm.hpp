// RMSNorm on the CPU: the reference every other backend is tested against.
// Pure function of its arguments; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]
/// x: (rows, dim)  weight: (dim)  out: (rows, dim); out may alias x.
/// Accumulates in double so the reference stays exact to float rounding.
kernel_status rmsnorm(const float* x, const float* weight, float* out, size_t rows, size_t dim,
                      float eps) noexcept;

}  // namespace moe::kernels::cpu
