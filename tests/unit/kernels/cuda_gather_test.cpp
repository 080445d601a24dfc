// The embedding lookup and dtype conversions on the GPU (kernels/cuda/gather.hpp) against the
// CPU: exact copies, zero rows for ids outside the table, and float32 -> bf16 rounding equal to
// model::float_to_bf16 (nearest even; NaN stays NaN, infinities and halfway cases included);
// the residual accumulate against cpu::add (float32 sum, rounded once).
// The GPU comparisons skip without a GPU; the argument checks run everywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/gather.hpp"
#include "kernels/cuda/gather.hpp"
#include "model/dequantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

using namespace moe;
using namespace moe::kernels;
using namespace moe::kernels::cuda_testing;
using cpu::testing::random_floats;

TEST(cuda_gather, can_run_rejects_bad_arguments) {
  cuda::gather_rows_args a{fake_ptr(), fake<int32_t>(), fake_ptr(), 10, 3, 4, dtype::bf16};
  EXPECT_EQ(cuda::gather_rows_can_run(a), kernel_status::ok);
  auto bad = a;
  bad.dt = dtype::i32;
  EXPECT_EQ(cuda::gather_rows_can_run(bad), kernel_status::unsupported_dtype);
  bad = a;
  bad.ids = nullptr;
  EXPECT_EQ(cuda::gather_rows_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.num_ids = int64_t{INT32_MAX} + 1;
  EXPECT_EQ(cuda::gather_rows_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.dim = INT64_MAX / 2;
  EXPECT_EQ(cuda::gather_rows_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.num_ids = 0;
  bad.ids = nullptr;
  bad.out = nullptr;
  EXPECT_EQ(cuda::gather_rows_can_run(bad), kernel_status::ok) << "nothing to look up";

  cuda::convert_args c{fake_ptr(), fake_ptr(), 5, dtype::f32, dtype::bf16};
  EXPECT_EQ(cuda::convert_can_run(c), kernel_status::unsupported_shape) << "in place across widths";
  c.out = fake<int>() + 1;
  EXPECT_EQ(cuda::convert_can_run(c), kernel_status::ok);
  c.in_dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::convert_can_run(c), kernel_status::unsupported_dtype);
  c.in_dt = dtype::f32;
  c.count = -1;
  EXPECT_EQ(cuda::convert_can_run(c), kernel_status::unsupported_shape);
}

TEST(cuda_gather, embedding_rows_match_the_cpu_and_bad_ids_give_zero_rows) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const int64_t rows = 1000, dim = 777;
  const auto table = random_floats(static_cast<size_t>(rows * dim), 11);
  const std::vector<int32_t> ids{0, 999, 5, 5, 123, 998, 1};
  std::vector<float> want(ids.size() * dim);
  ASSERT_EQ(cpu::gather_rows(table.data(), rows, dim, ids.data(), ids.size(), want.data()), kernel_status::ok);
  device_buffer dt(table.size() * 4), dids(ids.size() * 4), dout(want.size() * 4);
  ASSERT_TRUE(upload(dt, table));
  ASSERT_TRUE(upload(dids, ids));
  cuda::gather_rows_args a{dt.get(), dids.as<int32_t>(), dout.get(), rows, static_cast<int64_t>(ids.size()), dim,
                           dtype::f32};
  ASSERT_EQ(cuda::gather_rows_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(fetch<float>(dout, want.size()), want);

  // bf16: the table's bf16 bits come back unchanged.
  const auto table16 = to_bf16(table);
  device_buffer dt16(table16.size() * 2), dout16(want.size() * 2);
  ASSERT_TRUE(upload(dt16, table16));
  a.table = dt16.get();
  a.out = dout16.get();
  a.dt = dtype::bf16;
  ASSERT_EQ(cuda::gather_rows_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got16 = fetch<uint16_t>(dout16, want.size());
  for (size_t i = 0; i < ids.size(); ++i)
    for (int64_t c = 0; c < dim; ++c)
      ASSERT_EQ(got16[i * dim + c], table16[static_cast<size_t>(ids[i] * dim + c)]) << i << "," << c;

  // Ids the host failed to check never read outside the table.
  const std::vector<int32_t> bad{-1, 1000, 3};
  ASSERT_TRUE(upload(dids, bad));
  a.num_ids = 3;
  ASSERT_EQ(cuda::gather_rows_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_bad = fetch<uint16_t>(dout16, 3 * dim);
  for (int64_t c = 0; c < dim; ++c) {
    ASSERT_EQ(got_bad[c], 0) << c;
    ASSERT_EQ(got_bad[dim + c], 0) << c;
    ASSERT_EQ(got_bad[2 * dim + c], table16[static_cast<size_t>(3 * dim + c)]) << c;
  }
}

TEST(cuda_gather, conversions_round_to_nearest_even_like_the_host) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  auto values = random_floats(100000, 12, -1e4f, 1e4f);
  const float inf = std::numeric_limits<float>::infinity();
  // Halfway between two bf16 values (ties go to even), the largest finite floats, subnormals.
  const float special[] = {0.0f, -0.0f, inf, -inf, 1.00390625f, 1.01171875f, 3.3895313892515355e38f,
                           std::numeric_limits<float>::denorm_min(), -1e-40f};
  for (size_t i = 0; i < std::size(special); ++i) values[i] = special[i];
  device_buffer din(values.size() * 4), d16(values.size() * 2), dback(values.size() * 4);
  ASSERT_TRUE(upload(din, values));
  const auto n = static_cast<int64_t>(values.size());
  ASSERT_EQ(cuda::convert_run({din.get(), d16.get(), n, dtype::f32, dtype::bf16}, nullptr), kernel_status::ok);
  ASSERT_EQ(cuda::convert_run({d16.get(), dback.get(), n, dtype::bf16, dtype::f32}, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got16 = fetch<uint16_t>(d16, values.size());
  const auto back = fetch<float>(dback, values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    ASSERT_EQ(got16[i], model::float_to_bf16(values[i])) << i << ": " << values[i];
    ASSERT_EQ(back[i], model::bf16_to_float(got16[i])) << i;
  }
}

TEST(cuda_gather, accumulate_can_run_rejects_bad_arguments) {
  float a = 0, b = 0;
  EXPECT_EQ(cuda::accumulate_can_run({&a, &b, 1, dtype::f32}), kernel_status::ok);
  EXPECT_EQ(cuda::accumulate_can_run({nullptr, nullptr, 0, dtype::bf16}), kernel_status::ok);
  EXPECT_EQ(cuda::accumulate_can_run({&a, &b, 1, dtype::f16}), kernel_status::unsupported_dtype);
  EXPECT_EQ(cuda::accumulate_can_run({&a, &b, -1, dtype::f32}), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::accumulate_can_run({nullptr, &b, 1, dtype::f32}), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::accumulate_can_run({&a, nullptr, 1, dtype::f32}), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::accumulate_can_run({&a, &a, 1, dtype::f32}), kernel_status::unsupported_shape);
}

// y += x: in f32 exactly cpu::add's float sum; in bf16 the float sum of the two bf16 values
// rounded once to nearest even.
TEST(cuda_gather, accumulate_adds_like_the_cpu) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t n = 70001;
  const auto x = random_floats(n, 31, -4.0f, 4.0f), y = random_floats(n, 32, -4.0f, 4.0f);
  std::vector<float> want(n);
  ASSERT_EQ(cpu::add(y.data(), x.data(), want.data(), n), kernel_status::ok);
  device_buffer dx(n * 4), dy(n * 4);
  ASSERT_TRUE(upload(dx, x));
  ASSERT_TRUE(upload(dy, y));
  ASSERT_EQ(cuda::accumulate_run({dx.get(), dy.get(), static_cast<int64_t>(n), dtype::f32}, nullptr),
            kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<float>(dy, n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], want[i]) << i;

  std::vector<uint16_t> x16(n), y16(n);
  for (size_t i = 0; i < n; ++i) {
    x16[i] = model::float_to_bf16(x[i]);
    y16[i] = model::float_to_bf16(y[i]);
  }
  device_buffer dx16(n * 2), dy16(n * 2);
  ASSERT_TRUE(upload(dx16, x16));
  ASSERT_TRUE(upload(dy16, y16));
  ASSERT_EQ(cuda::accumulate_run({dx16.get(), dy16.get(), static_cast<int64_t>(n), dtype::bf16}, nullptr),
            kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got16 = fetch<uint16_t>(dy16, n);
  for (size_t i = 0; i < n; ++i) {
    const float sum = model::bf16_to_float(y16[i]) + model::bf16_to_float(x16[i]);
    ASSERT_EQ(got16[i], model::float_to_bf16(sum)) << i;
  }
}
