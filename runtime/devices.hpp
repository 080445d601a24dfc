// Discovery of the GPUs this process may use, and of the CUDA/NCCL versions it runs with.
//
// A binary built with CUDA still starts on a machine with no driver or no GPU: discovery then
// reports zero devices and says why, and every caller falls back to the CPU.
// Thread safety: discover_devices() may be called from any thread; it only queries CUDA.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe::runtime {

struct gpu_info {
  int index = 0;
  std::string name;
  uint64_t memory_bytes = 0;
  int compute_major = 0;
  int compute_minor = 0;
  int num_multiprocessors = 0;
};

struct device_inventory {
  bool cuda_built = false;           ///< This binary was compiled with the CUDA backend.
  int cuda_runtime_version = 0;      ///< e.g. 13000; 0 when not built with CUDA.
  int cuda_driver_version = 0;       ///< 0 when no driver is installed.
  std::vector<gpu_info> gpus;
  std::string no_gpu_reason;         ///< Set when `gpus` is empty.
};

[[nodiscard]] device_inventory discover_devices();

/// Renders a CUDA version integer (12080) as "12.8".
[[nodiscard]] std::string cuda_version_string(int version);

}  // namespace moe::runtime
