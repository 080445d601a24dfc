// Test support for the MoE training tests on tiny-v3: its weights (mutable, so a check can
// perturb them in place), random inputs whose routing survives small perturbations, and
// central-difference checks of analytic gradients.
// Thread safety: one test at a time per tiny_model.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model::testing {

struct tiny_model {
  model_config config;
  checkpoint ckpt;

  static tiny_model load() {
    const auto dir = std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3";
    auto c = load_config(dir);
    EXPECT_TRUE(c) << error_of(c);
    auto k = load_checkpoint(dir, *c);
    EXPECT_TRUE(k) << error_of(k);
    return tiny_model{*c, std::move(*k)};
  }
  std::span<float> tensor(const std::string& name) {
    host_tensor* t = ckpt.find(name);
    EXPECT_NE(t, nullptr) << name;
    return t ? t->data() : std::span<float>{};
  }
  [[nodiscard]] size_t hidden() const { return static_cast<size_t>(config.hidden_size); }
};

inline std::vector<float> random_values(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// How far token x (hidden) is from changing its routing in layer `layer`: the smaller of the
// gap between the last kept and the first dropped group score, and the gap between the k-th and
// (k+1)-th biased score among the kept groups' experts. Written from the routing's definition.
inline double routing_margin(tiny_model& m, int64_t layer, const float* x) {
  const auto& c = m.config;
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.gate.";
  const auto w = m.tensor(p + "weight");
  const auto bias = m.tensor(p + "e_score_correction_bias");
  const size_t E = c.n_routed_experts, D = m.hidden(), G = c.n_group, per = E / G;
  std::vector<double> biased(E);
  for (size_t e = 0; e < E; ++e) {
    double logit = 0;
    for (size_t d = 0; d < D; ++d) logit += double(x[d]) * w[e * D + d];
    biased[e] = 1.0 / (1.0 + std::exp(-logit)) + bias[e];
  }
  std::vector<std::pair<double, size_t>> groups;
  for (size_t g = 0; g < G; ++g) {
    std::vector<double> s(biased.begin() + g * per, biased.begin() + (g + 1) * per);
    std::sort(s.rbegin(), s.rend());
    groups.emplace_back(s[0] + s[1], g);
  }
  std::sort(groups.rbegin(), groups.rend());
  const size_t kept = c.topk_group;
  double margin = kept < G ? groups[kept - 1].first - groups[kept].first : 1e9;
  std::vector<double> candidates;
  for (size_t i = 0; i < kept; ++i)
    for (size_t e = 0; e < per; ++e) candidates.push_back(biased[groups[i].second * per + e]);
  std::sort(candidates.rbegin(), candidates.rend());
  const size_t k = c.num_experts_per_tok;
  if (k < candidates.size()) margin = std::min(margin, candidates[k - 1] - candidates[k]);
  return margin;
}

// T random rows whose routing margin in `layer` is at least `min_margin` (dense layers: any).
inline std::vector<float> robust_rows(tiny_model& m, int64_t layer, size_t T, uint32_t seed,
                                      double min_margin = 2e-3) {
  std::mt19937 rng(seed);
  const size_t D = m.hidden();
  std::vector<float> x;
  for (int tries = 0; x.size() < T * D && tries < 10000; ++tries) {
    auto row = random_values(D, rng);
    if (m.config.is_moe_layer(layer) && routing_margin(m, layer, row.data()) < min_margin) continue;
    x.insert(x.end(), row.begin(), row.end());
  }
  EXPECT_EQ(x.size(), T * D) << "too few rows with a routing margin of " << min_margin;
  return x;
}

/// A scalar objective at the current parameters, and whether the routing is the unperturbed
/// one (a perturbation that changes it is not differentiable there and is skipped).
using fd_objective = std::function<std::pair<double, bool>()>;

/// Central differences of `objective` against `analytic` over `samples` distinct entries of
/// `param` (perturbed in place and restored); expects a relative error
/// ||fd - analytic|| / ||analytic|| below 2e-3 and a nonzero analytic sample. Returns the error.
inline double check_finite_differences(std::span<float> param, std::span<const float> analytic,
                                       const fd_objective& objective, std::mt19937& rng,
                                       const std::string& what, size_t samples = 20,
                                       float step = 1e-2f) {
  EXPECT_EQ(param.size(), analytic.size()) << what;
  if (param.empty() || param.size() != analytic.size()) return INFINITY;
  std::uniform_int_distribution<size_t> pick(0, param.size() - 1);
  double diff = 0, norm = 0;
  size_t used = 0, flipped = 0;
  std::set<size_t> seen;
  for (int tries = 0; used < samples && tries < 200; ++tries) {
    const size_t i = pick(rng);
    if (!seen.insert(i).second) continue;
    const float orig = param[i];
    param[i] = orig + step;
    const float hi = param[i];
    const auto [l_hi, same_hi] = objective();
    param[i] = orig - step;
    const float lo = param[i];
    const auto [l_lo, same_lo] = objective();
    param[i] = orig;
    if (!same_hi || !same_lo) {
      ++flipped;
      continue;
    }
    const double fd = (l_hi - l_lo) / (double(hi) - double(lo));
    diff += (fd - analytic[i]) * (fd - analytic[i]);
    norm += double(analytic[i]) * analytic[i];
    ++used;
  }
  EXPECT_EQ(used, std::min(samples, param.size()))
      << what << ": " << flipped << " perturbations changed the routing";
  EXPECT_GT(norm, 0.0) << what << ": every sampled gradient is zero";
  const double rel = std::sqrt(diff / std::max(norm, 1e-30));
  EXPECT_LT(rel, 2e-3) << what;
  return rel;
}

}  // namespace moe::model::testing
