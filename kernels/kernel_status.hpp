// The result of every kernel entry point. Kernels never throw or abort on bad arguments;
// they answer one of these, and the caller turns it into its own error.
#pragma once

#include <cstdint>
#include <string_view>

namespace moe::kernels {

enum class kernel_status : uint8_t {
  ok = 0,
  unsupported_dtype,  ///< Permanent: no implementation for this element type.
  unsupported_shape,  ///< Permanent: shapes are inconsistent or outside the kernel's limits.
  unsupported_arch,   ///< Permanent: the device lacks a needed feature.
  no_device,          ///< Permanent for this process: no usable GPU (no driver, no device).
  launch_failed,      ///< Transient or fatal, per the CUDA error: the launch or a copy failed.
};

[[nodiscard]] constexpr std::string_view to_string(kernel_status s) noexcept {
  switch (s) {
    case kernel_status::ok: return "ok";
    case kernel_status::unsupported_dtype: return "unsupported dtype";
    case kernel_status::unsupported_shape: return "unsupported shape";
    case kernel_status::unsupported_arch: return "unsupported architecture";
    case kernel_status::no_device: return "no device";
    case kernel_status::launch_failed: return "launch failed";
  }
  return "unknown";
}

}  // namespace moe::kernels
