// Expert replication and placement (scheduler/expert_plan.hpp) at DeepSeek-V3 scale: planning
// time for 61 layers x 256 experts x 288 slots (8 routing groups, 4 nodes, 32 GPUs), and the
// balance reached against score.py's lower bound and against no replication at all (each GPU
// holding 8 experts in order: the baseline of the same run). Zipf-like loads, a different
// ranking per layer, for several skews. Prints JSON.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "scheduler/expert_plan.hpp"

using namespace moe::scheduler;

namespace {

expert_plan_request zipf_trace(double exponent, uint32_t seed) {
  expert_plan_request r;
  r.num_slots = 288;
  r.num_groups = 8;
  r.num_nodes = 4;
  r.num_gpus = 32;
  std::mt19937 rng(seed);
  for (int l = 0; l < 61; ++l) {
    std::vector<int> rank(256);
    std::iota(rank.begin(), rank.end(), 1);
    std::shuffle(rank.begin(), rank.end(), rng);
    std::vector<double> w(256);
    for (size_t e = 0; e < w.size(); ++e) w[e] = std::round(100000.0 / std::pow(rank[e], exponent));
    r.load.push_back(std::move(w));
  }
  return r;
}

// No replication: 256 experts in order, 8 per GPU (the remaining slots unused).
double naive_ratio(const expert_plan_request& r) {
  double sum = 0;
  for (const auto& w : r.load) {
    std::vector<double> gpu(static_cast<size_t>(r.num_gpus), 0.0);
    for (size_t e = 0; e < w.size(); ++e) gpu[e / (w.size() / gpu.size())] += w[e];
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    sum += *std::max_element(gpu.begin(), gpu.end()) / (total / r.num_gpus);
  }
  return sum / static_cast<double>(r.load.size());
}

}  // namespace

int main() {
  nlohmann::json out = {{"benchmark", "expert_plan"}, {"layers", 61}, {"experts", 256}, {"slots", 288},
                        {"groups", 8}, {"nodes", 4}, {"gpus", 32}, {"runs", nlohmann::json::array()}};
  for (double exponent : {0.6, 1.0, 1.4}) {
    const auto r = zipf_trace(exponent, 7);
    std::vector<double> ms;
    expert_plan plan;
    for (int rep = 0; rep < 5; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      auto p = plan_experts(r);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      if (!p) {
        std::cerr << moe::error_text(p.error()) << "\n";
        return 1;
      }
      plan = std::move(*p);
    }
    std::sort(ms.begin(), ms.end());
    const auto s = score_expert_plan(r, plan);
    out["runs"].push_back({{"zipf_exponent", exponent},
                           {"planning_ms_median", ms[ms.size() / 2]},
                           {"planning_ms_samples", ms},
                           {"gpu_ratio_mean", s.gpu_ratio_mean},
                           {"gpu_ratio_max", s.gpu_ratio_max},
                           {"node_ratio_mean", s.node_ratio_mean},
                           {"lower_bound_gpu_ratio_mean", s.lower_bound_mean},
                           {"no_replication_gpu_ratio_mean", naive_ratio(r)},
                           {"layers_with_groups_on_one_node",
                            std::count(plan.hierarchical.begin(), plan.hierarchical.end(), true)}});
  }
  std::cout << out.dump(1) << "\n";
  return 0;
}
