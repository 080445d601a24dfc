// The backward kernels' checks that only a GPU can run, kept out of tests/emulator's list:
//  - linear_backward (kernels/cuda/backward.hpp) against cpu::linear_backward: its two cuBLASLt
//    products (the emulator has no cuBLASLt);
//  - the other backward kernels at DeepSeek-V3's sizes (hidden 7168, vocabulary 129280, a
//    training batch of tokens): grid limits, reproducibility at scale, and how long each takes,
//    printed for the record. Far too slow for the emulator, which runs every thread as a fiber.
// The descriptor and can_run tests are host code and run wherever the CUDA backend is built.
//
// Tolerances (the reasoning of cuda_backward_test.cpp's header): f32 inputs run float32
// throughout without TF32, so |got - want| <= 1e-5 * sum of |terms|; bf16 inputs are rounded
// on the host first, their products are exact in float32 and accumulate in float32 (the same
// bound), and a bf16 dx adds its rounding: 2^-8 * |want|, and with accumulate 2^-8 * |product|
// more, because with beta = 1 cuBLASLt rounds the product to bf16 before it adds C.
// dweight is float32 always.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/backward.hpp"
#include "kernels/cuda/backward.hpp"
#include "kernels/cuda/gemm.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using cpu::testing::random_floats;
using namespace cuda_testing;

bool upload_as(device_buffer& d, const std::vector<float>& v, dtype dt) {
  return dt == dtype::bf16 ? upload(d, to_bf16(v)) : upload(d, v);
}

std::vector<float> fetch_as(const device_buffer& d, size_t n, dtype dt) {
  return dt == dtype::bf16 ? from_bf16(fetch<uint16_t>(d, n)) : fetch<float>(d, n);
}

struct linear_case {
  size_t rows, in, out;
  dtype ab_dt, dx_dt;
  bool accumulate;
};

void check_linear_backward(cuda::gemm_lt& lt, device_buffer& workspace, const linear_case& c, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " in " << c.in << " out " << c.out << " ab "
                                    << to_string(c.ab_dt) << " dx " << to_string(c.dx_dt) << " accumulate "
                                    << c.accumulate);
  const auto round = [&](std::vector<float> v, dtype dt) { return dt == dtype::bf16 ? bf16_rounded(v) : v; };
  const auto x = round(random_floats(c.rows * c.in, seed), c.ab_dt);
  const auto w = round(random_floats(c.out * c.in, seed + 1), c.ab_dt);
  const auto dy = round(random_floats(c.rows * c.out, seed + 2), c.ab_dt);
  const auto dx0 = round(random_floats(c.rows * c.in, seed + 3), c.dx_dt);
  const auto dw0 = random_floats(c.out * c.in, seed + 4);
  auto want_dx = dx0;
  auto want_dw = dw0;
  ASSERT_EQ(cpu::linear_backward(x.data(), w.data(), dy.data(), want_dx.data(), want_dw.data(), c.rows, c.in,
                                 c.out, c.accumulate),
            kernel_status::ok);

  const size_t ab = dtype_bytes(c.ab_dt);
  device_buffer d_x(x.size() * ab), d_w(w.size() * ab), d_dy(dy.size() * ab);
  device_buffer d_dx(dx0.size() * dtype_bytes(c.dx_dt)), d_dw(dw0.size() * 4);
  ASSERT_TRUE(upload_as(d_x, x, c.ab_dt) && upload_as(d_w, w, c.ab_dt) && upload_as(d_dy, dy, c.ab_dt));
  ASSERT_TRUE(upload_as(d_dx, dx0, c.dx_dt) && upload(d_dw, dw0));
  cuda::linear_backward_args a;
  a.x = d_x.get();
  a.weight = d_w.get();
  a.dy = d_dy.get();
  a.dx = d_dx.get();
  a.dweight = d_dw.as<float>();
  a.rows = c.rows;
  a.in_features = c.in;
  a.out_features = c.out;
  a.accumulate = c.accumulate;
  a.ab_dt = c.ab_dt;
  a.dx_dt = c.dx_dt;
  ASSERT_EQ(cuda::linear_backward_run(lt, a, workspace.get(), workspace.bytes(), nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_dx = fetch_as(d_dx, dx0.size(), c.dx_dt);
  const auto got_dw = fetch<float>(d_dw, dw0.size());
  for (size_t r = 0; r < c.rows; ++r)
    for (size_t i = 0; i < c.in; ++i) {
      const size_t k = r * c.in + i;
      double scale = c.accumulate ? std::fabs(dx0[k]) : 0.0;
      for (size_t o = 0; o < c.out; ++o) scale += std::fabs(double{dy[r * c.out + o]} * w[o * c.in + i]);
      // A bf16 dx with accumulate is rounded twice: cuBLASLt rounds the product p to bf16, then
      // adds beta * C and rounds again (on an H200, dx[0, 1] of the first accumulate case came
      // back as exactly bf16(dx0 + bf16(p)), one ulp from bf16(dx0 + p)): u * |p| more.
      const double product = c.accumulate ? std::fabs(double{want_dx[k]} - dx0[k]) : 0.0;
      const double tol =
          1e-5 * scale + (c.dx_dt == dtype::bf16 ? std::ldexp(std::fabs(want_dx[k]) + product, -8) : 0.0);
      ASSERT_NEAR(got_dx[k], want_dx[k], tol) << "dx " << r << "," << i;
    }
  for (size_t o = 0; o < c.out; ++o)
    for (size_t i = 0; i < c.in; ++i) {
      const size_t k = o * c.in + i;
      double scale = std::fabs(dw0[k]);
      for (size_t r = 0; r < c.rows; ++r) scale += std::fabs(double{dy[r * c.out + o]} * x[r * c.in + i]);
      ASSERT_NEAR(got_dw[k], want_dw[k], 1e-5 * scale) << "dweight " << o << "," << i;
    }
}

TEST(cuda_backward_linear, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  cuda::gemm_lt lt;
  ASSERT_EQ(cuda::gemm_lt::create(lt), kernel_status::ok);
  device_buffer workspace(cuda::gemm_workspace_bytes);
  const linear_case cases[] = {
      {40, 96, 72, dtype::bf16, dtype::bf16, false},
      {40, 96, 72, dtype::bf16, dtype::bf16, true},
      {40, 96, 72, dtype::bf16, dtype::f32, true},
      {64, 256, 128, dtype::bf16, dtype::bf16, false},
      {40, 96, 72, dtype::f32, dtype::f32, false},
      {5, 33, 17, dtype::f32, dtype::f32, true},  // odd shapes, float32 throughout
  };
  for (const auto& c : cases) check_linear_backward(lt, workspace, c, c.rows * 3 + c.in);
}

TEST(cuda_backward_linear, descs_are_the_cpu_products) {
  cuda::linear_backward_args a;
  a.x = fake_ptr();
  a.weight = fake_ptr();
  a.dy = fake_ptr();
  a.dx = fake_ptr();
  a.dweight = fake<float>();
  a.rows = 6;
  a.in_features = 10;
  a.out_features = 4;
  a.accumulate = true;
  cuda::gemm_desc dx, dw;
  cuda::linear_backward_descs(a, dx, dw);
  // dx (6, 10) = dy (6, 4) . W (4, 10), beta 1 with accumulate.
  EXPECT_EQ(dx.trans_a, cuda::transpose::no);
  EXPECT_EQ(dx.trans_b, cuda::transpose::no);
  EXPECT_EQ(dx.m, 6);
  EXPECT_EQ(dx.n, 10);
  EXPECT_EQ(dx.k, 4);
  EXPECT_EQ(dx.lda, 4);
  EXPECT_EQ(dx.ldb, 10);
  EXPECT_EQ(dx.ldc, 10);
  EXPECT_EQ(dx.beta, 1.0f);
  // dW (4, 10) += dy^T (4, 6) . x (6, 10), float32.
  EXPECT_EQ(dw.trans_a, cuda::transpose::yes);
  EXPECT_EQ(dw.m, 4);
  EXPECT_EQ(dw.n, 10);
  EXPECT_EQ(dw.k, 6);
  EXPECT_EQ(dw.lda, 4);
  EXPECT_EQ(dw.ldb, 10);
  EXPECT_EQ(dw.beta, 1.0f);
  EXPECT_EQ(dw.c_dt, dtype::f32);
  EXPECT_EQ(cuda::gemm_can_run(dx), kernel_status::ok);
  EXPECT_EQ(cuda::gemm_can_run(dw), kernel_status::ok);
}

TEST(cuda_backward_linear, can_run_rejects_bad_arguments) {
  cuda::linear_backward_args a;
  a.x = fake_ptr();
  a.weight = fake_ptr();
  a.dy = fake_ptr();
  a.dx = fake_ptr();
  a.dweight = fake<float>();
  a.rows = 6;
  a.in_features = 10;
  a.out_features = 4;
  EXPECT_EQ(cuda::linear_backward_can_run(a), kernel_status::ok);
  auto b = a;
  b.ab_dt = dtype::f32;  // f32 inputs with a bf16 dx
  EXPECT_EQ(cuda::linear_backward_can_run(b), kernel_status::unsupported_dtype);
  b = a;
  b.weight = nullptr;  // dx needs the weight
  EXPECT_EQ(cuda::linear_backward_can_run(b), kernel_status::unsupported_shape);
  b.dx = nullptr;  // not without dx
  EXPECT_EQ(cuda::linear_backward_can_run(b), kernel_status::ok);
  b = a;
  b.x = nullptr;  // dweight needs x
  EXPECT_EQ(cuda::linear_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.rows = -1;
  EXPECT_EQ(cuda::linear_backward_can_run(b), kernel_status::unsupported_shape);
  // A never-created gemm_lt refuses rather than crashes, after the host checks pass.
  cuda::gemm_lt none;
  EXPECT_NE(cuda::linear_backward_run(none, a, nullptr, 0, nullptr), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// DeepSeek-V3 sizes

std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  if (!v.empty()) std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// Runs f (which queues work on the default stream) and waits; the wall time in milliseconds.
template <class F>
double timed_ms(F&& f) {
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto t0 = std::chrono::steady_clock::now();
  f();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

TEST(cuda_backward_at_scale, rmsnorm_hidden_7168) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t rows = 4096, dim = 7168;
  const auto x = bf16_rounded(random_floats(rows * dim, 201, -2.0f, 2.0f));
  const auto dout = bf16_rounded(random_floats(rows * dim, 202));
  const auto weight = random_floats(dim, 203, 0.5f, 1.5f);
  std::vector<float> want_dweight(dim, 0.0f);
  ASSERT_EQ(cpu::rmsnorm_backward(x.data(), weight.data(), dout.data(), nullptr, want_dweight.data(), rows, dim,
                                  1e-6f),
            kernel_status::ok);
  device_buffer d_x(x.size() * 2), d_g(dout.size() * 2), d_dx(x.size() * 2), d_w(dim * 4), d_dw(dim * 4);
  ASSERT_TRUE(upload(d_x, to_bf16(x)) && upload(d_g, to_bf16(dout)) && upload(d_w, weight));
  cuda::rmsnorm_backward_args a;
  a.x = d_x.get();
  a.weight = d_w.as<float>();
  a.dout = d_g.get();
  a.dx = d_dx.get();
  a.dweight = d_dw.as<float>();
  a.rows = rows;
  a.dim = dim;
  a.dt = dtype::bf16;
  device_buffer ws(cuda::rmsnorm_backward_workspace_bytes(a));
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    ASSERT_EQ(cudaMemset(d_dw.get(), 0, dim * 4), cudaSuccess);
    const double ms = timed_ms([&] { ASSERT_EQ(cuda::rmsnorm_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok); });
    const auto got = fetch<float>(d_dw, dim);
    if (run == 0) {
      first = got;
      std::printf("rmsnorm_backward bf16 %zux%zu: %.3f ms (first call)\n", rows, dim, ms);
    } else {
      EXPECT_EQ(bits(got), bits(first)) << "dweight differs between two runs";
      std::printf("rmsnorm_backward bf16 %zux%zu: %.3f ms\n", rows, dim, ms);
    }
  }
  // |dout * x * inv| <= 1 * 2 * ~1.7 per row: the sum of magnitudes is below 4 * rows.
  for (size_t i = 0; i < dim; ++i) ASSERT_NEAR(first[i], want_dweight[i], 1e-5 * 4.0 * rows) << i;
}

TEST(cuda_backward_at_scale, cross_entropy_vocabulary_129280) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t rows = 256, vocab = 129280;
  const auto logits = bf16_rounded(random_floats(rows * vocab, 211, -8.0f, 8.0f));
  auto targets = random_ints(rows, 0, static_cast<int32_t>(vocab) - 1, 212);
  targets[7] = -100;
  double want_loss = 0.0;
  std::vector<float> want(rows * vocab);
  ASSERT_EQ(cpu::cross_entropy(logits.data(), targets.data(), rows, vocab, &want_loss, want.data()),
            kernel_status::ok);
  device_buffer d_logits(logits.size() * 2), d_targets(rows * 4), d_dlogits(logits.size() * 2), d_loss(4);
  ASSERT_TRUE(upload(d_logits, to_bf16(logits)) && upload(d_targets, targets));
  cuda::cross_entropy_args a;
  a.logits = d_logits.get();
  a.targets = d_targets.as<int32_t>();
  a.loss = d_loss.as<float>();
  a.dlogits = d_dlogits.get();
  a.rows = rows;
  a.vocab = vocab;
  a.dt = dtype::bf16;
  device_buffer ws(cuda::cross_entropy_workspace_bytes(a));
  float first_loss = 0.0f;
  for (int run = 0; run < 2; ++run) {
    const double ms = timed_ms([&] { ASSERT_EQ(cuda::cross_entropy_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok); });
    const float loss = fetch<float>(d_loss, 1).at(0);
    std::printf("cross_entropy bf16 %zux%zu: %.3f ms, loss %.6f (reference %.6f)\n", rows, vocab, ms, loss, want_loss);
    if (run == 0) first_loss = loss;
    else EXPECT_EQ(bits({loss}), bits({first_loss}));
  }
  EXPECT_NEAR(first_loss, want_loss, 1e-5 * 17.0);
  const auto got = from_bf16(fetch<uint16_t>(d_dlogits, rows * vocab));
  const double inv_counted = 1.0 / (rows - 1);
  for (size_t k = 0; k < got.size(); ++k)
    ASSERT_NEAR(got[k], want[k], std::ldexp(std::fabs(want[k]), -8) + 2e-5 * (std::fabs(want[k]) + inv_counted)) << k;
}

TEST(cuda_backward_at_scale, embedding_16k_tokens) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // A skewed id distribution: a quarter of the tokens share 16 ids (long chains), the rest spread.
  const size_t rows = 16384, vocab = 129280, dim = 512;
  auto ids = random_ints(rows, 0, static_cast<int32_t>(vocab) - 1, 221);
  const auto hot = random_ints(rows, 0, 15, 222);
  for (size_t r = 0; r < rows; r += 4) ids[r] = hot[r];
  const auto dout = bf16_rounded(random_floats(rows * dim, 223));
  std::vector<float> want(vocab * dim, 0.0f);
  ASSERT_EQ(cpu::embedding_backward(ids.data(), dout.data(), want.data(), rows, vocab, dim), kernel_status::ok);
  device_buffer d_ids(rows * 4), d_dout(dout.size() * 2), d_table(want.size() * 4);
  ASSERT_TRUE(upload(d_ids, ids) && upload(d_dout, to_bf16(dout)));
  ASSERT_EQ(cudaMemset(d_table.get(), 0, d_table.bytes()), cudaSuccess);
  cuda::embedding_backward_args a;
  a.ids = d_ids.as<int32_t>();
  a.dout = d_dout.get();
  a.dtable = d_table.as<float>();
  a.rows = rows;
  a.vocab = vocab;
  a.dim = dim;
  a.dt = dtype::bf16;
  device_buffer ws(cuda::embedding_backward_workspace_bytes(a));
  const double ms = timed_ms([&] { ASSERT_EQ(cuda::embedding_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok); });
  std::printf("embedding_backward bf16 %zu tokens, dim %zu: %.3f ms\n", rows, dim, ms);
  EXPECT_EQ(bits(fetch<float>(d_table, want.size())), bits(want));
}

}  // namespace
}  // namespace moe::kernels
