// A test of kernels/cuda/tma.cuh and tensor_map.hpp on their own: one block copies `boxes`
// boxes of a row-major bf16 (rows, k) matrix by TMA (each box_rows x 64, 128-byte swizzle) into
// one shared buffer, one after another on one mbarrier (so its phases alternate parity), and
// after each writes the buffer's bytes out unchanged: the image the tensor cores would read.
// The grouped GEMM's TMA kernel rests on those contracts (the encoder's map, the swizzled
// landing, zero fill past the matrix, expect_tx and the parity waits); this checks them without
// its pipeline, so a failure on a card says which part to look at.
// Test code only (tests/unit/kernels/tma_probe.cu, built by nvcc, and by the emulator).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe::kernels::cuda_testing {

/// Box i starts at element (column coords[2 i], row coords[2 i + 1]); out gets boxes *
/// box_rows * 128 bytes. One block of 128 threads on `stream`. cudaErrorInvalidValue when the
/// map cannot be encoded (see tensor_map.hpp) or box_rows is not 64 or 128; else the launch's
/// error.
cudaError_t tma_probe_run(const void* matrix, int64_t rows, int64_t k, int box_rows,
                          const int32_t* coords, int boxes, void* out, cudaStream_t stream);

}  // namespace moe::kernels::cuda_testing
