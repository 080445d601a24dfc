// The parts of runtime/nccl_comm.hpp that need no GPU: join_nccl_comm refuses bad arguments
// before any CUDA call, naming the values, and nccl_unique_id survives CAF's binary
// serialisation (how the control plane carries it from rank 0 to the other ranks).
// Built only with the CUDA backend; runs without a driver.
#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>
#include <caf/deep_to_string.hpp>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_comm.hpp"

using namespace moe;
using namespace moe::runtime;

namespace {

bool is_cuda_error(const caf::error& e, cuda_errc code) {
  return e.category() == caf::atom("cuda") && e.code() == static_cast<uint8_t>(code);
}

}  // namespace

TEST(nccl_join, accepts_ranks_inside_the_world) {
  EXPECT_FALSE(validate_nccl_join(0, 1, 0));
  EXPECT_FALSE(validate_nccl_join(1, 2, 0));
  EXPECT_FALSE(validate_nccl_join(7, 8, 3));
}

TEST(nccl_join, refuses_bad_arguments_naming_the_values_before_any_cuda_call) {
  struct bad_case {
    int rank, world_size, device;
    const char* says;
  };
  const bad_case cases[] = {
      {0, 0, 0, "world_size must be at least 1"},
      {0, -3, 0, "world_size must be at least 1"},
      {-1, 2, 0, "rank must lie in [0, 2)"},
      {2, 2, 0, "rank must lie in [0, 2)"},
      {5, 4, 1, "rank must lie in [0, 4)"},
      {0, 2, -1, "device must not be negative"},
  };
  const nccl_unique_id id{};
  for (const auto& c : cases) {
    const std::string values = "join_nccl_comm(rank " + std::to_string(c.rank) +
                               ", world_size " + std::to_string(c.world_size) + ", device " +
                               std::to_string(c.device) + "): ";
    const auto err = validate_nccl_join(c.rank, c.world_size, c.device);
    ASSERT_TRUE(err) << values;
    EXPECT_TRUE(is_cuda_error(err, cuda_errc::failed)) << caf::to_string(err);
    EXPECT_EQ(error_text(err), values + c.says);
    // join_nccl_comm gives the same error: had it reached CUDA first, a machine without a
    // driver would have answered cuda_errc::no_device from cudaGetDeviceCount instead.
    const auto joined = join_nccl_comm(id, c.rank, c.world_size, c.device);
    ASSERT_FALSE(joined) << values;
    EXPECT_TRUE(is_cuda_error(joined.error(), cuda_errc::failed)) << error_text(joined.error());
    EXPECT_EQ(error_text(joined.error()), values + c.says);
  }
}

TEST(nccl_unique_id, is_the_128_bytes_of_an_nccl_unique_id) {
  static_assert(sizeof(nccl_unique_id{}.bytes) == sizeof(ncclUniqueId));
  EXPECT_EQ(nccl_unique_id{}.bytes.size(), 128u);
}

TEST(nccl_unique_id, survives_caf_binary_serialisation) {
  nccl_unique_id id;
  for (size_t i = 0; i < id.bytes.size(); ++i) id.bytes[i] = static_cast<std::byte>(255 - i);
  std::vector<char> buf;
  caf::binary_serializer sink{nullptr, buf};
  ASSERT_FALSE(sink(id));
  EXPECT_EQ(buf.size(), id.bytes.size());  // the bytes, nothing around them
  nccl_unique_id back;
  caf::binary_deserializer source{nullptr, buf};
  ASSERT_FALSE(source(back));
  EXPECT_EQ(back, id);
  back.bytes[17] = std::byte{0};
  EXPECT_NE(back, id);
  EXPECT_NE(caf::deep_to_string(id).find("nccl_unique_id"), std::string::npos);
}
