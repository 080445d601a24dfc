// gate_training and expert_training_set on tiny-v3: each half against the inference blocks
// (router_block, expert_set, mlp_block) and its backward against central finite differences;
// argument errors, which must leave state and gradients untouched.
#include "model/moe_training.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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

constexpr int64_t moe_layer = 1;
constexpr size_t num_tokens = 8;

model_errc code(const caf::error& e) {
  return static_cast<model_errc>(e.code());
}

std::string expert_prefix(int64_t e) {
  return "model.layers.1.mlp." + (e == shared_experts_id ? std::string("shared_experts.")
                                                         : "experts." + std::to_string(e) + ".");
}

// --- expert_training_set ------------------------------------------------------------------------

// Rows in a shuffled expert order, each expert of `experts` named at least once and some twice,
// so grouping by expert and returning to row order are both exercised.
std::vector<int32_t> shuffled_rows(std::span<const int64_t> experts, size_t num_rows,
                                   uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> rows;
  for (size_t r = 0; r < num_rows; ++r)
    rows.push_back(static_cast<int32_t>(experts[r % experts.size()]));
  std::shuffle(rows.begin(), rows.end(), rng);
  return rows;
}

TEST(expert_training_set, forward_matches_expert_set_in_row_order) {
  auto m = tiny_model::load();
  const auto lookup = lookup_in(m.ckpt);
  const size_t D = m.hidden();
  const std::vector<int64_t> held = {2, 5, 9, 14};
  auto set = expert_training_set::bind(m.config, moe_layer, held, lookup);
  ASSERT_TRUE(set) << error_of(set);
  EXPECT_EQ(set->intermediate(), m.config.moe_intermediate_size);
  for (int64_t e = 0; e < m.config.n_routed_experts; ++e)
    EXPECT_EQ(set->holds(e), std::ranges::count(held, e) == 1) << e;
  EXPECT_FALSE(set->holds(shared_experts_id));

  auto ref = expert_set::bind(m.config, moe_layer, held, lookup);
  ASSERT_TRUE(ref) << error_of(ref);
  const auto rows = shuffled_rows(held, 11, 1);
  const size_t R = rows.size();
  std::mt19937 rng(2);
  const auto x = random_values(R * D, rng);
  const std::vector<float> ones(R, 1.0f);  // expert_set weights its rows; 1 leaves them as they are
  std::vector<float> want(R * D), out(R * D, NAN);
  ASSERT_FALSE(ref->run(x.data(), R, rows.data(), ones.data(), want.data()));

  expert_pass pass;
  ASSERT_FALSE(set->forward(x.data(), rows, out.data(), pass));
  EXPECT_EQ(out, want);  // the same kernels over the same groups: bit-identical
  EXPECT_EQ(pass.num_rows(), R);
  EXPECT_EQ(pass.expert_of_row, rows);
  // Grouped stably by expert id.
  ASSERT_EQ(pass.order.size(), R);
  for (size_t i = 1; i < R; ++i) {
    const int32_t a = rows[pass.order[i - 1]], b = rows[pass.order[i]];
    EXPECT_TRUE(a < b || (a == b && pass.order[i - 1] < pass.order[i])) << i;
  }

  // No rows: nothing to do, and an empty pass.
  ASSERT_FALSE(set->forward(nullptr, {}, nullptr, pass));
  EXPECT_EQ(pass.num_rows(), 0u);
}

TEST(expert_training_set, bind_shared_matches_the_shared_mlp) {
  auto m = tiny_model::load();
  const auto lookup = lookup_in(m.ckpt);
  const size_t D = m.hidden(), T = num_tokens;
  auto set = expert_training_set::bind_shared(m.config, moe_layer, lookup);
  ASSERT_TRUE(set) << error_of(set);
  EXPECT_TRUE(set->holds(shared_experts_id));
  EXPECT_FALSE(set->holds(0));
  EXPECT_EQ(set->intermediate(), m.config.shared_intermediate_size());
  EXPECT_EQ(set->layer(), moe_layer);

  auto ref = mlp_block::bind(expert_prefix(shared_experts_id), D,
                             m.config.shared_intermediate_size(), lookup);
  ASSERT_TRUE(ref) << error_of(ref);
  std::mt19937 rng(3);
  const auto x = random_values(T * D, rng);
  std::vector<float> want(T * D), out(T * D, NAN);
  mlp_scratch scratch;
  ASSERT_FALSE(ref->forward(x.data(), T, want.data(), 0.0f, scratch));
  const std::vector<int32_t> rows(T, static_cast<int32_t>(shared_experts_id));
  expert_pass pass;
  ASSERT_FALSE(set->forward(x.data(), rows, out.data(), pass));
  EXPECT_EQ(out, want);

  // A routed expert's id is not the shared experts'.
  std::vector<int32_t> bad = rows;
  bad[3] = 0;
  auto err = set->forward(x.data(), bad, out.data(), pass);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);

  // A config without shared experts has none to bind.
  auto no_shared = m.config;
  no_shared.n_shared_experts = 0;
  auto none = expert_training_set::bind_shared(no_shared, moe_layer, lookup);
  ASSERT_FALSE(none);
  EXPECT_EQ(testing::code_of(none), model_errc::bad_input);
}

// L = sum(a * out) of one set's forward against backward() with d_out = a: d_in (in row order)
// and every held expert's weight gradients.
void check_set_backward(tiny_model& m, expert_training_set& set, std::span<const int64_t> held,
                        const std::vector<int32_t>& rows, uint32_t seed) {
  const size_t D = m.hidden(), R = rows.size();
  std::mt19937 rng(seed);
  auto x = random_values(R * D, rng);
  const auto a = random_values(R * D, rng);
  std::vector<float> out(R * D), d_in(R * D, NAN);
  expert_pass pass;
  ASSERT_FALSE(set.forward(x.data(), rows, out.data(), pass));
  std::map<int64_t, mlp_grads> grads;
  for (int64_t e : held) grads[e] = mlp_grads::zeros(m.config.hidden_size, set.intermediate());
  ASSERT_FALSE(set.backward(pass, a.data(), d_in.data(), [&](int64_t e) { return &grads.at(e); }));

  const testing::fd_objective objective = [&] {
    std::vector<float> y(R * D);
    expert_pass p;
    EXPECT_FALSE(set.forward(x.data(), rows, y.data(), p));
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += double(a[i]) * y[i];
    return std::pair{l, true};
  };
  testing::check_finite_differences(x, d_in, objective, rng, "d_in");
  for (int64_t e : held) {
    const std::string p = expert_prefix(e);
    auto& g = grads.at(e);
    testing::check_finite_differences(m.tensor(p + "gate_proj.weight"), g.gate_proj, objective, rng,
                                      p + "gate_proj");
    testing::check_finite_differences(m.tensor(p + "up_proj.weight"), g.up_proj, objective, rng,
                                      p + "up_proj");
    testing::check_finite_differences(m.tensor(p + "down_proj.weight"), g.down_proj, objective, rng,
                                      p + "down_proj");
  }
}

TEST(expert_training_set, backward_matches_finite_differences) {
  auto m = tiny_model::load();
  const auto lookup = lookup_in(m.ckpt);
  {
    SCOPED_TRACE("routed experts");
    const std::vector<int64_t> held = {3, 8, 11};
    auto set = expert_training_set::bind(m.config, moe_layer, held, lookup);
    ASSERT_TRUE(set) << error_of(set);
    check_set_backward(m, *set, held, shuffled_rows(held, 7, 4), 5);
  }
  {
    SCOPED_TRACE("shared experts");
    auto set = expert_training_set::bind_shared(m.config, moe_layer, lookup);
    ASSERT_TRUE(set) << error_of(set);
    const std::vector<int64_t> held = {shared_experts_id};
    check_set_backward(m, *set, held, std::vector<int32_t>(5, shared_experts_id), 6);
  }
}

TEST(expert_training_set, backward_accumulates_weights_and_writes_d_in) {
  auto m = tiny_model::load();
  const size_t D = m.hidden();
  const std::vector<int64_t> held = {0, 7};
  auto set = expert_training_set::bind(m.config, moe_layer, held, lookup_in(m.ckpt));
  ASSERT_TRUE(set) << error_of(set);
  const auto rows = shuffled_rows(held, 5, 7);
  std::mt19937 rng(8);
  const auto x = random_values(rows.size() * D, rng);
  const auto d_out = random_values(rows.size() * D, rng);
  std::vector<float> out(x.size()), d_in(x.size(), NAN), d_in2(x.size(), 123.0f);
  expert_pass pass;
  ASSERT_FALSE(set->forward(x.data(), rows, out.data(), pass));
  std::vector<mlp_grads> once(2, mlp_grads::zeros(m.config.hidden_size, set->intermediate()));
  auto grad_of = [&](std::vector<mlp_grads>& g) {
    return [&g](int64_t e) { return &g[e == 0 ? 0 : 1]; };
  };
  ASSERT_FALSE(set->backward(pass, d_out.data(), d_in.data(), grad_of(once)));
  auto twice = once;
  ASSERT_FALSE(set->backward(pass, d_out.data(), d_in2.data(), grad_of(twice)));
  EXPECT_EQ(d_in, d_in2);  // written, not accumulated
  for (size_t e = 0; e < 2; ++e) {
    EXPECT_TRUE(std::ranges::any_of(once[e].down_proj, [](float f) { return f != 0; }));
    for (size_t i = 0; i < once[e].up_proj.size(); ++i)
      ASSERT_FLOAT_EQ(twice[e].up_proj[i], 2 * once[e].up_proj[i]) << e << " " << i;
  }
}

TEST(expert_training_set, argument_errors) {
  auto m = tiny_model::load();
  const auto lookup = lookup_in(m.ckpt);
  const size_t D = m.hidden();
  const std::vector<int64_t> held = {1, 4};

  for (const std::vector<int64_t>& bad :
       {std::vector<int64_t>{1, 16}, std::vector<int64_t>{-1}, std::vector<int64_t>{4, 4}}) {
    auto set = expert_training_set::bind(m.config, moe_layer, bad, lookup);
    ASSERT_FALSE(set) << bad.back();
    EXPECT_EQ(testing::code_of(set), model_errc::bad_input);
  }
  auto set = expert_training_set::bind(m.config, moe_layer, held, lookup);
  auto all = expert_training_set::bind(m.config, moe_layer, std::vector<int64_t>{1, 4, 6}, lookup);
  ASSERT_TRUE(set && all);

  std::vector<float> x(3 * D, 0.5f), out(3 * D), d_in(3 * D);
  expert_pass pass;
  ASSERT_FALSE(set->forward(x.data(), std::vector<int32_t>{1, 4, 1}, out.data(), pass));
  ASSERT_EQ(pass.num_rows(), 3u);
  // A row naming an expert the set does not hold: refused, and the pass is cleared.
  auto err = set->forward(x.data(), std::vector<int32_t>{1, 6, 4}, out.data(), pass);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_NE(error_text(err).find("not held"), std::string::npos) << error_text(err);
  EXPECT_EQ(pass.num_rows(), 0u);
  EXPECT_TRUE(pass.in.empty());
  err = set->forward(nullptr, std::vector<int32_t>{1}, out.data(), pass);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);

  std::vector<mlp_grads> grads(7, mlp_grads::zeros(m.config.hidden_size, set->intermediate()));
  auto grad_of = [&](int64_t e) { return &grads[e]; };
  auto untouched = [&] {
    return std::ranges::all_of(grads, [](const mlp_grads& g) {
      return std::ranges::all_of(g.down_proj, [](float f) { return f == 0; }) &&
             std::ranges::all_of(g.gate_proj, [](float f) { return f == 0; });
    });
  };
  // A pass naming an expert this set does not hold (filled by another set).
  ASSERT_FALSE(all->forward(x.data(), std::vector<int32_t>{1, 6, 4}, out.data(), pass));
  err = set->backward(pass, out.data(), d_in.data(), grad_of);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_TRUE(untouched());

  ASSERT_FALSE(set->forward(x.data(), std::vector<int32_t>{4, 1, 4}, out.data(), pass));
  err = set->backward(pass, nullptr, d_in.data(), grad_of);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  err = set->backward(pass, out.data(), nullptr, grad_of);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  // A null gradient for one expert, or a misshapen one: nothing is accumulated anywhere.
  err = set->backward(pass, out.data(), d_in.data(),
                      [&](int64_t e) { return e == 4 ? nullptr : &grads[e]; });
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_TRUE(untouched());
  grads[4].up_proj.pop_back();
  err = set->backward(pass, out.data(), d_in.data(), grad_of);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_TRUE(untouched());
  grads[4] = mlp_grads::zeros(m.config.hidden_size, set->intermediate());
  EXPECT_FALSE(set->backward(pass, out.data(), d_in.data(), grad_of));
  EXPECT_FALSE(untouched());

  // The shared experts' pass is not a routed set's, even with matching rows.
  auto shared = expert_training_set::bind_shared(m.config, moe_layer, lookup);
  ASSERT_TRUE(shared) << error_of(shared);
  ASSERT_FALSE(
      shared->forward(x.data(), std::vector<int32_t>(3, shared_experts_id), out.data(), pass));
  err = set->backward(pass, out.data(), d_in.data(), grad_of);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
}

// --- gate_training ------------------------------------------------------------------------------

gate_training bind_gate(tiny_model& m) {
  auto g = gate_training::bind(m.config, moe_layer, lookup_in(m.ckpt));
  EXPECT_TRUE(g) << error_of(g);
  return std::move(*g);
}

TEST(gate_training, choices_equal_router_block) {
  auto m = tiny_model::load();
  const size_t D = m.hidden(), T = num_tokens, E = m.config.n_routed_experts;
  auto gate = bind_gate(m);
  auto router = router_block::bind(m.config, moe_layer, lookup_in(m.ckpt));
  ASSERT_TRUE(router) << error_of(router);
  EXPECT_EQ(gate.top_k(), router->top_k());
  EXPECT_EQ(gate.num_experts(), E);
  EXPECT_EQ(gate.layer(), moe_layer);
  ASSERT_EQ(gate.expert_load().size(), E);

  std::mt19937 rng(9);
  const auto x = random_values(T * D, rng);
  const size_t k = router->top_k();
  std::vector<int32_t> idx(T * k);
  std::vector<float> w(T * k);
  ASSERT_FALSE(router->route(x.data(), T, idx.data(), w.data()));
  for (const double alpha : {0.0, 0.01}) {
    ASSERT_FALSE(gate.forward(x.data(), T, {}, alpha));
    EXPECT_EQ(gate.num_tokens(), T);
    EXPECT_EQ(std::vector<int32_t>(gate.routing().begin(), gate.routing().end()), idx);
    EXPECT_EQ(std::vector<float>(gate.routing_weights().begin(), gate.routing_weights().end()), w);
    std::vector<int64_t> load(E, 0);
    for (int32_t e : idx) ++load[e];
    EXPECT_EQ(std::vector<int64_t>(gate.expert_load().begin(), gate.expert_load().end()), load);
    EXPECT_EQ(gate.balance_loss() > 0.0, alpha > 0.0);
  }
  ASSERT_FALSE(gate.forward(nullptr, 0));
  EXPECT_TRUE(gate.routing().empty());
  EXPECT_TRUE(std::ranges::all_of(gate.expert_load(), [](int64_t n) { return n == 0; }));
}

// L = sum(b * routing_weights) (+ balance_loss()) against backward(d_weight = b): dx and the
// gate weight's gradient. dy_scale 0 leaves the balance loss alone.
void check_gate_backward(tiny_model& m, uint32_t seed, std::vector<int32_t> cu_seqlens,
                         double alpha, float dy_scale = 1.0f) {
  const size_t D = m.hidden(), T = num_tokens;
  auto gate = bind_gate(m);
  auto x = robust_rows(m, moe_layer, T, seed);
  std::mt19937 rng(seed);
  auto b = random_values(T * gate.top_k(), rng);
  for (auto& v : b) v *= dy_scale;
  ASSERT_FALSE(gate.forward(x.data(), T, cu_seqlens, alpha));
  const std::vector<int32_t> routing(gate.routing().begin(), gate.routing().end());
  std::vector<float> dx(T * D, 0.0f), gate_grad(gate.num_experts() * D, 0.0f);
  ASSERT_FALSE(gate.backward(b.data(), dx.data(), gate_grad));

  const testing::fd_objective objective = [&] {
    EXPECT_FALSE(gate.forward(x.data(), T, cu_seqlens, alpha));
    double l = gate.balance_loss();
    for (size_t i = 0; i < b.size(); ++i) l += double(b[i]) * gate.routing_weights()[i];
    return std::pair{l, std::ranges::equal(gate.routing(), routing)};
  };
  testing::check_finite_differences(x, dx, objective, rng, "dx");
  // A smaller step: a gate weight moves its logit by about step * |x|, and routing margins are
  // a few 1e-3.
  testing::check_finite_differences(m.tensor("model.layers.1.mlp.gate.weight"), gate_grad,
                                    objective, rng, "gate.weight", 20, 1e-3f);
}

TEST(gate_training, backward_matches_finite_differences) {
  auto m = tiny_model::load();
  const std::vector<int32_t> two = {0, 3, static_cast<int32_t>(num_tokens)};
  {
    SCOPED_TRACE("routing weights");
    check_gate_backward(m, 21, {}, 0.0);
  }
  {
    SCOPED_TRACE("routing weights + balance loss");
    check_gate_backward(m, 22, two, 0.01);
  }
  {
    SCOPED_TRACE("balance loss alone");
    check_gate_backward(m, 23, two, 0.01, /*dy_scale=*/0.0f);
  }
}

TEST(gate_training, backward_adds_to_dx_and_the_gate_gradient) {
  auto m = tiny_model::load();
  const size_t D = m.hidden(), T = num_tokens;
  auto gate = bind_gate(m);
  std::mt19937 rng(24);
  const auto x = random_values(T * D, rng);
  const auto d_weight = random_values(T * gate.top_k(), rng);
  ASSERT_FALSE(gate.forward(x.data(), T, {}, 0.01));
  std::vector<float> dx(T * D, 0.0f), grad(gate.num_experts() * D, 0.0f);
  ASSERT_FALSE(gate.backward(d_weight.data(), dx.data(), grad));
  std::vector<float> dx2(T * D, 1.0f), grad2 = grad;
  ASSERT_FALSE(gate.backward(d_weight.data(), dx2.data(), grad2));
  for (size_t i = 0; i < dx.size(); ++i) ASSERT_FLOAT_EQ(dx2[i], dx[i] + 1.0f) << i;
  for (size_t i = 0; i < grad.size(); ++i) ASSERT_FLOAT_EQ(grad2[i], 2 * grad[i]) << i;
  EXPECT_TRUE(std::ranges::any_of(grad, [](float f) { return f != 0; }));
}

TEST(gate_training, argument_errors) {
  auto m = tiny_model::load();
  const size_t D = m.hidden(), T = 4;
  auto gate = bind_gate(m);
  std::vector<float> x(T * D, 0.5f), dx(T * D), d_weight(T * gate.top_k(), 1.0f);
  std::vector<float> grad(gate.num_experts() * D);

  auto err = gate.backward(d_weight.data(), dx.data(), grad);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_NE(error_text(err).find("without forward"), std::string::npos) << error_text(err);

  const std::vector<std::vector<int32_t>> bad = {{0}, {0, 3}, {1, 4}, {0, 3, 2, 4}, {0, 5}};
  for (const auto& cu : bad) {
    ASSERT_FALSE(gate.forward(x.data(), T));
    err = gate.forward(x.data(), T, cu, 0.01);
    ASSERT_TRUE(err) << cu.size();
    EXPECT_EQ(code(err), model_errc::bad_input);
    EXPECT_EQ(gate.balance_loss(), 0.0);
    EXPECT_TRUE(gate.backward(d_weight.data(), dx.data(), grad));  // no state kept
  }
  for (const double alpha : {-0.01, double(NAN), double(INFINITY)}) {
    err = gate.forward(x.data(), T, {}, alpha);
    ASSERT_TRUE(err) << alpha;
    EXPECT_EQ(code(err), model_errc::bad_input);
  }
  err = gate.forward(nullptr, T);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);

  const std::vector<int32_t> ok = {0, 0, 4, 4};
  ASSERT_FALSE(gate.forward(x.data(), T, ok, 0.01));
  EXPECT_GT(gate.balance_loss(), 0.0);
  std::vector<float> short_grad(grad.size() - 1);
  err = gate.backward(d_weight.data(), dx.data(), short_grad);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  err = gate.backward(nullptr, dx.data(), grad);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  err = gate.backward(d_weight.data(), nullptr, grad);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_FALSE(gate.backward(d_weight.data(), dx.data(), grad));

  // Binding reports the lookup's error.
  const auto lookup = lookup_in(m.ckpt);
  weight_lookup no_gate = [&](const std::string& name, std::span<const int64_t> shape) {
    if (name.find("gate.weight") != std::string::npos)
      return caf::expected<const float*>(make_error(model_errc::missing_tensor, name));
    return lookup(name, shape);
  };
  auto missing = gate_training::bind(m.config, moe_layer, no_gate);
  ASSERT_FALSE(missing);
  EXPECT_EQ(testing::code_of(missing), model_errc::missing_tensor);
}

}  // namespace
}  // namespace moe::model
