// Next-token choice on the GPU, the device twins of kernels/cpu/sampling.hpp:
//  - sample_greedy_run: the argmax of each row (cpu::sample_greedy): the lowest index wins ties,
//    NaN never wins, an all-NaN row gives 0. bf16 logits are compared as the float32 values they
//    widen to (exactly), so the choice is the CPU's on the widened row.
//  - sample_run: cpu::sample per row (temperature, top-k, top-p, the counter-based draw
//    sampling_uniform(seed, offset)), each row with its own parameters read from the device, so
//    a decode graph replays any mix of greedy and sampled rows. One block per row.
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

/// The most ranked candidates sample_run sorts on the device: top-k up to this many, and top-p
/// whose nucleus lies within this many of the most likely tokens (a wider one is found by its
/// mass over the whole row instead). top_k above it is left to the host (sample_on_host).
inline constexpr int64_t sample_max_candidates = 1024;
/// A row's token when the device leaves it to the caller: run cpu::sample on that row's logits
/// with its parameters (it also says what is wrong with parameters cpu::sample refuses).
inline constexpr int32_t sample_on_host = -1;

/// One row's sampling, as cpu::sample takes it (device memory, one per row).
struct sample_row {
  float temperature = 0.0f;  ///< >= 0; 0: greedy
  int32_t top_k = 0;         ///< >= 0; 0: no limit; 1: greedy
  float top_p = 1.0f;        ///< (0, 1]
  uint32_t reserved = 0;
  uint64_t seed = 0;
  uint64_t offset = 0;  ///< the draw's index in the seed's stream (tokens sampled so far)
};
static_assert(sizeof(sample_row) == 32);

struct sample_args {
  const float* logits = nullptr;       ///< (rows, vocab) float32, device
  const sample_row* params = nullptr;  ///< (rows), device
  int32_t* tokens = nullptr;           ///< (rows) int32, device
  int64_t rows = 0;
  int64_t vocab = 0;
};

/// tokens[r] = cpu::sample's token for row r with params[r], or sample_on_host where top_k
/// exceeds sample_max_candidates (and the vocabulary) or cpu::sample refuses the parameters.
/// The weights are the CPU's (exp in double of the same double expression); their sums run in
/// the CPU's order wherever the CPU sums ranked candidates (top-k), and in chunks, or by value
/// buckets for a top-p nucleus wider than the candidates, otherwise (temperature alone; top-p
/// alone's normaliser over the vocabulary): there the token can differ from the CPU's only
/// where the draw falls within the sums' rounding (~1e-15 relative) of a boundary between two
/// tokens. The same inputs give the same tokens on every run (no atomics in any sum).
/// ok, or unsupported_shape for vocab outside [1, INT32_MAX - 1], rows < 0 or > INT32_MAX, or a
/// null pointer (null is accepted when rows == 0).
[[nodiscard]] kernel_status sample_can_run(const sample_args& a) noexcept;
[[nodiscard]] kernel_status sample_run(const sample_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
