#include "runtime/nccl_comm.hpp"

#ifdef MOE_HAVE_CUDA

#include <cstring>

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
  std::string text = std::string(what) + ": NCCL error: " + ncclGetErrorString(status);
  // NCCL's own words say which rule broke ("Duplicate GPU detected : rank 0 and rank 1 ...").
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') text += std::string(" [") + last + "]";
  return make_error(cuda_errc::failed, std::move(text));
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

static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES,
              "nccl_unique_id assumes ncclUniqueId is exactly its bytes");

caf::expected<nccl_unique_id> make_nccl_unique_id() {
  ncclUniqueId raw{};
  if (auto err = nccl_error(ncclGetUniqueId(&raw), "ncclGetUniqueId")) return err;
  nccl_unique_id out;
  std::memcpy(out.bytes.data(), &raw, sizeof(raw));
  return out;
}

caf::error validate_nccl_join(int rank, int world_size, int device) {
  const auto fail = [&](const std::string& why) {
    return make_error(cuda_errc::failed, "join_nccl_comm(rank " + std::to_string(rank) +
                                             ", world_size " + std::to_string(world_size) +
                                             ", device " + std::to_string(device) + "): " + why);
  };
  if (world_size < 1) return fail("world_size must be at least 1");
  if (rank < 0 || rank >= world_size)
    return fail("rank must lie in [0, " + std::to_string(world_size) + ")");
  if (device < 0) return fail("device must not be negative");
  return {};
}

caf::expected<nccl_comm_ptr> join_nccl_comm(const nccl_unique_id& id, int rank, int world_size,
                                            int device) {
  // No CUDA call before the arguments are known good.
  if (auto err = validate_nccl_join(rank, world_size, device)) return err;
  int count = 0;
  if (auto err = cuda_error(cudaGetDeviceCount(&count), "join_nccl_comm: cudaGetDeviceCount"))
    return err;
  if (device >= count)
    return make_error(count == 0 ? cuda_errc::no_device : cuda_errc::failed,
                      "join_nccl_comm(rank " + std::to_string(rank) + ", world_size " +
                          std::to_string(world_size) + "): device " + std::to_string(device) +
                          " does not exist, this process sees " + std::to_string(count) +
                          " CUDA device(s)");
  if (auto err = cuda_error(cudaSetDevice(device), "join_nccl_comm: cudaSetDevice")) return err;
  ncclUniqueId raw{};
  std::memcpy(&raw, id.bytes.data(), sizeof(raw));
  ncclComm_t comm = nullptr;
  const std::string what = "ncclCommInitRank(rank " + std::to_string(rank) + " of " +
                           std::to_string(world_size) + ", device " + std::to_string(device) + ")";
  if (auto err = nccl_error(ncclCommInitRank(&comm, world_size, raw, rank), what.c_str()))
    return err;
  return nccl_comm_ptr{comm};
}

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
