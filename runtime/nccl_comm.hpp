// RAII owner of an NCCL communicator, the NCCL version this binary runs with, and the two ways
// to make communicators: all ranks in this process (make_local_nccl_comms), or one rank per
// process joining a world through a unique id that rank 0 made and the control plane carried
// (make_nccl_unique_id, then join_nccl_comm in every process).
//
// Only built with the CUDA backend. Ownership: move-only; the destructor destroys the
// communicator. Thread safety: a communicator is driven by one thread at a time (NCCL's rule).
#pragma once

#ifdef MOE_HAVE_CUDA

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <caf/meta/type_name.hpp>

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "base/error.hpp"

namespace moe::runtime {

/// "2.28.3", from the library actually loaded (not the header).
[[nodiscard]] std::string nccl_version_string();

struct nccl_comm_deleter {
  void operator()(ncclComm_t c) const noexcept { ncclCommDestroy(c); }
};
using nccl_comm_ptr = std::unique_ptr<std::remove_pointer_t<ncclComm_t>, nccl_comm_deleter>;

/// Turns an NCCL status into an error naming `what`, with NCCL's last error message where it
/// left one; ncclSuccess gives an empty error.
[[nodiscard]] caf::error nccl_error(ncclResult_t status, const char* what);

/// One communicator per listed device, all in this process (ncclCommInitAll).
[[nodiscard]] caf::expected<std::vector<nccl_comm_ptr>> make_local_nccl_comms(
    const std::vector<int>& devices);

/// The opaque token that names one NCCL world (ncclUniqueId's bytes). Rank 0 makes it, the
/// control plane carries it to the other ranks; it holds no pointer, so it may cross processes
/// and nodes as plain bytes.
struct nccl_unique_id {
  std::array<std::byte, NCCL_UNIQUE_ID_BYTES> bytes{};
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, nccl_unique_id& x) {
  return f(caf::meta::type_name("nccl_unique_id"), x.bytes);
}

inline bool operator==(const nccl_unique_id& a, const nccl_unique_id& b) {
  return a.bytes == b.bytes;
}
inline bool operator!=(const nccl_unique_id& a, const nccl_unique_id& b) { return !(a == b); }

/// A fresh id for a new world (ncclGetUniqueId). Called once, by rank 0; every rank of the
/// world then passes the same id to join_nccl_comm.
[[nodiscard]] caf::expected<nccl_unique_id> make_nccl_unique_id();

/// Checks the arguments of join_nccl_comm that need no CUDA call: world_size >= 1, rank in
/// [0, world_size), device >= 0. An empty error when they hold; else cuda_errc::failed with a
/// text naming the values.
[[nodiscard]] caf::error validate_nccl_join(int rank, int world_size, int device);

/// Joins this process to the world `id` as `rank` of `world_size`, on CUDA device `device`
/// (ncclCommInitRank). The arguments are checked first, before any CUDA call; then the device
/// must exist (cudaGetDeviceCount: cuda_errc::no_device without a driver or GPU), and it becomes
/// this thread's current device (cudaSetDevice), so later allocations for the communicator land
/// on it. Blocks until every rank of the world has joined (NCCL's rule): call it from a thread
/// that may wait, once per rank, with a distinct rank in each process. Two ranks of one world on
/// the same device are refused by NCCL (ncclInvalidUsage, "Duplicate GPU detected").
[[nodiscard]] caf::expected<nccl_comm_ptr> join_nccl_comm(const nccl_unique_id& id, int rank,
                                                          int world_size, int device);

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
