// Hopper's tensor memory accelerator (TMA) and the shared-memory barriers (mbarrier) its copies
// complete on: what a warp-specialized kernel needs to stream tiles into shared memory without
// its compute warps issuing a copy. Each device function is one PTX instruction (or a wait loop)
// on sm_90a; the emulator (tests/emulator/tma_emulator.hpp) defines the same operations on the
// host, and any other device pass traps: the host launches these kernels on sm_90 only.
// Internal to kernels/cuda: .cu files only (it needs nvcc or the emulator).
//
// A tensor map (CUtensorMap, 128 opaque bytes the driver encodes on the host) describes a 2-D
// bf16 matrix in global memory and the box one copy moves; a kernel takes it as a
// `const __grid_constant__ CUtensorMap` parameter, whose address the copy names. Elements of a
// box outside the matrix are written as zeros. With the 128-byte swizzle the box's rows are 64
// bf16 (128 bytes) and land in shared memory in the layout wgmma.cuh describes: row r at r * 128
// bytes, its 16-byte chunk c at chunk position c ^ (r % 8) of a 1024-byte aligned destination.
//
// An mbarrier is 8 bytes of shared memory counting the arrivals of a phase and the bytes the
// phase still expects; the phase completes when both reach zero, and its parity flips.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/cuda/wgmma.cuh"  // MOE_WGMMA_PTX: sm_90a device code

namespace moe::kernels::cuda::detail {

/// Sets up the barrier at shared address `bar` for `arrivals` arrivals a phase (one thread).
__device__ inline void mbarrier_init(uint32_t bar, uint32_t arrivals) {
#if defined(MOE_WGMMA_PTX)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::mbarrier_init(bar, arrivals);
#else
  (void)bar, (void)arrivals;
  __trap();
#endif
}

/// Makes the initialised barriers visible to the async proxy (the TMA unit) before a copy
/// completes on them; the block's barrier after it makes them visible to the other threads.
__device__ inline void fence_mbarrier_init() {
#if defined(MOE_WGMMA_PTX)
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#elif defined(MOE_CUDA_EMULATOR)
#else
  __trap();
#endif
}

/// One arrival on the barrier's current phase.
__device__ inline void mbarrier_arrive(uint32_t bar) {
#if defined(MOE_WGMMA_PTX)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::mbarrier_arrive(bar, 0);
#else
  (void)bar;
  __trap();
#endif
}

/// One arrival that also tells the phase to expect `bytes` more from copies completing on it.
__device__ inline void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(MOE_WGMMA_PTX)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::mbarrier_arrive(bar, bytes);
#else
  (void)bar, (void)bytes;
  __trap();
#endif
}

/// Waits until the phase of parity `parity` (0 for a barrier's first phase, then alternating)
/// has completed. What the completing copies wrote is then visible to this thread and to wgmma.
__device__ inline void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if defined(MOE_WGMMA_PTX)
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::mbarrier_wait(bar, parity);
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

/// Copies the box at element coordinates (c0 along rows, c1 across them) of `map`'s matrix to
/// shared address `dst`, completing `bytes of the box` on the barrier at `bar` (whose phase must
/// expect them: mbarrier_arrive_expect_tx). Asynchronous; one thread issues it.
__device__ inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int32_t c0,
                                   int32_t c1) {
#if defined(MOE_WGMMA_PTX)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::tma_load_2d(dst, map, bar, c0, c1);
#else
  (void)dst, (void)map, (void)bar, (void)c0, (void)c1;
  __trap();
#endif
}

}  // namespace moe::kernels::cuda::detail
