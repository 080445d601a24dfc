#include "runtime/nccl_comm.hpp"

#ifdef MOE_HAVE_CUDA

#include "runtime/cuda_memory.hpp"

namespace moe::runtime {

std::string nccl_version_string() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // Since 2.9 the code is major*10000 + minor*100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." +
         std::to_string(v % 100);
}

caf::error nccl_error(ncclResult_t status, const char* what) {
  if (status == ncclSuccess) return {};
  return make_error(cuda_errc::failed,
                    std::string(what) + ": NCCL error: " + ncclGetErrorString(status));
}

caf::expected<std::vector<nccl_comm_ptr>> make_local_nccl_comms(const std::vector<int>& devices) {
  std::vector<ncclComm_t> raw(devices.size(), nullptr);
  if (auto err = nccl_error(ncclCommInitAll(raw.data(), static_cast<int>(devices.size()),
                                            devices.data()),
                            "ncclCommInitAll"))
    return err;
  std::vector<nccl_comm_ptr> out;
  out.reserve(raw.size());
  for (auto* c : raw) out.emplace_back(c);
  return out;
}

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
