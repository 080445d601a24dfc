// kernels/cuda/wgmma.cuh on its own (tests/unit/kernels/wgmma_probe.hpp): one wgmma group of
// four k16 steps over operands in the 128-byte swizzled layout, against the product on the host;
// and tma.cuh with tensor_map.hpp (tma_probe.hpp): boxes landed by TMA, byte for byte.
// The operands are small integers, so every sum is exact in float32 and the check is equality:
// an element in the wrong place (descriptor, swizzle, k-slice advance or fragment layout) shows
// as a wrong value, and the first one is reported with where it came from. On an sm_90 card
// (label gpu) and in the CUDA emulator (label unit), where the same contracts are emulated.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/tma_probe.hpp"
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

// TMA boxes of a (200, 200) bf16 matrix of distinct small integers (exact in bf16), 128 and 64
// rows tall, one after another on one barrier (its phases alternate parity): inside the matrix,
// across its last columns (8 of 64 there), across its last rows, across both, each compared byte
// for byte with the 128-byte swizzled image (row r at r * 128, its 16-byte chunk c at c ^ r % 8)
// of the box, zeros past the matrix.
TEST(cuda_tma, boxes_land_swizzled_with_zeros_past_the_matrix) {
  MOE_KERNELS_SKIP_WITHOUT_SM90();
  const int64_t rows = 200, k = 200;
  std::vector<float> m(static_cast<size_t>(rows * k));
  for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(static_cast<int>(i % 251) - 125);
  device_buffer dm(m.size() * 2);
  ASSERT_TRUE(upload(dm, to_bf16(m)));
  const auto bits = to_bf16(m);
  for (const int box_rows : {128, 64}) {
    SCOPED_TRACE("box rows " + std::to_string(box_rows));
    const std::vector<int32_t> coords{0, 0, 64, 64, 192, 0, 0, 136, 128, 192};
    const int boxes = static_cast<int>(coords.size() / 2);
    const size_t box_bytes = static_cast<size_t>(box_rows) * 128;
    device_buffer dout(box_bytes * boxes);
    ASSERT_EQ(tma_probe_run(dm.get(), rows, k, box_rows, coords.data(), boxes, dout.get(), nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint16_t> got(box_bytes * boxes / 2);
    ASSERT_TRUE(download(dout, got));
    for (int i = 0; i < boxes; ++i)
      for (int r = 0; r < box_rows; ++r)
        for (int e = 0; e < 64; ++e) {
          const int64_t row = coords[2 * i + 1] + r, col = coords[2 * i] + e;
          const uint16_t want =
              row < rows && col < k ? bits[static_cast<size_t>(row * k + col)] : uint16_t{0};
          const size_t logical = static_cast<size_t>(r) * 128 + static_cast<size_t>(e) * 2;
          const size_t physical = logical ^ (((logical >> 7) & 7u) << 4);
          ASSERT_EQ(got[(i * box_bytes + physical) / 2], want)
              << "box " << i << " (column " << coords[2 * i] << ", row " << coords[2 * i + 1]
              << ") element (" << r << ", " << e << ")";
        }
  }
}

TEST(cuda_tma, the_probe_refuses_what_cannot_be_mapped) {
  const int32_t coords[2] = {0, 0};
  alignas(16) static const uint16_t matrix[64 * 64] = {};
  EXPECT_EQ(tma_probe_run(matrix, 64, 64, 32, coords, 1, nullptr, nullptr), cudaErrorInvalidValue)
      << "box rows";
  EXPECT_EQ(tma_probe_run(matrix, 64, 60, 64, coords, 1, nullptr, nullptr), cudaErrorInvalidValue)
      << "rows of 120 bytes";
  EXPECT_EQ(tma_probe_run(matrix, 0, 64, 64, coords, 1, nullptr, nullptr), cudaErrorInvalidValue)
      << "no rows";
}

}  // namespace
}  // namespace moe::kernels
