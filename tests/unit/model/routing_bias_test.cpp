// DeepSeek-V3's auxiliary-loss-free load balancing on a text corpus: training tiny-v3 with the
// routing-bias update evens out the experts' loads in every MoE layer; without it, it does not.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <numeric>

#include "model/checkpoint.hpp"
#include "model/optimizer.hpp"
#include "model/training_model.hpp"

using namespace moe;
using namespace moe::model;

namespace {

std::filesystem::path data() { return std::filesystem::path(MOE_TEST_DATA_DIR); }

// Byte-level sequences of `length` tokens from the corpus, one batch per step, in order.
std::vector<std::vector<int32_t>> batch_at(const std::string& text, size_t step, size_t rows, size_t length) {
  std::vector<std::vector<int32_t>> out;
  for (size_t r = 0; r < rows; ++r) {
    const size_t start = ((step * rows + r) * length) % (text.size() - length);
    std::vector<int32_t> s;
    for (size_t i = 0; i < length; ++i) s.push_back(static_cast<unsigned char>(text[start + i]));
    out.push_back(std::move(s));
  }
  return out;
}

double max_over_mean(const std::vector<int64_t>& load) {
  const double mean = std::accumulate(load.begin(), load.end(), 0.0) / static_cast<double>(load.size());
  return static_cast<double>(*std::max_element(load.begin(), load.end())) / mean;
}

// Per MoE layer: the mean max/mean load over the first and over the last `window` steps.
std::vector<std::pair<double, double>> imbalance_over_training(double bias_speed, int steps, int window) {
  const auto dir = data() / "tiny-v3";
  auto c = load_config(dir);
  load_options o;
  o.progress = false;
  auto m = training_model::bind(std::make_shared<checkpoint>(std::move(*load_checkpoint(dir, *c, o))));
  EXPECT_TRUE(m) << error_text(m.error());
  std::ifstream in(data() / "corpus" / "apache-2.0.txt");
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  adamw opt;
  std::vector<std::pair<double, double>> out;
  for (int step = 0; step < steps; ++step) {
    m->zero_grads();
    auto loss = m->forward_backward(batch_at(text, static_cast<size_t>(step), 8, 32));
    EXPECT_TRUE(loss) << error_text(loss.error());
    const auto loads = m->expert_loads();
    out.resize(loads.size());
    for (size_t l = 0; l < loads.size(); ++l) {
      if (step < window) out[l].first += max_over_mean(loads[l]) / window;
      if (step >= steps - window) out[l].second += max_over_mean(loads[l]) / window;
    }
    EXPECT_FALSE(opt.step(m->parameters(), 1e-3));
    m->update_routing_bias(bias_speed);
  }
  return out;
}

}  // namespace

TEST(routing_bias, the_bias_update_evens_out_expert_load_and_training_alone_does_not) {
  const int steps = 40, window = 5;
  const auto balanced = imbalance_over_training(0.01, steps, window);
  const auto plain = imbalance_over_training(0.0, steps, window);
  ASSERT_EQ(balanced.size(), 2u);  // tiny-v3's two MoE layers
  for (size_t l = 0; l < balanced.size(); ++l) {
    SCOPED_TRACE("MoE layer " + std::to_string(l));
    // Same start (the update acts after the first step).
    EXPECT_NEAR(balanced[l].first, plain[l].first, 0.25 * plain[l].first);
    EXPECT_LT(balanced[l].second, 0.8 * balanced[l].first) << "max/mean load did not fall with the bias update";
    EXPECT_LT(balanced[l].second, plain[l].second) << "the update balanced no better than training alone";
    EXPECT_GT(plain[l].second, 0.9 * plain[l].first) << "training alone evened out the load: the test shows nothing";
    std::printf("layer %zu: max/mean load %.2f -> %.2f with the update, %.2f -> %.2f without\n", l,
                balanced[l].first, balanced[l].second, plain[l].first, plain[l].second);
  }
}
