// Tensor maps for TMA copies (tma.cuh), encoded on the host by the driver's
// cuTensorMapEncodeTiled, which is looked up through the runtime (cudaGetDriverEntryPointByVersion)
// so that nothing links libcuda itself.
//
// Host-only. Internal linkage on purpose, as device_arch.hpp: the CPU emulator compiles kernel
// files with the lookup as a macro (tests/emulator/tma_emulator.hpp) beside real-runtime code.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

namespace moe::kernels::cuda::detail {

using encode_tiled_fn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                     const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                     const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                     CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/// The driver's encoder, looked up once; null where the driver has none (no driver, or one
/// older than CUDA 12), with the runtime's error cleared.
[[maybe_unused]] static encode_tiled_fn tensor_map_encoder() noexcept {
  static const encode_tiled_fn encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<encode_tiled_fn>(fn);
  }();
  return encoder;
}

/// The map of a row-major bf16 (rows, k) matrix at `base` whose copies move boxes of box_rows
/// rows by 64 columns (128 bytes: one row of the 128-byte swizzle, which they land in; elements
/// outside the matrix are zeros). nullopt where the driver refuses it: base not 16-byte
/// aligned, k * 2 not a multiple of 16, a dimension of 0, box_rows past 256, or no encoder.
[[maybe_unused]] static std::optional<CUtensorMap> bf16_tensor_map(const void* base, int64_t rows,
                                                                   int64_t k,
                                                                   uint32_t box_rows) noexcept {
  const encode_tiled_fn encode = tensor_map_encoder();
  if (encode == nullptr || rows <= 0 || k <= 0) return std::nullopt;
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k) * 2};
  const cuuint32_t box[2] = {64, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return std::nullopt;
  return map;
}

}  // namespace moe::kernels::cuda::detail
