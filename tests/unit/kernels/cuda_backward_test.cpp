// The CUDA backward kernels (kernels/cuda/backward.hpp) against the CPU training reference
// (kernels/cpu/backward.hpp), itself checked against finite differences in backward_test.cpp.
// Each comparison needs a GPU (or CI's emulator) and skips, with the reason, without one; the
// can_run tests are host code. linear_backward goes through cuBLASLt, which the emulator lacks:
// its test is cuda_backward_device_test.cpp.
//
// Tolerances, per element, against the double-accumulating reference `want`:
//  - exact where the kernel does the host's float32 operations in the host's order: the
//    embedding's scatter (adds in row order), permute_rows' backward (adds in k order), the
//    combine's dy (one rounded product, one add), untouched rows and elements;
//  - f32: |got - want| <= 1e-5 * scale, where scale is the sum of the magnitudes of the terms
//    that make up the value (so cancellation does not shrink the bound to nothing). The kernels
//    accumulate in float32 (unit roundoff u = 2^-24 ~ 6e-8) over blocked/tree orders of at most
//    a few thousand terms here, and CUDA's expf/rsqrtf are within 2 ulp: a few hundred u at
//    worst, under 1e-5;
//  - bf16: inputs are rounded to bf16 on the host first, so reference and kernel compute from
//    the same values; the kernel's float32 result (within the f32 bound above) is rounded once
//    to bf16, whose unit roundoff is 2^-8 (8 significant bits). So
//    |got - want| <= 2^-8 * |want| + 2e-5 * scale (the rounding of a value already within the
//    f32 bound, plus that bound). Float32 outputs (weight gradients, the loss) keep the f32 bound.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cuda/backward.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using cpu::testing::random_floats;
using namespace cuda_testing;

// ---------------------------------------------------------------------------------------------
// helpers

std::vector<float> from_device(const device_buffer& d, size_t n, dtype dt) {
  return dt == dtype::bf16 ? from_bf16(fetch<uint16_t>(d, n)) : fetch<float>(d, n);
}

::testing::AssertionResult close(float got, double want, double scale, dtype out_dt) {
  const double tol = (out_dt == dtype::bf16 ? std::ldexp(std::fabs(want), -8) + 2e-5 * scale
                                            : 1e-5 * scale) +
                     1e-30;
  if (std::fabs(static_cast<double>(got) - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want << " (tolerance "
                                       << tol << ")";
}

std::vector<uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  if (!v.empty()) std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

void check_rmsnorm(size_t rows, size_t dim, dtype dt, bool accumulate, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " dim " << dim << " " << to_string(dt)
                                    << " accumulate " << accumulate);
  const float eps = 1e-6f;
  const auto x = stored(random_floats(rows * dim, seed, -2.0f, 2.0f), dt);
  const auto dout = stored(random_floats(rows * dim, seed + 1), dt);
  const auto weight = random_floats(dim, seed + 2, 0.5f, 1.5f);
  const auto dx0 = stored(random_floats(rows * dim, seed + 3), dt);
  const auto dweight0 = random_floats(dim, seed + 4);

  auto want_dx = dx0;
  auto want_dweight = dweight0;
  ASSERT_EQ(cpu::rmsnorm_backward(x.data(), weight.data(), dout.data(), want_dx.data(),
                                  want_dweight.data(), rows, dim, eps, accumulate),
            kernel_status::ok);

  auto d_x = to_device(x, dt), d_dout = to_device(dout, dt), d_dx = to_device(dx0, dt);
  auto d_w = to_device(weight, dtype::f32), d_dw = to_device(dweight0, dtype::f32);
  cuda::rmsnorm_backward_args a;
  a.x = d_x->get();
  a.weight = d_w->as<float>();
  a.dout = d_dout->get();
  a.dx = d_dx->get();
  a.dweight = d_dw->as<float>();
  a.rows = static_cast<int64_t>(rows);
  a.dim = static_cast<int64_t>(dim);
  a.eps = eps;
  a.accumulate = accumulate;
  a.dt = dt;
  device_buffer ws(cuda::rmsnorm_backward_workspace_bytes(a));
  ASSERT_EQ(cuda::rmsnorm_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_dx = from_device(*d_dx, rows * dim, dt);
  const auto got_dweight = from_device(*d_dw, dim, dtype::f32);

  // Scales: dx = inv * (g - x * coef) has the terms inv * |g| and inv * |x| * |coef|, coef
  // itself a sum of |g * x| * inv^2 / dim; dweight sums |dout * x * inv| over rows.
  std::vector<double> dweight_scale(dim);
  for (size_t j = 0; j < dim; ++j) dweight_scale[j] = std::fabs(dweight0[j]);
  for (size_t r = 0; r < rows; ++r) {
    double sum_sq = 0.0, abs_gx = 0.0;
    for (size_t i = 0; i < dim; ++i) {
      sum_sq += double{x[r * dim + i]} * x[r * dim + i];
      abs_gx += std::fabs(double{dout[r * dim + i]} * weight[i] * x[r * dim + i]);
    }
    const double inv = 1.0 / std::sqrt(sum_sq / dim + eps);
    const double abs_coef = inv * inv * abs_gx / dim;
    for (size_t i = 0; i < dim; ++i) {
      const size_t k = r * dim + i;
      const double scale = inv * (std::fabs(double{dout[k]} * weight[i]) + std::fabs(x[k]) * abs_coef) +
                           (accumulate ? std::fabs(dx0[k]) : 0.0);
      ASSERT_TRUE(close(got_dx[k], want_dx[k], scale, dt)) << "dx " << r << "," << i;
      dweight_scale[i] += std::fabs(double{dout[k]} * x[k] * inv);
    }
  }
  for (size_t i = 0; i < dim; ++i)
    ASSERT_TRUE(close(got_dweight[i], want_dweight[i], dweight_scale[i], dtype::f32)) << "dweight " << i;

  // Reproducible: the same call again gives the same dweight bits (no atomics).
  ASSERT_TRUE(upload(*d_dw, dweight0));
  ASSERT_EQ(cuda::rmsnorm_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(bits_of(from_device(*d_dw, dim, dtype::f32)), bits_of(got_dweight));
}

TEST(cuda_backward_rmsnorm, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // One row; an odd width; three first-stage chunks (64 rows each) with a ragged last one;
  // DeepSeek-V3's q_a norm width.
  const size_t shapes[][2] = {{1, 7}, {37, 300}, {130, 64}, {5, 1536}};
  for (const auto& s : shapes)
    for (dtype dt : {dtype::f32, dtype::bf16})
      for (bool accumulate : {false, true}) check_rmsnorm(s[0], s[1], dt, accumulate, s[0] * 7 + s[1]);
}

TEST(cuda_backward_rmsnorm, dx_in_place_over_dout_and_dweight_only) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t rows = 9, dim = 40;
  const auto x = random_floats(rows * dim, 21, -2.0f, 2.0f);
  const auto dout = random_floats(rows * dim, 22);
  const std::vector<float> weight(dim, 1.25f);
  auto want_dx = dout;
  std::vector<float> want_dweight(dim, 0.0f);
  ASSERT_EQ(cpu::rmsnorm_backward(x.data(), weight.data(), dout.data(), want_dx.data(),
                                  want_dweight.data(), rows, dim, 1e-6f),
            kernel_status::ok);
  auto d_x = to_device(x, dtype::f32), d_g = to_device(dout, dtype::f32);
  auto d_w = to_device(weight, dtype::f32), d_dw = to_device(std::vector<float>(dim, 0.0f), dtype::f32);
  cuda::rmsnorm_backward_args a;
  a.x = d_x->get();
  a.weight = d_w->as<float>();
  a.dout = d_g->get();
  a.dx = d_g->get();  // in place over dout
  a.dweight = d_dw->as<float>();
  a.rows = rows;
  a.dim = dim;
  device_buffer ws(cuda::rmsnorm_backward_workspace_bytes(a));
  ASSERT_EQ(cuda::rmsnorm_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = from_device(*d_g, rows * dim, dtype::f32);
  const auto got_dw = from_device(*d_dw, dim, dtype::f32);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_TRUE(close(got[i], want_dx[i], 4.0, dtype::f32)) << i;
  for (size_t i = 0; i < dim; ++i) ASSERT_TRUE(close(got_dw[i], want_dweight[i], rows * 2.0, dtype::f32)) << i;
}

TEST(cuda_backward_rmsnorm, can_run_rejects_bad_arguments) {
  cuda::rmsnorm_backward_args a;
  a.x = fake_ptr();
  a.weight = fake<float>();
  a.dout = fake_ptr();
  a.dx = fake_ptr();
  a.rows = 4;
  a.dim = 8;
  EXPECT_EQ(cuda::rmsnorm_backward_can_run(a), kernel_status::ok);
  auto b = a;
  b.dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::rmsnorm_backward_can_run(b), kernel_status::unsupported_dtype);
  b = a;
  b.dim = 0;
  EXPECT_EQ(cuda::rmsnorm_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.weight = nullptr;
  EXPECT_EQ(cuda::rmsnorm_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.rows = int64_t{1} << 40;
  EXPECT_EQ(cuda::rmsnorm_backward_can_run(b), kernel_status::unsupported_shape);
  // A workspace too small is refused before anything is launched.
  EXPECT_EQ(cuda::rmsnorm_backward_run(a, fake_ptr(), 8, nullptr), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::rmsnorm_backward_run(a, nullptr, 0, nullptr), kernel_status::unsupported_shape);
}

// ---------------------------------------------------------------------------------------------
// swiglu

void check_swiglu(size_t rows, size_t dim, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " dim " << dim << " " << to_string(dt));
  auto gate = random_floats(rows * dim, seed, -10.0f, 10.0f);
  const float extremes[] = {0.0f, -100.0f, 100.0f, -1000.0f, -88.5f, -1.2785f};
  for (size_t i = 0; i < std::size(extremes) && i < gate.size(); ++i) gate[(i * 7919) % gate.size()] = extremes[i];
  gate = stored(gate, dt);
  const auto up = stored(random_floats(rows * dim, seed + 1, -3.0f, 3.0f), dt);
  const auto dout = stored(random_floats(rows * dim, seed + 2), dt);
  std::vector<float> want_dgate(rows * dim), want_dup(rows * dim);
  ASSERT_EQ(cpu::swiglu_backward(gate.data(), up.data(), dout.data(), want_dgate.data(),
                                 want_dup.data(), rows, dim),
            kernel_status::ok);
  auto d_gate = to_device(gate, dt), d_up = to_device(up, dt), d_dout = to_device(dout, dt);
  auto d_dgate = to_device(std::vector<float>(rows * dim), dt);
  auto d_dup = to_device(std::vector<float>(rows * dim), dt);
  cuda::swiglu_backward_args a;
  a.gate = d_gate->get();
  a.up = d_up->get();
  a.dout = d_dout->get();
  a.dgate = d_dgate->get();
  a.dup = d_dup->get();
  a.rows = rows;
  a.dim = dim;
  a.dt = dt;
  ASSERT_EQ(cuda::swiglu_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_dgate = from_device(*d_dgate, rows * dim, dt);
  const auto got_dup = from_device(*d_dup, rows * dim, dt);
  for (size_t i = 0; i < rows * dim; ++i) {
    // dsilu = s * (1 + g * (1 - s)) cancels near g = -1.28: its scale is s * (1 + |g (1 - s)|).
    const double g = gate[i], s = 1.0 / (1.0 + std::exp(-g));
    const double du = std::fabs(double{dout[i]} * up[i]);
    ASSERT_TRUE(close(got_dgate[i], want_dgate[i], du * s * (1.0 + std::fabs(g * (1.0 - s))), dt)) << i;
    ASSERT_TRUE(close(got_dup[i], want_dup[i], std::fabs(dout[i] * g * s), dt)) << i;
  }
}

TEST(cuda_backward_swiglu, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_swiglu(3, 1000, dt, 31);
    check_swiglu(17, 33, dt, 32);
  }
}

TEST(cuda_backward_swiglu, in_place_and_one_output) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t n = 300;
  const auto gate = random_floats(n, 41, -6.0f, 6.0f), up = random_floats(n, 42), dout = random_floats(n, 43);
  std::vector<float> want_dgate(n);
  ASSERT_EQ(cpu::swiglu_backward(gate.data(), up.data(), dout.data(), want_dgate.data(), nullptr, 1, n),
            kernel_status::ok);
  auto d_gate = to_device(gate, dtype::f32), d_up = to_device(up, dtype::f32), d_dout = to_device(dout, dtype::f32);
  cuda::swiglu_backward_args a;
  a.gate = d_gate->get();
  a.up = d_up->get();
  a.dout = d_dout->get();
  a.dgate = d_gate->get();  // over its own input
  a.rows = 1;
  a.dim = n;
  ASSERT_EQ(cuda::swiglu_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = from_device(*d_gate, n, dtype::f32);
  for (size_t i = 0; i < n; ++i) ASSERT_TRUE(close(got[i], want_dgate[i], 4.0, dtype::f32)) << i;
}

TEST(cuda_backward_swiglu, can_run_rejects_bad_arguments) {
  cuda::swiglu_backward_args a;
  a.gate = a.up = a.dout = fake_ptr();
  a.dgate = fake_ptr();
  a.rows = 2;
  a.dim = 3;
  EXPECT_EQ(cuda::swiglu_backward_can_run(a), kernel_status::ok);
  auto b = a;
  b.dup = b.dgate;  // both outputs in one buffer
  EXPECT_EQ(cuda::swiglu_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.up = nullptr;
  EXPECT_EQ(cuda::swiglu_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.dim = -1;
  EXPECT_EQ(cuda::swiglu_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.dt = dtype::i32;
  EXPECT_EQ(cuda::swiglu_backward_can_run(b), kernel_status::unsupported_dtype);
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

struct ce_result {
  float loss = 0.0f;
  std::vector<float> dlogits;
};

ce_result run_cross_entropy(const std::vector<float>& logits, const std::vector<int32_t>& targets,
                            size_t vocab, dtype dt) {
  const size_t rows = targets.size();
  auto d_logits = to_device(logits, dt);
  auto d_targets = to_device(targets);
  auto d_dlogits = to_device(std::vector<float>(rows * vocab, 9.0f), dt);  // all overwritten
  device_buffer d_loss(4);
  cuda::cross_entropy_args a;
  a.logits = d_logits->get();
  a.targets = d_targets->as<int32_t>();
  a.loss = d_loss.as<float>();
  a.dlogits = d_dlogits->get();
  a.rows = rows;
  a.vocab = vocab;
  a.dt = dt;
  device_buffer ws(cuda::cross_entropy_workspace_bytes(a));
  ce_result r;
  EXPECT_EQ(cuda::cross_entropy_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  r.loss = fetch<float>(d_loss, 1).at(0);
  r.dlogits = from_device(*d_dlogits, rows * vocab, dt);
  return r;
}

void check_cross_entropy(size_t rows, size_t vocab, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " vocab " << vocab << " " << to_string(dt));
  const auto logits = stored(random_floats(rows * vocab, seed, -6.0f, 6.0f), dt);
  auto targets = random_ints(rows, 0, static_cast<int32_t>(vocab) - 1, seed + 1);
  targets[0] = -100;  // ignored, as transformers' ignore_index
  if (rows > 3) targets[rows / 2] = -1;
  double want_loss = 0.0;
  std::vector<float> want(rows * vocab);
  ASSERT_EQ(cpu::cross_entropy(logits.data(), targets.data(), rows, vocab, &want_loss, want.data()),
            kernel_status::ok);
  const auto got = run_cross_entropy(logits, targets, vocab, dt);
  // A row's loss is max + log(sum) - x[target]: terms of the logits' magnitude (6).
  ASSERT_TRUE(close(got.loss, want_loss, 13.0, dtype::f32));
  size_t counted = 0;
  for (int32_t t : targets) counted += t >= 0 ? 1 : 0;
  const double inv_counted = 1.0 / counted;
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < vocab; ++i) {
      const size_t k = r * vocab + i;
      if (targets[r] < 0) {
        ASSERT_EQ(got.dlogits[k], 0.0f) << r << "," << i;
        continue;
      }
      // softmax * inv_counted, less inv_counted at the target: scale both terms.
      const double scale = std::fabs(want[k]) + (static_cast<int32_t>(i) == targets[r] ? inv_counted : 0.0);
      ASSERT_TRUE(close(got.dlogits[k], want[k], scale, dt)) << r << "," << i;
    }
  // Reproducible loss bits.
  EXPECT_EQ(bits_of({run_cross_entropy(logits, targets, vocab, dt).loss}), bits_of({got.loss}));
}

TEST(cuda_backward_cross_entropy, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_cross_entropy(9, 1000, dt, 51);
    check_cross_entropy(300, 37, dt, 52);  // more rows than the mean's block has threads
    check_cross_entropy(2, 1, dt, 53);     // a vocabulary of one: loss 0
  }
}

TEST(cuda_backward_cross_entropy, all_ignored_and_a_bad_target) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t vocab = 5;
  const auto logits = random_floats(3 * vocab, 61);
  const auto none = run_cross_entropy(logits, {-100, -1, -100}, vocab, dtype::f32);
  EXPECT_EQ(none.loss, 0.0f);
  EXPECT_EQ(none.dlogits, std::vector<float>(3 * vocab, 0.0f));
  // A target past the vocabulary: the CPU refuses; the device makes the loss NaN and zeroes
  // that row, while the other rows stay as if it were ignored.
  const auto bad = run_cross_entropy(logits, {2, 5, 4}, vocab, dtype::f32);
  EXPECT_TRUE(std::isnan(bad.loss));
  for (size_t i = 0; i < vocab; ++i) EXPECT_EQ(bad.dlogits[vocab + i], 0.0f);
  double loss = 0.0;
  std::vector<float> want(3 * vocab);
  ASSERT_EQ(cpu::cross_entropy(logits.data(), std::vector<int32_t>{2, -1, 4}.data(), 3, vocab, &loss, want.data()),
            kernel_status::ok);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE(close(bad.dlogits[i], want[i], 1.0, dtype::f32)) << i;
}

TEST(cuda_backward_cross_entropy, can_run_rejects_bad_arguments) {
  cuda::cross_entropy_args a;
  a.logits = fake_ptr();
  a.targets = fake<int32_t>();
  a.loss = fake<float>();
  a.rows = 3;
  a.vocab = 10;
  EXPECT_EQ(cuda::cross_entropy_can_run(a), kernel_status::ok);
  auto b = a;
  b.loss = nullptr;
  EXPECT_EQ(cuda::cross_entropy_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.vocab = 0;
  EXPECT_EQ(cuda::cross_entropy_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.vocab = int64_t{1} << 32;
  EXPECT_EQ(cuda::cross_entropy_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.targets = nullptr;
  EXPECT_EQ(cuda::cross_entropy_can_run(b), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::cross_entropy_run(a, fake_ptr(), 16, nullptr), kernel_status::unsupported_shape);
}

// ---------------------------------------------------------------------------------------------
// embedding

void check_embedding(size_t rows, size_t vocab, size_t dim, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " vocab " << vocab << " dim " << dim << " "
                                    << to_string(dt));
  // Few distinct ids: every id repeats, some many times; two ids outside the vocabulary.
  auto ids = random_ints(rows, 0, static_cast<int32_t>(vocab) - 1, seed);
  ids[rows / 3] = -1;
  ids[rows - 1] = static_cast<int32_t>(vocab);
  const auto dout = stored(random_floats(rows * dim, seed + 1), dt);
  const auto dtable0 = random_floats(vocab * dim, seed + 2);
  // The reference refuses out-of-range ids; the kernel skips them: compare with the rest.
  std::vector<int32_t> kept_ids;
  std::vector<float> kept_dout;
  for (size_t r = 0; r < rows; ++r) {
    if (ids[r] < 0 || ids[r] >= static_cast<int32_t>(vocab)) continue;
    kept_ids.push_back(ids[r]);
    kept_dout.insert(kept_dout.end(), dout.begin() + r * dim, dout.begin() + (r + 1) * dim);
  }
  auto want = dtable0;
  ASSERT_EQ(cpu::embedding_backward(kept_ids.data(), kept_dout.data(), want.data(), kept_ids.size(), vocab, dim),
            kernel_status::ok);
  auto d_ids = to_device(ids);
  auto d_dout = to_device(dout, dt);
  auto d_table = to_device(dtable0, dtype::f32);
  cuda::embedding_backward_args a;
  a.ids = d_ids->as<int32_t>();
  a.dout = d_dout->get();
  a.dtable = d_table->as<float>();
  a.rows = rows;
  a.vocab = vocab;
  a.dim = dim;
  a.dt = dt;
  device_buffer ws(cuda::embedding_backward_workspace_bytes(a));
  ASSERT_EQ(cuda::embedding_backward_run(a, ws.get(), ws.bytes(), nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // The CPU's float32 additions in the CPU's order: bit for bit.
  EXPECT_EQ(bits_of(from_device(*d_table, vocab * dim, dtype::f32)), bits_of(want));
}

TEST(cuda_backward_embedding, matches_cpu_reference_bit_for_bit) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_embedding(70, 6, 300, dt, 71);  // dim over two column blocks; ids repeat ~12 times
    check_embedding(3, 1000, 8, dt, 72);  // mostly unused table rows
    check_embedding(100, 2, 5, dt, 73);   // chains past a warp's 32 ids
  }
}

TEST(cuda_backward_embedding, can_run_rejects_bad_arguments) {
  cuda::embedding_backward_args a;
  a.ids = fake<int32_t>();
  a.dout = fake_ptr();
  a.dtable = fake<float>();
  a.rows = 4;
  a.vocab = 10;
  a.dim = 8;
  EXPECT_EQ(cuda::embedding_backward_can_run(a), kernel_status::ok);
  auto b = a;
  b.dtable = nullptr;
  EXPECT_EQ(cuda::embedding_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.rows = int64_t{1} << 31;
  EXPECT_EQ(cuda::embedding_backward_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::embedding_backward_can_run(b), kernel_status::unsupported_dtype);
  EXPECT_EQ(cuda::embedding_backward_run(a, fake_ptr(), 4, nullptr), kernel_status::unsupported_shape);
}

// ---------------------------------------------------------------------------------------------
// rope

cpu::rope_params yarn_rope(size_t head_dim) {  // tiny-v3's rope_scaling, any width
  cpu::rope_params p;
  p.head_dim = head_dim;
  p.has_yarn = true;
  p.factor = 40.0;
  p.original_max_pos = 4096.0;
  p.beta_fast = 32.0;
  p.beta_slow = 1.0;
  p.mscale = 1.0;
  p.mscale_all_dim = 1.0;
  return p;
}

void check_rope(const cpu::rope_params& params, size_t num_tokens, size_t num_heads, size_t nope_dim,
                dtype dt, uint64_t seed) {
  const size_t dr = params.head_dim, head_stride = nope_dim + dr, half = dr / 2;
  const size_t token_stride = num_heads * head_stride;
  SCOPED_TRACE(::testing::Message() << "head_dim " << dr << " tokens " << num_tokens << " heads "
                                    << num_heads << " " << to_string(dt));
  const size_t table_positions = 300;
  std::vector<float> cos(table_positions * half), sin(table_positions * half);
  ASSERT_EQ(cpu::rope_cos_sin_table(params, 0, table_positions, cos.data(), sin.data()), kernel_status::ok);
  auto positions = random_ints(num_tokens, 0, static_cast<int32_t>(table_positions) - 1, seed);
  if (num_tokens > 3) {
    positions[1] = static_cast<int32_t>(table_positions);  // outside the table: untouched
    positions[2] = static_cast<int32_t>(table_positions) - 1;
  }
  const auto g = stored(random_floats(num_tokens * token_stride, seed + 1, -2.0f, 2.0f), dt);
  auto want = g;
  for (size_t t = 0; t < num_tokens; ++t) {
    if (static_cast<size_t>(positions[t]) >= table_positions) continue;
    cpu::rope_apply_args r;
    r.x = want.data() + t * token_stride + nope_dim;
    r.num_tokens = 1;
    r.num_heads = num_heads;
    r.token_stride = token_stride;
    r.head_stride = head_stride;
    ASSERT_EQ(cpu::rope_backward(params, r, &positions[t]), kernel_status::ok);
  }
  const size_t esize = dtype_bytes(dt);
  auto d_g = to_device(g, dt);
  auto d_pos = to_device(positions), d_cos = to_device(cos), d_sin = to_device(sin);
  cuda::rope_args a;
  a.x = static_cast<char*>(d_g->get()) + nope_dim * esize;
  a.num_tokens = num_tokens;
  a.num_heads = num_heads;
  a.token_stride = token_stride;
  a.head_stride = head_stride;
  a.head_dim = dr;
  a.positions = d_pos->as<int32_t>();
  a.cos = d_cos->as<float>();
  a.sin = d_sin->as<float>();
  a.table_positions = table_positions;
  a.dt = dt;
  ASSERT_EQ(cuda::rope_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = from_device(*d_g, g.size(), dt);
  for (size_t t = 0; t < num_tokens; ++t)
    for (size_t h = 0; h < num_heads; ++h)
      for (size_t i = 0; i < head_stride; ++i) {
        const size_t k = t * token_stride + h * head_stride + i;
        const bool rotated = i >= nope_dim && static_cast<size_t>(positions[t]) < table_positions;
        if (!rotated) {
          ASSERT_EQ(got[k], g[k]) << "untouched " << t << "," << h << "," << i;
          continue;
        }
        // Element 2p or 2p+1 of the output mixes dy[p] and dy[p + half] by cos and sin.
        const size_t pair = (i - nope_dim) / 2;
        const float* y = g.data() + t * token_stride + h * head_stride + nope_dim;
        const size_t row = static_cast<size_t>(positions[t]) * half + pair;
        const double scale = (std::fabs(y[pair]) + std::fabs(y[pair + half])) *
                             std::max(std::fabs(cos[row]), std::fabs(sin[row]));
        ASSERT_TRUE(close(got[k], want[k], scale, dt)) << t << "," << h << "," << i;
      }
}

TEST(cuda_backward_rope, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_rope(yarn_rope(8), 37, 4, 16, dt, 81);     // tiny-v3's q
    check_rope(yarn_rope(64), 29, 16, 128, dt, 82);  // DeepSeek-V3's q (fewer heads)
    check_rope(yarn_rope(64), 5, 1, 512, dt, 83);    // DeepSeek-V3's k_pe
    check_rope(yarn_rope(96), 13, 2, 7, dt, 84);     // some lanes hold 2 pairs, some 1
    check_rope(yarn_rope(512), 3, 2, 0, dt, 85);     // the largest head_dim
  }
}

TEST(cuda_backward_rope, is_the_transpose_of_the_forward) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // <rope(x), g> = <x, rope_backward(g)> on the device itself.
  const auto params = yarn_rope(64);
  const size_t tokens = 7, half = 32, table_positions = 64;
  std::vector<float> cos(table_positions * half), sin(table_positions * half);
  ASSERT_EQ(cpu::rope_cos_sin_table(params, 0, table_positions, cos.data(), sin.data()), kernel_status::ok);
  const auto positions = random_ints(tokens, 0, table_positions - 1, 91);
  const auto x = random_floats(tokens * 64, 92), g = random_floats(tokens * 64, 93);
  auto d_x = to_device(x, dtype::f32), d_g = to_device(g, dtype::f32);
  auto d_pos = to_device(positions), d_cos = to_device(cos), d_sin = to_device(sin);
  cuda::rope_args a;
  a.num_tokens = tokens;
  a.token_stride = 64;
  a.head_stride = 64;
  a.head_dim = 64;
  a.positions = d_pos->as<int32_t>();
  a.cos = d_cos->as<float>();
  a.sin = d_sin->as<float>();
  a.table_positions = table_positions;
  a.x = d_x->get();
  ASSERT_EQ(cuda::rope_run(a, nullptr), kernel_status::ok);
  a.x = d_g->get();
  ASSERT_EQ(cuda::rope_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto rx = from_device(*d_x, x.size(), dtype::f32), bg = from_device(*d_g, g.size(), dtype::f32);
  double lhs = 0.0, rhs = 0.0, mag = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    lhs += double{rx[i]} * g[i];
    rhs += double{x[i]} * bg[i];
    mag += std::fabs(double{rx[i]} * g[i]);
  }
  EXPECT_NEAR(lhs, rhs, 1e-5 * mag);
}

TEST(cuda_backward_rope, can_run_is_the_forwards) {
  cuda::rope_args a;
  a.x = fake_ptr();
  a.num_tokens = 2;
  a.head_dim = 7;  // odd
  a.token_stride = a.head_stride = 8;
  a.positions = fake<int32_t>();
  a.cos = a.sin = fake<float>();
  EXPECT_EQ(cuda::rope_backward_can_run(a), kernel_status::unsupported_shape);
  a.head_dim = 8;
  EXPECT_EQ(cuda::rope_backward_can_run(a), kernel_status::ok);
  a.token_stride = 4;  // overlapping vectors
  EXPECT_EQ(cuda::rope_backward_run(a, nullptr), kernel_status::unsupported_shape);
}

// ---------------------------------------------------------------------------------------------
// the combine and the dispatch copy

struct plan {
  size_t num_tokens, top_k, dim, num_rows;
  std::vector<int32_t> positions;
};

// A real plan from permute_plan: experts 0..7 local, some ids outside (skipped, position -1).
plan make_plan(size_t num_tokens, size_t top_k, size_t dim, uint64_t seed) {
  const size_t num_experts = 8;
  plan p{num_tokens, top_k, dim, num_tokens * top_k, {}};
  const auto topk_idx = random_ints(num_tokens * top_k, -2, static_cast<int32_t>(num_experts) + 1, seed);
  std::vector<int32_t> offsets(num_experts + 1), inverse(num_tokens * top_k);
  p.positions.resize(num_tokens * top_k);
  EXPECT_EQ(cpu::permute_plan(topk_idx.data(), num_tokens, top_k, num_experts, offsets.data(),
                              p.positions.data(), inverse.data()),
            kernel_status::ok);
  return p;
}

void check_unpermute_backward(const plan& p, dtype dt, bool accumulate, bool with_weight, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "tokens " << p.num_tokens << " top_k " << p.top_k << " dim " << p.dim
                                    << " " << to_string(dt) << " accumulate " << accumulate
                                    << " weight " << with_weight);
  const size_t entries = p.num_tokens * p.top_k;
  const auto y = stored(random_floats(p.num_rows * p.dim, seed), dt);
  const auto weight = random_floats(entries, seed + 1, 0.0f, 1.0f);
  const auto dout = stored(random_floats(p.num_tokens * p.dim, seed + 2), dt);
  const auto dy0 = stored(random_floats(p.num_rows * p.dim, seed + 3), dt);
  const auto dweight0 = random_floats(entries, seed + 4);
  auto want_dy = dy0;
  auto want_dweight = dweight0;
  const float* w = with_weight ? weight.data() : nullptr;
  ASSERT_EQ(cpu::unpermute_backward(y.data(), p.num_rows, w, p.positions.data(), p.num_tokens, p.top_k, p.dim,
                                    dout.data(), want_dy.data(), want_dweight.data(), accumulate),
            kernel_status::ok);
  auto d_y = to_device(y, dt), d_dout = to_device(dout, dt), d_dy = to_device(dy0, dt);
  auto d_w = to_device(weight, dtype::f32), d_dw = to_device(dweight0, dtype::f32);
  auto d_pos = to_device(p.positions);
  cuda::unpermute_backward_args a;
  a.y = d_y->get();
  a.weight = with_weight ? d_w->as<float>() : nullptr;
  a.positions = d_pos->as<int32_t>();
  a.dout = d_dout->get();
  a.dy = d_dy->get();
  a.dweight = d_dw->as<float>();
  a.num_tokens = p.num_tokens;
  a.top_k = p.top_k;
  a.dim = p.dim;
  a.num_rows = p.num_rows;
  a.accumulate = accumulate;
  a.dt = dt;
  ASSERT_EQ(cuda::unpermute_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got_dy = from_device(*d_dy, dy0.size(), dt);
  const auto got_dw = from_device(*d_dw, entries, dtype::f32);
  // dy: one rounded product (and one add): the host's float32 operations, so f32 is exact and
  // bf16 the same value rounded once; rows no entry maps to keep dy0.
  if (dt == dtype::f32)
    EXPECT_EQ(bits_of(got_dy), bits_of(want_dy));
  else
    for (size_t i = 0; i < got_dy.size(); ++i) ASSERT_EQ(to_bf16(got_dy[i]), to_bf16(want_dy[i])) << i;
  for (size_t j = 0; j < entries; ++j) {
    double scale = accumulate ? std::fabs(dweight0[j]) : 0.0;
    if (p.positions[j] >= 0)
      for (size_t i = 0; i < p.dim; ++i)
        scale += std::fabs(double{dout[(j / p.top_k) * p.dim + i]} * y[p.positions[j] * p.dim + i]);
    ASSERT_TRUE(close(got_dw[j], want_dweight[j], scale, dtype::f32)) << "dweight " << j;
  }
}

TEST(cuda_backward_unpermute, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const plan plans[] = {make_plan(23, 4, 200, 101), make_plan(5, 8, 33, 102), make_plan(1, 1, 7, 103)};
  for (const auto& p : plans)
    for (dtype dt : {dtype::f32, dtype::bf16})
      for (bool accumulate : {false, true})
        for (bool with_weight : {true, false}) check_unpermute_backward(p, dt, accumulate, with_weight, p.dim);
}

void check_permute_rows_backward(const plan& p, dtype dt, bool accumulate, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "tokens " << p.num_tokens << " top_k " << p.top_k << " dim " << p.dim
                                    << " " << to_string(dt) << " accumulate " << accumulate);
  const auto dpermuted = stored(random_floats(p.num_rows * p.dim, seed), dt);
  const auto dx0 = stored(random_floats(p.num_tokens * p.dim, seed + 1), dt);
  auto want = dx0;
  ASSERT_EQ(cpu::permute_rows_backward(dpermuted.data(), p.num_rows, p.positions.data(), p.num_tokens, p.top_k,
                                       p.dim, want.data(), accumulate),
            kernel_status::ok);
  auto d_dp = to_device(dpermuted, dt), d_dx = to_device(dx0, dt);
  auto d_pos = to_device(p.positions);
  cuda::permute_rows_backward_args a;
  a.dpermuted = d_dp->get();
  a.positions = d_pos->as<int32_t>();
  a.dx = d_dx->get();
  a.num_tokens = p.num_tokens;
  a.top_k = p.top_k;
  a.dim = p.dim;
  a.num_rows = p.num_rows;
  a.accumulate = accumulate;
  a.dt = dt;
  ASSERT_EQ(cuda::permute_rows_backward_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = from_device(*d_dx, dx0.size(), dt);
  // Adds in k order from 0.0f, as the host: exact in f32; in bf16 the host's float32 sum
  // rounded once.
  if (dt == dtype::f32)
    EXPECT_EQ(bits_of(got), bits_of(want));
  else
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(to_bf16(got[i]), to_bf16(want[i])) << i;
}

TEST(cuda_backward_permute_rows, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const plan plans[] = {make_plan(23, 4, 200, 111), make_plan(5, 8, 33, 112), make_plan(1, 1, 7, 113)};
  for (const auto& p : plans)
    for (dtype dt : {dtype::f32, dtype::bf16})
      for (bool accumulate : {false, true}) check_permute_rows_backward(p, dt, accumulate, p.dim + 1);
}

TEST(cuda_backward_permute, can_run_rejects_bad_arguments) {
  cuda::unpermute_backward_args u;
  u.y = u.dout = fake_ptr();
  u.positions = fake<int32_t>();
  u.dy = fake_ptr();
  u.dweight = fake<float>();
  u.num_tokens = 4;
  u.top_k = 2;
  u.dim = 8;
  u.num_rows = 8;
  EXPECT_EQ(cuda::unpermute_backward_can_run(u), kernel_status::ok);
  auto v = u;
  v.y = nullptr;  // dweight needs y
  EXPECT_EQ(cuda::unpermute_backward_can_run(v), kernel_status::unsupported_shape);
  v.dweight = nullptr;  // dy alone does not
  EXPECT_EQ(cuda::unpermute_backward_can_run(v), kernel_status::ok);
  v = u;
  v.num_tokens = int64_t{1} << 31;
  EXPECT_EQ(cuda::unpermute_backward_can_run(v), kernel_status::unsupported_shape);
  v = u;
  v.dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::unpermute_backward_run(v, nullptr), kernel_status::unsupported_dtype);

  cuda::permute_rows_backward_args p;
  p.dpermuted = fake_ptr();
  p.positions = fake<int32_t>();
  p.dx = fake_ptr();
  p.num_tokens = 4;
  p.top_k = 2;
  p.dim = 8;
  p.num_rows = 8;
  EXPECT_EQ(cuda::permute_rows_backward_can_run(p), kernel_status::ok);
  auto q = p;
  q.dx = nullptr;
  EXPECT_EQ(cuda::permute_rows_backward_can_run(q), kernel_status::unsupported_shape);
  q = p;
  q.top_k = -1;
  EXPECT_EQ(cuda::permute_rows_backward_run(q, nullptr), kernel_status::unsupported_shape);
}

}  // namespace
}  // namespace moe::kernels
