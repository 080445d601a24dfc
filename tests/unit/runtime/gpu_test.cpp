// CUDA and NCCL wired for real: a kernel of ours runs on the GPU and matches its CPU
// reference; an NCCL all-reduce runs on a world of one. Skipped, with the reason, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/cpu/rmsnorm.hpp"
#include "runtime/devices.hpp"

#ifdef MOE_HAVE_CUDA
#include <cuda_bf16.h>

#include <cstring>

#include "kernels/cuda/rmsnorm.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/device_allocator.hpp"
#include "runtime/nccl_all_to_all.hpp"
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

TEST(gpu, caching_allocator_over_cuda_reuses_blocks_per_stream) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  MOE_SKIP_WITHOUT_GPU();
  runtime::caching_device_allocator alloc{std::make_unique<runtime::cuda_memory_source>(0)};
  auto stream = runtime::cuda_stream::create();
  ASSERT_TRUE(stream);
  const auto key = reinterpret_cast<runtime::stream_key>(stream->get());
  std::vector<float> host(100000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i);
  void* first = nullptr;
  {
    auto a = alloc.allocate(host.size() * 4, key);
    ASSERT_TRUE(a) << error_text(a.error());
    first = a->data();
    // The block is real device memory: a round trip through it keeps the data.
    auto pinned = runtime::pinned_host_buffer::allocate(host.size() * 4);
    ASSERT_TRUE(pinned) << error_text(pinned.error());
    std::memcpy(pinned->data(), host.data(), host.size() * 4);
    ASSERT_FALSE(runtime::copy_async(a->data(), pinned->data(), host.size() * 4, stream->get()));
    std::vector<float> back(host.size());
    ASSERT_FALSE(runtime::copy_async(back.data(), a->data(), host.size() * 4, stream->get()));
    ASSERT_FALSE(stream->synchronize());
    EXPECT_EQ(back, host);
  }
  auto again = alloc.allocate(host.size() * 4, key);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->data(), first);
  EXPECT_EQ(alloc.stats().num_cache_hits, 1u);
  again->reset();
  // Far more than the card holds: out of memory, reported as transient, nothing lost.
  auto huge = alloc.allocate(size_t{1} << 50, key);
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.error().code(), static_cast<uint8_t>(runtime::device_memory_errc::out_of_memory))
      << error_text(huge.error());
  EXPECT_EQ(alloc.stats().num_oom_retries, 1u) << "the cache was emptied before giving up";
  EXPECT_TRUE(alloc.allocate(4096, key));
#endif
}

TEST(gpu, events_order_streams_and_time_work) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  MOE_SKIP_WITHOUT_GPU();
  auto s1 = runtime::cuda_stream::create();
  auto s2 = runtime::cuda_stream::create();
  auto start = runtime::cuda_event::create(true);
  auto done = runtime::cuda_event::create(true);
  ASSERT_TRUE(s1 && s2 && start && done);
  const size_t n = size_t{64} << 20;
  auto src = runtime::device_buffer::allocate(n);
  auto dst = runtime::device_buffer::allocate(n);
  ASSERT_TRUE(src && dst);
  ASSERT_EQ(cudaMemsetAsync(src->data(), 0x5a, n, s1->get()), cudaSuccess);
  ASSERT_FALSE(start->record(s1->get()));
  ASSERT_FALSE(runtime::copy_async(dst->data(), src->data(), n, s1->get()));
  ASSERT_FALSE(done->record(s1->get()));
  // s2 reads dst only after s1's copy: the event orders them without a host wait.
  ASSERT_FALSE(done->make_wait(s2->get()));
  std::vector<unsigned char> back(4096);
  ASSERT_FALSE(runtime::copy_async(back.data(), static_cast<char*>(dst->data()) + n - back.size(), back.size(),
                                   s2->get()));
  ASSERT_FALSE(s2->synchronize());
  for (auto b : back) ASSERT_EQ(b, 0x5a);
  auto ms = done->elapsed_ms_since(*start);
  ASSERT_TRUE(ms) << error_text(ms.error());
  EXPECT_GT(*ms, 0.0f);
#endif
}

TEST(gpu, expert_all_to_all_and_gradient_all_reduce_on_a_world_of_one) {
#ifndef MOE_HAVE_CUDA
  GTEST_SKIP() << "no GPU: built without CUDA";
#else
  MOE_SKIP_WITHOUT_GPU();
  auto comms = runtime::make_local_nccl_comms({0});
  ASSERT_TRUE(comms) << error_text(comms.error());
  ncclComm_t comm = (*comms)[0].get();
  auto stream = runtime::cuda_stream::create();
  ASSERT_TRUE(stream);
  auto scratch = runtime::device_buffer::allocate(2 * sizeof(int64_t));
  ASSERT_TRUE(scratch);
  // Dispatch: 7 rows of 3 floats routed to this rank's own experts.
  auto counts = runtime::exchange_row_counts(comm, {7}, scratch->data(), stream->get());
  ASSERT_TRUE(counts) << error_text(counts.error());
  EXPECT_EQ(*counts, (std::vector<int64_t>{7}));
  runtime::all_to_all_plan plan{{7}, *counts, 3 * sizeof(float)};
  std::vector<float> rows(21);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i) * 0.5f;
  auto send = runtime::device_buffer::allocate(rows.size() * 4);
  auto recv = runtime::device_buffer::allocate(rows.size() * 4);
  auto home = runtime::device_buffer::allocate(rows.size() * 4);
  ASSERT_TRUE(send && recv && home);
  ASSERT_FALSE(send->copy_from_host(rows.data(), rows.size() * 4));
  ASSERT_FALSE(runtime::all_to_all_rows(comm, plan, send->data(), 7, recv->data(), 7, stream->get()));
  // Combine: the way back.
  ASSERT_FALSE(runtime::all_to_all_rows(comm, plan.reversed(), recv->data(), 7, home->data(), 7, stream->get()));
  ASSERT_FALSE(stream->synchronize());
  std::vector<float> got(rows.size());
  ASSERT_FALSE(recv->copy_to_host(got.data(), got.size() * 4));
  EXPECT_EQ(got, rows);
  ASSERT_FALSE(home->copy_to_host(got.data(), got.size() * 4));
  EXPECT_EQ(got, rows);
  // A plan that does not fit the buffers is refused before NCCL sees it.
  auto err = runtime::all_to_all_rows(comm, {{8}, {8}, 12}, send->data(), 7, recv->data(), 7, stream->get());
  EXPECT_EQ(err.category(), caf::atom("collective")) << error_text(err);
  ASSERT_FALSE(runtime::all_reduce_sum(comm, send->data(), rows.size(), false, stream->get()));
  ASSERT_FALSE(stream->synchronize());
  ASSERT_FALSE(send->copy_to_host(got.data(), got.size() * 4));
  EXPECT_EQ(got, rows) << "a sum over one rank is the identity";
#endif
}
