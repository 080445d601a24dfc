// Greedy next-token choice on the GPU: the argmax of each row of logits, the device twin of
// cpu::sample_greedy (kernels/cpu/sampling.hpp): the lowest index wins ties, NaN never wins,
// an all-NaN row gives 0. bf16 logits are compared as the float32 values they widen to
// (exactly), so the choice is the CPU's on the widened row.
// Framework-free: raw device pointers, shapes and a stream.
// Thread safety: the launch is asynchronous on `stream`; the caller owns every buffer and keeps
// it alive until the stream has passed the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

struct sample_greedy_args {
  const void* logits = nullptr;  ///< (rows, vocab) of `dt`, device
  int32_t* tokens = nullptr;     ///< (rows) int32, device
  int64_t rows = 0;
  int64_t vocab = 0;
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for vocab outside [1, INT32_MAX - 1], rows < 0
/// or > INT32_MAX, or a null pointer (null is accepted when rows == 0).
[[nodiscard]] kernel_status sample_greedy_can_run(const sample_greedy_args& a) noexcept;
[[nodiscard]] kernel_status sample_greedy_run(const sample_greedy_args& a,
                                              cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
