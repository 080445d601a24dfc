// CUDA and NCCL wired for real: a kernel of ours runs on the GPU and matches its CPU
// reference; an NCCL all-reduce runs on a world of one. Skipped, with the reason, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/cpu/rmsnorm.hpp"
#include "runtime/devices.hpp"

#ifdef MOE_HAVE_CUDA
#include <cuda_bf16.h>

#include "kernels/cuda/rmsnorm.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_comm.hpp"
#endif

using namespace moe;

namespace {

std::string no_gpu_reason() {
  const auto inv = runtime::discover_devices();
  return inv.gpus.empty() ? inv.no_gpu_reason : std::string{};
}

}  // namespace

#define MOE_SKIP_WITHOUT_GPU()                                              \
  do {                                                                      \
    if (auto reason = no_gpu_reason(); !reason.empty())                     \
      GTEST_SKIP() << "no GPU: " << reason;                                 \
  } while (false)

TEST(gpu, rmsnorm_kernel_matches_cpu_reference) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  MOE_SKIP_WITHOUT_GPU();
  const size_t rows = 37, dim = 1000;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(rows * dim), w(dim), want(rows * dim), got(rows * dim);
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = 1.0f + 0.1f * nd(rng);
  ASSERT_EQ(kernels::cpu::rmsnorm(x.data(), w.data(), want.data(), rows, dim, 1e-6f),
            kernels::kernel_status::ok);

  auto dx = runtime::device_buffer::allocate(x.size() * 4);
  auto dw = runtime::device_buffer::allocate(w.size() * 4);
  auto dout = runtime::device_buffer::allocate(x.size() * 4);
  ASSERT_TRUE(dx && dw && dout);
  ASSERT_FALSE(dx->copy_from_host(x.data(), x.size() * 4));
  ASSERT_FALSE(dw->copy_from_host(w.data(), w.size() * 4));
  kernels::cuda::rmsnorm_args a;
  a.x = dx->data();
  a.weight = static_cast<const float*>(dw->data());
  a.out = dout->data();
  a.rows = rows;
  a.dim = dim;
  a.eps = 1e-6f;
  a.dt = kernels::dtype::f32;
  ASSERT_EQ(kernels::cuda::rmsnorm_run(a, nullptr), kernels::kernel_status::ok);
  ASSERT_FALSE(dout->copy_to_host(got.data(), got.size() * 4));
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5f) << i;

  a.dt = kernels::dtype::i64;
  EXPECT_EQ(kernels::cuda::rmsnorm_run(a, nullptr), kernels::kernel_status::unsupported_dtype);
#endif
}

TEST(gpu, nccl_all_reduce_on_a_world_of_one) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  MOE_SKIP_WITHOUT_GPU();
  EXPECT_NE(runtime::nccl_version_string(), "unknown");
  auto comms = runtime::make_local_nccl_comms({0});
  ASSERT_TRUE(comms) << error_text(comms.error());
  std::vector<float> host(1024);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i);
  auto buf = runtime::device_buffer::allocate(host.size() * 4);
  ASSERT_TRUE(buf);
  ASSERT_FALSE(buf->copy_from_host(host.data(), host.size() * 4));
  auto stream = runtime::cuda_stream::create();
  ASSERT_TRUE(stream);
  ASSERT_FALSE(runtime::nccl_error(ncclAllReduce(buf->data(), buf->data(), host.size(), ncclFloat,
                                                 ncclSum, (*comms)[0].get(), stream->get()),
                                   "ncclAllReduce"));
  ASSERT_FALSE(stream->synchronize());
  std::vector<float> back(host.size());
  ASSERT_FALSE(buf->copy_to_host(back.data(), back.size() * 4));
  EXPECT_EQ(back, host);  // a sum over one rank is the identity
#endif
}
