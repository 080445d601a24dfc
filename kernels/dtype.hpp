// Element types the kernels understand, and their sizes.
// Pure value types: safe to use from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moe::kernels {

enum class dtype : uint8_t {
  f32,
  f16,
  bf16,
  f8_e4m3,  ///< float8_e4m3fn: no infinities, 0x7f/0xff are NaN.
  i64,
  i32,
  u8,
};

[[nodiscard]] constexpr size_t dtype_bytes(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::f16: return 2;
    case dtype::bf16: return 2;
    case dtype::f8_e4m3: return 1;
    case dtype::i64: return 8;
    case dtype::i32: return 4;
    case dtype::u8: return 1;
  }
  return 0;
}

/// Name as safetensors spells it ("F32", "BF16", "F8_E4M3", ...).
[[nodiscard]] std::string_view safetensors_name(dtype t) noexcept;
[[nodiscard]] std::optional<dtype> dtype_from_safetensors(std::string_view name) noexcept;
/// Short lower-case name for messages ("f32", "bf16", ...).
[[nodiscard]] std::string_view to_string(dtype t) noexcept;

}  // namespace moe::kernels
