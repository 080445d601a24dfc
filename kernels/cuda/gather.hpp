// Row lookups and dtype conversion on the GPU: the embedding lookup that starts every forward
// pass (token ids to bf16 hidden rows), and the casts between float32 and bf16 at the edges of
// blocks that keep float32 (the router's logits are computed in float32, as transformers does).
//
// gather_rows: out[i, :] = table[ids[i], :] for i < num_ids; table (num_rows, dim), out
//   (num_ids, dim), both of `dt` (an exact copy). ids are device data the host cannot check:
//   an id outside [0, num_rows) writes a zero row (never a read outside the table); callers
//   validate token ids on the host before they reach the GPU (the API does).
// convert: out[i] = in[i] converted from in_dt to out_dt (f32 <-> bf16, or a copy); float32 to
//   bf16 rounds to nearest even, as model::float_to_bf16 does.
// accumulate: y[i] += x[i], summed in float32 and rounded once to dt: the residual add of
//   cpu::add (out aliasing a) for the products that cannot add into their output themselves
//   (the block-scaled FP8 linears).
// Thread safety: launches are asynchronous on `stream`; the caller owns every buffer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

struct gather_rows_args {
  const void* table = nullptr;     ///< (num_rows, dim) of `dt`
  const int32_t* ids = nullptr;    ///< (num_ids) int32, device
  void* out = nullptr;             ///< (num_ids, dim) of `dt`
  int64_t num_rows = 0;
  int64_t num_ids = 0;
  int64_t dim = 0;
  dtype dt = dtype::bf16;          ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, num_ids > INT32_MAX, a
/// size product past int64, or a null pointer (null is accepted when out is empty).
[[nodiscard]] kernel_status gather_rows_can_run(const gather_rows_args& a) noexcept;
[[nodiscard]] kernel_status gather_rows_run(const gather_rows_args& a, cudaStream_t stream) noexcept;

struct convert_args {
  const void* in = nullptr;
  void* out = nullptr;   ///< may equal `in` only when the dtypes are equal (then nothing is done)
  int64_t count = 0;
  dtype in_dt = dtype::f32;   ///< f32 or bf16
  dtype out_dt = dtype::bf16; ///< f32 or bf16
};

[[nodiscard]] kernel_status convert_can_run(const convert_args& a) noexcept;
[[nodiscard]] kernel_status convert_run(const convert_args& a, cudaStream_t stream) noexcept;

struct accumulate_args {
  const void* x = nullptr;
  void* y = nullptr;  ///< not overlapping x
  int64_t count = 0;
  dtype dt = dtype::bf16;  ///< f32 or bf16, both operands
};

/// ok, unsupported_dtype, or unsupported_shape for a negative count, a null pointer (where
/// count > 0) or x == y.
[[nodiscard]] kernel_status accumulate_can_run(const accumulate_args& a) noexcept;
[[nodiscard]] kernel_status accumulate_run(const accumulate_args& a, cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
