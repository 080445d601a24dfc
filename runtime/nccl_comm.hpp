// RAII owner of an NCCL communicator, and the NCCL version this binary runs with.
//
// Only built with the CUDA backend. Ownership: move-only; the destructor destroys the
// communicator. Thread safety: a communicator is driven by one thread at a time (NCCL's rule).
#pragma once

#ifdef MOE_HAVE_CUDA

#include <cuda_runtime_api.h>
#include <nccl.h>

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

/// Turns an NCCL status into an error naming `what`; ncclSuccess gives an empty error.
[[nodiscard]] caf::error nccl_error(ncclResult_t status, const char* what);

/// One communicator per listed device, all in this process (ncclCommInitAll).
[[nodiscard]] caf::expected<std::vector<nccl_comm_ptr>> make_local_nccl_comms(
    const std::vector<int>& devices);

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
