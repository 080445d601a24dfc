#include "kernels/cpu/sampling.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace moe::kernels::cpu {
namespace {

// One row of logits drawn from through a cpu::sampler (which owns sample()'s workspaces).
struct row {
  explicit row(std::vector<float> l) : logits(std::move(l)), s(logits.size()) {}

  int32_t draw(const sampling_params& p, uint64_t seed, uint64_t offset) {
    int32_t token = -1;
    EXPECT_EQ(s.draw(logits.data(), p, seed, offset, &token), kernel_status::ok);
    return token;
  }

  // Frequencies of n draws with consecutive offsets.
  std::vector<double> histogram(const sampling_params& p, uint64_t seed, int n) {
    std::vector<double> freq(logits.size(), 0.0);
    for (int i = 0; i < n; ++i) freq[static_cast<size_t>(draw(p, seed, i))] += 1.0 / n;
    return freq;
  }

  std::vector<float> logits;
  sampler s;
};

std::vector<float> log_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

TEST(sampling, greedy_takes_the_lowest_index_on_ties_and_ignores_nan) {
  int32_t token = -1;
  const float tie[] = {1.0f, 3.0f, -2.0f, 3.0f};
  ASSERT_EQ(sample_greedy(tie, 4, &token), kernel_status::ok);
  EXPECT_EQ(token, 1);
  const float with_nan[] = {NAN, 0.5f, NAN, 2.0f};
  ASSERT_EQ(sample_greedy(with_nan, 4, &token), kernel_status::ok);
  EXPECT_EQ(token, 3);
  const float all_nan[] = {NAN, NAN};
  ASSERT_EQ(sample_greedy(all_nan, 2, &token), kernel_status::ok);
  EXPECT_EQ(token, 0);
  EXPECT_EQ(sample_greedy(tie, 0, &token), kernel_status::unsupported_shape);
  EXPECT_EQ(sample_greedy(nullptr, 4, &token), kernel_status::unsupported_shape);
}

TEST(sampling, uniform_is_splitmix64) {
  // splitmix64's first output from seed 0 is 0xE220A8397B1DCDAF (Vigna's reference code).
  EXPECT_EQ(sampling_uniform(0, 0), static_cast<double>(0xE220A8397B1DCDAFull >> 11) * 0x1.0p-53);
  for (uint64_t i = 0; i < 1000; ++i) {
    const double u = sampling_uniform(42, i);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
}

TEST(sampling, temperature_zero_and_top_k_one_are_greedy) {
  row s({0.1f, 2.0f, 1.9f, 2.0f});
  for (uint64_t i = 0; i < 50; ++i) {
    EXPECT_EQ(s.draw({.temperature = 0.0f}, 7, i), 1);
    EXPECT_EQ(s.draw({.temperature = 5.0f, .top_k = 1}, 7, i), 1);
  }
}

TEST(sampling, same_seed_and_offset_give_the_same_token) {
  row s(log_of({0.25, 0.25, 0.25, 0.25}));
  std::vector<int32_t> first, again, other_seed;
  for (uint64_t i = 0; i < 64; ++i) {
    first.push_back(s.draw({}, 1234, i));
    again.push_back(s.draw({}, 1234, i));
    other_seed.push_back(s.draw({}, 1235, i));
  }
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other_seed);
}

TEST(sampling, follows_the_distribution) {
  const std::vector<double> p{0.1, 0.2, 0.3, 0.4};
  row s(log_of(p));
  const auto freq = s.histogram({}, 99, 20000);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(freq[i], p[i], 0.015) << i;
  // The same with the ranking path (top_p just below 1 keeps all four here).
  const auto ranked = s.histogram({.top_p = 0.9999f}, 99, 20000);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(ranked[i], p[i], 0.015) << i;
}

TEST(sampling, temperature_sharpens) {
  // p ~ [1, 2]; at temperature 0.5, p ~ [1, 4].
  row s(log_of({1.0 / 3, 2.0 / 3}));
  const auto freq = s.histogram({.temperature = 0.5f}, 5, 20000);
  EXPECT_NEAR(freq[1], 0.8, 0.015);
}

TEST(sampling, top_k_keeps_the_k_best_renormalised) {
  row s(log_of({0.1, 0.4, 0.2, 0.3}));
  const auto freq = s.histogram({.top_k = 2}, 11, 20000);
  EXPECT_EQ(freq[0], 0.0);
  EXPECT_EQ(freq[2], 0.0);
  EXPECT_NEAR(freq[1], 0.4 / 0.7, 0.015);
  EXPECT_NEAR(freq[3], 0.3 / 0.7, 0.015);
}

TEST(sampling, top_p_keeps_the_smallest_set_reaching_p) {
  row s(log_of({0.1, 0.4, 0.2, 0.3}));
  // Ranked 0.4, 0.3, 0.2, 0.1: mass 0.4 < 0.5 <= 0.7, so tokens 1 and 3 remain.
  const auto freq = s.histogram({.top_p = 0.5f}, 13, 20000);
  EXPECT_EQ(freq[0] + freq[2], 0.0);
  EXPECT_NEAR(freq[1], 0.4 / 0.7, 0.015);
  // A tiny p keeps exactly one token: the most likely, whatever the draw.
  for (uint64_t i = 0; i < 200; ++i) EXPECT_EQ(s.draw({.top_p = 1e-6f}, 17, i), 1);
  // top-k first, then top-p on what is left: among {1: 0.4/0.7, 3: 0.3/0.7}, p = 0.5 keeps 1.
  for (uint64_t i = 0; i < 200; ++i) EXPECT_EQ(s.draw({.top_k = 2, .top_p = 0.5f}, 19, i), 1);
}

TEST(sampling, masked_and_degenerate_logits) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  row masked({neg_inf, 0.0f, NAN, 0.0f});  // only tokens 1 and 3 have mass
  const auto freq = masked.histogram({}, 23, 4000);
  EXPECT_EQ(freq[0] + freq[2], 0.0);
  EXPECT_NEAR(freq[1], 0.5, 0.04);

  row nothing({neg_inf, neg_inf, neg_inf});
  EXPECT_EQ(nothing.draw({}, 1, 0), 0);  // no finite logit: greedy
  row infinite({0.0f, std::numeric_limits<float>::infinity()});
  EXPECT_EQ(infinite.draw({}, 1, 0), 1);
}

TEST(sampling, bad_arguments_are_refused) {
  const std::vector<float> logits{0.0f, 1.0f};
  std::vector<double> probs(2);
  std::vector<int32_t> order(2);
  sample_args a;
  a.logits = logits.data();
  a.vocab = 2;
  a.probs_workspace = probs.data();
  a.order_workspace = order.data();
  int32_t token = -1;
  auto refused = [&](sampling_params p) {
    a.params = p;
    return sample(a, &token) == kernel_status::unsupported_shape;
  };
  EXPECT_TRUE(refused({.top_p = 0.0f}));
  EXPECT_TRUE(refused({.top_p = 1.5f}));
  EXPECT_TRUE(refused({.temperature = -1.0f}));
  EXPECT_TRUE(refused({.temperature = NAN}));
  a.probs_workspace = nullptr;
  EXPECT_TRUE(refused({}));
  EXPECT_FALSE(refused({.temperature = 0.0f}));  // greedy needs no workspace
  a.vocab = 0;
  EXPECT_TRUE(refused({.temperature = 0.0f}));
  EXPECT_EQ(sample(a, nullptr), kernel_status::unsupported_shape);

  // The row refuses what sample() refuses, and draws after a refusal as before it.
  sampler s(2);
  EXPECT_EQ(s.draw(logits.data(), {.top_p = 0.0f}, 1, 0, &token), kernel_status::unsupported_shape);
  EXPECT_EQ(s.draw(logits.data(), {.temperature = NAN}, 1, 0, &token),
            kernel_status::unsupported_shape);
  EXPECT_EQ(s.draw(nullptr, {}, 1, 0, &token), kernel_status::unsupported_shape);
  EXPECT_EQ(s.draw(logits.data(), {}, 1, 0, nullptr), kernel_status::unsupported_shape);
  EXPECT_EQ(sampler(0).draw(logits.data(), {}, 1, 0, &token), kernel_status::unsupported_shape);
  EXPECT_EQ(s.draw(logits.data(), {.temperature = 0.0f}, 1, 0, &token), kernel_status::ok);
  EXPECT_EQ(token, 1);
}

}  // namespace
}  // namespace moe::kernels::cpu
