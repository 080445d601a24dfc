// Hopper's warpgroup-level MMA (wgmma) and what feeding it from shared memory takes: operand
// descriptors for the 128-byte swizzled K-major layout, the fences and the group waits. Each
// function is one PTX instruction on sm_90a; the emulator (tests/emulator/wgmma_emulator.hpp)
// defines the same operations on the host, and any other device pass (the compute_90 PTX kept
// for other cards, which lacks wgmma) traps: the host launches these kernels on sm_90 only.
// Internal to kernels/cuda: .cu files only (it needs nvcc or the emulator). Pure device functions.
//
// The operand layout, K-major with 128-byte swizzle (what sw128_descriptor describes): a tile of
// R rows of 64 bf16 (128 bytes, one k step of 64) starts at a 1024-byte aligned shared address;
// row r lies at r * 128 bytes, and its 16-byte chunk c (elements 8c .. 8c + 7) at chunk position
// c ^ (r % 8). The swizzle spreads the 8 rows of a core matrix over all 32 banks, for the tensor
// cores' reads and for the 16-byte writes that fill the tile alike. The k16 slice j of such a
// tile is the same descriptor with its start advanced by 32 j bytes: the hardware applies the
// XOR to address bits 4-6 from bits 7-9, which the 1024-byte alignment keeps equal to r % 8.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_WGMMA_PTX 1
#endif

// An MMA wrapper's body outside sm_90a: the emulator's product, or a trap.
#if defined(MOE_CUDA_EMULATOR)
#define MOE_WGMMA_ELSEWHERE(n) ::emu::wgmma_bf16(d, n, a, b)
#else
#define MOE_WGMMA_ELSEWHERE(n) ((void)d, (void)a, (void)b, __trap())
#endif

namespace moe::kernels::cuda::detail {

/// p's address in the shared state space (what descriptors take).
__device__ inline uint32_t shared_offset(const void* p) {
#if defined(MOE_CUDA_EMULATOR)
  return ::emu::shared_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

/// The descriptor of a K-major, 128-byte swizzled bf16 operand starting at shared address
/// `start` (see above): 8-row core-matrix groups 1024 bytes apart (the stride byte offset), the
/// leading byte offset unused by this layout (16 by convention), base offset 0.
__device__ inline uint64_t sw128_descriptor(uint32_t start) {
  constexpr uint64_t stride_bytes = 1024, leading_bytes = 16, swizzle_128b = 1;
  return uint64_t{(start & 0x3ffff) >> 4} | (leading_bytes >> 4) << 16 | (stride_bytes >> 4) << 32 |
         swizzle_128b << 62;
}

/// Orders this thread's generic-proxy writes to shared memory (cp.async's included) before the
/// async proxy's reads (wgmma's operands). Each writer fences, then the block's barrier.
__device__ inline void fence_proxy_async_shared() {
#if defined(MOE_WGMMA_PTX)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::fence_proxy_async();
#else
  __trap();
#endif
}

/// Before a warpgroup's first wgmma of a batch: orders its register and shared accesses.
__device__ inline void wgmma_fence() {
#if defined(MOE_WGMMA_PTX)
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::wgmma_fence();
#else
  __trap();
#endif
}

/// Pins the accumulators in their registers across an asynchronous wgmma: the compiler sees each
/// read and written here, so it neither moves one between registers nor touches one between
/// the issue and the wait. Call right before wgmma_fence and right after wgmma_wait.
template <int N>
__device__ inline void fence_operands(float (&d)[N]) {
#if defined(MOE_WGMMA_PTX)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

/// Closes the batch of wgmma issued since the last commit into one group.
__device__ inline void wgmma_commit() {
#if defined(MOE_WGMMA_PTX)
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::wgmma_commit();
#else
  __trap();
#endif
}

/// Waits until at most `Pending` of this warpgroup's committed groups are still running: their
/// accumulators may be read, and the shared memory they read overwritten, after it.
template <int Pending>
__device__ inline void wgmma_wait() {
#if defined(MOE_WGMMA_PTX)
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(Pending) : "memory");
#elif defined(MOE_CUDA_EMULATOR)
  ::emu::wgmma_wait(Pending);
#else
  __trap();
#endif
}

/// d += a . b^T for a (64, 16) bf16 tile `a` and a (256, 16) bf16 tile `b`, both K-major in
/// shared memory (descriptors above), float32 accumulators, by the 128 threads of a warpgroup
/// (4 consecutive warps from a multiple of 4) together. Asynchronous: d belongs to the
/// warpgroup until a wgmma_wait covers the group. Thread (warp w of the warpgroup, lane l) holds,
/// for each of the 32 column blocks j: d[4j + 2h + c] = element (16 w + l / 4 + 8 h,
/// 8 j + 2 (l % 4) + c), h and c in {0, 1}.
__device__ inline void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t a, uint64_t b) {
#if defined(MOE_WGMMA_PTX)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
      "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, "
      "%52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, "
      "%69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "
      "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, "
      "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, "
      "%116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},"
      " %128, %129, 1, 1, 1, 0, 0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b)
      : "memory");
#else
  MOE_WGMMA_ELSEWHERE(256);
#endif
}

/// The same for a (64, 16) `a` and a (128, 16) `b`: 64 accumulators, the first 16 column blocks
/// of the layout above.
__device__ inline void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t a, uint64_t b) {
#if defined(MOE_WGMMA_PTX)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
      "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, "
      "%52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
      " %64, %65, 1, 1, 1, 0, 0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(a), "l"(b)
      : "memory");
#else
  MOE_WGMMA_ELSEWHERE(128);
#endif
}

}  // namespace moe::kernels::cuda::detail

#undef MOE_WGMMA_ELSEWHERE
