#include "kernels/cpu/fp8.hpp"

#include <cmath>

namespace moe::kernels::cpu {

uint8_t float_to_e4m3(float v) noexcept {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  if (std::isnan(v)) return static_cast<uint8_t>(sign | 0x7f);
  const float a = std::fabs(v);
  if (a >= e4m3_max) return static_cast<uint8_t>(sign | 0x7e);
  // Below 2^-6 the format is fixed point with step 2^-9: the bits are the count of steps (8 steps
  // is 2^-6, whose encoding 0x08 is the smallest normal: the same bits).
  if (a < 0x1p-6f)
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f)));
  int e = 0;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  // Three mantissa bits: the significand 2m in [1, 2) in steps of 1/8; (2m - 1) * 8 is exact.
  int exponent = e - 1;
  int mantissa = static_cast<int>(std::nearbyint((2.0f * m - 1.0f) * 8.0f));
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  // a < 448 keeps (exponent, mantissa) at or below (8, 6): 0x7f (NaN) is never produced here.
  return static_cast<uint8_t>(sign | ((exponent + 7) << 3) | mantissa);
}

kernel_status fp8_quantize_groups(const float* x, int64_t rows, int64_t k, uint8_t* q, float* scale,
                                  fp8_scale_layout layout, int64_t scale_ld) noexcept {
  if (rows < 0 || k < 0) return kernel_status::unsupported_shape;
  const int64_t num_groups = (k + fp8_group_size - 1) / fp8_group_size;
  const int64_t packed_ld = layout == fp8_scale_layout::group_major ? rows : num_groups;
  if (scale_ld == 0) scale_ld = packed_ld;
  if (scale_ld < packed_ld) return kernel_status::unsupported_shape;
  if (rows == 0 || k == 0) return kernel_status::ok;
  if (x == nullptr || q == nullptr || scale == nullptr) return kernel_status::unsupported_shape;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t begin = g * fp8_group_size;
      const int64_t end = begin + fp8_group_size < k ? begin + fp8_group_size : k;
      float amax = 0.0f;
      for (int64_t c = begin; c < end; ++c) amax = std::fmax(amax, std::fabs(x[r * k + c]));
      float s = amax / e4m3_max;
      if (s == 0.0f) s = 1.0f;
      for (int64_t c = begin; c < end; ++c) q[r * k + c] = float_to_e4m3(x[r * k + c] / s);
      scale[layout == fp8_scale_layout::group_major ? g * scale_ld + r : r * scale_ld + g] = s;
    }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
