// The routed experts' product through cuBLAS's grouped GEMM (kernels/cuda/grouped_gemm_cublas.hpp)
// against the CPU reference (kernels/cpu/grouped_gemm.hpp) on the same stored inputs: uneven
// routings with idle experts, bf16 and f32, rows past the last expert's left alone. On a card
// it runs cuBLAS itself; in the emulator (engine_emulated) the stand-in of fake_cublaslt.cpp,
// which checks the problems and addresses this file's wrapper hands over.
//
// Tolerance, per element, relative to S = sum_i |x_i w_i| of its dot product: cuBLAS's
// algorithms sum bf16 products (exact in float32) in float32 in an order of their own, tensor
// cores aligning addends by truncation: k * 2^-22 * S covers that with room (a lost or doubled
// product, ~S / k, fails at these k); f32 (no TF32) k * 2^-23 * S; a bf16 output adds its
// rounding, 2^-8 of the value.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/grouped_gemm.hpp"
#include "kernels/cuda/grouped_gemm_cublas.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

using namespace moe;
using namespace moe::kernels;
using namespace moe::kernels::cuda_testing;
using cpu::testing::random_floats;

namespace {

void check_product(const std::vector<int32_t>& counts, int64_t spare_rows, int64_t n, int64_t k,
                   dtype dt) {
  SCOPED_TRACE(::testing::Message() << counts.size() << " experts, n " << n << " k " << k
                                    << (dt == dtype::f32 ? " f32" : " bf16"));
  const auto offsets = offsets_of(counts);
  const int64_t E = static_cast<int64_t>(counts.size());
  const int64_t used = offsets.back(), rows = used + spare_rows;
  const auto x = stored(random_floats(static_cast<size_t>(rows * k), 11 + n), dt);
  const auto w = stored(random_floats(static_cast<size_t>(E * n * k), 12 + k), dt);
  const float canary = stored({12345.0f}, dt)[0];
  std::vector<float> want(static_cast<size_t>(rows * n), canary);
  ASSERT_EQ(
      cpu::grouped_gemm(x.data(), offsets.data(), static_cast<size_t>(E), w.data(), want.data(),
                        static_cast<size_t>(rows), static_cast<size_t>(n), static_cast<size_t>(k)),
      kernel_status::ok);
  auto dx = to_device(x, dt), dw = to_device(w, dt);
  auto dy = to_device(std::vector<float>(want.size(), canary), dt);
  device_buffer device_pointers(3 * static_cast<size_t>(E) * sizeof(void*));
  std::vector<const void*> host_pointers(3 * static_cast<size_t>(E));

  cuda::cublas_grouped_gemm blas;
  ASSERT_EQ(cuda::cublas_grouped_gemm::create(blas), kernel_status::ok);
  cuda::cublas_grouped_args a;
  a.x = dx->get();
  a.weights = dw->get();
  a.y = dy->get();
  a.offsets = offsets.data();
  a.num_rows = rows;
  a.num_experts = E;
  a.n = n;
  a.k = k;
  a.dt = dt;
  a.host_pointers = host_pointers.data();
  a.device_pointers = device_pointers.as<void*>();
  ASSERT_EQ(blas.run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const auto got = dt == dtype::f32 ? fetch<float>(*dy, want.size())
                                    : from_bf16(fetch<uint16_t>(*dy, want.size()));
  ASSERT_EQ(got.size(), want.size());
  const double per_k = dt == dtype::f32 ? 0x1p-23 : 0x1p-22;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const auto i = static_cast<size_t>(r * n + c);
      if (r >= used) {
        ASSERT_EQ(got[i], canary) << "row " << r << " belongs to no expert";
        continue;
      }
      int64_t e = 0;
      while (offsets[static_cast<size_t>(e + 1)] <= r) ++e;
      double s = 0;
      for (int64_t l = 0; l < k; ++l)
        s += std::fabs(double{x[static_cast<size_t>(r * k + l)]} *
                       w[static_cast<size_t>((e * n + c) * k + l)]);
      const double tol = static_cast<double>(k) * per_k * s +
                         (dt == dtype::bf16 ? 0x1p-8 * std::fabs(want[i]) : 0.0) + 1e-30;
      ASSERT_LE(std::fabs(double{got[i]} - want[i]), tol) << "row " << r << " col " << c;
    }
}

}  // namespace

TEST(cuda_grouped_gemm_cublas, can_run_rejects_bad_arguments) {
  const int32_t good[] = {0, 3, 3, 7};
  const void* host[9] = {};
  cuda::cublas_grouped_args a;
  a.x = a.weights = fake_ptr();
  a.y = fake_ptr();
  a.offsets = good;
  a.num_rows = 8;
  a.num_experts = 3;
  a.n = 16;
  a.k = 32;
  a.host_pointers = host;
  a.device_pointers = fake<void*>();
  EXPECT_EQ(cuda::cublas_grouped_can_run(a), kernel_status::ok);
  auto bad = a;
  const int32_t decreasing[] = {0, 3, 2, 7};
  bad.offsets = decreasing;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape);
  const int32_t late_start[] = {1, 3, 3, 7};
  bad.offsets = late_start;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.num_rows = 6;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape)
      << "offsets past the rows";
  bad = a;
  bad.host_pointers = nullptr;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.y = nullptr;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_dtype)
      << "FP8 is grouped_gemm_run's";
  bad = a;
  bad.k = int64_t{INT32_MAX} + 1;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::unsupported_shape);
  const int32_t idle[] = {0, 0, 0, 0};
  bad = a;
  bad.offsets = idle;
  bad.x = bad.weights = nullptr;
  bad.y = nullptr;
  EXPECT_EQ(cuda::cublas_grouped_can_run(bad), kernel_status::ok) << "no expert has rows";
}

// Idle experts between busy ones, spare rows past the last (left alone), bf16 and f32.
TEST(cuda_grouped_gemm_cublas, matches_the_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  check_product({5, 0, 9, 1, 0, 3}, 4, 48, 64, dtype::bf16);
  check_product({5, 0, 9, 1, 0, 3}, 4, 48, 64, dtype::f32);
  check_product({0, 17, 2}, 0, 40, 96, dtype::bf16);
  check_product({0, 0}, 3, 16, 32, dtype::bf16);  // no expert has rows: nothing written
}
