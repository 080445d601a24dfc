#include "kernels/cpu/backward.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/cpu/gather.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cpu/softmax.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

// Every backward kernel against central finite differences of its FORWARD kernel, over the
// scalar L = sum(dout * forward(x)) with a random dout, in double. The forward kernels are
// float32, so a step of 1e-2 balances truncation error (h^2) against rounding (eps_f / h); a
// gradient passes when norm(got - want) / norm(want) < kTol. The *_detects_* tests show that
// a plausible wrong gradient (a dropped term, a transposed rotation) fails that bound.

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

constexpr double kStep = 1e-2;
constexpr double kTol = 1e-3;

// forward(x) -> L, for one input vector; the other inputs are captured.
using objective = std::function<double(const std::vector<float>&)>;

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

std::vector<double> numeric_gradient(const objective& f, std::vector<float> x,
                                     double step = kStep) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    const float hi = static_cast<float>(x0 + step);
    const float lo = static_cast<float>(x0 - step);
    x[i] = hi;
    const double f_hi = f(x);
    x[i] = lo;
    const double f_lo = f(x);
    x[i] = x0;
    // The step actually taken, after rounding x +- step to float.
    g[i] = (f_hi - f_lo) / (static_cast<double>(hi) - static_cast<double>(lo));
  }
  return g;
}

double relative_error(const std::vector<float>& got, const std::vector<double>& want) {
  double diff = 0.0, ref = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    ref += want[i] * want[i];
  }
  return std::sqrt(diff) / std::sqrt(ref);
}

// ---------------------------------------------------------------------------------------------
// linear

TEST(linear_backward, matches_finite_differences) {
  const size_t rows = 3, in = 7, out = 5;
  const auto x = random_floats(rows * in, 11);
  const auto w = random_floats(out * in, 12);
  const auto dy = random_floats(rows * out, 13);
  auto loss = [&](const std::vector<float>& xv, const std::vector<float>& wv) {
    std::vector<float> y(rows * out);
    EXPECT_EQ(linear(xv.data(), wv.data(), y.data(), rows, in, out), kernel_status::ok);
    return dot(dy, y);
  };
  const auto want_dx = numeric_gradient([&](const auto& v) { return loss(v, w); }, x);
  const auto want_dw = numeric_gradient([&](const auto& v) { return loss(x, v); }, w);

  std::vector<float> dx(rows * in, NAN);  // written, not read
  std::vector<float> dw(out * in, 0.0f);
  ASSERT_EQ(linear_backward(x.data(), w.data(), dy.data(), dx.data(), dw.data(), rows, in, out),
            kernel_status::ok);
  EXPECT_LT(relative_error(dx, want_dx), kTol);
  EXPECT_LT(relative_error(dw, want_dw), kTol);

  // dweight always accumulates; dx accumulates on request.
  const auto dx0 = random_floats(rows * in, 14);
  const auto dw0 = random_floats(out * in, 15);
  auto dx_acc = dx0;
  auto dw_acc = dw0;
  ASSERT_EQ(linear_backward(x.data(), w.data(), dy.data(), dx_acc.data(), dw_acc.data(), rows, in,
                            out, /*accumulate=*/true),
            kernel_status::ok);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_NEAR(dx_acc[i], dx0[i] + dx[i], 1e-5) << i;
  for (size_t i = 0; i < dw.size(); ++i) EXPECT_NEAR(dw_acc[i], dw0[i] + dw[i], 1e-5) << i;

  // Either output alone.
  std::vector<float> dx_only(rows * in);
  std::vector<float> dw_only(out * in, 0.0f);
  ASSERT_EQ(linear_backward(nullptr, w.data(), dy.data(), dx_only.data(), nullptr, rows, in, out),
            kernel_status::ok);
  ASSERT_EQ(linear_backward(x.data(), nullptr, dy.data(), nullptr, dw_only.data(), rows, in, out),
            kernel_status::ok);
  EXPECT_EQ(dx_only, dx);
  EXPECT_EQ(dw_only, dw);
}

TEST(linear_backward, hand_computed) {
  // x (1, 2) = [1, 2]; w (2, 2) = [[1, 2], [3, 4]]; dy (1, 2) = [1, -1].
  const float x[] = {1.0f, 2.0f};
  const float w[] = {1.0f, 2.0f, 3.0f, 4.0f};
  const float dy[] = {1.0f, -1.0f};
  float dx[2];
  float dw[4] = {};
  ASSERT_EQ(linear_backward(x, w, dy, dx, dw, 1, 2, 2), kernel_status::ok);
  EXPECT_FLOAT_EQ(dx[0], -2.0f);  // 1*1 - 1*3
  EXPECT_FLOAT_EQ(dx[1], -2.0f);  // 1*2 - 1*4
  const float want_dw[] = {1.0f, 2.0f, -1.0f, -2.0f};
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(dw[i], want_dw[i]) << i;
}

TEST(linear_backward, argument_errors) {
  const float x[6] = {}, w[6] = {}, dy[4] = {};
  float dx[6] = {7, 7, 7, 7, 7, 7};
  float dw[6] = {};
  EXPECT_EQ(linear_backward(x, w, nullptr, dx, dw, 2, 3, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(linear_backward(x, nullptr, dy, dx, dw, 2, 3, 2), kernel_status::unsupported_shape);
  // dx's operands are fine but dweight's are not: nothing is written.
  EXPECT_EQ(linear_backward(nullptr, w, dy, dx, dw, 2, 3, 2), kernel_status::unsupported_shape);
  for (float v : dx) EXPECT_EQ(v, 7.0f);
  EXPECT_EQ(linear_backward(x, w, dy, dx, dw, size_t{1} << 32, 3, 2),
            kernel_status::unsupported_shape);
  EXPECT_EQ(linear_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 3, 2), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

void check_rmsnorm_backward(size_t rows, size_t dim, uint64_t seed, double step = kStep) {
  const float eps = 1e-6f;
  const auto x = random_floats(rows * dim, seed, -3.0f, 3.0f);
  const auto w = random_floats(dim, seed + 1, 0.5f, 1.5f);
  const auto dout = random_floats(rows * dim, seed + 2);
  auto loss = [&](const std::vector<float>& xv, const std::vector<float>& wv) {
    std::vector<float> y(rows * dim);
    EXPECT_EQ(rmsnorm(xv.data(), wv.data(), y.data(), rows, dim, eps), kernel_status::ok);
    return dot(dout, y);
  };
  const auto want_dx = numeric_gradient([&](const auto& v) { return loss(v, w); }, x, step);
  const auto want_dw = numeric_gradient([&](const auto& v) { return loss(x, v); }, w, step);

  std::vector<float> dx(rows * dim, NAN);
  std::vector<float> dw(dim, 0.0f);
  ASSERT_EQ(rmsnorm_backward(x.data(), w.data(), dout.data(), dx.data(), dw.data(), rows, dim, eps),
            kernel_status::ok);
  EXPECT_LT(relative_error(dx, want_dx), kTol) << "dim " << dim;
  EXPECT_LT(relative_error(dw, want_dw), kTol) << "dim " << dim;

  const auto dx0 = random_floats(rows * dim, seed + 3);
  const auto dw0 = random_floats(dim, seed + 4);
  auto dx_acc = dx0;
  auto dw_acc = dw0;
  ASSERT_EQ(rmsnorm_backward(x.data(), w.data(), dout.data(), dx_acc.data(), dw_acc.data(), rows,
                             dim, eps, /*accumulate=*/true),
            kernel_status::ok);
  EXPECT_LT(relative_error(dx_acc, [&] {
              std::vector<double> v(dx.size());
              for (size_t i = 0; i < v.size(); ++i) v[i] = double{dx0[i]} + want_dx[i];
              return v;
            }()),
            kTol);
  for (size_t i = 0; i < dim; ++i) EXPECT_NEAR(dw_acc[i], dw0[i] + dw[i], 1e-5) << i;
}

TEST(rmsnorm_backward, matches_finite_differences) {
  check_rmsnorm_backward(3, 5, 21);
  check_rmsnorm_backward(3, 16, 31);
  // Wider than one block of dweight's double accumulators. L sums thousands of float terms, so
  // a longer step keeps their rounding (~ sqrt(n) * eps / step) well under the tolerance; the
  // curvature along one coordinate is small at this width.
  check_rmsnorm_backward(2, 2051, 41, 5e-2);
}

TEST(rmsnorm_backward, in_place_over_dout) {
  const size_t rows = 3, dim = 9;
  const auto x = random_floats(rows * dim, 51, -2.0f, 2.0f);
  const auto w = random_floats(dim, 52);
  const auto dout = random_floats(rows * dim, 53);
  std::vector<float> dx(rows * dim);
  std::vector<float> dw(dim, 0.0f);
  ASSERT_EQ(rmsnorm_backward(x.data(), w.data(), dout.data(), dx.data(), dw.data(), rows, dim, 1e-6f),
            kernel_status::ok);
  auto buf = dout;
  std::vector<float> dw_in_place(dim, 0.0f);
  ASSERT_EQ(rmsnorm_backward(x.data(), w.data(), buf.data(), buf.data(), dw_in_place.data(), rows,
                             dim, 1e-6f),
            kernel_status::ok);
  EXPECT_EQ(buf, dx);
  EXPECT_EQ(dw_in_place, dw);
}

TEST(rmsnorm_backward, detects_a_dropped_term) {
  // dx without the normalisation's own derivative (dx = r * dout * w) must fail the check.
  const size_t rows = 3, dim = 8;
  const float eps = 1e-6f;
  const auto x = random_floats(rows * dim, 61, -3.0f, 3.0f);
  const auto w = random_floats(dim, 62, 0.5f, 1.5f);
  const auto dout = random_floats(rows * dim, 63);
  const auto want = numeric_gradient(
      [&](const std::vector<float>& v) {
        std::vector<float> y(rows * dim);
        EXPECT_EQ(rmsnorm(v.data(), w.data(), y.data(), rows, dim, eps), kernel_status::ok);
        return dot(dout, y);
      },
      x);
  std::vector<float> wrong(rows * dim);
  for (size_t r = 0; r < rows; ++r) {
    double sq = 0.0;
    for (size_t i = 0; i < dim; ++i) sq += double{x[r * dim + i]} * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(sq / dim + eps);
    for (size_t i = 0; i < dim; ++i)
      wrong[r * dim + i] = static_cast<float>(inv * dout[r * dim + i] * w[i]);
  }
  EXPECT_GT(relative_error(wrong, want), 100 * kTol);
}

TEST(rmsnorm_backward, argument_errors) {
  const float x[4] = {1, 2, 3, 4}, w[2] = {1, 1}, d[4] = {};
  float dx[4], dw[2] = {};
  EXPECT_EQ(rmsnorm_backward(x, w, d, dx, dw, 2, 0, 1e-6f), kernel_status::unsupported_shape);
  EXPECT_EQ(rmsnorm_backward(nullptr, w, d, dx, dw, 2, 2, 1e-6f), kernel_status::unsupported_shape);
  EXPECT_EQ(rmsnorm_backward(x, nullptr, d, dx, dw, 2, 2, 1e-6f), kernel_status::unsupported_shape);
  EXPECT_EQ(rmsnorm_backward(x, w, nullptr, dx, dw, 2, 2, 1e-6f), kernel_status::unsupported_shape);
  EXPECT_EQ(rmsnorm_backward(x, w, d, nullptr, nullptr, 2, 2, 1e-6f), kernel_status::ok);
  EXPECT_EQ(rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 2, 1e-6f),
            kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// swiglu

TEST(swiglu_backward, matches_finite_differences) {
  const size_t rows = 3, dim = 11;
  auto gate = random_floats(rows * dim, 71, -6.0f, 6.0f);
  const auto up = random_floats(rows * dim, 72, -2.0f, 2.0f);
  const auto dout = random_floats(rows * dim, 73);
  auto loss = [&](const std::vector<float>& g, const std::vector<float>& u) {
    std::vector<float> y(rows * dim);
    EXPECT_EQ(swiglu(g.data(), u.data(), y.data(), rows, dim), kernel_status::ok);
    return dot(dout, y);
  };
  const auto want_dgate = numeric_gradient([&](const auto& v) { return loss(v, up); }, gate);
  const auto want_dup = numeric_gradient([&](const auto& v) { return loss(gate, v); }, up);
  std::vector<float> dgate(rows * dim), dup(rows * dim);
  ASSERT_EQ(swiglu_backward(gate.data(), up.data(), dout.data(), dgate.data(), dup.data(), rows, dim),
            kernel_status::ok);
  EXPECT_LT(relative_error(dgate, want_dgate), kTol);
  EXPECT_LT(relative_error(dup, want_dup), kTol);

  // Either output alone, and in place over its own input.
  auto g_buf = gate;
  ASSERT_EQ(swiglu_backward(g_buf.data(), up.data(), dout.data(), g_buf.data(), nullptr, rows, dim),
            kernel_status::ok);
  EXPECT_EQ(g_buf, dgate);
  std::vector<float> dup_only(rows * dim);
  ASSERT_EQ(swiglu_backward(gate.data(), up.data(), dout.data(), nullptr, dup_only.data(), rows, dim),
            kernel_status::ok);
  EXPECT_EQ(dup_only, dup);
}

TEST(swiglu_backward, hand_computed_and_saturated) {
  // g = 0: silu = 0, silu' = 1/2. g = -100: exp overflows; gradients are (signed) zeros.
  const float gate[] = {0.0f, -100.0f, 100.0f};
  const float up[] = {3.0f, 2.0f, 2.0f};
  const float dout[] = {2.0f, 1.0f, 1.0f};
  float dgate[3], dup[3];
  ASSERT_EQ(swiglu_backward(gate, up, dout, dgate, dup, 1, 3), kernel_status::ok);
  EXPECT_FLOAT_EQ(dgate[0], 3.0f);  // 2 * 3 * 0.5
  EXPECT_FLOAT_EQ(dup[0], 0.0f);
  EXPECT_EQ(dgate[1], 0.0f);
  EXPECT_EQ(dup[1], 0.0f);
  EXPECT_FLOAT_EQ(dgate[2], 2.0f);  // silu' -> 1
  EXPECT_FLOAT_EQ(dup[2], 100.0f);
}

TEST(swiglu_backward, argument_errors) {
  const float a[2] = {}, b[2] = {}, d[2] = {};
  float o[2];
  EXPECT_EQ(swiglu_backward(nullptr, b, d, o, o, 1, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(swiglu_backward(a, nullptr, d, o, nullptr, 1, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(swiglu_backward(a, b, nullptr, o, nullptr, 1, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(swiglu_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 2), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// cross_entropy

// The forward: -mean over counted rows of log_softmax(row)[target], via softmax.hpp.
double reference_loss(const std::vector<float>& logits, const std::vector<int32_t>& targets,
                      size_t vocab) {
  std::vector<float> logp(logits.size());
  EXPECT_EQ(log_softmax_rows(logits.data(), logp.data(), targets.size(), vocab), kernel_status::ok);
  double total = 0.0;
  size_t counted = 0;
  for (size_t r = 0; r < targets.size(); ++r) {
    if (targets[r] < 0) continue;
    total -= logp[r * vocab + static_cast<size_t>(targets[r])];
    ++counted;
  }
  return counted == 0 ? 0.0 : total / static_cast<double>(counted);
}

TEST(cross_entropy, matches_finite_differences_with_an_ignored_target) {
  const size_t vocab = 13;
  const std::vector<int32_t> targets{4, -100, 12, 0};
  const size_t rows = targets.size();
  const auto logits = random_floats(rows * vocab, 81, -4.0f, 4.0f);
  const auto want =
      numeric_gradient([&](const auto& v) { return reference_loss(v, targets, vocab); }, logits);
  double loss = -1.0;
  std::vector<float> dlogits(rows * vocab, NAN);
  ASSERT_EQ(cross_entropy(logits.data(), targets.data(), rows, vocab, &loss, dlogits.data()),
            kernel_status::ok);
  EXPECT_NEAR(loss, reference_loss(logits, targets, vocab), 1e-6);
  EXPECT_LT(relative_error(dlogits, want), kTol);
  for (size_t i = 0; i < vocab; ++i) EXPECT_EQ(dlogits[vocab + i], 0.0f) << i;  // ignored row
  // Each counted row's gradient sums to zero (softmax minus a one-hot, scaled).
  for (size_t r : {0, 2, 3}) {
    double s = 0.0;
    for (size_t i = 0; i < vocab; ++i) s += dlogits[r * vocab + i];
    EXPECT_NEAR(s, 0.0, 1e-6) << r;
  }

  double loss_only = -1.0;
  ASSERT_EQ(cross_entropy(logits.data(), targets.data(), rows, vocab, &loss_only, nullptr),
            kernel_status::ok);
  EXPECT_EQ(loss_only, loss);
}

TEST(cross_entropy, hand_computed) {
  // Row 0: [1, 2, 3] -> target 2; row 1 ignored; row 2: [0, 0, 0] -> target 0.
  const std::vector<float> logits{1, 2, 3, 9, 9, 9, 0, 0, 0};
  const std::vector<int32_t> targets{2, -1, 0};
  double loss = 0.0;
  std::vector<float> d(9);
  ASSERT_EQ(cross_entropy(logits.data(), targets.data(), 3, 3, &loss, d.data()), kernel_status::ok);
  const double lse0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  EXPECT_NEAR(loss, ((lse0 - 3.0) + std::log(3.0)) / 2.0, 1e-12);
  EXPECT_NEAR(d[0], std::exp(1.0 - lse0) / 2.0, 1e-7);
  EXPECT_NEAR(d[2], (std::exp(3.0 - lse0) - 1.0) / 2.0, 1e-7);
  EXPECT_NEAR(d[6], (1.0 / 3.0 - 1.0) / 2.0, 1e-7);
  EXPECT_NEAR(d[7], 1.0 / 6.0, 1e-7);
  for (int i = 3; i < 6; ++i) EXPECT_EQ(d[i], 0.0f);

  // Large logits: max-subtracted, so no overflow.
  const std::vector<float> big{1000.0f, 0.0f};
  const int32_t t1 = 1;
  ASSERT_EQ(cross_entropy(big.data(), &t1, 1, 2, &loss, d.data()), kernel_status::ok);
  EXPECT_NEAR(loss, 1000.0, 1e-9);
  EXPECT_NEAR(d[0], 1.0, 1e-7);
  EXPECT_NEAR(d[1], -1.0, 1e-7);
}

TEST(cross_entropy, all_ignored_and_errors) {
  const std::vector<float> logits{1, 2, 3, 4};
  const std::vector<int32_t> ignored{-100, -1};
  double loss = 7.0;
  std::vector<float> d(4, NAN);
  ASSERT_EQ(cross_entropy(logits.data(), ignored.data(), 2, 2, &loss, d.data()), kernel_status::ok);
  EXPECT_EQ(loss, 0.0);
  for (float v : d) EXPECT_EQ(v, 0.0f);

  const std::vector<int32_t> out_of_range{0, 2};
  std::vector<float> untouched(4, 5.0f);
  loss = 7.0;
  EXPECT_EQ(cross_entropy(logits.data(), out_of_range.data(), 2, 2, &loss, untouched.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(loss, 7.0);
  for (float v : untouched) EXPECT_EQ(v, 5.0f);
  EXPECT_EQ(cross_entropy(logits.data(), ignored.data(), 2, 2, nullptr, d.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(cross_entropy(logits.data(), ignored.data(), 2, 0, &loss, d.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(cross_entropy(nullptr, ignored.data(), 2, 2, &loss, d.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(cross_entropy(nullptr, nullptr, 0, 2, &loss, nullptr), kernel_status::ok);
  EXPECT_EQ(loss, 0.0);
}

// ---------------------------------------------------------------------------------------------
// embedding

TEST(embedding_backward, matches_finite_differences_with_repeated_ids) {
  const size_t vocab = 6, dim = 5;
  const std::vector<int32_t> ids{3, 0, 3, 5};
  const size_t rows = ids.size();
  const auto table = random_floats(vocab * dim, 91);
  const auto dout = random_floats(rows * dim, 92);
  const auto want = numeric_gradient(
      [&](const std::vector<float>& t) {
        std::vector<float> y(rows * dim);
        EXPECT_EQ(gather_rows(t.data(), vocab, dim, ids.data(), rows, y.data()), kernel_status::ok);
        return dot(dout, y);
      },
      table);
  const auto dtable0 = random_floats(vocab * dim, 93);
  auto dtable = dtable0;
  ASSERT_EQ(embedding_backward(ids.data(), dout.data(), dtable.data(), rows, vocab, dim),
            kernel_status::ok);
  std::vector<double> want_acc(want.size());
  for (size_t i = 0; i < want.size(); ++i) want_acc[i] = dtable0[i] + want[i];
  EXPECT_LT(relative_error(dtable, want_acc), kTol);
  for (size_t j = 0; j < dim; ++j) {
    EXPECT_FLOAT_EQ(dtable[3 * dim + j], dtable0[3 * dim + j] + dout[j] + dout[2 * dim + j]);
    EXPECT_EQ(dtable[1 * dim + j], dtable0[1 * dim + j]);  // unused row
  }
}

TEST(embedding_backward, bad_id_writes_nothing) {
  const std::vector<int32_t> ids{1, 4};
  const std::vector<float> dout{1, 2, 3, 4};
  std::vector<float> dtable(8, 0.5f);
  EXPECT_EQ(embedding_backward(ids.data(), dout.data(), dtable.data(), 2, 4, 2), kernel_status::unsupported_shape);
  const std::vector<int32_t> negative{1, -1};
  EXPECT_EQ(embedding_backward(negative.data(), dout.data(), dtable.data(), 2, 4, 2),
            kernel_status::unsupported_shape);
  for (float v : dtable) EXPECT_EQ(v, 0.5f);
  EXPECT_EQ(embedding_backward(nullptr, dout.data(), dtable.data(), 2, 4, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(embedding_backward(ids.data(), nullptr, dtable.data(), 2, 4, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(embedding_backward(ids.data(), dout.data(), nullptr, 2, 4, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(embedding_backward(nullptr, nullptr, nullptr, 0, 4, 2), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// rope

// tests/data/tiny-v3/config.json's rope_scaling (the cos/sin factor is 1 there).
rope_params tiny_v3_yarn() {
  rope_params p;
  p.head_dim = 8;
  p.theta = 10000.0;
  p.has_yarn = true;
  p.factor = 40.0;
  p.original_max_pos = 4096.0;
  p.beta_fast = 32.0;
  p.beta_slow = 1.0;
  p.mscale = 1.0;
  p.mscale_all_dim = 1.0;
  return p;
}

// The attention block's q layout: (T, H, dn + dr), rotary part at offset dn of each head.
struct q_layout {
  size_t num_tokens, num_heads, dn, dr;
  size_t size() const { return num_tokens * num_heads * (dn + dr); }
  rope_apply_args args(float* q) const {
    rope_apply_args a;
    a.x = q + dn;
    a.num_tokens = num_tokens;
    a.num_heads = num_heads;
    a.token_stride = num_heads * (dn + dr);
    a.head_stride = dn + dr;
    return a;
  }
};

// Gradient of sum(dout * rope_apply(q)) over the WHOLE q buffer: the nope parts pass through
// unchanged, so their gradient is dout itself, which an in-place rope_backward leaves there.
template <class Position>
void check_rope_backward(const rope_params& p, const q_layout& l,
                         const std::vector<Position>& positions, uint64_t seed) {
  ASSERT_EQ(positions.size(), l.num_tokens);
  ASSERT_EQ(l.dr, p.head_dim);
  const auto q = random_floats(l.size(), seed);
  const auto dout = random_floats(l.size(), seed + 1);
  const auto want = numeric_gradient(
      [&](const std::vector<float>& v) {
        auto y = v;
        EXPECT_EQ(rope_apply(p, l.args(y.data()), positions.data()), kernel_status::ok);
        return dot(dout, y);
      },
      q);
  auto g = dout;
  ASSERT_EQ(rope_backward(p, l.args(g.data()), positions.data()), kernel_status::ok);
  EXPECT_LT(relative_error(g, want), kTol);
  for (size_t t = 0; t < l.num_tokens; ++t)
    for (size_t h = 0; h < l.num_heads; ++h)
      for (size_t i = 0; i < l.dn; ++i) {
        const size_t at = (t * l.num_heads + h) * (l.dn + l.dr) + i;
        EXPECT_EQ(g[at], dout[at]) << "nope part moved at " << at;
      }

  // A linear map's transpose: <rope_apply(x), y> == <x, rope_backward(y)> for any x, y.
  auto ax = q;
  ASSERT_EQ(rope_apply(p, l.args(ax.data()), positions.data()), kernel_status::ok);
  EXPECT_NEAR(dot(ax, dout), dot(q, g), 1e-5 * static_cast<double>(l.size()));
}

TEST(rope_backward, yarn_like_tiny_v3_int64_and_int32) {
  const q_layout l{3, 4, 16, 8};  // tiny-v3: 4 heads, qk_nope 16, qk_rope 8
  check_rope_backward<int64_t>(tiny_v3_yarn(), l, {0, 7, 163000}, 101);
  check_rope_backward<int32_t>(tiny_v3_yarn(), l, {5, 4100, 1}, 111);
}

TEST(rope_backward, yarn_with_attention_factor) {
  rope_params p = tiny_v3_yarn();
  p.mscale = 0.7;  // factor 0.919...: a scaled rotation, so transpose != inverse
  ASSERT_NE(rope_attention_factor(p), 1.0);
  check_rope_backward<int64_t>(p, {3, 2, 4, 8}, {3, 9, 50000}, 121);
  p.mscale_all_dim = 0.0;  // factor mscale(40) > 1
  check_rope_backward<int32_t>(p, {3, 2, 4, 8}, {3, 9, 50000}, 131);
}

TEST(rope_backward, plain_rope) {
  rope_params p;
  p.head_dim = 16;
  p.theta = 10000.0;
  check_rope_backward<int64_t>(p, {3, 3, 5, 16}, {0, 1, 2047}, 141);
  check_rope_backward<int32_t>(p, {3, 1, 0, 16}, {12, 12, 99}, 151);
}

TEST(rope_backward, k_pe_layout) {
  // k_pe inside kv_a_proj's output (T, R + dr): one head, x = ckv + R.
  const size_t tokens = 3, r = 6, dr = 8;
  const auto p = tiny_v3_yarn();
  const std::vector<int64_t> positions{2, 0, 31};
  const auto ckv = random_floats(tokens * (r + dr), 161);
  const auto dout = random_floats(tokens * (r + dr), 162);
  auto args = [&](float* buf) {
    rope_apply_args a;
    a.x = buf + r;
    a.num_tokens = tokens;
    a.token_stride = r + dr;
    return a;
  };
  const auto want = numeric_gradient(
      [&](const std::vector<float>& v) {
        auto y = v;
        EXPECT_EQ(rope_apply(p, args(y.data()), positions.data()), kernel_status::ok);
        return dot(dout, y);
      },
      ckv);
  auto g = dout;
  ASSERT_EQ(rope_backward(p, args(g.data()), positions.data()), kernel_status::ok);
  EXPECT_LT(relative_error(g, want), kTol);
}

TEST(rope_backward, detects_the_wrong_map) {
  // Undoing the forward (its inverse) is not its transpose once cos/sin carry a factor != 1,
  // and shifting the positions by one must fail as well.
  rope_params p = tiny_v3_yarn();
  p.mscale_all_dim = 0.0;
  const q_layout l{3, 2, 4, 8};
  const std::vector<int64_t> positions{1, 2, 3};
  const auto q = random_floats(l.size(), 171);
  const auto dout = random_floats(l.size(), 172);
  const auto want = numeric_gradient(
      [&](const std::vector<float>& v) {
        auto y = v;
        EXPECT_EQ(rope_apply(p, l.args(y.data()), positions.data()), kernel_status::ok);
        return dot(dout, y);
      },
      q);
  const std::vector<int64_t> shifted{2, 3, 4};
  auto g = dout;
  ASSERT_EQ(rope_backward(p, l.args(g.data()), shifted.data()), kernel_status::ok);
  EXPECT_GT(relative_error(g, want), 100 * kTol);

  auto g2 = dout;
  ASSERT_EQ(rope_backward(p, l.args(g2.data()), positions.data()), kernel_status::ok);
  EXPECT_LT(relative_error(g2, want), kTol);  // sanity: the right call passes
  const double factor = rope_attention_factor(p);
  std::vector<float> inverse = g2;  // inverse = transpose / factor^2
  for (size_t t = 0; t < l.num_tokens; ++t)
    for (size_t h = 0; h < l.num_heads; ++h)
      for (size_t i = 0; i < l.dr; ++i) {
        const size_t at = (t * l.num_heads + h) * (l.dn + l.dr) + l.dn + i;
        inverse[at] = static_cast<float>(inverse[at] / (factor * factor));
      }
  EXPECT_GT(relative_error(inverse, want), 100 * kTol);
}

TEST(rope_backward, argument_errors) {
  const q_layout l{2, 2, 4, 8};
  auto q = random_floats(l.size(), 181);
  const auto before = q;
  const auto p = tiny_v3_yarn();
  const std::vector<int64_t> negative{3, -1};
  EXPECT_EQ(rope_backward(p, l.args(q.data()), negative.data()), kernel_status::unsupported_shape);
  const std::vector<int32_t> negative32{-4, 0};
  EXPECT_EQ(rope_backward(p, l.args(q.data()), negative32.data()), kernel_status::unsupported_shape);
  EXPECT_EQ(q, before);  // untouched

  const std::vector<int64_t> positions{0, 1};
  EXPECT_EQ(rope_backward(p, l.args(q.data()), static_cast<const int64_t*>(nullptr)),
            kernel_status::unsupported_shape);
  rope_params odd = p;
  odd.head_dim = 7;
  EXPECT_EQ(rope_backward(odd, l.args(q.data()), positions.data()), kernel_status::unsupported_shape);
  rope_params bad_yarn = p;
  bad_yarn.factor = 0.0;
  EXPECT_EQ(rope_backward(bad_yarn, l.args(q.data()), positions.data()),
            kernel_status::unsupported_shape);
  auto overlapping = l.args(q.data());
  overlapping.head_stride = 4;  // < head_dim
  EXPECT_EQ(rope_backward(p, overlapping, positions.data()), kernel_status::unsupported_shape);
  overlapping = l.args(q.data());
  overlapping.token_stride = 12;  // < (H - 1) * head_stride + head_dim
  EXPECT_EQ(rope_backward(p, overlapping, positions.data()), kernel_status::unsupported_shape);
  rope_apply_args null_x = l.args(q.data());
  null_x.x = nullptr;
  EXPECT_EQ(rope_backward(p, null_x, positions.data()), kernel_status::unsupported_shape);
  EXPECT_EQ(q, before);

  rope_apply_args empty;
  EXPECT_EQ(rope_backward(p, empty, static_cast<const int32_t*>(nullptr)), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// the MoE combine (unpermute) and the dispatch copy (permute_rows)

// 3 tokens, top_k 2, 5 rows (one unused): token 1's second entry is skipped (-1).
struct combine_case {
  size_t num_tokens = 3, top_k = 2, dim = 4, num_rows = 5;
  std::vector<int32_t> positions{2, 0, 3, -1, 1, 4};
};

TEST(unpermute_backward, matches_finite_differences) {
  const combine_case c;
  const auto y = random_floats(c.num_rows * c.dim, 101);
  const auto weight = random_floats(c.num_tokens * c.top_k, 102);
  const auto dout = random_floats(c.num_tokens * c.dim, 103);
  const auto forward = [&](const std::vector<float>& yy, const std::vector<float>& ww) {
    std::vector<float> out(c.num_tokens * c.dim);
    EXPECT_EQ(unpermute(yy.data(), c.num_rows, ww.data(), c.positions.data(), c.num_tokens,
                        c.top_k, c.dim, out.data()),
              kernel_status::ok);
    return dot(dout, out);
  };
  const auto want_dy =
      numeric_gradient([&](const std::vector<float>& yy) { return forward(yy, weight); }, y);
  const auto want_dw =
      numeric_gradient([&](const std::vector<float>& ww) { return forward(y, ww); }, weight);
  std::vector<float> dy(y.size(), 0.0f), dweight(weight.size(), 7.0f);
  ASSERT_EQ(unpermute_backward(y.data(), c.num_rows, weight.data(), c.positions.data(),
                               c.num_tokens, c.top_k, c.dim, dout.data(), dy.data(), dweight.data()),
            kernel_status::ok);
  EXPECT_LT(relative_error(dy, want_dy), kTol);
  EXPECT_LT(relative_error(dweight, want_dw), kTol);
  EXPECT_EQ(dweight[3], 0.0f);  // the skipped entry is written, not left at 7

  // accumulate adds a second contribution to both outputs (the skipped entry stays 0).
  auto dy2 = dy;
  auto dweight2 = dweight;
  ASSERT_EQ(unpermute_backward(y.data(), c.num_rows, weight.data(), c.positions.data(),
                               c.num_tokens, c.top_k, c.dim, dout.data(), dy2.data(),
                               dweight2.data(), /*accumulate=*/true),
            kernel_status::ok);
  for (size_t i = 0; i < dy.size(); ++i) EXPECT_FLOAT_EQ(dy2[i], 2.0f * dy[i]);
  for (size_t i = 0; i < dweight.size(); ++i) EXPECT_FLOAT_EQ(dweight2[i], 2.0f * dweight[i]);
}

TEST(unpermute_backward, unmapped_rows_untouched_and_errors) {
  const size_t num_tokens = 2, top_k = 1, dim = 2, num_rows = 3;
  const std::vector<int32_t> positions{2, 0};
  const std::vector<float> y{1, 2, 3, 4, 5, 6}, dout{1, -1, 2, 0.5f};
  std::vector<float> dy(6, 9.0f), dweight(2, 0.0f);
  ASSERT_EQ(unpermute_backward(y.data(), num_rows, nullptr, positions.data(), num_tokens, top_k,
                               dim, dout.data(), dy.data(), dweight.data()),
            kernel_status::ok);
  EXPECT_EQ(dy, (std::vector<float>{2, 0.5f, 9, 9, 1, -1}));  // weight null: 1
  EXPECT_EQ(dweight, (std::vector<float>{5 - 6, 2 + 1}));
  const std::vector<int32_t> bad{3, 0};
  std::vector<float> untouched(6, 9.0f);
  EXPECT_EQ(unpermute_backward(y.data(), num_rows, nullptr, bad.data(), num_tokens, top_k, dim,
                               dout.data(), untouched.data(), nullptr),
            kernel_status::unsupported_shape);
  EXPECT_EQ(untouched, std::vector<float>(6, 9.0f));
  EXPECT_EQ(unpermute_backward(nullptr, num_rows, nullptr, positions.data(), num_tokens, top_k,
                               dim, dout.data(), nullptr, dweight.data()),
            kernel_status::unsupported_shape);  // dweight needs y
  EXPECT_EQ(unpermute_backward(y.data(), num_rows, nullptr, positions.data(), num_tokens, top_k,
                               dim, nullptr, dy.data(), nullptr),
            kernel_status::unsupported_shape);
}

TEST(permute_rows_backward, matches_finite_differences) {
  const combine_case c;
  const auto x = random_floats(c.num_tokens * c.dim, 111);
  const auto dpermuted = random_floats(c.num_rows * c.dim, 112);
  const auto want = numeric_gradient(
      [&](const std::vector<float>& xx) {
        std::vector<float> permuted(c.num_rows * c.dim, 0.0f);
        EXPECT_EQ(permute_rows(xx.data(), c.num_tokens, c.top_k, c.dim, c.positions.data(),
                               permuted.data(), c.num_rows),
                  kernel_status::ok);
        return dot(dpermuted, permuted);
      },
      x);
  std::vector<float> dx(x.size(), 3.0f);
  ASSERT_EQ(permute_rows_backward(dpermuted.data(), c.num_rows, c.positions.data(), c.num_tokens,
                                  c.top_k, c.dim, dx.data()),
            kernel_status::ok);
  EXPECT_LT(relative_error(dx, want), kTol);
  for (size_t i = 0; i < c.dim; ++i)  // token 1 has one row: an exact copy
    EXPECT_EQ(dx[1 * c.dim + i], dpermuted[3 * c.dim + i]);
  auto dx2 = dx;
  ASSERT_EQ(permute_rows_backward(dpermuted.data(), c.num_rows, c.positions.data(), c.num_tokens,
                                  c.top_k, c.dim, dx2.data(), /*accumulate=*/true),
            kernel_status::ok);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_EQ(dx2[i], 2.0f * dx[i]);
}

TEST(permute_rows_backward, argument_errors) {
  const std::vector<int32_t> bad{0, -2};
  const std::vector<float> dp(4, 1.0f);
  std::vector<float> dx(2, 5.0f);
  EXPECT_EQ(permute_rows_backward(dp.data(), 2, bad.data(), 1, 2, 2, dx.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(dx, std::vector<float>(2, 5.0f));
  const std::vector<int32_t> ok{1, -1};
  EXPECT_EQ(permute_rows_backward(dp.data(), 2, ok.data(), 1, 2, 2, nullptr),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_rows_backward(nullptr, 0, nullptr, 0, 2, 2, nullptr), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
