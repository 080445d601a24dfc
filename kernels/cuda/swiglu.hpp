// The SwiGLU activation of DeepSeek's MLPs and experts on the GPU: out = silu(gate) * up,
// elementwise, between the gate/up projections and the down projection. The device twin of
// kernels/cpu/swiglu.hpp, which defines the numerics. Framework-free: raw device pointers, shapes
// and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

/// Two forms, chosen by which inputs are set (exactly one of them):
///   two inputs: gate, up: (rows, dim); out[r, i] = silu(gate[r, i]) * up[r, i]
///   fused:      gate_up: (rows, 2 * dim), each row [gate (dim) | up (dim)]
/// out: (rows, dim). silu(x) = x / (1 + exp(-x)) in float32; storage in `dt`.
/// Aliasing: in the two-input form out may be gate or up (each element is read, then written by
/// the same thread). In the fused form out must not overlap gate_up: unlike the CPU loop, blocks
/// run in any order, so an in-place write could land on a row another block has yet to read.
struct swiglu_args {
  const void* gate = nullptr;     ///< (rows, dim) of `dt`, two-input form
  const void* up = nullptr;       ///< (rows, dim) of `dt`, two-input form
  const void* gate_up = nullptr;  ///< (rows, 2 * dim) of `dt`, fused form
  void* out = nullptr;            ///< (rows, dim) of `dt`
  int64_t rows = 0;
  int64_t dim = 0;
  dtype dt = dtype::f32;  ///< f32 or bf16; arithmetic is always float32
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, a missing pointer (null is
/// accepted only when rows * dim == 0), both or neither form set.
[[nodiscard]] kernel_status swiglu_can_run(const swiglu_args& a) noexcept;
[[nodiscard]] kernel_status swiglu_run(const swiglu_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
