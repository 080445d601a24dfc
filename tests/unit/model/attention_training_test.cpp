#include "model/attention_training.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "model/attention_block.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"
#include "model/model_errc.hpp"
#include "model/weights.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

using testing::error_of;

const std::filesystem::path tiny_dir = std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3";

// Two packed sequences of lengths 5 and 3.
const std::vector<int32_t> two_seqs = {0, 5, 8};
constexpr size_t num_tokens = 8;

std::vector<float> random_normal(size_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

struct tiny_model {
  model_config config;
  checkpoint ckpt;
};

tiny_model load_tiny() {
  tiny_model m;
  auto c = load_config(tiny_dir);
  EXPECT_TRUE(c) << error_of(c);
  if (!c) return m;
  m.config = *c;
  auto ck = load_checkpoint(tiny_dir, m.config);
  EXPECT_TRUE(ck) << error_of(ck);
  if (ck) m.ckpt = std::move(*ck);
  return m;
}

// tiny-v3's shapes without q compression (q_proj), with random attention weights for `layer`:
// projections uniform as init_model makes them, norm scales around 1 so their gradients matter.
tiny_model random_plain_q(int64_t layer) {
  tiny_model m;
  auto c = load_config(tiny_dir);
  EXPECT_TRUE(c) << error_of(c);
  if (!c) return m;
  m.config = *c;
  m.config.q_lora_rank = std::nullopt;
  m.ckpt.config = m.config;
  std::mt19937_64 rng(1234);
  const float bound = std::sqrt(3.0f) * static_cast<float>(m.config.initializer_range);
  std::uniform_real_distribution<float> proj(-bound, bound), norm(0.8f, 1.2f);
  bool has_q_proj = false;
  for (const auto& w : expected_weights(m.config, false)) {
    if (w.layer != layer) continue;
    if (w.name.find("self_attn.") == std::string::npos && w.name.find("layernorm") == std::string::npos)
      continue;
    has_q_proj = has_q_proj || w.name.find("self_attn.q_proj.") != std::string::npos;
    host_tensor t(w.shape);
    for (auto& x : t.data()) x = w.kind == weight_kind::norm ? norm(rng) : proj(rng);
    m.ckpt.tensors.emplace(w.name, std::move(t));
  }
  EXPECT_TRUE(has_q_proj);
  return m;
}

// ------------------------------------------------------------------------------------------
// 1. The training forward is attention_block::prefill.

TEST(attention_training, forward_matches_prefill_on_tiny_v3) {
  auto m = load_tiny();
  ASSERT_FALSE(m.ckpt.tensors.empty());
  const auto lookup = lookup_in(m.ckpt);
  const size_t D = m.config.hidden_size;
  for (int64_t layer : {0, 1}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    auto train = attention_training_block::bind(m.config, layer, lookup);
    ASSERT_TRUE(train) << error_of(train);
    auto infer = attention_block::bind(m.config, layer, lookup);
    ASSERT_TRUE(infer) << error_of(infer);

    latent_cache cache(m.config.num_hidden_layers, m.config.kv_lora_rank,
                       m.config.qk_rope_head_dim, {.num_blocks = 4, .block_size = 4});
    std::vector<int64_t> positions, slots;
    for (size_t s = 0; s + 1 < two_seqs.size(); ++s) {
      const int64_t len = two_seqs[s + 1] - two_seqs[s];
      ASSERT_FALSE(cache.reserve(s, len));
      for (int64_t p = 0; p < len; ++p) {
        positions.push_back(p);
        slots.push_back(cache.slot(s, p));
      }
    }
    const auto x0 = random_normal(num_tokens * D, 7 + layer);
    auto x_want = x0, x_got = x0;
    std::vector<float> mlp_want(num_tokens * D), mlp_got(num_tokens * D, NAN);
    prefill_layout layout{two_seqs, positions, slots};
    ASSERT_FALSE(infer->prefill(x_want.data(), mlp_want.data(), num_tokens, layout, cache));
    ASSERT_FALSE(train->forward(x_got.data(), mlp_got.data(), num_tokens, two_seqs));

    double max_x = 0, max_mlp = 0, max_change = 0;
    for (size_t i = 0; i < x0.size(); ++i) {
      max_x = std::max(max_x, std::abs(double(x_got[i]) - x_want[i]));
      max_mlp = std::max(max_mlp, std::abs(double(mlp_got[i]) - mlp_want[i]));
      max_change = std::max(max_change, std::abs(double(x_want[i]) - x0[i]));
    }
    EXPECT_LT(max_x, 1e-5);
    EXPECT_LT(max_mlp, 1e-5);
    EXPECT_GT(max_change, 1e-2) << "attention changed nothing: the comparison is vacuous";
  }
}

// ------------------------------------------------------------------------------------------
// 2. backward against central differences of forward.

// L = sum(a * x_out) + sum(b * mlp_in), accumulated in double.
struct objective {
  attention_training_block* block;
  std::vector<float> a, b;

  double operator()(const std::vector<float>& x0) const {
    auto x = x0;
    std::vector<float> mlp_in(x.size());
    EXPECT_FALSE(block->forward(x.data(), mlp_in.data(), num_tokens, two_seqs));
    double l = 0.0;
    for (size_t i = 0; i < x.size(); ++i) l += double(a[i]) * x[i] + double(b[i]) * mlp_in[i];
    return l;
  }
};

// Central differences, Richardson-extrapolated (steps h and h/2), so the step can be large
// enough that float32 rounding in forward stays far below the gradients it measures.
template <class Eval>
double derivative(float& value, float h, Eval&& eval) {
  const float saved = value;
  auto central = [&](float step) {
    // The float steps actually taken, not the nominal ones (the sums round).
    const float up_value = saved + step, down_value = saved - step;
    value = up_value;
    const double up = eval();
    value = down_value;
    const double down = eval();
    value = saved;
    return (up - down) / (double(up_value) - double(down_value));
  };
  const double d1 = central(h), d2 = central(h / 2);
  return (4.0 * d2 - d1) / 3.0;
}

// ||numeric - analytic|| / ||analytic|| over the sampled entries.
double relative_error(const std::vector<double>& numeric, const std::vector<double>& analytic) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < numeric.size(); ++i) {
    diff += (numeric[i] - analytic[i]) * (numeric[i] - analytic[i]);
    ref += analytic[i] * analytic[i];
  }
  return ref > 0 ? std::sqrt(diff / ref) : (diff > 0 ? INFINITY : 0.0);
}

double rms(std::span<const float> v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s / static_cast<double>(v.size()));
}

// The step is relative to the tensor's RMS value. Forward is float32, so the objective carries
// ~1e-6 of rounding noise, which the difference quotient divides by the step: measured errors
// fall as 1/step up to 0.2 (1e-2 gives ~6e-3, 0.2 gives <= 3.3e-4 here), while the Richardson
// truncation error stays below that. A dropped head-sum or rope_backward gives errors > 5e-2.
constexpr double fd_tolerance = 2e-3;
constexpr float fd_step = 0.2f;
constexpr size_t fd_samples = 20;

void check_gradients_by_finite_differences(tiny_model& m, int64_t layer) {
  const auto lookup = lookup_in(m.ckpt);
  auto block = attention_training_block::bind(m.config, layer, lookup);
  ASSERT_TRUE(block) << error_of(block);
  const size_t D = m.config.hidden_size, n = num_tokens * D;
  const objective f{&*block, random_normal(n, 11), random_normal(n, 12)};
  auto x0 = random_normal(n, 13);

  // Analytic: forward once, then backward with dL/dx_out = a, dL/dmlp_in = b.
  auto grads = attention_grads::for_config(m.config);
  grads.input_layernorm.assign(D, 0.5f);  // backward accumulates: start from a known offset
  {
    auto x = x0;
    std::vector<float> mlp_in(n);
    ASSERT_FALSE(block->forward(x.data(), mlp_in.data(), num_tokens, two_seqs));
  }
  std::vector<float> dx_in(n, NAN);
  ASSERT_FALSE(block->backward(f.a.data(), f.b.data(), dx_in.data(), grads));
  for (auto& g : grads.input_layernorm) g -= 0.5f;

  std::mt19937_64 rng(99);
  auto compare = [&](const std::string& what, std::span<float> values, std::span<const float> grad) {
    ASSERT_EQ(values.size(), grad.size()) << what;
    std::uniform_int_distribution<size_t> pick(0, values.size() - 1);
    const auto h = static_cast<float>(fd_step * std::max(rms(values), 1e-3));
    std::vector<double> numeric, analytic;
    for (size_t s = 0; s < fd_samples; ++s) {
      const size_t i = pick(rng);
      numeric.push_back(derivative(values[i], h, [&] { return f(x0); }));
      analytic.push_back(grad[i]);
    }
    const double err = relative_error(numeric, analytic);
    std::vector<double> skewed(analytic);
    for (auto& g : skewed) g *= 1.02;
    std::printf("  %-40s rel err %.2e (|grad| %.3e)\n", what.c_str(), err,
                std::sqrt(std::inner_product(analytic.begin(), analytic.end(), analytic.begin(),
                                             0.0) /
                          fd_samples));
    EXPECT_LT(err, fd_tolerance) << what;
    // The criterion is sharp enough to catch a gradient that is 2% off.
    EXPECT_GT(relative_error(numeric, skewed), fd_tolerance) << what;
  };

  compare("dx_in", x0, dx_in);
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  size_t num_checked = 0;
  grads.for_each([&](std::string_view suffix, std::vector<float>& grad) {
    host_tensor* w = m.ckpt.find(prefix + std::string(suffix));
    ASSERT_NE(w, nullptr) << suffix;
    compare(std::string(suffix), w->data(), grad);
    ++num_checked;
  });
  EXPECT_EQ(num_checked, m.config.q_lora_rank ? 9u : 7u);
}

TEST(attention_training, backward_matches_finite_differences_with_q_compression_and_yarn) {
  auto m = load_tiny();
  ASSERT_FALSE(m.ckpt.tensors.empty());
  ASSERT_TRUE(m.config.q_lora_rank.has_value());
  ASSERT_EQ(m.config.rope.kind, rope_kind::yarn);
  check_gradients_by_finite_differences(m, 0);
}

TEST(attention_training, backward_matches_finite_differences_without_q_compression) {
  auto m = random_plain_q(0);
  ASSERT_FALSE(m.ckpt.tensors.empty());
  check_gradients_by_finite_differences(m, 0);
}

// ------------------------------------------------------------------------------------------
// 3. Bad arguments are errors.

TEST(attention_training, bad_arguments_are_errors) {
  auto m = load_tiny();
  ASSERT_FALSE(m.ckpt.tensors.empty());
  const auto lookup = lookup_in(m.ckpt);
  auto block = attention_training_block::bind(m.config, 0, lookup);
  ASSERT_TRUE(block) << error_of(block);
  const size_t D = m.config.hidden_size, n = num_tokens * D;
  auto x = random_normal(n, 3);
  std::vector<float> mlp_in(n), dx(n), dy(n, 1.0f);
  auto grads = attention_grads::for_config(m.config);
  auto code = [](const caf::error& e) { return static_cast<model_errc>(e.code()); };

  // Backward before any forward.
  auto err = block->backward(dy.data(), dy.data(), dx.data(), grads);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input) << error_text(err);

  const std::vector<std::vector<int32_t>> bad = {
      {}, {0}, {0, 5}, {0, 9}, {1, 8}, {0, 6, 5, 8}, {0, 5, 8, 9}};
  for (const auto& cu : bad) {
    const auto before = x;
    err = block->forward(x.data(), mlp_in.data(), num_tokens, cu);
    ASSERT_TRUE(err) << "cu_seqlens of size " << cu.size();
    EXPECT_EQ(code(err), model_errc::bad_input) << error_text(err);
    EXPECT_EQ(x, before) << "a rejected forward must not touch x";
  }

  // A good forward enables backward; a failed one after it disables it again.
  ASSERT_FALSE(block->forward(x.data(), mlp_in.data(), num_tokens, two_seqs));
  EXPECT_FALSE(block->backward(dy.data(), dy.data(), dx.data(), grads));
  auto wrong = attention_grads::for_config(m.config);
  wrong.kv_b_proj.pop_back();
  err = block->backward(dy.data(), dy.data(), dx.data(), wrong);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input) << error_text(err);
  ASSERT_TRUE(block->forward(x.data(), mlp_in.data(), num_tokens, std::vector<int32_t>{0, 5}));
  err = block->backward(dy.data(), dy.data(), dx.data(), grads);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input) << error_text(err);

  // Gradients for a config without q compression do not fit a block with it.
  auto plain = m.config;
  plain.q_lora_rank = std::nullopt;
  auto other = attention_grads::for_config(plain);
  ASSERT_FALSE(block->forward(x.data(), mlp_in.data(), num_tokens, two_seqs));
  EXPECT_TRUE(block->backward(dy.data(), dy.data(), dx.data(), other));

  // No tokens: nothing to do, and backward has nothing to do either.
  EXPECT_FALSE(block->forward(x.data(), mlp_in.data(), 0, std::vector<int32_t>{0}));
  EXPECT_FALSE(block->backward(dy.data(), dy.data(), dx.data(), grads));

  // Binding a layer the checkpoint does not have names the tensor.
  auto missing = attention_training_block::bind(m.config, 7, lookup);
  ASSERT_FALSE(missing);
  EXPECT_NE(error_of(missing).find("model.layers.7."), std::string::npos) << error_of(missing);
}

}  // namespace
}  // namespace moe::model
