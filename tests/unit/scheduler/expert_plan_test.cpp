// scheduler/expert_plan: EPLB's README example (tests/data/eplb, copied from the EPLB fixture),
// Zipf-skewed traces at DeepSeek-V3 scale, the plan's invariants, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "scheduler/expert_plan.hpp"
#include "scheduler/synthetic_load.hpp"

using namespace moe::scheduler;

namespace {

expert_plan_request readme_example() {
  std::ifstream in(std::string(MOE_TEST_DATA_DIR) + "/eplb/a_readme.json");
  auto j = nlohmann::json::parse(in);
  expert_plan_request r;
  r.load = j.at("weight").get<std::vector<std::vector<double>>>();
  r.num_slots = j.at("num_replicas");
  r.num_groups = j.at("num_groups");
  r.num_nodes = j.at("num_nodes");
  r.num_gpus = j.at("num_gpus");
  return r;
}

// Every expert has a replica, counts match the slots, no GPU holds one expert twice, and the
// node-local layers keep each routing group on one node.
void expect_valid(const expert_plan_request& r, const expert_plan& p) {
  const size_t E = r.load.front().size();
  const int64_t per_gpu = r.num_slots / r.num_gpus, per_node = r.num_slots / r.num_nodes;
  ASSERT_EQ(p.phy2log.size(), r.load.size());
  for (size_t l = 0; l < p.phy2log.size(); ++l) {
    const auto& row = p.phy2log[l];
    ASSERT_EQ(row.size(), static_cast<size_t>(r.num_slots));
    std::vector<int32_t> count(E, 0);
    for (auto e : row) {
      ASSERT_GE(e, 0);
      ASSERT_LT(static_cast<size_t>(e), E);
      ++count[static_cast<size_t>(e)];
    }
    EXPECT_EQ(count, p.logcnt[l]) << "layer " << l;
    for (auto c : count) EXPECT_GE(c, 1) << "layer " << l;
    for (int64_t g = 0; g < r.num_gpus; ++g) {
      std::set<int32_t> seen(row.begin() + g * per_gpu, row.begin() + (g + 1) * per_gpu);
      EXPECT_EQ(seen.size(), static_cast<size_t>(per_gpu)) << "layer " << l << ": an expert twice on GPU " << g;
    }
    if (p.hierarchical[l]) {
      const size_t group_size = E / static_cast<size_t>(r.num_groups);
      std::vector<std::set<int64_t>> nodes_of_group(static_cast<size_t>(r.num_groups));
      for (size_t j = 0; j < row.size(); ++j)
        nodes_of_group[static_cast<size_t>(row[j]) / group_size].insert(static_cast<int64_t>(j) / per_node);
      for (const auto& n : nodes_of_group) EXPECT_EQ(n.size(), 1u) << "layer " << l << ": a group on several nodes";
    }
  }
}

}  // namespace

TEST(expert_plan, eplb_readme_example_is_balanced_better_than_eplb) {
  const auto r = readme_example();
  auto p = plan_experts(r);
  ASSERT_TRUE(p) << moe::error_text(p.error());
  expect_valid(r, *p);
  const auto s = score_expert_plan(r, *p);
  // EPLB reaches 1.225 on this example (../shared/eplb); the bar is 1.15.
  EXPECT_LE(s.gpu_ratio_mean, 1.15);
  // Node-local at any price: every layer keeps its groups on one node. An exhaustive search over
  // group-to-node assignments, replica counts and packings finds 1.2058 the best possible; the
  // planner balances node loads first (1.2252), which is what it can afford at 61 x 256 x 288.
  auto strict = r;
  strict.hierarchy_tolerance = std::numeric_limits<double>::infinity();
  auto q = plan_experts(strict);
  ASSERT_TRUE(q);
  expect_valid(strict, *q);
  EXPECT_EQ(std::count(q->hierarchical.begin(), q->hierarchical.end(), true), 2);
  const double strict_ratio = score_expert_plan(strict, *q).gpu_ratio_mean;
  EXPECT_GE(strict_ratio, 1.2058 - 1e-4);  // nothing node-local can beat the exhaustive optimum
  EXPECT_LE(strict_ratio, 1.2253);
}

TEST(expert_plan, zipf_traces_at_deepseek_scale_stay_near_the_lower_bound) {
  // Moderate skew: within 2% of what any placement of 288 slots could reach (score.py's bound:
  // the heaviest replica after optimal water-filling against the mean GPU load).
  for (double exponent : {0.6, 1.0}) {
    SCOPED_TRACE("zipf exponent " + std::to_string(exponent));
    const auto r = zipf_expert_load(8, exponent, 7);
    auto p = plan_experts(r);
    ASSERT_TRUE(p) << moe::error_text(p.error());
    expect_valid(r, *p);
    const auto s = score_expert_plan(r, *p);
    EXPECT_LE(s.gpu_ratio_mean, s.lower_bound_mean * 1.02) << "bound " << s.lower_bound_mean;
  }
  // Heavy skew (exponent 1.4): more heavy replicas than GPUs, so some share one; that bound
  // ignores it. 1.169 on a 61-layer trace of this kind (1.222 before replicas were re-balanced after
  // packing); the bar guards against regressions until a tighter bound and planner come.
  const auto r = zipf_expert_load(8, 1.4, 7);
  auto p = plan_experts(r);
  ASSERT_TRUE(p);
  expect_valid(r, *p);
  EXPECT_LE(score_expert_plan(r, *p).gpu_ratio_mean, 1.18);
}

TEST(expert_plan, a_very_hot_expert_gets_no_more_replicas_than_there_are_gpus) {
  // Two GPUs, 16 experts and 2 spare slots: water-filling alone gives expert 3 all three extra
  // replicas' worth of load, and one GPU would hold it twice (a group cannot).
  expert_plan_request r;
  r.load = {std::vector<double>(16, 1.0)};
  r.load[0][3] = 1000;
  r.num_slots = 18;
  r.num_groups = 1;
  r.num_nodes = 1;
  r.num_gpus = 2;
  auto p = plan_experts(r);
  ASSERT_TRUE(p) << moe::error_text(p.error());
  expect_valid(r, *p);
  EXPECT_EQ(p->logcnt[0][3], 2);
}

TEST(expert_plan, the_same_loads_give_the_same_plan) {
  const auto r = zipf_expert_load(3, 1.0, 11);
  auto a = plan_experts(r), b = plan_experts(r);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->phy2log, b->phy2log);
}

TEST(expert_plan, global_when_groups_do_not_divide_among_nodes) {
  auto r = zipf_expert_load(2, 1.0, 3);
  r.num_nodes = 3;  // 8 groups over 3 nodes
  r.num_gpus = 24;
  r.num_slots = 288;
  auto p = plan_experts(r);
  ASSERT_TRUE(p);
  expect_valid(r, *p);
  EXPECT_EQ(std::count(p->hierarchical.begin(), p->hierarchical.end(), true), 0);
}

TEST(expert_plan, bad_requests_are_refused_with_the_reason) {
  auto base = readme_example();
  auto expect_error = [](expert_plan_request r, const std::string& part) {
    auto p = plan_experts(r);
    ASSERT_FALSE(p);
    EXPECT_NE(moe::error_text(p.error()).find(part), std::string::npos) << moe::error_text(p.error());
  };
  auto r = base;
  r.num_slots = 8;
  expect_error(r, "cannot hold 12 experts");
  r = base;
  r.num_slots = 17;
  expect_error(r, "do not divide among 8 GPUs");
  r = base;
  r.num_gpus = 7;
  expect_error(r, "do not divide among 2 nodes");
  r = base;
  r.load[1].pop_back();
  expect_error(r, "layer 1 has 11 experts");
  r = base;
  r.load[0][3] = -1;
  expect_error(r, "finite and >= 0");
  r = base;
  r.load.clear();
  expect_error(r, "no loads");
}
