// bf16 WMMA operand loads from shared memory that compile to ldmatrix. nvcc's bf16
// wmma::load_matrix_sync takes a generic address, and ptxas then emits per-lane 32-bit loads and
// transposes instead of ldmatrix; the same wmma.load naming the shared state space gets
// ldmatrix (mla_prefill's tensor-core kernel ran that way on an H200, 2026-11-30). The
// fragment's storage is the four 32-bit registers nvcc's builtin fills, in the same order. The
// emulator, and nvcc's host pass, make WMMA's own call. Every pointer must point into shared
// memory, 32-byte aligned, as for load_matrix_sync.
// Internal to kernels/cuda: .cu files only (it needs nvcc or the emulator). Pure device functions.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

namespace moe::kernels::cuda::detail {

using wmma_a_row = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                                          nvcuda::wmma::row_major>;
using wmma_b_col = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                          nvcuda::wmma::col_major>;
using wmma_b_row = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                          nvcuda::wmma::row_major>;

#ifdef __CUDA_ARCH__
__device__ inline unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#define MOE_WMMA_LOAD_SHARED(instruction)                                         \
  unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);                             \
  asm volatile(instruction " {%0, %1, %2, %3}, [%4], %5;"                         \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                   \
               : "r"(shared_address(p)), "r"(ldm)                                 \
               : "memory")
#else
#define MOE_WMMA_LOAD_SHARED(instruction) nvcuda::wmma::load_matrix_sync(f, p, ldm)
#endif

// The PTX instruction must be a literal, hence one overload per fragment kind.
__device__ inline void load_shared(wmma_a_row& f, const __nv_bfloat16* p, unsigned ldm) {
  MOE_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
}
__device__ inline void load_shared(wmma_b_col& f, const __nv_bfloat16* p, unsigned ldm) {
  MOE_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
}
__device__ inline void load_shared(wmma_b_row& f, const __nv_bfloat16* p, unsigned ldm) {
  MOE_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16");
}

#undef MOE_WMMA_LOAD_SHARED

}  // namespace moe::kernels::cuda::detail
