// AdamW, gradient clipping and the learning-rate schedule, against properties that hold
// exactly for torch.optim.AdamW's update (the golden AdamW losses check the whole training step).
#include "model/optimizer.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

using namespace moe;
using namespace moe::model;

namespace {

std::vector<parameter_ref> refs(std::vector<float>& value, const std::vector<float>& grad, const std::string& name = "w") {
  return {parameter_ref{name, value, grad}};
}

}  // namespace

TEST(adamw, the_first_step_moves_each_value_by_lr_times_the_gradients_sign_after_decay) {
  adamw opt;  // betas 0.9 / 0.95, eps 1e-8, weight decay 0.1
  std::vector<float> w = {1.0f, -2.0f, 0.5f, 3.0f};
  const std::vector<float> g = {0.3f, -4.0f, 1e-3f, 0.0f};
  const auto before = w;
  ASSERT_FALSE(opt.step(refs(w, g), 1e-2));
  for (size_t i = 0; i < w.size(); ++i) {
    // m_hat = g and sqrt(v_hat) = |g| after one step; a zero gradient only decays.
    const double decayed = before[i] * (1.0 - 1e-2 * 0.1);
    const double move = g[i] == 0.0f ? 0.0 : 1e-2 * g[i] / (std::abs(g[i]) + 1e-8);
    EXPECT_NEAR(w[i], decayed - move, 1e-7) << i;
  }
  EXPECT_EQ(opt.steps(), 1);
}

TEST(adamw, a_constant_gradient_keeps_moving_by_lr_and_moments_follow_the_betas) {
  adamw_options o;
  o.weight_decay = 0.0;
  adamw opt(o);
  std::vector<float> w = {0.0f};
  const std::vector<float> g = {2.0f};
  for (int t = 1; t <= 3; ++t) {
    ASSERT_FALSE(opt.step(refs(w, g), 0.1));
    // With a constant gradient the bias-corrected moments are g and g^2 at every step.
    EXPECT_NEAR(w[0], -0.1 * t, 1e-6) << t;
    const auto& s = opt.state().at("w");
    EXPECT_NEAR(s.m[0], 2.0 * (1.0 - std::pow(0.9, t)), 1e-12);
    EXPECT_NEAR(s.v[0], 4.0 * (1.0 - std::pow(0.95, t)), 1e-12);
  }
}

TEST(adamw, bad_parameters_are_refused_and_change_nothing) {
  adamw opt;
  std::vector<float> w = {1.0f, 2.0f};
  const std::vector<float> short_grad = {1.0f};
  EXPECT_TRUE(opt.step(refs(w, short_grad), 1e-3));
  std::vector<parameter_ref> twice = {parameter_ref{"w", w, w}, parameter_ref{"w", w, w}};
  EXPECT_TRUE(opt.step(twice, 1e-3));
  EXPECT_EQ(w, (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(opt.steps(), 0);
}

TEST(clip_grad_norm, scales_to_the_max_norm_only_when_above_it) {
  std::vector<float> a = {3.0f}, b = {4.0f};
  std::vector<std::span<float>> grads = {a, b};
  EXPECT_NEAR(clip_grad_norm(grads, 10.0), 5.0, 1e-12);
  EXPECT_EQ(a[0], 3.0f);
  EXPECT_NEAR(clip_grad_norm(grads, 1.0), 5.0, 1e-12);
  EXPECT_NEAR(std::sqrt(a[0] * a[0] + b[0] * b[0]), 1.0, 1e-6);
  std::vector<float> c = {1.0f};
  const std::vector<parameter_ref> p = {parameter_ref{"c", c, c}, parameter_ref{"d", c, c}};
  EXPECT_NEAR(global_grad_norm(p), std::sqrt(2.0), 1e-12);
}

TEST(learning_rate, linear_warmup_then_cosine_to_the_minimum) {
  EXPECT_NEAR(learning_rate_at(0, 1.0, 10, 110, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate_at(9, 1.0, 10, 110, 0.1), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate_at(10, 1.0, 10, 110, 0.1), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate_at(60, 1.0, 10, 110, 0.1), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate_at(110, 1.0, 10, 110, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate_at(500, 1.0, 10, 110, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate_at(5, 2.0, 0, 0), 2.0, 1e-12);
}
