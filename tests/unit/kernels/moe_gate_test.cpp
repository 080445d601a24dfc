#include "kernels/cpu/moe_gate.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

moe_gate_params tiny_v3() {  // shared/fixtures/tiny-v3/config.json
  moe_gate_params p;
  p.num_experts = 16;
  p.num_groups = 4;
  p.topk_group = 2;
  p.top_k = 4;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.5f;
  return p;
}

moe_gate_params deepseek_v3() {
  moe_gate_params p;
  p.num_experts = 256;
  p.num_groups = 8;
  p.topk_group = 4;
  p.top_k = 8;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.5f;
  return p;
}

// moe() of shared/fixtures/reference.py for one token, in double, with numpy's stable argsort
// of the negated scores.
void reference_gate(const moe_gate_params& p, const float* logits, const float* bias,
                    std::vector<int32_t>& idx, std::vector<double>& weight) {
  const size_t E = p.num_experts, gs = E / p.num_groups;
  std::vector<double> s(E), c(E), group(p.num_groups);
  for (size_t e = 0; e < E; ++e) {
    s[e] = 1.0 / (1.0 + std::exp(-double{logits[e]}));
    c[e] = s[e] + bias[e];
  }
  for (size_t g = 0; g < p.num_groups; ++g) {
    std::vector<double> v(c.begin() + g * gs, c.begin() + (g + 1) * gs);
    std::sort(v.begin(), v.end());
    group[g] = v[gs - 1] + v[gs - 2];
  }
  auto argsort_desc = [](const std::vector<double>& v) {
    std::vector<int32_t> o(v.size());
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
    return o;
  };
  const auto keep = argsort_desc(group);
  std::vector<bool> kept(p.num_groups, false);
  for (size_t i = 0; i < p.topk_group; ++i) kept[keep[i]] = true;
  for (size_t e = 0; e < E; ++e)
    if (!kept[e / gs]) c[e] = 0.0;
  const auto order = argsort_desc(c);
  idx.assign(order.begin(), order.begin() + p.top_k);
  weight.clear();
  double sum = 0.0;
  for (auto e : idx) sum += s[e];
  for (auto e : idx)
    weight.push_back(s[e] / (p.norm_topk_prob ? sum + 1e-20 : 1.0) * p.routed_scaling_factor);
}

void expect_matches_reference(const moe_gate_params& p, size_t tokens, uint64_t seed) {
  auto logits = random_floats(tokens * p.num_experts, seed, -4.0f, 4.0f);
  auto bias = random_floats(p.num_experts, seed + 1, -0.1f, 0.1f);
  std::vector<int32_t> idx(tokens * p.top_k);
  std::vector<float> weight(tokens * p.top_k);
  ASSERT_EQ(moe_gate(p, logits.data(), bias.data(), tokens, idx.data(), weight.data()),
            kernel_status::ok);
  std::vector<int32_t> want_idx;
  std::vector<double> want_weight;
  for (size_t t = 0; t < tokens; ++t) {
    reference_gate(p, &logits[t * p.num_experts], bias.data(), want_idx, want_weight);
    for (size_t i = 0; i < p.top_k; ++i) {
      EXPECT_EQ(idx[t * p.top_k + i], want_idx[i]) << "token " << t << " rank " << i;
      EXPECT_NEAR(weight[t * p.top_k + i], want_weight[i], 1e-5);
    }
  }
}

TEST(moe_gate, tiny_v3_matches_reference) { expect_matches_reference(tiny_v3(), 64, 1); }

TEST(moe_gate, deepseek_v3_shape_matches_reference) {
  expect_matches_reference(deepseek_v3(), 32, 3);
  auto p = deepseek_v3();
  p.norm_topk_prob = false;
  p.routed_scaling_factor = 1.0f;
  expect_matches_reference(p, 8, 5);
}

// Worked by hand. 8 experts in 4 groups of 2, keep 2 groups, pick 2 experts.
// logits: 0 = sigmoid 0.5. bias lifts expert 6 (group 3) so its group wins although expert 6's
// own score is low, and the weights use the unbiased scores.
TEST(moe_gate, hand_computed_case) {
  moe_gate_params p;
  p.num_experts = 8;
  p.num_groups = 4;
  p.topk_group = 2;
  p.top_k = 2;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.0f;
  const float logits[] = {2.0f, -2.0f, 0.0f, 0.0f, 1.0f, 1.0f, -1.0f, -1.0f};
  const float bias[] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f};
  // biased: 0.881, 0.119 | 0.5, 0.5 | 0.731, 0.731 | 1.269, 0.269
  // group scores: 1.0, 1.0, 1.462, 1.538 -> groups 3 and 2.
  // masked biased: experts 4, 5 = 0.731, 6 = 1.269, 7 = 0.269 -> top-2: 6, then 4 (tie with 5).
  int32_t idx[2];
  float weight[2];
  ASSERT_EQ(moe_gate(p, logits, bias, 1, idx, weight), kernel_status::ok);
  EXPECT_EQ(idx[0], 6);
  EXPECT_EQ(idx[1], 4);
  const double s6 = 1.0 / (1.0 + std::exp(1.0)), s4 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_NEAR(weight[0], s6 / (s6 + s4) * 2.0, 1e-6);
  EXPECT_NEAR(weight[1], s4 / (s6 + s4) * 2.0, 1e-6);
}

TEST(moe_gate, ties_go_to_the_lower_index) {
  auto p = tiny_v3();
  std::vector<float> logits(16, 0.5f);  // every expert and every group ties
  int32_t idx[4];
  float weight[4];
  ASSERT_EQ(moe_gate(p, logits.data(), nullptr, 1, idx, weight), kernel_status::ok);
  // Groups 0 and 1 win; experts 0..3 in order; equal weights of 2.5 / 4.
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(idx[i], i);
    EXPECT_NEAR(weight[i], 2.5f / 4, 1e-6);
  }
}

// Experts outside the chosen groups are masked with -inf, as DeepSeek's code and transformers
// 5.17 do (older transformers used 0.0, which lets a masked expert outrank chosen groups whose
// biased scores are negative): only experts of the chosen groups can ever be picked.
TEST(moe_gate, experts_outside_the_chosen_groups_are_never_picked) {
  moe_gate_params p;
  p.num_experts = 4;
  p.num_groups = 2;
  p.topk_group = 1;
  p.top_k = 2;
  p.routed_scaling_factor = 1.0f;
  const float logits[] = {0.0f, 0.0f, 0.0f, 0.0f};
  const float bias[] = {-0.6f, -0.7f, -0.9f, -0.9f};  // group 0 wins, -0.3 against -0.8
  int32_t idx[2];
  float weight[2];
  ASSERT_EQ(moe_gate(p, logits, bias, 1, idx, weight), kernel_status::ok);
  // masked biased: -0.1, -0.2, -inf, -inf -> experts 0 and 1, though their scores are negative.
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 1);
}

TEST(moe_gate, nan_scores_rank_last) {
  moe_gate_params p;
  p.num_experts = 4;
  p.num_groups = 1;
  p.topk_group = 1;
  p.top_k = 2;
  const float logits[] = {NAN, 1.0f, NAN, 0.0f};
  int32_t idx[2];
  float weight[2];
  ASSERT_EQ(moe_gate(p, logits, nullptr, 1, idx, weight), kernel_status::ok);
  EXPECT_EQ(idx[0], 1);
  EXPECT_EQ(idx[1], 3);
}

TEST(moe_gate, bad_params_are_refused_and_outputs_untouched) {
  const auto logits = random_floats(16, 7);
  int32_t idx[4] = {-5, -5, -5, -5};
  float weight[4] = {};
  auto check = [&](const moe_gate_params& p) {
    EXPECT_EQ(moe_gate(p, logits.data(), nullptr, 1, idx, weight),
              kernel_status::unsupported_shape);
  };
  auto p = tiny_v3();
  p.num_groups = 3;  // 16 % 3 != 0
  check(p);
  p = tiny_v3();
  p.num_groups = 16;  // groups of 1: no top-2 group score
  check(p);
  p = tiny_v3();
  p.topk_group = 5;
  check(p);
  p = tiny_v3();
  p.top_k = 9;  // more than 2 groups of 4 hold
  check(p);
  p = tiny_v3();
  p.top_k = 0;
  check(p);
  p = tiny_v3();
  p.num_experts = moe_gate_max_experts * 2;
  check(p);
  EXPECT_EQ(moe_gate(tiny_v3(), nullptr, nullptr, 1, idx, weight),
            kernel_status::unsupported_shape);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(idx[i], -5);
  EXPECT_EQ(moe_gate(tiny_v3(), nullptr, nullptr, 0, nullptr, nullptr), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
