// The SwiGLU activation of DeepSeek's MLPs and experts: silu(gate) * up, elementwise.
// The expert MLP is down(swiglu(gate(x), up(x))); the block does the three projections with
// gemm and calls this in between.
// Thread safety: pure functions; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// out[r, i] = silu(gate[r, i]) * up[r, i], silu(x) = x / (1 + exp(-x)), in float32.
/// gate, up, out: (rows, dim) packed; out may alias gate or up.
[[nodiscard]] kernel_status swiglu(const float* gate, const float* up, float* out, size_t rows,
                                   size_t dim) noexcept;

/// The same over one projection with the gate and up weights stacked as (2 * dim, hidden):
/// gate_up: (rows, 2 * dim), each row [gate (dim) | up (dim)]; out: (rows, dim).
/// out may alias gate_up (row r of out never overruns row r of gate_up's unread part).
[[nodiscard]] kernel_status swiglu_fused(const float* gate_up, float* out, size_t rows,
                                         size_t dim) noexcept;

}  // namespace moe::kernels::cpu
