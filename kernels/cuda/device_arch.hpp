// The current device's compute capability, for the kernels and tests that choose by the card:
// wgmma (grouped_gemm.cu) and cuBLASLt's FP8 block-scaled modes (gemm.cpp) exist on compute
// capability 9.0 alone (sm_90a code does not load on 9.x successors, nor on 10.0).
//
// Host-only. The functions have internal linkage on purpose: the CPU emulator compiles kernel
// files with cudaGetDevice and cudaDeviceGetAttribute as macros (tests/emulator/cuda_emulator.hpp)
// and links them into binaries that also hold real-runtime code; an inline function with external
// linkage would have two different bodies there, and the linker would keep one of them.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>

namespace moe::kernels::cuda::detail {

struct compute_capability {
  int major = 0;
  int minor = 0;
};

/// The current device's compute capability; nullopt when there is none to ask (no device, no
/// driver), with the runtime's sticky error cleared so later calls do not report it.
[[maybe_unused]] static std::optional<compute_capability> current_compute_capability() noexcept {
  int device = 0;
  compute_capability cc;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cc.major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cc.minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return std::nullopt;
  }
  return cc;
}

/// Whether the current device is compute capability 9.0 (H100, H200, GH200): sm_90a's.
[[maybe_unused]] static bool current_device_is_sm90() noexcept {
  const auto cc = current_compute_capability();
  return cc && cc->major == 9 && cc->minor == 0;
}

}  // namespace moe::kernels::cuda::detail
