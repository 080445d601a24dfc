#include "scheduler/synthetic_load.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace moe::scheduler {

expert_plan_request zipf_expert_load(int layers, double exponent, uint32_t seed) {
  expert_plan_request r;
  r.num_slots = 288;
  r.num_groups = 8;
  r.num_nodes = 4;
  r.num_gpus = 32;
  std::mt19937 rng(seed);
  for (int l = 0; l < layers; ++l) {
    std::vector<int> rank(256);
    std::iota(rank.begin(), rank.end(), 1);
    std::shuffle(rank.begin(), rank.end(), rng);
    std::vector<double> w(256);
    for (size_t e = 0; e < w.size(); ++e) w[e] = std::round(100000.0 / std::pow(rank[e], exponent));
    r.load.push_back(std::move(w));
  }
  return r;
}

}  // namespace moe::scheduler
