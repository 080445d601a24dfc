#include "kernels/dtype.hpp"

namespace moe::kernels {

std::string_view safetensors_name(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::u8: return "U8";
  }
  return "?";
}

std::optional<dtype> dtype_from_safetensors(std::string_view name) noexcept {
  for (auto t : {dtype::f32, dtype::f16, dtype::bf16, dtype::f8_e4m3, dtype::i64, dtype::i32,
                 dtype::u8}) {
    if (safetensors_name(t) == name) return t;
  }
  return std::nullopt;
}

std::string_view to_string(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
    case dtype::f8_e4m3: return "f8_e4m3";
    case dtype::i64: return "i64";
    case dtype::i32: return "i32";
    case dtype::u8: return "u8";
  }
  return "?";
}

}  // namespace moe::kernels
