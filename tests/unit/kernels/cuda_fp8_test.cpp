// The block-scaled FP8 product (kernels/cuda/gemm.hpp: gemm_lt::run_fp8_linear, cuBLASLt's
// VEC128 x BLK128x128 modes) and its fallback (run_fp8_linear_fallback: the weight expanded to
// bf16, then the bf16 product) against a CPU reference in double, on DeepSeek-like shapes. The
// argument checks run everywhere; the GPU runs are skipped, with the reason, where no GPU exists.
//
// Reference: both operands dequantized exactly (model::dequantize_fp8_blocks: the activation with
// 1x128 blocks, the weight with 128x128), multiplied in double; mag = sum |x||w| per element.
// Tolerances, per element:
//  - FP8 path: |got - want| <= 2^-8 |want| + 2^-12 mag. The first term is the bf16 output's
//    rounding (8 significant bits: half an ulp is at most 2^-8 of the value). The second is the
//    accumulation: the scaled sum is float32 across 128-wide blocks, but Hopper's FP8 tensor cores
//    keep about 14 bits inside one (DeepSeek-V3 report, section 3.3.2), so each block's partial
//    sum may be off by ~2^-14 of its magnitude; 2^-12 leaves a factor of 4. A wrong scale layout
//    (the classic failure: scales read transposed, or the weight's padded rows misread) moves
//    whole blocks by their scale ratios, far outside this; the padding floats are NaN, so reading
//    them shows up as NaN.
//  - Fallback: the reference multiplies the bf16 activation by the weight expanded and rounded to
//    bf16 exactly as fp8_dequantize rounds it, so only cuBLASLt's float32 accumulation (1e-5 of
//    mag, as cuda_gemm_test) and the output rounding (2^-8 |want|) remain.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "kernels/cpu/fp8.hpp"
#include "kernels/cuda/fp8_quantize.hpp"
#include "kernels/cuda/gemm.hpp"
#include "model/dequantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"

namespace moe::kernels {
namespace {

using namespace cuda_testing;

struct fp8_weight {
  int64_t n = 0, k = 0;
  std::vector<uint8_t> q;    // (n, k)
  std::vector<float> scale;  // (ceil(n / 128), ceil(k / 128)), packed: the reference's
  std::vector<float>
      scale_ld;  // (ceil(n / 128), fp8_weight_scale_ld(k)), NaN padding: the device's
  std::vector<float> dequantized;  // (n, k)
};

fp8_weight random_weight(int64_t n, int64_t k, uint64_t seed) {
  fp8_weight w;
  w.n = n;
  w.k = k;
  std::mt19937_64 rng(seed);
  w.q.resize(static_cast<size_t>(n * k));
  for (auto& b : w.q) {
    do b = static_cast<uint8_t>(rng());
    while ((b & 0x7f) == 0x7f || (b & 0x7f) > 0x70);  // no NaN, |w| <= 256
  }
  const int64_t srows = (n + 127) / 128, scols = (k + 127) / 128, ld = cuda::fp8_weight_scale_ld(k);
  w.scale.resize(static_cast<size_t>(srows * scols));
  // Scales over a few octaves, as a checkpoint's are, so a misplaced one changes the result.
  for (auto& s : w.scale)
    s = std::ldexp(1.0f + static_cast<float>(rng() % 1024) / 1024.0f,
                   -10 - static_cast<int>(rng() % 4));
  w.scale_ld.assign(static_cast<size_t>(srows * ld), nan_f);
  for (int64_t r = 0; r < srows; ++r)
    for (int64_t c = 0; c < scols; ++c)
      w.scale_ld[static_cast<size_t>(r * ld + c)] = w.scale[static_cast<size_t>(r * scols + c)];
  w.dequantized.resize(w.q.size());
  model::dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(w.q)), n, k, w.scale, 128,
                               128, w.dequantized);
  return w;
}

// Activations with a spread of per-group magnitudes (a few outlier groups, as real ones have).
std::vector<float> random_activation(int64_t m, int64_t k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const float group_gain = ((r * 7 + c / 128) % 5 == 0) ? 20.0f : 1.0f;
      x[static_cast<size_t>(r * k + c)] = d(rng) * group_gain;
    }
  return bf16_rounded(x);  // what a bf16 layer hands over
}

void linear_reference(const std::vector<float>& x, const std::vector<float>& w, int64_t m,
                      int64_t n, int64_t k, std::vector<double>& y, std::vector<double>& mag) {
  y.assign(static_cast<size_t>(m * n), 0.0);
  mag.assign(y.size(), 0.0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t o = 0; o < n; ++o) {
      double s = 0, a = 0;
      const float* xr = x.data() + r * k;
      const float* wo = w.data() + o * k;
      for (int64_t i = 0; i < k; ++i) {
        const double p = static_cast<double>(xr[i]) * wo[i];
        s += p;
        a += std::fabs(p);
      }
      y[static_cast<size_t>(r * n + o)] = s;
      mag[static_cast<size_t>(r * n + o)] = a;
    }
}

::testing::AssertionResult within(uint16_t got, double want, double mag, double rel_mag) {
  const double g = from_bf16(got);
  const double tol = 0x1p-8 * std::fabs(want) + rel_mag * mag + 1e-30;
  if (std::fabs(g - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << g << ", want " << want << " (tolerance " << tol << ", mag " << mag << ")";
}

struct fp8_fixture {
  cuda::gemm_lt lt;
  device_buffer workspace{cuda::gemm_workspace_bytes};
};

// Runs the FP8 path for m tokens (padded to fp8_linear_rows(m) rows, the padding rows' codes and
// scales NaN, so a leak into a real row shows); the status where it is refused.
kernel_status check_fp8_linear(fp8_fixture& f, int64_t m, int64_t n, int64_t k,
                               bool quantize_on_gpu) {
  SCOPED_TRACE(::testing::Message() << "m " << m << " n " << n << " k " << k
                                    << (quantize_on_gpu ? " (GPU quantize)" : ""));
  const int64_t m_pad = cuda::fp8_linear_rows(m);
  const auto w = random_weight(n, k, static_cast<uint64_t>(n * 7 + k));
  const auto x = random_activation(m, k, static_cast<uint64_t>(m * 13 + k));
  const int64_t groups = k / 128;
  std::vector<uint8_t> xq(static_cast<size_t>(m_pad * k), 0x7f);
  std::vector<float> xs_rows(static_cast<size_t>(m * groups)),
      xs_groups(static_cast<size_t>(m_pad * groups), nan_f);
  EXPECT_EQ(cpu::fp8_quantize_groups(x.data(), m, k, xq.data(), xs_rows.data(),
                                     cpu::fp8_scale_layout::row_major),
            kernel_status::ok);
  EXPECT_EQ(cpu::fp8_quantize_groups(x.data(), m, k, xq.data(), xs_groups.data(),
                                     cpu::fp8_scale_layout::group_major, m_pad),
            kernel_status::ok);
  std::vector<float> xd(x.size());
  model::dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(xq.data(), x.size())), m, k,
                               xs_rows, 1, 128, xd);
  std::vector<double> want, mag;
  linear_reference(xd, w.dequantized, m, n, k, want, mag);

  device_buffer d_xq(xq.size()), d_xs(xs_groups.size() * 4), d_wq(w.q.size()),
      d_ws(w.scale_ld.size() * 4), d_y(static_cast<size_t>(m_pad * n) * 2), d_x(x.size() * 2);
  EXPECT_TRUE(upload(d_wq, w.q) && upload(d_ws, w.scale_ld));
  // Both start with the padding's NaN codes and scales; the GPU quantizer fills the real rows.
  EXPECT_TRUE(upload(d_xq, xq) && upload(d_xs, xs_groups));
  if (quantize_on_gpu) {
    EXPECT_EQ(cudaMemset(d_xq.get(), 0x7f, d_xq.bytes()), cudaSuccess);
    EXPECT_EQ(cudaMemset(d_xs.get(), 0xff, d_xs.bytes()), cudaSuccess);
    EXPECT_TRUE(upload(d_x, to_bf16(x)));
    cuda::fp8_quantize_args qa;
    qa.x = d_x.get();
    qa.q = d_xq.as<uint8_t>();
    qa.scale = d_xs.as<float>();
    qa.rows = m;
    qa.k = k;
    qa.x_dt = dtype::bf16;
    qa.layout = cuda::fp8_scale_layout::group_major;
    qa.scale_ld = m_pad;
    EXPECT_EQ(cuda::fp8_quantize_run(qa, nullptr), kernel_status::ok);
  }
  EXPECT_EQ(cudaMemset(d_y.get(), 0xff, d_y.bytes()),
            cudaSuccess);  // NaN: an unwritten element shows
  cuda::fp8_linear_desc d;
  d.x_q = d_xq.as<uint8_t>();
  d.x_scale = d_xs.as<float>();
  d.w_q = d_wq.as<uint8_t>();
  d.w_scale = d_ws.as<float>();
  d.y = d_y.get();
  d.m = m_pad;
  d.n = n;
  d.k = k;
  const kernel_status s =
      f.lt.run_fp8_linear(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr);
  if (s != kernel_status::ok) return s;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<uint16_t>(d_y, want.size());  // the first m rows
  if (got.size() != want.size()) return kernel_status::launch_failed;
  size_t failures = 0;
  for (size_t i = 0; i < got.size() && failures < 10; ++i) {
    const auto r = within(got[i], want[i], mag[i], 0x1p-12);
    if (!r) {
      ++failures;
      ADD_FAILURE() << "y[" << i / n << ", " << i % n << "]: " << r.message();
    }
  }
  return kernel_status::ok;
}

void check_fallback(fp8_fixture& f, int64_t m, int64_t n, int64_t k) {
  SCOPED_TRACE(::testing::Message() << "fallback m " << m << " n " << n << " k " << k);
  const auto w = random_weight(n, k, static_cast<uint64_t>(n * 5 + k));
  const auto x = random_activation(m, k, static_cast<uint64_t>(m * 3 + k));
  // fp8_dequantize rounds each expanded weight to bf16 (nearest even): so does the reference.
  const auto w_bf16 = bf16_rounded(w.dequantized);
  std::vector<double> want, mag;
  linear_reference(x, w_bf16, m, n, k, want, mag);
  device_buffer d_x(x.size() * 2), d_wq(w.q.size()), d_ws(w.scale_ld.size() * 4),
      d_scratch(w.q.size() * 2), d_y(static_cast<size_t>(m * n) * 2);
  ASSERT_TRUE(upload(d_x, to_bf16(x)) && upload(d_wq, w.q) && upload(d_ws, w.scale_ld));
  cuda::fp8_linear_fallback_desc d;
  d.x = d_x.get();
  d.w_q = d_wq.as<uint8_t>();
  d.w_scale = d_ws.as<float>();
  d.w_scratch = d_scratch.get();
  d.y = d_y.get();
  d.m = m;
  d.n = n;
  d.k = k;
  ASSERT_EQ(f.lt.run_fp8_linear_fallback(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr),
            kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<uint16_t>(d_y, want.size());
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_TRUE(within(got[i], want[i], mag[i], 1e-5)) << i / n << ", " << i % n;
}

TEST(cuda_fp8, rows_pad_to_32) {
  EXPECT_EQ(cuda::fp8_linear_rows(0), 0);
  EXPECT_EQ(cuda::fp8_linear_rows(1), 32);
  EXPECT_EQ(cuda::fp8_linear_rows(32), 32);
  EXPECT_EQ(cuda::fp8_linear_rows(300), 320);
}

TEST(cuda_fp8, weight_scale_rows_pad_to_16_bytes) {
  EXPECT_EQ(cuda::fp8_weight_scale_ld(2048), 16);
  EXPECT_EQ(cuda::fp8_weight_scale_ld(1536), 12);
  EXPECT_EQ(cuda::fp8_weight_scale_ld(1408), 12);  // 11 blocks
  EXPECT_EQ(cuda::fp8_weight_scale_ld(7168), 56);
  EXPECT_EQ(cuda::fp8_weight_scale_ld(200), 4);
  EXPECT_EQ(cuda::fp8_weight_scale_ld(1), 4);
}

TEST(cuda_fp8, can_run_refuses_bad_arguments_without_a_gpu) {
  alignas(16) static uint8_t storage[64];
  cuda::fp8_linear_desc d;
  d.x_q = storage;
  d.x_scale = reinterpret_cast<const float*>(storage);
  d.w_q = storage;
  d.w_scale = reinterpret_cast<const float*>(storage);
  d.y = storage;
  d.m = 32;
  d.n = 2048;
  d.k = 1536;
  EXPECT_EQ(cuda::fp8_linear_can_run(d), kernel_status::ok);
  auto bad = d;
  bad.m = 7;  // rows not padded to 32
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.n = 576;  // a partial weight block row (DeepSeek's kv_a_proj): the fallback's
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.k = 200;  // not a multiple of 128: refused, the fallback takes it
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.k = 0;
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.n = 2056;  // not a multiple of 128
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.m = -1;
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.x_scale = nullptr;
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.w_q = storage + 4;  // misaligned
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.m = 0;
  bad.x_q = nullptr;
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::ok);  // nothing to compute
  bad = d;
  bad.m = INT64_MAX / 1024 / 32 * 32;
  EXPECT_EQ(cuda::fp8_linear_can_run(bad), kernel_status::unsupported_shape);

  cuda::fp8_linear_fallback_desc fb;
  fb.x = storage;
  fb.w_q = storage;
  fb.w_scale = reinterpret_cast<const float*>(storage);
  fb.w_scratch = storage;
  fb.y = storage;
  fb.m = 7;
  fb.n = 2048;
  fb.k = 200;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(fb), kernel_status::ok);  // any k
  auto bad_fb = fb;
  bad_fb.w_scratch = nullptr;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(bad_fb), kernel_status::unsupported_shape);
  bad_fb = fb;
  bad_fb.k = 0;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(bad_fb), kernel_status::unsupported_shape);
  // Other block grids (the engine's stacked weights): blocks of at least one element, and scale
  // rows at least as long as the grid's columns (k = 200 in 40-wide blocks: 5).
  auto grid = fb;
  grid.block_rows = 32;
  grid.block_cols = 40;
  grid.scale_ld = 5;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(grid), kernel_status::ok);
  grid.scale_ld = 4;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(grid), kernel_status::unsupported_shape);
  grid.scale_ld = 0;
  grid.block_rows = 0;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(grid), kernel_status::unsupported_shape);
  grid.block_rows = 32;
  grid.block_cols = 0;
  EXPECT_EQ(cuda::fp8_linear_fallback_can_run(grid), kernel_status::unsupported_shape);

  // A gemm_lt never created has no handle: a refusal, not a crash.
  cuda::gemm_lt none;
  EXPECT_EQ(none.run_fp8_linear(d, nullptr, 0, nullptr), kernel_status::no_device);
  EXPECT_EQ(none.run_fp8_linear(bad, nullptr, 0, nullptr), kernel_status::unsupported_shape);
  EXPECT_EQ(none.run_fp8_linear_fallback(fb, nullptr, 0, nullptr), kernel_status::no_device);
}

TEST(cuda_fp8, block_scaled_product_matches_the_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  fp8_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  // Decode (1), a ragged batch (7), a tile (128), a ragged prefill (300), each padded to 32 rows;
  // DeepSeek-like (n, k): q_b (q_lora 1536 in), o_proj (2048 square), v2-lite's q_proj (3072
  // out), its expert gate (1408 out) and down (1408 in: 11 blocks, the padded scale rows).
  for (const int64_t m : {1, 7, 128, 300})
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{2048, 1536},
                               {2048, 2048},
                               {3072, 2048},
                               {1408, 2048},
                               {2048, 1408}}) {
      const kernel_status s = check_fp8_linear(f, m, n, k, false);
      if (s == kernel_status::unsupported_arch)
        GTEST_SKIP()
            << "cuBLASLt has no VEC128 x BLK128x128 FP8 product on this card (Hopper sm_90 only)";
      ASSERT_EQ(s, kernel_status::ok) << "m " << m << " n " << n << " k " << k;
      if (HasFailure()) return;
    }
}

TEST(cuda_fp8, quantized_on_the_gpu_then_multiplied) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  fp8_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  for (const int64_t m : {1, 32}) {
    const kernel_status s = check_fp8_linear(f, m, 3072, 2048, true);
    if (s == kernel_status::unsupported_arch)
      GTEST_SKIP() << "no block-scaled FP8 product on this card";
    ASSERT_EQ(s, kernel_status::ok);
  }
}

TEST(cuda_fp8, refused_shapes_go_to_the_fallback) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  fp8_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  // k = 200 and n = 576 are refused by the FP8 path (checked without a GPU above); the fallback
  // computes them, and any row count.
  check_fallback(f, 7, 256, 200);
  check_fallback(f, 7, 576, 2048);
  check_fallback(f, 1, 2048, 1408);
  check_fallback(f, 300, 1408, 2048);
}

}  // namespace
}  // namespace moe::kernels
