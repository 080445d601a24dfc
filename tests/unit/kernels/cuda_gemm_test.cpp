// cuBLASLt products (kernels/cuda/gemm.hpp) and the FP8 block expansion
// (kernels/cuda/fp8_dequantize.hpp) against their CPU references. The argument checks run
// everywhere; the GPU runs are skipped, with the reason, where no GPU exists.
//
// Tolerances, from the dtypes:
//  - f32 in, f32 out: float32 throughout (no TF32), only the summation order differs from
//    OpenBLAS: |error| <= k * 2^-23 * sum|a||b| per element; 1e-5 relative to sum|a||b| is ample.
//  - bf16 in: the reference multiplies the same bf16-rounded values in double, so the inputs add
//    no error; float32 accumulation adds as above. bf16 out rounds once more: 2^-8 relative to
//    the value (bf16 keeps 8 significant bits).
//  - FP8 expansion: exact in f32; in bf16 exactly the reference rounded to nearest even.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cuda/fp8_dequantize.hpp"
#include "kernels/cuda/gemm.hpp"
#include "model/dequantize.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"

using namespace moe;
using namespace moe::kernels;
using namespace moe::kernels::cuda_testing;

namespace {

std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// y = x . w^T in double, with the magnitude sum|x||w| each element's error is relative to.
void linear_reference(const std::vector<float>& x, const std::vector<float>& w, size_t rows, size_t in,
                      size_t out, std::vector<double>& y, std::vector<double>& magnitude) {
  y.assign(rows * out, 0.0);
  magnitude.assign(rows * out, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t o = 0; o < out; ++o)
      for (size_t i = 0; i < in; ++i) {
        y[r * out + o] += static_cast<double>(x[r * in + i]) * w[o * in + i];
        magnitude[r * out + o] += std::fabs(static_cast<double>(x[r * in + i]) * w[o * in + i]);
      }
}

struct gemm_fixture {
  cuda::gemm_lt lt;
  device_buffer workspace{cuda::gemm_workspace_bytes};
};

}  // namespace

TEST(cuda_gemm, can_run_refuses_bad_arguments_without_a_gpu) {
  float a = 0, b = 0, c = 0;
  auto d = cuda::linear_desc(&a, &b, &c, 1, 1, 1, dtype::f32, dtype::f32);
  EXPECT_EQ(cuda::gemm_can_run(d), kernel_status::ok);
  auto bad = d;
  bad.ab_dt = dtype::f16;
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_dtype);
  bad = d;
  bad.c_dt = dtype::bf16;  // f32 products are not narrowed
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_dtype);
  bad = d;
  bad.lda = 0;
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_shape);
  bad = cuda::linear_desc(&a, &b, &c, 4, 8, 3, dtype::bf16, dtype::f32);
  bad.ldb = 7;  // weight rows hold in_features = 8
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.b = nullptr;
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.k = 0;
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.batch_count = 0;
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::unsupported_shape);
  bad = d;
  bad.m = 0;
  bad.a = nullptr;  // nothing to compute: no pointer needed
  EXPECT_EQ(cuda::gemm_can_run(bad), kernel_status::ok);
  // A gemm_lt that was never created runs nothing.
  cuda::gemm_lt none;
  EXPECT_EQ(none.run(d, nullptr, 0, nullptr), kernel_status::no_device);
}

TEST(cuda_gemm, can_run_refuses_bad_fp8_expansions_without_a_gpu) {
  uint8_t q = 0;
  float s = 1, out = 0;
  cuda::fp8_dequantize_args a{&q, &s, &out, 1, 1, 128, 128, dtype::f32};
  EXPECT_EQ(cuda::fp8_dequantize_can_run(a), kernel_status::ok);
  auto bad = a;
  bad.out_dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::fp8_dequantize_can_run(bad), kernel_status::unsupported_dtype);
  bad = a;
  bad.block_rows = 0;
  EXPECT_EQ(cuda::fp8_dequantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.scale = nullptr;
  EXPECT_EQ(cuda::fp8_dequantize_can_run(bad), kernel_status::unsupported_shape);
  bad = a;
  bad.rows = INT64_MAX;
  bad.cols = 2;
  EXPECT_EQ(cuda::fp8_dequantize_can_run(bad), kernel_status::unsupported_shape);
}

TEST(cuda_gemm, linear_f32_matches_the_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  gemm_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  const size_t rows = 37, in = 300, out = 129;
  const auto x = random_floats(rows * in, 1), w = random_floats(out * in, 2);
  std::vector<float> want(rows * out);
  ASSERT_EQ(cpu::linear(x.data(), w.data(), want.data(), rows, in, out), kernel_status::ok);
  std::vector<double> exact, magnitude;
  linear_reference(x, w, rows, in, out, exact, magnitude);
  device_buffer dx(x.size() * 4), dw(w.size() * 4), dy(want.size() * 4);
  ASSERT_TRUE(upload(dx, x));
  ASSERT_TRUE(upload(dw, w));
  auto d = cuda::linear_desc(dx.get(), dw.get(), dy.get(), rows, in, out, dtype::f32, dtype::f32);
  ASSERT_EQ(f.lt.run(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<float>(dy, want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], exact[i], 1e-5 * magnitude[i]) << i;
    ASSERT_NEAR(got[i], want[i], 2e-5 * magnitude[i]) << i;
  }
  // beta = 1 accumulates: y = x . w^T + y.
  d.beta = 1.0f;
  ASSERT_EQ(f.lt.run(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
  const auto twice = fetch<float>(dy, want.size());
  for (size_t i = 0; i < twice.size(); ++i) ASSERT_NEAR(twice[i], 2 * exact[i], 2e-5 * magnitude[i]) << i;
  EXPECT_EQ(f.lt.num_plans(), 2u) << "one plan per beta == 0 and beta != 0";
  ASSERT_EQ(f.lt.run(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
  EXPECT_EQ(f.lt.num_plans(), 2u) << "a repeated shape reuses its plan";
}

TEST(cuda_gemm, linear_bf16_matches_the_cpu_reference_within_bf16_rounding) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  gemm_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  // The tiny model's and DeepSeek-like shapes: decode (1 row), a batch, a prefill.
  for (const auto& [rows, in, out] : {std::tuple<size_t, size_t, size_t>{1, 7168, 576}, {32, 2048, 1408},
                                      {513, 256, 1000}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(in) + "x" + std::to_string(out));
    const auto xb = to_bf16(random_floats(rows * in, rows)), wb = to_bf16(random_floats(out * in, out));
    std::vector<double> exact, magnitude;
    linear_reference(from_bf16(xb), from_bf16(wb), rows, in, out, exact, magnitude);
    device_buffer dx(xb.size() * 2), dw(wb.size() * 2), dy32(rows * out * 4), dy16(rows * out * 2);
    ASSERT_TRUE(upload(dx, xb));
    ASSERT_TRUE(upload(dw, wb));
    auto d32 = cuda::linear_desc(dx.get(), dw.get(), dy32.get(), rows, in, out, dtype::bf16, dtype::f32);
    auto d16 = cuda::linear_desc(dx.get(), dw.get(), dy16.get(), rows, in, out, dtype::bf16, dtype::bf16);
    ASSERT_EQ(f.lt.run(d32, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
    ASSERT_EQ(f.lt.run(d16, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got32 = fetch<float>(dy32, rows * out);
    const auto got16 = from_bf16(fetch<uint16_t>(dy16, rows * out));
    for (size_t i = 0; i < got32.size(); ++i) {
      ASSERT_NEAR(got32[i], exact[i], 1e-5 * magnitude[i]) << i;
      ASSERT_NEAR(got16[i], exact[i], 1e-5 * magnitude[i] + std::ldexp(std::fabs(exact[i]), -8)) << i;
    }
  }
}

TEST(cuda_gemm, a_less_aligned_operand_gets_a_plan_of_its_own) {
  // Plans are cached per shape, and cuBLASLt assumes 256-byte aligned operands unless told:
  // the same shape with x starting 8 bytes into its buffer must get its own plan, made for
  // that alignment, and the right product (CI's stand-in cuBLASLt refuses a product whose
  // pointers break the alignment its plan was made for).
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  gemm_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  const size_t rows = 8, in = 256, out = 64, shift = 4;  // 4 bf16 elements: 8 bytes
  const auto xb = to_bf16(random_floats(rows * in, 5)), wb = to_bf16(random_floats(out * in, 6));
  std::vector<double> exact, magnitude;
  linear_reference(from_bf16(xb), from_bf16(wb), rows, in, out, exact, magnitude);
  std::vector<uint16_t> shifted(shift, 0);
  shifted.insert(shifted.end(), xb.begin(), xb.end());
  device_buffer dx(xb.size() * 2), dxs(shifted.size() * 2), dw(wb.size() * 2), dy(rows * out * 4);
  ASSERT_TRUE(upload(dx, xb));
  ASSERT_TRUE(upload(dxs, shifted));
  ASSERT_TRUE(upload(dw, wb));
  const auto* x_shifted = static_cast<const uint16_t*>(dxs.get()) + shift;
  for (const void* x : {static_cast<const void*>(dx.get()), static_cast<const void*>(x_shifted)}) {
    const auto d = cuda::linear_desc(x, dw.get(), dy.get(), rows, in, out, dtype::bf16, dtype::f32);
    ASSERT_EQ(f.lt.run(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = fetch<float>(dy, rows * out);
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], exact[i], 1e-5 * magnitude[i]) << i;
  }
  EXPECT_EQ(f.lt.num_plans(), 2u);
}

TEST(cuda_gemm, strided_batched_transposed_products_match_the_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  gemm_fixture f;
  ASSERT_EQ(cuda::gemm_lt::create(f.lt), kernel_status::ok);
  // The MLA absorption's shape: per head, q_nope(T, dn) . W_uk(dn, R) with W_uk stored (R, dn)
  // per head (trans_b), the heads' outputs interleaved in one row-major (T, H * R) matrix.
  const size_t heads = 5, tokens = 9, dn = 64, latent = 96;
  const auto a = random_floats(heads * tokens * dn, 3), b = random_floats(heads * latent * dn, 4);
  std::vector<float> want(tokens * heads * latent, 0.0f);
  cpu::gemm_args g;
  g.trans_b = cpu::transpose::yes;
  g.m = tokens;
  g.n = latent;
  g.k = dn;
  g.a = a.data();
  g.lda = heads * dn;  // (T, H, dn) row-major: head h at column h * dn
  g.b = b.data();
  g.ldb = dn;
  g.c = want.data();
  g.ldc = heads * latent;
  ASSERT_EQ(cpu::gemm_strided_batched(g, heads, dn, latent * dn, latent), kernel_status::ok);
  device_buffer da(a.size() * 4), db(b.size() * 4), dc(want.size() * 4);
  ASSERT_TRUE(upload(da, a));
  ASSERT_TRUE(upload(db, b));
  cuda::gemm_desc d;
  d.trans_b = cuda::transpose::yes;
  d.m = tokens;
  d.n = latent;
  d.k = dn;
  d.a = da.get();
  d.lda = heads * dn;
  d.b = db.get();
  d.ldb = dn;
  d.c = dc.get();
  d.ldc = heads * latent;
  d.ab_dt = dtype::f32;
  d.c_dt = dtype::f32;
  d.batch_count = heads;
  d.stride_a = dn;
  d.stride_b = latent * dn;
  d.stride_c = latent;
  ASSERT_EQ(f.lt.run(d, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<float>(dc, want.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-4f) << i;

  // trans_a: A stored (k, m).
  std::vector<float> at(dn * tokens);
  for (size_t i = 0; i < tokens; ++i)
    for (size_t j = 0; j < dn; ++j) at[j * tokens + i] = a[i * heads * dn + j];  // head 0
  std::vector<float> want0(tokens * latent);
  cpu::gemm_args g0 = g;
  g0.trans_a = cpu::transpose::yes;
  g0.a = at.data();
  g0.lda = tokens;
  g0.c = want0.data();
  g0.ldc = latent;
  ASSERT_EQ(cpu::gemm(g0), kernel_status::ok);
  device_buffer dat(at.size() * 4), dc0(want0.size() * 4);
  ASSERT_TRUE(upload(dat, at));
  cuda::gemm_desc d0 = d;
  d0.trans_a = cuda::transpose::yes;
  d0.a = dat.get();
  d0.lda = tokens;
  d0.c = dc0.get();
  d0.ldc = latent;
  d0.batch_count = 1;
  d0.stride_a = d0.stride_b = d0.stride_c = 0;
  ASSERT_EQ(f.lt.run(d0, f.workspace.get(), cuda::gemm_workspace_bytes, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got0 = fetch<float>(dc0, want0.size());
  for (size_t i = 0; i < got0.size(); ++i) ASSERT_NEAR(got0[i], want0[i], 1e-4f) << i;
}

TEST(cuda_gemm, fp8_blocks_expand_exactly_as_on_the_cpu) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const int64_t rows = 300, cols = 200;  // partial edge blocks both ways
  std::mt19937 rng(5);
  std::vector<uint8_t> q(static_cast<size_t>(rows * cols));
  for (auto& b : q) {
    do b = static_cast<uint8_t>(rng()); while ((b & 0x7f) == 0x7f);  // no NaN
  }
  const int64_t srows = 3, scols = 2;
  std::vector<float> scale(static_cast<size_t>(srows * scols));
  for (auto& s : scale) s = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -static_cast<int>(rng() % 10));
  std::vector<float> want(q.size());
  model::dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(q)), rows, cols, scale, 128, 128, want);
  device_buffer dq(q.size()), ds(scale.size() * 4), d32(q.size() * 4), d16(q.size() * 2);
  ASSERT_TRUE(upload(dq, q));
  ASSERT_TRUE(upload(ds, scale));
  cuda::fp8_dequantize_args a{static_cast<const uint8_t*>(dq.get()), static_cast<const float*>(ds.get()), d32.get(),
                              rows, cols, 128, 128, dtype::f32};
  ASSERT_EQ(cuda::fp8_dequantize_run(a, nullptr), kernel_status::ok);
  a.out = d16.get();
  a.out_dt = dtype::bf16;
  ASSERT_EQ(cuda::fp8_dequantize_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got32 = fetch<float>(d32, q.size());
  const auto got16 = fetch<uint16_t>(d16, q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    ASSERT_EQ(got32[i], want[i]) << i;
    ASSERT_EQ(got16[i], model::float_to_bf16(want[i])) << i;
  }
}
