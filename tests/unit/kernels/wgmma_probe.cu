#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/wgmma.cuh"
#include "tests/unit/kernels/wgmma_probe.hpp"

namespace moe::kernels::cuda_testing {
namespace {

namespace detail = ::moe::kernels::cuda::detail;
constexpr int probe_threads = 128;

__global__ void wgmma_probe_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* d,
                                   int n) {
  extern __shared__ __align__(128) unsigned char probe_smem[];
  const int tid = static_cast<int>(threadIdx.x);
  // a's 64 rows, then b's n rows, from the first 1024-byte aligned shared address: row r's
  // 16-byte chunk c at r * 128 + (c ^ r % 8) * 16 (b's rows start 64 rows in, so r % 8 is
  // theirs too).
  const uint32_t base = detail::shared_offset(probe_smem);
  const uint32_t at = (base + 1023u) / 1024u * 1024u;
  unsigned char* tiles = probe_smem + (at - base);
  for (int i = tid; i < (64 + n) * 8; i += probe_threads) {
    const int r = i / 8, c = i % 8;
    const __nv_bfloat16* src = r < 64 ? a + r * 64 + 8 * c : b + (r - 64) * 64 + 8 * c;
    *reinterpret_cast<uint4*>(tiles + r * 128 + (c ^ (r % 8)) * 16) =
        *reinterpret_cast<const uint4*>(src);
  }
  detail::fence_proxy_async_shared();
  __syncthreads();

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  float(&half)[64] = *reinterpret_cast<float(*)[64]>(acc);
  detail::fence_operands(acc);
  detail::wgmma_fence();
  if (n == 256) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      detail::wgmma_m64n256k16_bf16(acc, detail::sw128_descriptor(at + 32 * j),
                                    detail::sw128_descriptor(at + 64 * 128 + 32 * j));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      detail::wgmma_m64n128k16_bf16(half, detail::sw128_descriptor(at + 32 * j),
                                    detail::sw128_descriptor(at + 64 * 128 + 32 * j));
  }
  detail::wgmma_commit();
  detail::wgmma_wait<0>();
  detail::fence_operands(acc);

  // Thread (warp w, lane l): acc[4j + 2h + c] is d(16 w + l / 4 + 8 h, 8 j + 2 (l % 4) + c).
  const int w = tid / 32, l = tid % 32;
#pragma unroll
  for (int j = 0; j < 32; ++j)
    if (8 * j < n)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          d[(16 * w + l / 4 + 8 * h) * n + 8 * j + 2 * (l % 4) + c] = acc[4 * j + 2 * h + c];
}

}  // namespace

cudaError_t wgmma_probe_run(const void* a, const void* b, float* d, int n, cudaStream_t stream) {
  if (n != 128 && n != 256) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(64 + n) * 128 + 1024;  // + the alignment's slack
  wgmma_probe_kernel<<<1, probe_threads, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), d, n);
  return cudaGetLastError();
}

}  // namespace moe::kernels::cuda_testing
