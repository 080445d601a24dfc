// Opt-in accounting of the CPU GEMMs: how many, of which shapes, how many FLOPs and how long.
// Benchmarks use it to report the share of time in GEMM and the GFLOP/s reached per shape.
// Off by default; when off, the only cost in gemm() is one relaxed atomic load.
// Thread safety: every function may be called from any thread; records are mutex-protected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe::kernels::cpu {

struct gemm_shape_record {
  size_t m = 0, n = 0, k = 0;
  uint64_t calls = 0;
  double flops = 0.0;
  double seconds = 0.0;
};

void gemm_profile_enable(bool on) noexcept;
[[nodiscard]] bool gemm_profile_enabled() noexcept;
void gemm_profile_reset();
/// One record per distinct (m, n, k), largest total time first.
[[nodiscard]] std::vector<gemm_shape_record> gemm_profile_snapshot();

/// Called by gemm(); adds one product's time.
void gemm_profile_record(size_t m, size_t n, size_t k, double seconds);

}  // namespace moe::kernels::cpu
