// The per-token-group FP8 activation quantization on the GPU (kernels/cuda/fp8_quantize.hpp)
// against its CPU reference (kernels/cpu/fp8.hpp): bit-identical codes and scales, in both scale
// layouts, from f32 and bf16 inputs (the reference reads the bf16 values widened, as the kernel
// does). Exactness is the right bar: both compute the same IEEE max, division and round-to-
// nearest-even conversion. The argument checks run everywhere; the GPU runs are skipped, with the
// reason, where no GPU exists. Built into the CPU emulator too (tests/emulator).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/fp8.hpp"
#include "kernels/cuda/fp8_quantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using cpu::testing::random_floats;
using namespace cuda_testing;
using cpu::fp8_scale_layout;

// Activations as a layer sees them, with the cases the rules single out: an all-zero group, an
// outlier, values past what e4m3 holds relative to the group's amax (they flush toward 0), a NaN.
std::vector<float> quantize_inputs(int64_t rows, int64_t k, uint64_t seed) {
  auto x = random_floats(static_cast<size_t>(rows * k), seed, -3.0f, 3.0f);
  if (rows > 1 && k > 128)
    for (int64_t c = 0; c < 128; ++c) x[static_cast<size_t>(k + c)] = 0.0f;
  if (rows > 2) {
    x[static_cast<size_t>(2 * k)] = 5000.0f;
    x[static_cast<size_t>(2 * k + 1)] = 1e-6f;
    x[static_cast<size_t>(2 * k + 2)] = -1e-3f;
  }
  if (rows > 3) x[static_cast<size_t>(3 * k + k - 1)] = nan_f;
  return x;
}

// scale_ld_pad > 0 spaces the scales' outer index that much wider than packed: the gap must stay
// as it was (both sides start from the same all-ones bytes, a NaN).
void check_quantize(int64_t rows, int64_t k, dtype dt, fp8_scale_layout layout,
                    int64_t scale_ld_pad = 0) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << rows << " k " << k << " dt " << static_cast<int>(dt) << " layout "
               << static_cast<int>(layout) << " pad " << scale_ld_pad);
  auto x = quantize_inputs(rows, k, static_cast<uint64_t>(rows * 131 + k));
  if (dt == dtype::bf16) x = bf16_rounded(x);
  const int64_t groups = (k + 127) / 128;
  const int64_t outer = layout == fp8_scale_layout::group_major ? groups : rows;
  const int64_t scale_ld =
      scale_ld_pad == 0 ? 0
                        : (layout == fp8_scale_layout::group_major ? rows : groups) + scale_ld_pad;
  const int64_t scale_floats = scale_ld == 0 ? rows * groups : outer * scale_ld;
  std::vector<uint8_t> want_q(x.size());
  std::vector<float> want_s(static_cast<size_t>(scale_floats));
  std::memset(want_s.data(), 0xff, want_s.size() * 4);
  ASSERT_EQ(
      cpu::fp8_quantize_groups(x.data(), rows, k, want_q.data(), want_s.data(), layout, scale_ld),
      kernel_status::ok);

  device_buffer d_x(x.size() * 4), d_q(x.size()), d_s(want_s.size() * 4);
  ASSERT_EQ(cudaMemset(d_s.get(), 0xff, d_s.bytes()), cudaSuccess);
  if (dt == dtype::bf16)
    ASSERT_TRUE(upload(d_x, to_bf16(x)));
  else
    ASSERT_TRUE(upload(d_x, x));
  cuda::fp8_quantize_args a;
  a.x = d_x.get();
  a.q = d_q.as<uint8_t>();
  a.scale = d_s.as<float>();
  a.rows = rows;
  a.k = k;
  a.x_dt = dt;
  a.layout = layout;
  a.scale_ld = scale_ld;
  ASSERT_EQ(cuda::fp8_quantize_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_q = fetch<uint8_t>(d_q, want_q.size());
  const auto got_s = fetch<float>(d_s, want_s.size());
  ASSERT_EQ(got_q.size(), want_q.size());
  ASSERT_EQ(got_s.size(), want_s.size());
  // Bits, not values: the untouched gap is NaN on both sides.
  ASSERT_EQ(std::memcmp(got_s.data(), want_s.data(), want_s.size() * 4), 0) << "scales differ";
  for (size_t i = 0; i < want_q.size(); ++i)
    ASSERT_EQ(int{got_q[i]}, int{want_q[i]}) << "code " << i;
}

TEST(cuda_fp8_quantize, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // Decode (1 token), a ragged batch at DeepSeek's hidden widths (2048; 1536 = q_lora_rank,
  // 1408 = v2-lite's expert width: 11 groups), a partial last group (200, 100).
  for (const auto& [rows, k] :
       {std::pair<int64_t, int64_t>{1, 2048}, {7, 1536}, {5, 1408}, {4, 200}, {3, 100}})
    for (dtype dt : {dtype::f32, dtype::bf16})
      for (fp8_scale_layout layout : {fp8_scale_layout::group_major, fp8_scale_layout::row_major})
        check_quantize(rows, k, dt, layout);
}

TEST(cuda_fp8_quantize, writes_scales_at_a_padded_stride) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // gemm.hpp's FP8 product runs on rows padded to 32: 7 tokens quantized with a group stride of 32.
  check_quantize(7, 1536, dtype::bf16, fp8_scale_layout::group_major, 25);
  check_quantize(3, 300, dtype::f32, fp8_scale_layout::row_major, 2);
}

TEST(cuda_fp8_quantize, can_run_rejects_bad_arguments) {
  cuda::fp8_quantize_args a;
  a.x = fake_ptr();
  a.q = fake<uint8_t>();
  a.scale = fake<float>();
  a.rows = 2;
  a.k = 256;
  EXPECT_EQ(cuda::fp8_quantize_can_run(a), kernel_status::ok);
  auto bad = a;
  bad.x_dt = dtype::f16;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_dtype);
  bad = a;
  bad.rows = -1;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.scale = nullptr;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.layout = static_cast<fp8_scale_layout>(7);
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.scale_ld = 1;  // below the packed 2 rows: the groups would overlap
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad.scale_ld = -4;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad.scale_ld = 32;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::ok);
  bad = a;
  bad.k = INT64_MAX / 2;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.x = bad.q = nullptr;
  bad.scale = nullptr;
  bad.rows = 0;
  EXPECT_EQ(cuda::fp8_quantize_can_run(bad), kernel_status::ok);  // nothing to do, nothing to read
  EXPECT_EQ(cuda::fp8_quantize_run(bad, nullptr), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels
