// The emulator refuses what the card refuses (cuda_emulator.hpp's check_launch, and UBSan's
// alignment check on the emulated code), so that such a bug fails in CI instead of on a card.

#include <gtest/gtest.h>

#include <cstdint>

namespace {

__global__ void mark(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 1;
}

__global__ void copy16(const unsigned char* from, unsigned char* to) {
  *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
}

}  // namespace

TEST(emulator_limits, launches_the_card_refuses_abort) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  int out[2] = {};
  ::emu::launch(mark, 2, 1024, 48 * 1024)(out);
  EXPECT_EQ(out[1], 1);
  EXPECT_DEATH(::emu::launch(mark, 1, 1025)(out), "1 to 1024 threads");
  EXPECT_DEATH(::emu::launch(mark, 0, 32)(out), "a grid dimension is 0");
  EXPECT_DEATH(::emu::launch(mark, dim3(1, 65536), 32)(out), "at most 65535");
  EXPECT_DEATH(::emu::launch(mark, 1, 32, 48 * 1024 + 16)(out), "without cudaFuncSetAttribute");

  ASSERT_EQ(cudaFuncSetAttribute(mark, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024),
            cudaSuccess);
  ::emu::launch(mark, 1, 32, 64 * 1024)(out);
  EXPECT_DEATH(::emu::launch(mark, 1, 32, 64 * 1024 + 16)(out), "without cudaFuncSetAttribute");
  EXPECT_EQ(cudaFuncSetAttribute(mark, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 + 1),
            cudaErrorInvalidValue);
}

TEST(emulator_limits, a_misaligned_vector_access_aborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  alignas(16) unsigned char from[48] = {};
  alignas(16) unsigned char to[48] = {};
  from[16] = 7;
  ::emu::launch(copy16, 1, 1)(from + 16, to + 16);
  EXPECT_EQ(to[16], 7);
  EXPECT_DEATH(::emu::launch(copy16, 1, 1)(from + 8, to), "misaligned address");
}
