#include <cuda.h>

#include <cstdint>

#include "kernels/cuda/tensor_map.hpp"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/wgmma.cuh"
#include "tests/unit/kernels/tma_probe.hpp"

namespace moe::kernels::cuda_testing {
namespace {

namespace detail = ::moe::kernels::cuda::detail;
constexpr int probe_threads = 128;
constexpr int max_boxes = 8;

struct box_coords {
  int32_t c[2 * max_boxes];
};

__global__ void tma_probe_kernel(const __grid_constant__ CUtensorMap map, box_coords coords,
                                 int boxes, int box_rows, unsigned char* out) {
  extern __shared__ __align__(128) unsigned char probe_smem[];
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t base = detail::shared_offset(probe_smem);
  const uint32_t at = (base + 1023u) / 1024u * 1024u;
  const auto bytes = static_cast<uint32_t>(box_rows) * 128u;
  const uint32_t bar = at + bytes;
  unsigned char* tile = probe_smem + (at - base);
  if (tid == 0) {
    detail::mbarrier_init(bar, 1);
    detail::fence_mbarrier_init();
  }
  __syncthreads();
  for (int i = 0; i < boxes; ++i) {
    if (tid == 0) {
      detail::mbarrier_arrive_expect_tx(bar, bytes);
      detail::tma_load_2d(at, &map, bar, coords.c[2 * i], coords.c[2 * i + 1]);
    }
    detail::mbarrier_wait(bar, static_cast<uint32_t>(i & 1));
    for (uint32_t b = 16u * static_cast<uint32_t>(tid); b < bytes; b += 16u * probe_threads)
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(i) * bytes + b) =
          *reinterpret_cast<const uint4*>(tile + b);
    // Every thread has read the box before the next one lands (the TMA unit writes through the
    // async proxy: the reads are ordered before it, as a stage release orders them).
    detail::fence_proxy_async_shared();
    __syncthreads();
  }
}

}  // namespace

cudaError_t tma_probe_run(const void* matrix, int64_t rows, int64_t k, int box_rows,
                          const int32_t* coords, int boxes, void* out, cudaStream_t stream) {
  if ((box_rows != 64 && box_rows != 128) || boxes < 1 || boxes > max_boxes)
    return cudaErrorInvalidValue;
  const auto map = detail::bf16_tensor_map(matrix, rows, k, static_cast<uint32_t>(box_rows));
  if (!map) return cudaErrorInvalidValue;
  box_coords c{};
  for (int i = 0; i < 2 * boxes; ++i) c.c[i] = coords[i];
  // The box, from the first 1024-byte aligned address, then the barrier.
  const size_t smem = static_cast<size_t>(box_rows) * 128 + 8 + 1024;
  if (cudaFuncSetAttribute(tma_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    return cudaGetLastError();
  tma_probe_kernel<<<1, probe_threads, smem, stream>>>(*map, c, boxes, box_rows,
                                                       static_cast<unsigned char*>(out));
  return cudaGetLastError();
}

}  // namespace moe::kernels::cuda_testing
