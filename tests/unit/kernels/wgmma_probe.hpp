// A test of kernels/cuda/wgmma.cuh on its own: one warpgroup loads a (64, 64) bf16 `a` and an
// (n, 64) bf16 `b` (row-major, k contiguous) into shared memory in the 128-byte swizzled K-major
// layout wgmma.cuh describes, runs the four k16 products of one wgmma group (m64n256k16 for
// n = 256, m64n128k16 for n = 128) and writes d = a . b^T (64, n) float32 through the accumulator
// layout wgmma.cuh documents. The grouped GEMM's wgmma kernel rests on those three contracts
// (descriptor and swizzle, the fences and waits, the fragment layout); this checks them without
// its pipeline, so a failure on a card says which part to look at.
// Test code only (tests/unit/kernels/wgmma_probe.cu, built by nvcc, and by the emulator).
#pragma once

#include <cuda_runtime_api.h>

namespace moe::kernels::cuda_testing {

/// One block of 128 threads on `stream`; n is 128 or 256. The launch's error (none on success).
cudaError_t wgmma_probe_run(const void* a, const void* b, float* d, int n, cudaStream_t stream);

}  // namespace moe::kernels::cuda_testing
