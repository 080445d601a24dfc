// FP8 (float8_e4m3fn) quantization of activations, DeepSeek-V3 style: the CPU reference that
// defines the numerics of kernels/cuda/fp8_quantize. Decoding e4m3 and expanding 128x128 weight
// blocks live in model/dequantize.hpp (kernels/ depends on nothing of ours, so the one encoder is
// here and the decoder there; the tests check that they invert each other).
//
// Per-token-group quantization, for every row r and 128-wide group g of columns:
//   amax  = max |x[r, c]| over the group (NaN ignored, as fmax does)
//   scale = amax / 448, or 1 where that is 0 (an all-zero group: any scale would do, and 1 keeps
//           x / scale and the product's rescaling finite)
//   q[r, c] = e4m3(x[r, c] / scale), round to nearest even, saturating to +-448 (never to NaN)
// so that x ~= e4m3(q) * scale with the group's largest element at (or next to) 448. The last
// group of a row is partial where k is not a multiple of 128. Division, not multiplication by
// the reciprocal, as DeepSeek's reference act_quant does: both implementations must round alike.
// A NaN stays NaN (0x7f); an infinite element makes its group's scale infinite.
// Thread safety: pure functions.
#pragma once

#include <cstdint>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// Largest finite float8_e4m3fn value.
inline constexpr float e4m3_max = 448.0f;
/// Columns sharing one activation scale (DeepSeek-V3's quantization group).
inline constexpr int64_t fp8_group_size = 128;

/// Round to nearest even into float8_e4m3fn bits, saturating: |v| > 448 (inf included) -> +-448.
/// NaN -> 0x7f (0xff for a negative NaN).
[[nodiscard]] uint8_t float_to_e4m3(float v) noexcept;

/// Where the scale of (row r, group g) lives, with num_groups = ceil(k / 128):
///   group_major: scale[g * rows + r], (num_groups, rows): what cuBLASLt's VEC128 mode reads
///                (the token index contiguous), so the quantized activation feeds it directly;
///   row_major:   scale[r * num_groups + g], (rows, num_groups): the natural one, for a reader of
///                one row at a time.
enum class fp8_scale_layout : uint8_t { group_major, row_major };

/// x: (rows, k) float32 packed; q: (rows, k) e4m3 bits; scale in `layout`, its outer index
/// scale_ld floats apart (0: packed, i.e. rows for group_major, ceil(k / 128) for row_major; a
/// larger one leaves the gap unwritten: gemm.hpp's FP8 product wants the group stride to be its
/// padded row count). unsupported_shape for negative sizes, scale_ld below the packed one, or a
/// null pointer with rows * k > 0.
[[nodiscard]] kernel_status fp8_quantize_groups(const float* x, int64_t rows, int64_t k, uint8_t* q,
                                                float* scale, fp8_scale_layout layout,
                                                int64_t scale_ld = 0) noexcept;

}  // namespace moe::kernels::cpu
