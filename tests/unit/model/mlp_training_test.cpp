// mlp_training_block on tiny-v3: its forward against the inference blocks, its backward against
// central finite differences of a scalar objective, and the gate's non-differentiable parts.
#include "model/mlp_training.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "model/checkpoint.hpp"
#include "model/mlp_block.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"
#include "tests/unit/model/scratch_dir.hpp"
#include "tests/unit/model/tiny_moe_checks.hpp"

namespace moe::model {
namespace {

using testing::error_of;
using testing::random_values;
using testing::robust_rows;
using testing::tiny_model;

constexpr size_t num_tokens = 8;

TEST(mlp_training, forward_matches_the_inference_blocks) {
  auto m = tiny_model::load();
  const auto lookup = lookup_in(m.ckpt);
  const size_t D = m.hidden(), T = num_tokens;
  std::mt19937 rng(7);
  const auto x = random_values(T * D, rng);

  // Layer 0: dense.
  {
    auto block = mlp_training_block::bind(m.config, 0, lookup);
    ASSERT_TRUE(block) << error_of(block);
    EXPECT_FALSE(block->is_moe());
    auto ref = mlp_block::bind("model.layers.0.mlp.", D, m.config.intermediate_size, lookup);
    ASSERT_TRUE(ref) << error_of(ref);
    std::vector<float> y(T * D, NAN), want(T * D);
    mlp_scratch scratch;
    ASSERT_FALSE(ref->forward(x.data(), T, want.data(), 0.0f, scratch));
    ASSERT_FALSE(block->forward(x.data(), y.data(), T));
    for (size_t i = 0; i < T * D; ++i) ASSERT_NEAR(y[i], want[i], 1e-5) << i;
    EXPECT_TRUE(block->routing().empty());
  }

  // Layer 1: MoE, composed as the reference engine composes it.
  {
    const int64_t layer = 1;
    auto block = mlp_training_block::bind(m.config, layer, lookup);
    ASSERT_TRUE(block) << error_of(block);
    EXPECT_TRUE(block->is_moe());
    auto router = router_block::bind(m.config, layer, lookup);
    ASSERT_TRUE(router) << error_of(router);
    std::vector<int64_t> all(m.config.n_routed_experts);
    std::iota(all.begin(), all.end(), 0);
    auto experts = expert_set::bind(m.config, layer, all, lookup);
    ASSERT_TRUE(experts) << error_of(experts);
    auto shared = mlp_block::bind("model.layers.1.mlp.shared_experts.", D,
                                  m.config.shared_intermediate_size(), lookup);
    ASSERT_TRUE(shared) << error_of(shared);

    const size_t k = router->top_k();
    std::vector<int32_t> idx(T * k);
    std::vector<float> w(T * k);
    ASSERT_FALSE(router->route(x.data(), T, idx.data(), w.data()));
    const auto rows = make_expert_rows(idx, w, k);
    std::vector<float> rows_in(rows.size() * D), rows_out(rows.size() * D);
    for (size_t r = 0; r < rows.size(); ++r)
      std::copy_n(x.data() + rows.token_of_row[r] * D, D, rows_in.data() + r * D);
    ASSERT_FALSE(experts->run(rows_in.data(), rows.size(), rows.expert_of_row.data(),
                              rows.weight_of_row.data(), rows_out.data()));
    std::vector<float> shared_out(T * D), want(T * D);
    mlp_scratch scratch;
    ASSERT_FALSE(shared->forward(x.data(), T, shared_out.data(), 0.0f, scratch));
    ASSERT_FALSE(moe_layer_output(rows_out.data(), rows, shared_out.data(), want.data(), T, D));

    std::vector<float> y(T * D, NAN);
    ASSERT_FALSE(block->forward(x.data(), y.data(), T));
    for (size_t i = 0; i < T * D; ++i) ASSERT_NEAR(y[i], want[i], 1e-5) << i;
    EXPECT_EQ(std::vector<int32_t>(block->routing().begin(), block->routing().end()), idx);
    const auto bw = block->routing_weights();
    for (size_t i = 0; i < T * k; ++i) EXPECT_EQ(bw[i], w[i]) << i;
  }
}

// Central differences of L = sum(a * y) against backward(), over ~20 sampled entries of dx and
// of every weight gradient of one layer; perturbations that change the routing are replaced.
// With balance_alpha > 0, L = sum(a * y) + balance_loss() over the sequences cu_seqlens;
// dy_scale scales a (0: the balance loss alone).
class gradient_check {
 public:
  gradient_check(tiny_model& m, int64_t layer, uint32_t seed, std::vector<int32_t> cu_seqlens = {},
                 double balance_alpha = 0.0, float dy_scale = 1.0f)
      : m_(m),
        rng_(seed),
        block_(bind(m, layer)),
        cu_seqlens_(std::move(cu_seqlens)),
        alpha_(balance_alpha) {
    const size_t D = m.hidden(), T = num_tokens;
    x_ = robust_rows(m, layer, T, seed);
    a_ = random_values(T * D, rng_);
    for (auto& v : a_) v *= dy_scale;
    y_.resize(T * D);
    EXPECT_FALSE(block_.forward(x_.data(), y_.data(), T, cu_seqlens_, alpha_));
    routing_.assign(block_.routing().begin(), block_.routing().end());
    grads_ = mlp_half_grads::zeros(m.config, layer);
    dx_.assign(T * D, NAN);
    EXPECT_FALSE(block_.backward(a_.data(), dx_.data(), grads_));
  }

  /// Relative error ||fd - analytic|| / ||analytic|| over `samples` entries of `param`.
  double check(std::span<float> param, std::span<const float> analytic, const std::string& what,
               size_t samples = 20, float step = 1e-2f) {
    return testing::check_finite_differences(
        param, analytic, [this] { return objective(); }, rng_, what, samples, step);
  }

  void check_mlp(const std::string& prefix, mlp_grads& g) {
    check(m_.tensor(prefix + "gate_proj.weight"), g.gate_proj, prefix + "gate_proj");
    check(m_.tensor(prefix + "up_proj.weight"), g.up_proj, prefix + "up_proj");
    check(m_.tensor(prefix + "down_proj.weight"), g.down_proj, prefix + "down_proj");
  }

  std::span<float> x() { return x_; }
  const std::vector<float>& dx() const { return dx_; }
  mlp_half_grads& grads() { return grads_; }
  const std::vector<int32_t>& routing() const { return routing_; }

 private:
  static mlp_training_block bind(tiny_model& m, int64_t layer) {
    auto b = mlp_training_block::bind(m.config, layer, lookup_in(m.ckpt));
    EXPECT_TRUE(b) << error_of(b);
    return std::move(*b);
  }

  // L at the current parameters, and whether the routing is the unperturbed one.
  std::pair<double, bool> objective() {
    std::vector<float> y(y_.size());
    EXPECT_FALSE(block_.forward(x_.data(), y.data(), num_tokens, cu_seqlens_, alpha_));
    double l = block_.balance_loss();
    for (size_t i = 0; i < y.size(); ++i) l += double(a_[i]) * y[i];
    return {l, std::ranges::equal(block_.routing(), routing_)};
  }

  tiny_model& m_;
  std::mt19937 rng_;
  mlp_training_block block_;
  std::vector<int32_t> cu_seqlens_;
  double alpha_;
  std::vector<float> x_, a_, y_, dx_;
  std::vector<int32_t> routing_;
  mlp_half_grads grads_;
};

TEST(mlp_training, dense_backward_matches_finite_differences) {
  auto m = tiny_model::load();
  gradient_check g(m, 0, 11);
  g.check(g.x(), g.dx(), "dx");
  g.check_mlp("model.layers.0.mlp.", g.grads().dense);
}

TEST(mlp_training, moe_backward_matches_finite_differences) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  gradient_check g(m, layer, 12);
  g.check(g.x(), g.dx(), "dx");
  // A smaller step: a gate weight moves its logit by about step * |x|, and routing margins are
  // a few 1e-3.
  g.check(m.tensor("model.layers.1.mlp.gate.weight"), g.grads().gate, "gate.weight", 20, 1e-3f);
  g.check_mlp("model.layers.1.mlp.shared_experts.", g.grads().shared);

  // The two experts with the most rows, and one with a single row when there is one.
  std::vector<int> rows_of(m.config.n_routed_experts, 0);
  for (int32_t e : g.routing()) ++rows_of[e];
  std::vector<int> by_rows(rows_of.size());
  std::iota(by_rows.begin(), by_rows.end(), 0);
  std::stable_sort(by_rows.begin(), by_rows.end(),
                   [&](int a, int b) { return rows_of[a] > rows_of[b]; });
  std::vector<int> checked = {by_rows[0], by_rows[1]};
  if (auto one = std::ranges::find(rows_of, 1); one != rows_of.end())
    checked.push_back(static_cast<int>(one - rows_of.begin()));
  for (int e : checked) {
    ASSERT_GT(rows_of[e], 0);
    g.check_mlp("model.layers.1.mlp.experts." + std::to_string(e) + ".", g.grads().experts[e]);
  }
  // Experts without rows get exactly nothing.
  for (size_t e = 0; e < rows_of.size(); ++e) {
    if (rows_of[e] != 0) continue;
    const auto& ge = g.grads().experts[e];
    for (const auto* v : {&ge.gate_proj, &ge.up_proj, &ge.down_proj})
      EXPECT_TRUE(std::ranges::all_of(*v, [](float f) { return f == 0.0f; })) << "expert " << e;
  }
}

TEST(mlp_training, correction_bias_changes_the_choice_but_not_the_output) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const size_t D = m.hidden(), T = num_tokens;
  auto block = mlp_training_block::bind(m.config, layer, lookup_in(m.ckpt));
  ASSERT_TRUE(block) << error_of(block);
  const auto x = robust_rows(m, layer, T, 21);
  std::vector<float> y(T * D), y2(T * D);
  ASSERT_FALSE(block->forward(x.data(), y.data(), T));
  const std::vector<int32_t> routing(block->routing().begin(), block->routing().end());

  auto bias = m.tensor("model.layers.1.mlp.gate.e_score_correction_bias");
  const std::vector<float> saved(bias.begin(), bias.end());
  // A small shift of every bias that keeps every choice leaves y bit-identical: the weights use
  // the unbiased scores, so dL/dbias is 0 wherever it exists.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> tiny(-1e-4f, 1e-4f);
  for (auto& b : bias) b += tiny(rng);
  ASSERT_FALSE(block->forward(x.data(), y2.data(), T));
  ASSERT_TRUE(std::ranges::equal(block->routing(), routing));
  EXPECT_EQ(y, y2);

  // A large bias on an expert token 0 did not choose makes every token choose it.
  const size_t k = block->top_k();
  int32_t boosted = 0;
  while (std::find(routing.begin(), routing.begin() + k, boosted) != routing.begin() + k) ++boosted;
  std::ranges::copy(saved, bias.begin());
  bias[boosted] += 10.0f;
  ASSERT_FALSE(block->forward(x.data(), y2.data(), T));
  for (size_t t = 0; t < T; ++t)
    EXPECT_EQ(block->routing()[t * k], boosted) << "token " << t;
  EXPECT_NE(y, y2);
  std::ranges::copy(saved, bias.begin());
}

TEST(mlp_training, gradients_accumulate_and_skip_unrouted_experts) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const size_t D = m.hidden();
  auto block = mlp_training_block::bind(m.config, layer, lookup_in(m.ckpt));
  ASSERT_TRUE(block) << error_of(block);
  const auto x = robust_rows(m, layer, 1, 31);  // one token: top_k experts receive rows
  std::vector<float> y(D), dx(D), dx2(D);
  std::mt19937 rng(4);
  const auto dy = random_values(D, rng);
  ASSERT_FALSE(block->forward(x.data(), y.data(), 1));
  auto once = mlp_half_grads::zeros(m.config, layer);
  ASSERT_FALSE(block->backward(dy.data(), dx.data(), once));
  auto twice = once;
  ASSERT_FALSE(block->backward(dy.data(), dx2.data(), twice));
  EXPECT_EQ(dx, dx2);  // written, not accumulated
  for (size_t i = 0; i < once.gate.size(); ++i) EXPECT_FLOAT_EQ(twice.gate[i], 2 * once.gate[i]);

  const std::set<int32_t> chosen(block->routing().begin(), block->routing().end());
  EXPECT_EQ(chosen.size(), block->top_k());
  for (size_t e = 0; e < once.experts.size(); ++e) {
    const bool any = std::ranges::any_of(once.experts[e].down_proj, [](float f) { return f != 0; });
    EXPECT_EQ(any, chosen.count(static_cast<int32_t>(e)) == 1) << "expert " << e;
  }
  // Only the chosen experts' gate rows get a gradient.
  for (size_t e = 0; e < once.experts.size(); ++e) {
    const bool any = std::any_of(once.gate.begin() + e * D, once.gate.begin() + (e + 1) * D,
                                 [](float f) { return f != 0; });
    EXPECT_EQ(any, chosen.count(static_cast<int32_t>(e)) == 1) << "gate row " << e;
  }

  once.zero();
  EXPECT_TRUE(std::ranges::all_of(once.gate, [](float f) { return f == 0; }));
  EXPECT_EQ(once.gate.size(), twice.gate.size());
}

TEST(mlp_training, argument_errors) {
  auto m = tiny_model::load();
  const size_t D = m.hidden();
  const auto lookup = lookup_in(m.ckpt);
  auto dense = mlp_training_block::bind(m.config, 0, lookup);
  auto moe = mlp_training_block::bind(m.config, 1, lookup);
  ASSERT_TRUE(dense && moe);
  std::vector<float> x(D, 0.5f), y(D), dx(D);
  auto moe_grads = mlp_half_grads::zeros(m.config, 1);
  auto dense_grads = mlp_half_grads::zeros(m.config, 0);

  auto code = [](const caf::error& e) { return static_cast<model_errc>(e.code()); };
  auto err = moe->backward(y.data(), dx.data(), moe_grads);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_NE(error_text(err).find("without forward"), std::string::npos) << error_text(err);

  err = moe->forward(nullptr, y.data(), 1);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_TRUE(moe->backward(y.data(), dx.data(), moe_grads));  // the failed forward left none

  ASSERT_FALSE(moe->forward(x.data(), y.data(), 1));
  err = moe->backward(y.data(), dx.data(), dense_grads);  // shaped for the wrong layer
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  err = moe->backward(nullptr, dx.data(), moe_grads);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_FALSE(moe->backward(y.data(), dx.data(), moe_grads));

  ASSERT_FALSE(dense->forward(x.data(), y.data(), 1));
  EXPECT_TRUE(dense->backward(y.data(), dx.data(), moe_grads));
  EXPECT_FALSE(dense->backward(y.data(), dx.data(), dense_grads));

  // Binding reports the lookup's error for a missing tensor.
  weight_lookup no_shared = [&](const std::string& name, std::span<const int64_t> shape) {
    if (name.find("shared_experts") != std::string::npos)
      return caf::expected<const float*>(make_error(model_errc::missing_tensor, name));
    return lookup(name, shape);
  };
  auto missing = mlp_training_block::bind(m.config, 1, no_shared);
  ASSERT_FALSE(missing);
  EXPECT_EQ(testing::code_of(missing), model_errc::missing_tensor);
}

// --- DeepSeek-V3's complementary sequence-wise balance loss ---------------------------------

// The balance loss written out from the report's eqs. 17-20, in double: per sequence,
// alpha * sum_i f_i P_i, then the mean over the non-empty sequences.
double direct_balance_loss(tiny_model& m, int64_t layer, const std::vector<float>& x,
                           std::span<const int32_t> routing, std::vector<int32_t> cu_seqlens,
                           double alpha) {
  const auto& c = m.config;
  const auto w = m.tensor("model.layers." + std::to_string(layer) + ".mlp.gate.weight");
  const size_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = m.hidden();
  double total = 0;
  int num_seqs = 0;
  for (size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const size_t begin = cu_seqlens[s], end = cu_seqlens[s + 1], T = end - begin;
    if (T == 0) continue;
    ++num_seqs;
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (size_t t = begin; t < end; ++t) {
      for (size_t j = 0; j < K; ++j) f[routing[t * K + j]] += double(E) / double(K * T);
      std::vector<double> score(E);
      double sum = 0;
      for (size_t e = 0; e < E; ++e) {
        double logit = 0;
        for (size_t d = 0; d < D; ++d) logit += double(x[t * D + d]) * double(w[e * D + d]);
        score[e] = 1.0 / (1.0 + std::exp(-logit));
        sum += score[e];
      }
      for (size_t e = 0; e < E; ++e) P[e] += score[e] / sum / double(T);
    }
    double l = 0;
    for (size_t e = 0; e < E; ++e) l += f[e] * P[e];
    total += alpha * l;
  }
  return num_seqs ? total / num_seqs : 0.0;
}

TEST(mlp_training, balance_loss_matches_a_direct_computation) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const size_t D = m.hidden(), T = num_tokens;
  auto block = mlp_training_block::bind(m.config, layer, lookup_in(m.ckpt));
  ASSERT_TRUE(block) << error_of(block);
  std::mt19937 rng(41);
  const auto x = random_values(T * D, rng);
  std::vector<float> y0(T * D), y(T * D);
  ASSERT_FALSE(block->forward(x.data(), y0.data(), T));
  EXPECT_EQ(block->balance_loss(), 0.0);
  const std::vector<int32_t> routing(block->routing().begin(), block->routing().end());

  const double alpha = 0.01;
  const std::vector<int32_t> two = {0, 3, 8};
  ASSERT_FALSE(block->forward(x.data(), y.data(), T, two, alpha));
  EXPECT_EQ(y, y0);  // the balance loss changes neither the routing nor the output
  ASSERT_TRUE(std::ranges::equal(block->routing(), routing));
  const double want = direct_balance_loss(m, layer, x, routing, two, alpha);
  EXPECT_GT(want, 0.0);
  EXPECT_NEAR(block->balance_loss(), want, 1e-12 * want);
  // Perfect balance gives alpha (f_i = 1, sum_i P_i = 1); this random batch is not balanced.
  EXPECT_NE(block->balance_loss(), alpha);

  // The mean over sequences, not the sum: an empty sequence does not count.
  const std::vector<int32_t> with_empty = {0, 3, 3, 8};
  ASSERT_FALSE(block->forward(x.data(), y.data(), T, with_empty, alpha));
  EXPECT_NEAR(block->balance_loss(), want, 1e-12 * want);

  // No cu_seqlens: one sequence of all T tokens, which is a different loss.
  const std::vector<int32_t> one = {0, static_cast<int32_t>(T)};
  const double want_one = direct_balance_loss(m, layer, x, routing, one, alpha);
  ASSERT_FALSE(block->forward(x.data(), y.data(), T, {}, alpha));
  EXPECT_NEAR(block->balance_loss(), want_one, 1e-12 * want_one);
  EXPECT_GT(std::abs(want_one - want), 1e-6 * want);

  // Linear in alpha; 0 again for alpha 0 and for a dense layer.
  ASSERT_FALSE(block->forward(x.data(), y.data(), T, two, 3 * alpha));
  EXPECT_NEAR(block->balance_loss(), 3 * want, 3e-12 * want);
  ASSERT_FALSE(block->forward(x.data(), y.data(), T, two, 0.0));
  EXPECT_EQ(block->balance_loss(), 0.0);
  auto dense = mlp_training_block::bind(m.config, 0, lookup_in(m.ckpt));
  ASSERT_TRUE(dense) << error_of(dense);
  ASSERT_FALSE(dense->forward(x.data(), y.data(), T, two, alpha));
  EXPECT_EQ(dense->balance_loss(), 0.0);
}

TEST(mlp_training, balance_backward_matches_finite_differences) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const std::vector<int32_t> two = {0, 3, static_cast<int32_t>(num_tokens)};
  const double alpha = 0.01;
  {
    SCOPED_TRACE("sum(a * y) + balance loss");
    gradient_check g(m, layer, 12, two, alpha);
    g.check(g.x(), g.dx(), "dx");
    g.check(m.tensor("model.layers.1.mlp.gate.weight"), g.grads().gate, "gate.weight", 20, 1e-3f);
  }
  {
    // The balance loss alone, whose gradient the term above could hide: it is small next to
    // sum(a * y)'s, but computed in double, so its differences are exact enough to check.
    SCOPED_TRACE("balance loss alone");
    gradient_check g(m, layer, 13, two, alpha, /*dy_scale=*/0.0f);
    g.check(g.x(), g.dx(), "dx");
    g.check(m.tensor("model.layers.1.mlp.gate.weight"), g.grads().gate, "gate.weight", 20, 1e-3f);
    // Every expert's gate row gets a gradient (P_i sums over all experts' scores).
    const size_t D = m.hidden();
    for (size_t e = 0; e < static_cast<size_t>(m.config.n_routed_experts); ++e) {
      EXPECT_TRUE(std::any_of(g.grads().gate.begin() + e * D, g.grads().gate.begin() + (e + 1) * D,
                              [](float f) { return f != 0; }))
          << "gate row " << e;
    }
  }
}

TEST(mlp_training, balance_alpha_zero_leaves_gradients_unchanged) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const size_t D = m.hidden(), T = num_tokens;
  auto block = mlp_training_block::bind(m.config, layer, lookup_in(m.ckpt));
  ASSERT_TRUE(block) << error_of(block);
  const auto x = robust_rows(m, layer, T, 51);
  std::mt19937 rng(5);
  const auto dy = random_values(T * D, rng);
  const std::vector<int32_t> two = {0, 5, 8};
  std::vector<float> y(T * D);

  auto run = [&](std::span<const int32_t> cu, double alpha, std::vector<float>& dx,
                 mlp_half_grads& g) {
    dx.assign(T * D, NAN);
    g = mlp_half_grads::zeros(m.config, layer);
    ASSERT_FALSE(block->forward(x.data(), y.data(), T, cu, alpha));
    ASSERT_FALSE(block->backward(dy.data(), dx.data(), g));
  };
  std::vector<float> dx_plain, dx_zero, dx_bal;
  mlp_half_grads plain, zero, bal;
  run({}, 0.0, dx_plain, plain);
  run(two, 0.0, dx_zero, zero);
  EXPECT_EQ(dx_zero, dx_plain);
  EXPECT_EQ(zero.gate, plain.gate);
  for (size_t e = 0; e < plain.experts.size(); ++e)
    EXPECT_EQ(zero.experts[e].down_proj, plain.experts[e].down_proj) << "expert " << e;
  EXPECT_EQ(zero.shared.gate_proj, plain.shared.gate_proj);

  // alpha > 0 changes only the gate path: the gate gradient and dx, not the experts'.
  run(two, 0.01, dx_bal, bal);
  EXPECT_NE(bal.gate, plain.gate);
  EXPECT_NE(dx_bal, dx_plain);
  for (size_t e = 0; e < plain.experts.size(); ++e) {
    EXPECT_EQ(bal.experts[e].gate_proj, plain.experts[e].gate_proj) << "expert " << e;
    EXPECT_EQ(bal.experts[e].down_proj, plain.experts[e].down_proj) << "expert " << e;
  }
  EXPECT_EQ(bal.shared.up_proj, plain.shared.up_proj);
}

TEST(mlp_training, expert_load_counts_the_choices) {
  auto m = tiny_model::load();
  const int64_t layer = 1;
  const size_t D = m.hidden(), T = num_tokens, E = m.config.n_routed_experts;
  const auto lookup = lookup_in(m.ckpt);
  auto block = mlp_training_block::bind(m.config, layer, lookup);
  ASSERT_TRUE(block) << error_of(block);
  ASSERT_EQ(block->expert_load().size(), E);
  EXPECT_TRUE(std::ranges::all_of(block->expert_load(), [](int64_t n) { return n == 0; }));

  std::mt19937 rng(61);
  const auto x = random_values(T * D, rng);
  std::vector<float> y(T * D);
  for (const double alpha : {0.0, 0.01}) {
    ASSERT_FALSE(block->forward(x.data(), y.data(), T, {}, alpha));
    const auto load = block->expert_load();
    ASSERT_EQ(load.size(), E);
    EXPECT_EQ(std::accumulate(load.begin(), load.end(), int64_t{0}),
              static_cast<int64_t>(T * block->top_k()));
    std::vector<int64_t> want(E, 0);
    for (int32_t e : block->routing()) ++want[e];
    EXPECT_EQ(std::vector<int64_t>(load.begin(), load.end()), want);
    EXPECT_GT(std::ranges::count_if(load, [](int64_t n) { return n > 0; }),
              static_cast<long>(block->top_k()));  // 8 tokens spread over several experts
  }
  // The next forward replaces the counts, not adds to them.
  ASSERT_FALSE(block->forward(x.data(), y.data(), 1));
  EXPECT_EQ(std::accumulate(block->expert_load().begin(), block->expert_load().end(), int64_t{0}),
            static_cast<int64_t>(block->top_k()));
  ASSERT_FALSE(block->forward(x.data(), y.data(), 0));
  EXPECT_TRUE(std::ranges::all_of(block->expert_load(), [](int64_t n) { return n == 0; }));

  auto dense = mlp_training_block::bind(m.config, 0, lookup);
  ASSERT_TRUE(dense) << error_of(dense);
  ASSERT_FALSE(dense->forward(x.data(), y.data(), T));
  EXPECT_TRUE(dense->expert_load().empty());
}

TEST(mlp_training, balance_argument_errors) {
  auto m = tiny_model::load();
  const size_t D = m.hidden(), T = 4;
  auto moe = mlp_training_block::bind(m.config, 1, lookup_in(m.ckpt));
  ASSERT_TRUE(moe) << error_of(moe);
  std::vector<float> x(T * D, 0.5f), y(T * D), dx(T * D);
  auto grads = mlp_half_grads::zeros(m.config, 1);
  auto code = [](const caf::error& e) { return static_cast<model_errc>(e.code()); };

  const std::vector<std::vector<int32_t>> bad = {{0}, {0, 3}, {1, 4}, {0, 3, 2, 4}, {0, 5}};
  for (const auto& cu : bad) {
    ASSERT_FALSE(moe->forward(x.data(), y.data(), T));
    auto err = moe->forward(x.data(), y.data(), T, cu, 0.01);
    ASSERT_TRUE(err) << cu.size();
    EXPECT_EQ(code(err), model_errc::bad_input);
    EXPECT_TRUE(moe->backward(y.data(), dx.data(), grads));  // no state kept
  }
  for (const double alpha : {-0.01, double(NAN), double(INFINITY)}) {
    auto err = moe->forward(x.data(), y.data(), T, {}, alpha);
    ASSERT_TRUE(err) << alpha;
    EXPECT_EQ(code(err), model_errc::bad_input);
  }
  const std::vector<int32_t> ok = {0, 0, 4, 4};
  EXPECT_FALSE(moe->forward(x.data(), y.data(), T, ok, 0.01));
  EXPECT_GT(moe->balance_loss(), 0.0);
  EXPECT_FALSE(moe->backward(y.data(), dx.data(), grads));
}

}  // namespace
}  // namespace moe::model
