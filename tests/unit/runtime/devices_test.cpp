// Device discovery never fails: it lists GPUs, or says why there are none.
#include "runtime/devices.hpp"

#include <gtest/gtest.h>

using namespace moe::runtime;

TEST(devices, discovery_lists_gpus_or_gives_a_reason) {
  const auto inv = discover_devices();
  if (inv.gpus.empty()) {
    EXPECT_FALSE(inv.no_gpu_reason.empty());
  } else {
    EXPECT_TRUE(inv.no_gpu_reason.empty());
    for (const auto& g : inv.gpus) {
      EXPECT_FALSE(g.name.empty());
      EXPECT_GT(g.memory_bytes, 0u);
    }
  }
#ifdef MOE_HAVE_CUDA
  EXPECT_TRUE(inv.cuda_built);
  EXPECT_GT(inv.cuda_runtime_version, 0);
#else
  EXPECT_FALSE(inv.cuda_built);
#endif
}

TEST(devices, cuda_versions_render) {
  EXPECT_EQ(cuda_version_string(13000), "13.0");
  EXPECT_EQ(cuda_version_string(12080), "12.8");
  EXPECT_EQ(cuda_version_string(0), "none");
}
