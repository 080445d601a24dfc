// kernels/cuda/wgmma.cuh on its own (tests/unit/kernels/wgmma_probe.hpp): one wgmma group of
// four k16 steps over operands in the 128-byte swizzled layout, against the product on the host.
// The operands are small integers, so every sum is exact in float32 and the check is equality:
// an element in the wrong place (descriptor, swizzle, k-slice advance or fragment layout) shows
// as a wrong value, and the first one is reported with where it came from. On an sm_90 card
// (label gpu) and in the CUDA emulator (label unit), where the same contracts are emulated.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/wgmma_probe.hpp"

namespace moe::kernels {
namespace {

using namespace cuda_testing;

// Integers in [-3, 3]: exact in bf16, and 64 products of them sum exactly in float32.
std::vector<float> small_integers(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(-3, 3);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(pick(rng));
  return v;
}

void expect_probe_matches(int n, uint32_t seed) {
  SCOPED_TRACE("n = " + std::to_string(n));
  const auto a = small_integers(64 * 64, seed),
             b = small_integers(static_cast<size_t>(n) * 64, seed + 1);
  device_buffer da(a.size() * 2), db(b.size() * 2), dd(static_cast<size_t>(64 * n) * 4);
  ASSERT_TRUE(upload(da, to_bf16(a)) && upload(db, to_bf16(b)));
  ASSERT_EQ(wgmma_probe_run(da.get(), db.get(), static_cast<float*>(dd.get()), n, nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(static_cast<size_t>(64 * n));
  ASSERT_TRUE(download(dd, got));
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < n; ++c) {
      float want = 0.0f;
      for (int k = 0; k < 64; ++k) want += a[r * 64 + k] * b[static_cast<size_t>(c) * 64 + k];
      // Thread and register that hold (r, c), for the report.
      const int thread = 32 * (r / 16) + 4 * (r % 8) + (c % 8) / 2;
      const int reg = 4 * (c / 8) + 2 * ((r % 16) / 8) + c % 2;
      ASSERT_EQ(got[static_cast<size_t>(r) * n + c], want)
          << "d(" << r << ", " << c << "), thread " << thread << "'s acc[" << reg << "]";
    }
}

TEST(cuda_wgmma, one_group_matches_the_host_product) {
  MOE_KERNELS_SKIP_WITHOUT_SM90();
  expect_probe_matches(256, 5);
  expect_probe_matches(128, 7);
}

TEST(cuda_wgmma, the_probe_refuses_other_widths) {
  EXPECT_EQ(wgmma_probe_run(nullptr, nullptr, nullptr, 64, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace moe::kernels
