// Expert replication and placement (scheduler/expert_plan.hpp) at DeepSeek-V3 scale: planning
// time for 61 layers x 256 experts x 288 slots (8 routing groups, 4 nodes, 32 GPUs), and the
// balance reached against score.py's lower bound and against no replication at all (each GPU
// holding 8 experts in order: the baseline of the same run). Zipf-like loads, a different
// ranking per layer, for several skews. Then the move from a previous even layout to a balanced
// one within a budget of replica loads (scheduler/plan_transition.hpp): time, moves and balance
// per budget, against the unlimited (aligned) plan. Prints JSON.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "scheduler/expert_plan.hpp"
#include "scheduler/synthetic_load.hpp"
#include "scheduler/plan_transition.hpp"

using namespace moe::scheduler;

namespace {

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

// The layout before any load was measured: 8 experts per GPU in order, and each GPU's ninth slot
// a replica of the first expert of the next GPU on its node (routing groups stay node-local).
std::vector<std::vector<int32_t>> even_layout(const expert_plan_request& r) {
  const int64_t experts = static_cast<int64_t>(r.load.front().size()), per_gpu = r.num_slots / r.num_gpus;
  const int64_t own = experts / r.num_gpus, gpus_per_node = r.num_gpus / r.num_nodes;
  std::vector<int32_t> row;
  for (int64_t g = 0; g < r.num_gpus; ++g) {
    for (int64_t i = 0; i < own; ++i) row.push_back(static_cast<int32_t>(g * own + i));
    const int64_t neighbour = g / gpus_per_node * gpus_per_node + (g + 1) % gpus_per_node;
    for (int64_t i = own; i < per_gpu; ++i) row.push_back(static_cast<int32_t>(neighbour * own + i - own));
  }
  return std::vector<std::vector<int32_t>>(r.load.size(), row);
}

// plan_transition_within_budget from the even layout: median of 5 runs per budget (-1: none).
nlohmann::json transition_runs(const expert_plan_request& r) {
  plan_transition_request t;
  t.plan = r;
  t.previous = even_layout(r);
  t.max_moves = 0;  // the previous layout as it is
  const double previous_ratio = score_expert_plan(r, plan_transition_within_budget(t)->plan).gpu_ratio_mean;
  nlohmann::json runs = nlohmann::json::array();
  double unlimited_ratio = 0;
  for (int64_t budget : {int64_t{-1}, int64_t{64}, int64_t{512}, int64_t{2048}}) {
    t.max_moves = budget;
    std::vector<double> ms;
    plan_transition out;
    for (int rep = 0; rep < 5; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      auto p = plan_transition_within_budget(t);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      if (!p) {
        std::cerr << moe::error_text(p.error()) << "\n";
        std::exit(1);
      }
      out = std::move(*p);
    }
    std::sort(ms.begin(), ms.end());
    const double ratio = score_expert_plan(r, out.plan).gpu_ratio_mean;
    if (budget < 0) unlimited_ratio = ratio;
    runs.push_back({{"max_moves", budget},
                    {"planning_ms_median", ms[ms.size() / 2]},
                    {"planning_ms_samples", ms},
                    {"moves", out.moves},
                    {"gpu_ratio_mean", ratio},
                    {"previous_gpu_ratio_mean", previous_ratio},
                    {"gpu_ratio_mean_over_unlimited", ratio / unlimited_ratio}});
  }
  return runs;
}

}  // namespace

int main() {
  nlohmann::json out = {{"benchmark", "expert_plan"}, {"layers", 61}, {"experts", 256}, {"slots", 288},
                        {"groups", 8}, {"nodes", 4}, {"gpus", 32}, {"runs", nlohmann::json::array()}};
  for (double exponent : {0.6, 1.0, 1.4}) {
    const auto r = zipf_expert_load(61, exponent, 7);
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
  out["transitions"] = nlohmann::json::array();
  for (double exponent : {1.0, 1.4}) {
    out["transitions"].push_back(
        {{"zipf_exponent", exponent}, {"previous", "even"}, {"runs", transition_runs(zipf_expert_load(61, exponent, 7))}});
  }
  std::cout << out.dump(1) << "\n";
  return 0;
}
