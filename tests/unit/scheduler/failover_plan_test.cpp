// The failover layout: experts with a surviving replica stay where they are, the others go to the
// least-filled survivors, lost groups end up empty, and impossible cases are errors.
#include "scheduler/failover_plan.hpp"

#include <gtest/gtest.h>

using namespace moe;
using namespace moe::scheduler;

TEST(failover_plan, replicated_experts_keep_serving_and_nothing_is_loaded) {
  // Group 2 holds 4 and 5, both replicated in groups 0 and 1.
  const expert_layout current{{{0, 1, 4}, {2, 3, 5}, {4, 5}}};
  auto p = plan_failover(current, {false, false, true}, 6);
  ASSERT_TRUE(p) << error_text(p.error());
  EXPECT_EQ(p->experts, (expert_layout{{{0, 1, 4}, {2, 3, 5}, {}}}));
  EXPECT_EQ(p->replicas_added, 0);
  EXPECT_EQ(p->experts_on_replicas, 2);
}

TEST(failover_plan, unreplicated_experts_go_to_the_least_filled_survivors_per_layer) {
  // Two layers with different layouts; group 1 dies.
  const expert_layout current{{{0, 1}, {2, 3, 4}, {5}}, {{0, 1, 2}, {3}, {4, 5}}};
  auto p = plan_failover(current, {false, true, false}, 6);
  ASSERT_TRUE(p) << error_text(p.error());
  // Layer 0: 2 -> group 2 (1 expert < 2), 3 -> group 0 (2 vs 2: lowest index), 4 -> group 2.
  // Layer 1: 3 -> group 2 (2 < 3).
  EXPECT_EQ(p->experts, (expert_layout{{{0, 1, 3}, {}, {2, 4, 5}}, {{0, 1, 2}, {}, {3, 4, 5}}}));
  EXPECT_EQ(p->replicas_added, 4);
  EXPECT_EQ(p->experts_on_replicas, 0);
  for (const auto& layer : p->experts) {
    std::vector<int> holders(6, 0);
    for (const auto& g : layer)
      for (auto e : g) ++holders[static_cast<size_t>(e)];
    for (int h : holders) EXPECT_EQ(h, 1);
  }
}

TEST(failover_plan, nothing_lost_changes_nothing) {
  const expert_layout current{{{0, 1}, {2, 3}}};
  auto p = plan_failover(current, {false, false}, 4);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->experts, current);
  EXPECT_EQ(p->replicas_added, 0);
}

TEST(failover_plan, impossible_cases_are_errors) {
  auto all = plan_failover({{{0, 1}, {2, 3}}}, {true, true}, 4);
  ASSERT_FALSE(all);
  EXPECT_NE(error_text(all.error()).find("every expert group is lost"), std::string::npos);
  EXPECT_FALSE(plan_failover({{{0, 1}, {2, 3}}}, {false}, 4));         // group count mismatch
  EXPECT_FALSE(plan_failover({{{0, 9}, {2, 3}}}, {false, true}, 4));   // expert out of range
}
