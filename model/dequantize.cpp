#include "model/dequantize.hpp"

#include <bit>
#include <cstring>
#include <limits>

#include "base/assert.hpp"

namespace moe::model {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host needs byte swaps here");

float e4m3_to_float(uint8_t bits) noexcept {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x80u) << 24;
  const uint32_t exponent = (bits >> 3) & 0xfu;
  const uint32_t mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exponent == 0) {
    // Subnormal: mantissa/8 * 2^-6 = mantissa * 2^-9, exact in float.
    float magnitude = static_cast<float>(mantissa) * 0x1p-9f;
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: rebias 7 -> 127 and widen the 3-bit mantissa to 23 bits.
  return std::bit_cast<float>(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

float bf16_to_float(uint16_t bits) noexcept {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

float f16_to_float(uint16_t bits) noexcept {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign != 0 ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

uint16_t float_to_bf16(float value) noexcept {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

bool is_float_type(kernels::dtype type) noexcept {
  switch (type) {
    case kernels::dtype::f32:
    case kernels::dtype::f16:
    case kernels::dtype::bf16:
    case kernels::dtype::f8_e4m3: return true;
    default: return false;
  }
}

namespace {

template <class Bits, class Decode>
void decode_each(const std::byte* in, float* out, size_t count, Decode decode) noexcept {
  for (size_t i = 0; i < count; ++i) {
    Bits b;
    std::memcpy(&b, in + i * sizeof(Bits), sizeof(Bits));
    out[i] = decode(b);
  }
}

}  // namespace

void decode_to_f32(kernels::dtype type, std::span<const std::byte> bytes,
                   std::span<float> out) noexcept {
  MOE_ASSERT(is_float_type(type));
  MOE_ASSERT(bytes.size() == out.size() * kernels::dtype_bytes(type));
  switch (type) {
    case kernels::dtype::f32:
      if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
      return;
    case kernels::dtype::bf16:
      decode_each<uint16_t>(bytes.data(), out.data(), out.size(), bf16_to_float);
      return;
    case kernels::dtype::f16:
      decode_each<uint16_t>(bytes.data(), out.data(), out.size(), f16_to_float);
      return;
    case kernels::dtype::f8_e4m3:
      decode_each<uint8_t>(bytes.data(), out.data(), out.size(), e4m3_to_float);
      return;
    default: return;
  }
}

void dequantize_fp8_blocks(std::span<const std::byte> q, int64_t rows, int64_t cols,
                           std::span<const float> scale, int64_t block_rows, int64_t block_cols,
                           std::span<float> out) noexcept {
  MOE_ASSERT(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0);
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  MOE_ASSERT(q.size() == static_cast<size_t>(rows * cols));
  MOE_ASSERT(out.size() == static_cast<size_t>(rows * cols));
  MOE_ASSERT(scale.size() == static_cast<size_t>(scale_rows * scale_cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* scale_row = scale.data() + (r / block_rows) * scale_cols;
    const std::byte* in = q.data() + r * cols;
    float* dst = out.data() + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c] = e4m3_to_float(static_cast<uint8_t>(in[c])) * scale_row[c / block_cols];
    }
  }
}

}  // namespace moe::model
