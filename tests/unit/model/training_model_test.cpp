// The whole model's training step against transformers on tiny-v3: the mean next-token loss, the
// gradient of every parameter (grads.safetensors, within 1e-4 relative per tensor), and the losses
// before each of 4 AdamW steps (golden.json, within 1e-4).
#include "model/training_model.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>

#include "model/checkpoint.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/model/tiny_training_data.hpp"

using namespace moe;
using namespace moe::model;
using moe::model::testing::golden_batch;
using moe::model::testing::load_tiny;
using moe::model::testing::tiny_dir;

namespace {

nlohmann::json golden_json() {
  std::ifstream in(tiny_dir() / "golden.json");
  return nlohmann::json::parse(in);
}

double relative_error(std::span<const float> got, const std::vector<float>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

}  // namespace

TEST(training_model, loss_and_every_gradient_match_transformers) {
  auto weights = load_tiny();
  auto m = training_model::bind(weights);
  ASSERT_TRUE(m) << error_text(m.error());
  auto loss = m->forward_backward(golden_batch());
  ASSERT_TRUE(loss) << error_text(loss.error());
  EXPECT_NEAR(*loss, golden_json()["loss"].get<double>(), 1e-4);
  const auto grads = moe::testing::golden_file::open(tiny_dir() / "grads.safetensors");
  const auto params = m->parameters();
  size_t checked = 0;
  for (const auto& p : params) {
    const auto want = grads.floats(p.name);
    ASSERT_EQ(want.size(), p.grad.size()) << p.name;
    EXPECT_LE(relative_error(p.grad, want), 1e-4) << p.name;
    ++checked;
  }
  // Every parameter transformers has a gradient for (137 tensors for tiny-v3).
  EXPECT_EQ(checked, 137u);
}

TEST(training_model, four_adamw_steps_give_the_golden_losses) {
  const auto golden = golden_json()["adamw"];
  auto weights = load_tiny();
  auto m = training_model::bind(weights);
  ASSERT_TRUE(m) << error_text(m.error());
  adamw_options o;
  o.beta1 = golden["betas"][0].get<double>();
  o.beta2 = golden["betas"][1].get<double>();
  o.eps = golden["eps"].get<double>();
  o.weight_decay = golden["weight_decay"].get<double>();
  adamw opt(o);
  const auto batch = golden_batch();
  for (size_t step = 0; step < golden["losses_before_each_step"].size(); ++step) {
    m->zero_grads();
    auto loss = m->forward_backward(batch);
    ASSERT_TRUE(loss) << error_text(loss.error());
    EXPECT_NEAR(*loss, golden["losses_before_each_step"][step].get<double>(), 1e-4) << "step " << step;
    ASSERT_FALSE(opt.step(m->parameters(), golden["lr"].get<double>()));
  }
}

TEST(training_model, the_balance_loss_adds_to_the_gate_gradients_only) {
  auto plain = training_model::bind(load_tiny());
  auto balanced = training_model::bind(load_tiny());
  ASSERT_TRUE(plain && balanced);
  auto ce = plain->forward_backward(golden_batch());
  auto ce2 = balanced->forward_backward(golden_batch(), 0.01);
  ASSERT_TRUE(ce && ce2);
  // The cross-entropy is the same; the balance loss (two MoE layers) comes on top.
  EXPECT_EQ(*ce, *ce2);
  EXPECT_EQ(plain->balance_loss(), 0.0);
  EXPECT_GT(balanced->balance_loss(), 0.0);
  const auto a = plain->parameters(), b = balanced->parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const bool same = std::equal(a[i].grad.begin(), a[i].grad.end(), b[i].grad.begin());
    // The balance loss reaches the gates, and through the inputs of the MoE layers everything
    // upstream of them; the last layer's experts and the head see none of it.
    if (a[i].name.find("layers.1.mlp.gate.weight") != std::string::npos ||
        a[i].name.find("layers.2.mlp.gate.weight") != std::string::npos) {
      EXPECT_FALSE(same) << a[i].name;
    }
    if (a[i].name == "lm_head.weight" || a[i].name.find("layers.2.mlp.experts.") != std::string::npos) {
      EXPECT_TRUE(same) << a[i].name;
    }
  }
}

TEST(training_model, multi_token_prediction_gradients_match_finite_differences) {
  auto weights = load_tiny();
  weights->config.num_nextn_predict_layers = 1;
  ASSERT_FALSE(add_random_mtp_weights(*weights, 1, 7));
  training_options o;
  o.mtp_depth = 1;
  o.mtp_weight = 0.3;
  auto m = training_model::bind(weights, o);
  ASSERT_TRUE(m) << error_text(m.error());
  const auto batch = golden_batch();
  auto total = [&]() {
    m->zero_grads();
    auto ce = m->forward_backward(batch);
    EXPECT_TRUE(ce);
    return *ce + m->mtp_loss();
  };
  const double base = total();
  EXPECT_GT(m->mtp_loss(), 0.0);
  EXPECT_NEAR(base - m->mtp_loss(), golden_json()["loss"].get<double>(), 1e-4);  // the main loss is untouched
  // Gradients of the MTP module, and of the shared embedding and head and the main model that
  // the MTP loss reaches through them, against central differences of the total loss.
  std::map<std::string, std::vector<float>> grads;
  for (const auto& p : m->parameters()) grads[p.name].assign(p.grad.begin(), p.grad.end());
  // The main model is reached only through the MTP module's input, so its gradients are small
  // (element 123 of o_proj had 0.004, where a step of 1% of its weight moved the float32 loss by
  // about one ulp: the check passed or failed with the BLAS's summation order). Its probe is the
  // element with the largest gradient, where the difference is well above the rounding.
  auto largest = [](const std::vector<float>& g) {
    return static_cast<size_t>(std::max_element(g.begin(), g.end(), [](float a, float b) {
                                 return std::abs(a) < std::abs(b);
                               }) - g.begin());
  };
  const std::pair<std::string, size_t> probes[] = {
      {"model.layers.3.eh_proj.weight", 5},      {"model.layers.3.enorm.weight", 3},
      {"model.layers.3.hnorm.weight", 9},        {"model.layers.3.shared_head.norm.weight", 1},
      {"model.layers.3.self_attn.o_proj.weight", 77}, {"lm_head.weight", 64 * 7 + 3},
      {"model.embed_tokens.weight", 64 * static_cast<size_t>(batch[0][5]) + 2},
      {"model.layers.2.self_attn.o_proj.weight", largest(grads.at("model.layers.2.self_attn.o_proj.weight"))}};
  for (const auto& [name, index] : probes) {
    host_tensor* t = weights->find(name);
    ASSERT_NE(t, nullptr) << name;
    float& w = t->data()[index];
    const float saved = w;
    const double ours = grads.at(name)[index];
    const double h = 1e-2 * std::max(1e-2, static_cast<double>(std::abs(saved)));
    w = static_cast<float>(saved + h);
    const double up = total();
    w = static_cast<float>(saved - h);
    const double down = total();
    w = saved;
    const double fd = (up - down) / (2 * h);
    // The loss is a float32 sum: each evaluation is good to about an ulp of it.
    const double noise = 2 * std::ldexp(1.0, std::ilogb(base) - 23) / (2 * h);
    EXPECT_NEAR(ours, fd, 2e-2 * std::abs(fd) + 1e-5 + noise) << name << "[" << index << "]";
  }
}

TEST(training_model, micro_batches_accumulate_to_the_full_batch_gradient) {
  auto whole = training_model::bind(load_tiny());
  auto parts = training_model::bind(load_tiny());
  ASSERT_TRUE(whole && parts);
  const auto batch = golden_batch();
  auto loss = whole->forward_backward(batch);
  ASSERT_TRUE(loss);
  // One sequence per micro-batch, each weighted by its share of the predicted positions.
  const double total = static_cast<double>(training_model::predicted_positions(batch));
  double accumulated = 0;
  for (const auto& row : batch) {
    const std::vector<std::vector<int32_t>> micro = {row};
    const double share = static_cast<double>(training_model::predicted_positions(micro)) / total;
    auto part = parts->forward_backward(micro, 0.0, share);
    ASSERT_TRUE(part);
    accumulated += share * *part;
  }
  EXPECT_NEAR(accumulated, *loss, 1e-6);
  const auto a = whole->parameters(), b = parts->parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    double diff = 0, norm = 0;
    for (size_t j = 0; j < a[i].grad.size(); ++j) {
      diff += (static_cast<double>(a[i].grad[j]) - b[i].grad[j]) * (static_cast<double>(a[i].grad[j]) - b[i].grad[j]);
      norm += static_cast<double>(a[i].grad[j]) * a[i].grad[j];
    }
    EXPECT_LE(std::sqrt(diff), 1e-5 * std::sqrt(norm) + 1e-12) << a[i].name;
  }
}

TEST(training_model, bad_batches_are_refused) {
  auto m = training_model::bind(load_tiny());
  ASSERT_TRUE(m) << error_text(m.error());
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{}));
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{{1}}));   // nothing predicted
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{{1, 512}}));  // outside the vocabulary
}
