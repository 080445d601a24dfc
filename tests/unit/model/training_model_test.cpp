// The whole model's training step against transformers on tiny-v3: the mean next-token loss, the
// gradient of every parameter (grads.safetensors, within 1e-4 relative per tensor), and the losses
// before each of 4 AdamW steps (golden.json, within 1e-4).
#include "model/training_model.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "model/checkpoint.hpp"
#include "tests/golden/golden_data.hpp"

using namespace moe;
using namespace moe::model;

namespace {

std::filesystem::path tiny() { return std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3"; }

nlohmann::json golden_json() {
  std::ifstream in(tiny() / "golden.json");
  return nlohmann::json::parse(in);
}

std::shared_ptr<checkpoint> load_tiny() {
  auto c = load_config(tiny());
  EXPECT_TRUE(c) << error_text(c.error());
  load_options o;
  o.progress = false;
  auto ckpt = load_checkpoint(tiny(), *c, o);
  EXPECT_TRUE(ckpt) << error_text(ckpt.error());
  return std::make_shared<checkpoint>(std::move(*ckpt));
}

// golden.safetensors' input_ids: two sequences of 16 tokens.
std::vector<std::vector<int32_t>> golden_batch() {
  const auto ids = moe::testing::golden_file::open(tiny() / "golden.safetensors").ids("input_ids");
  const size_t half = ids.size() / 2;
  return {std::vector<int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(half)),
          std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(half), ids.end())};
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
  const auto grads = moe::testing::golden_file::open(tiny() / "grads.safetensors");
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

TEST(training_model, bad_batches_are_refused) {
  auto m = training_model::bind(load_tiny());
  ASSERT_TRUE(m) << error_text(m.error());
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{}));
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{{1}}));   // nothing predicted
  EXPECT_FALSE(m->forward_backward(std::vector<std::vector<int32_t>>{{1, 512}}));  // outside the vocabulary
}
