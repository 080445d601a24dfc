// Worlds of NCCL ranks in one test process: each rank a thread on a device of its own, joined
// through one unique id (join_nccl_comm), as the ranks of a multi-GPU node would be. For the
// tests of what runs over a world (runtime/nccl_all_to_all.hpp, engine/expert_parallel.hpp),
// built against the real CUDA runtime and NCCL (label gpu) or the emulator's stand-ins
// (tests/emulator/fake_nccl.cpp, with four emulated devices).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_comm.hpp"

namespace moe::test_support {

#ifdef MOE_EMU_FAKE_NCCL
// The emulator shows one device unless told otherwise (before its first CUDA call); these
// worlds need up to four.
inline const bool emulated_devices = [] { return ::setenv("MOE_EMU_DEVICES", "4", 0) == 0; }();
#endif

/// One rank's view of its world.
struct rank_ctx {
  int rank = 0;
  int world = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

/// Why a world of `n` cannot run here, or empty: NCCL refuses two ranks of one world on one
/// device, so a world needs as many GPUs as ranks.
inline std::string cannot_form(int n) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return "no GPU: no CUDA device";
  if (count < n)
    return "a world of " + std::to_string(n) + " needs " + std::to_string(n) +
           " GPUs, this machine has " + std::to_string(count);
  return {};
}

/// Runs `body` on every rank of a fresh world of `n`, rank r on device r in a thread of its own
/// (NCCL's collectives block until every rank has called them).
inline void run_world(int n, const std::function<void(const rank_ctx&)>& body) {
  auto id = runtime::make_nccl_unique_id();
  ASSERT_TRUE(id) << error_text(id.error());
  std::vector<std::thread> ranks;
  for (int r = 0; r < n; ++r)
    ranks.emplace_back([&, r] {
      auto comm = runtime::join_nccl_comm(*id, r, n, r);
      ASSERT_TRUE(comm) << "rank " << r << ": " << error_text(comm.error());
      auto stream = runtime::cuda_stream::create();
      ASSERT_TRUE(stream) << error_text(stream.error());
      body({r, n, comm->get(), stream->get()});
      EXPECT_FALSE(stream->synchronize());
    });
  for (auto& t : ranks) t.join();
}

}  // namespace moe::test_support
