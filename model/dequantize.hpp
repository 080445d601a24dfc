// Decoding of checkpoint element types to float32, and DeepSeek-V3's FP8 block dequantisation.
//
// Every decode is exact: the float returned is the value the stored bits denote (all of BF16,
// F16 and F8_E4M3 embed in float32 without rounding). float_to_bf16 is the one rounding step
// (round to nearest even), for writers.
// Inputs are raw little-endian bytes with no alignment requirement, as memory-mapped safetensors
// data is only as aligned as its header length makes it.
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/dtype.hpp"

namespace moe::model {

/// float8_e4m3fn: bias 7, no infinities; 0x7f and 0xff are NaN, 0x7e is 448.
[[nodiscard]] float e4m3_to_float(uint8_t bits) noexcept;
[[nodiscard]] float bf16_to_float(uint16_t bits) noexcept;
[[nodiscard]] float f16_to_float(uint16_t bits) noexcept;
/// Round to nearest even; NaN stays a (quiet) NaN.
[[nodiscard]] uint16_t float_to_bf16(float value) noexcept;

/// Whether decode_to_f32 handles `type` (f32, f16, bf16, f8_e4m3).
[[nodiscard]] bool is_float_type(kernels::dtype type) noexcept;

/// out[i] = value of element i of `bytes` read as `type`.
/// Requires is_float_type(type) and bytes.size() == out.size() * dtype_bytes(type) (asserted:
/// callers check shapes against the header first).
void decode_to_f32(kernels::dtype type, std::span<const std::byte> bytes,
                   std::span<float> out) noexcept;

/// FP8 block dequantisation, row-major:
///   out[r, c] = e4m3(q[r, c]) * scale[r / block_rows, c / block_cols]
/// q: (rows, cols) bytes   scale: (ceil(rows / block_rows), ceil(cols / block_cols))
/// out: (rows, cols). Edge blocks are partial. Sizes are asserted, as for decode_to_f32.
void dequantize_fp8_blocks(std::span<const std::byte> q, int64_t rows, int64_t cols,
                           std::span<const float> scale, int64_t block_rows, int64_t block_cols,
                           std::span<float> out) noexcept;

}  // namespace moe::model
