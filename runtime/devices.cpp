#include "runtime/devices.hpp"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moe::runtime {

std::string cuda_version_string(int version) {
  if (version <= 0) return "none";
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

device_inventory discover_devices() {
  device_inventory inv;
#ifdef MOE_HAVE_CUDA
  inv.cuda_built = true;
  cudaRuntimeGetVersion(&inv.cuda_runtime_version);
  cudaDriverGetVersion(&inv.cuda_driver_version);
  // Without a driver the call fails and leaves the count untouched: start from zero.
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    inv.no_gpu_reason = std::string("CUDA reports ") + cudaGetErrorName(err) + ": " +
                        cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return inv;
  }
  if (count == 0) {
    inv.no_gpu_reason = "the CUDA driver reports no devices";
    return inv;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    inv.gpus.push_back(gpu_info{i, prop.name, static_cast<uint64_t>(prop.totalGlobalMem),
                                prop.major, prop.minor, prop.multiProcessorCount});
  }
  if (inv.gpus.empty()) inv.no_gpu_reason = "no device answered a properties query";
#else
  inv.no_gpu_reason = "this binary was built without CUDA (MOE_CUDA=OFF or no nvcc)";
#endif
  return inv;
}

}  // namespace moe::runtime
