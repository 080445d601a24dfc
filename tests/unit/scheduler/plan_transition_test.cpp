// scheduler/plan_transition: moving from the served expert layout to a better one within a budget
// of replica loads; Zipf-skewed traces at DeepSeek-V3 scale from an even layout, hand-made cases,
// and bad input.
#include "scheduler/plan_transition.hpp"
#include "scheduler/synthetic_load.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

using namespace moe::scheduler;

namespace {

// 8 experts per GPU in order, the ninth slot a replica of the next GPU's first expert on the same
// node: every routing group (32 experts) on one node.
std::vector<std::vector<int32_t>> even_layout(const expert_plan_request& r) {
  std::vector<int32_t> row;
  for (int32_t g = 0; g < 32; ++g) {
    for (int32_t i = 0; i < 8; ++i) row.push_back(g * 8 + i);
    row.push_back((g / 8 * 8 + (g + 1) % 8) * 8);
  }
  return std::vector<std::vector<int32_t>>(r.load.size(), row);
}

plan_transition_request transition(const expert_plan_request& r, int64_t max_moves) {
  plan_transition_request t;
  t.plan = r;
  t.previous = even_layout(r);
  t.max_moves = max_moves;
  return t;
}

int64_t total(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0});
}

// Every expert has a replica, counts match the slots, the moves match count_moves, and the layers
// marked hierarchical keep each routing group on one node.
void expect_valid(const plan_transition_request& t, const plan_transition& out) {
  const auto& r = t.plan;
  const size_t num_experts = r.load.front().size();
  const int64_t per_node = r.num_slots / r.num_nodes;
  ASSERT_EQ(out.plan.phy2log.size(), r.load.size());
  ASSERT_EQ(out.plan.hierarchical.size(), r.load.size());
  for (size_t l = 0; l < out.plan.phy2log.size(); ++l) {
    const auto& row = out.plan.phy2log[l];
    ASSERT_EQ(row.size(), static_cast<size_t>(r.num_slots));
    std::vector<int32_t> count(num_experts, 0);
    for (auto e : row) {
      ASSERT_GE(e, 0);
      ASSERT_LT(static_cast<size_t>(e), num_experts);
      ++count[static_cast<size_t>(e)];
    }
    EXPECT_EQ(count, out.plan.logcnt[l]) << "layer " << l;
    for (auto c : count) EXPECT_GE(c, 1) << "layer " << l;
    if (out.plan.hierarchical[l]) {
      const size_t group_size = num_experts / static_cast<size_t>(r.num_groups);
      std::vector<std::set<int64_t>> nodes_of_group(static_cast<size_t>(r.num_groups));
      for (size_t j = 0; j < row.size(); ++j)
        nodes_of_group[static_cast<size_t>(row[j]) / group_size].insert(static_cast<int64_t>(j) /
                                                                        per_node);
      for (const auto& n : nodes_of_group)
        EXPECT_EQ(n.size(), 1u) << "layer " << l << ": a group on several nodes";
    }
  }
  auto moves = count_moves(t.previous, out.plan.phy2log, r.num_gpus);
  ASSERT_TRUE(moves) << moe::error_text(moves.error());
  EXPECT_EQ(*moves, out.layer_moves);
  EXPECT_EQ(total(out.layer_moves), out.moves);
}

double ratio(const expert_plan_request& r, const plan_transition& out) {
  return score_expert_plan(r, out.plan).gpu_ratio_mean;
}

}  // namespace

TEST(plan_transition, count_moves_counts_experts_a_gpu_gains) {
  // 2 GPUs x 3 slots: GPU 0 {0, 1, 2}, GPU 1 {3, 1, 2}.
  const std::vector<std::vector<int32_t>> previous = {{0, 1, 2, 3, 1, 2}};
  auto same_sets = count_moves(previous, {{2, 0, 1, 2, 3, 1}}, 2);  // order and duplicates are free
  ASSERT_TRUE(same_sets);
  EXPECT_EQ(*same_sets, std::vector<int64_t>{0});
  auto two = count_moves(previous, {{0, 3, 3, 0, 1, 2}}, 2);  // GPU 0 gains 3 (once), GPU 1 gains 0
  ASSERT_TRUE(two);
  EXPECT_EQ(*two, std::vector<int64_t>{2});
  // Layer 0 swaps its GPUs' experts: 2; layer 1 has GPU 1 hold expert 0 instead of 1: 1.
  auto per_layer = count_moves({{0, 1}, {0, 1}}, {{1, 0}, {0, 0}}, 2);
  ASSERT_TRUE(per_layer);
  EXPECT_EQ(*per_layer, (std::vector<int64_t>{2, 1}));
}

TEST(plan_transition, one_move_balances_a_small_layer) {
  // Expert 0 carries 100 of 130 on GPU 0 (110 vs 20); one slot of a spare replica on GPU 1
  // repointed to expert 0 makes both 65.
  plan_transition_request t;
  t.plan.load = {{100, 10, 10, 10}};
  t.plan.num_slots = 6;
  t.plan.num_gpus = 2;
  t.previous = {{0, 1, 2, 3, 1, 2}};
  t.max_moves = 1;
  auto out = plan_transition_within_budget(t);
  ASSERT_TRUE(out) << moe::error_text(out.error());
  expect_valid(t, *out);
  EXPECT_EQ(out->moves, 1);
  EXPECT_DOUBLE_EQ(ratio(t.plan, *out), 1.0);
  EXPECT_EQ(out->plan.logcnt[0][0], 2);
  const std::set<int32_t> gpu0(out->plan.phy2log[0].begin(), out->plan.phy2log[0].begin() + 3);
  EXPECT_EQ(gpu0, (std::set<int32_t>{0, 1, 2}));  // GPU 0 unchanged
}

TEST(plan_transition, budget_zero_keeps_the_previous_layout) {
  const auto r = zipf_expert_load(4, 1.0, 5);
  const auto t = transition(r, 0);
  auto out = plan_transition_within_budget(t);
  ASSERT_TRUE(out) << moe::error_text(out.error());
  expect_valid(t, *out);
  EXPECT_EQ(out->plan.phy2log, t.previous);
  EXPECT_EQ(out->moves, 0);
  EXPECT_EQ(out->layer_moves, std::vector<int64_t>(4, 0));
  EXPECT_EQ(out->plan.logcnt[0][0], 2);  // the ninth slot of GPU 7 (node 0) holds expert 0
  EXPECT_EQ(out->plan.logcnt[0][1], 1);
  EXPECT_EQ(out->plan.hierarchical, std::vector<bool>(4, true));
}

TEST(plan_transition, unlimited_budget_balances_as_plan_experts_with_fewer_moves) {
  const auto r = zipf_expert_load(6, 1.0, 3);
  auto planned = plan_experts(r);
  ASSERT_TRUE(planned);
  const auto t = transition(r, -1);
  auto out = plan_transition_within_budget(t);
  ASSERT_TRUE(out) << moe::error_text(out.error());
  expect_valid(t, *out);
  const auto want = score_expert_plan(r, *planned), got = score_expert_plan(r, out->plan);
  ASSERT_EQ(got.gpu_ratio.size(), want.gpu_ratio.size());
  for (size_t l = 0; l < want.gpu_ratio.size(); ++l)
    EXPECT_NEAR(got.gpu_ratio[l], want.gpu_ratio[l], 1e-12);
  EXPECT_EQ(out->plan.logcnt, planned->logcnt);
  EXPECT_EQ(out->plan.hierarchical, planned->hierarchical);
  auto unaligned = count_moves(t.previous, planned->phy2log, r.num_gpus);
  ASSERT_TRUE(unaligned);
  EXPECT_LT(out->moves, total(*unaligned));
  // Each GPU lists its experts in ascending order.
  for (const auto& row : out->plan.phy2log)
    for (size_t g = 0; g < 32; ++g)
      EXPECT_TRUE(std::is_sorted(row.begin() + g * 9, row.begin() + (g + 1) * 9));
}

TEST(plan_transition, a_relabelled_plan_needs_no_moves) {
  // The previous layout is plan_experts' own plan with its nodes, the GPUs within each node and the
  // slots within each GPU shuffled: relabelling finds it again.
  const auto r = zipf_expert_load(3, 1.0, 9);
  auto planned = plan_experts(r);
  ASSERT_TRUE(planned);
  std::mt19937 rng(1);
  plan_transition_request t;
  t.plan = r;
  for (const auto& row : planned->phy2log) {
    std::vector<int> nodes(4), gpus(8);
    std::iota(nodes.begin(), nodes.end(), 0);
    std::shuffle(nodes.begin(), nodes.end(), rng);
    std::vector<int32_t> shuffled(row.size());
    for (int n = 0; n < 4; ++n) {
      std::iota(gpus.begin(), gpus.end(), 0);
      std::shuffle(gpus.begin(), gpus.end(), rng);
      for (int i = 0; i < 8; ++i) {
        const auto from = row.begin() + (n * 8 + i) * 9;
        const auto to = shuffled.begin() + (nodes[n] * 8 + gpus[i]) * 9;
        std::copy(from, from + 9, to);
        std::shuffle(to, to + 9, rng);
      }
    }
    t.previous.push_back(std::move(shuffled));
  }
  auto out = plan_transition_within_budget(t);
  ASSERT_TRUE(out) << moe::error_text(out.error());
  expect_valid(t, *out);
  EXPECT_EQ(out->moves, 0);
  // With a budget the same plan is found: it fits (0 moves) and nothing balances better.
  t.max_moves = 10;
  auto limited = plan_transition_within_budget(t);
  ASSERT_TRUE(limited);
  EXPECT_EQ(limited->moves, 0);
  EXPECT_NEAR(ratio(r, *limited), score_expert_plan(r, *planned).gpu_ratio_mean, 1e-12);
}

TEST(plan_transition, moves_never_exceed_the_budget) {
  const auto r = zipf_expert_load(6, 1.0, 3);
  for (int64_t budget : {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597}) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    const auto t = transition(r, budget);
    auto out = plan_transition_within_budget(t);
    ASSERT_TRUE(out) << moe::error_text(out.error());
    expect_valid(t, *out);
    EXPECT_LE(out->moves, budget);
    EXPECT_GE(out->moves, std::min<int64_t>(budget - 1, 30));  // spends a small budget
  }
}

TEST(plan_transition, more_budget_never_balances_worse) {
  for (double exponent : {1.0, 1.4}) {
    SCOPED_TRACE("zipf exponent " + std::to_string(exponent));
    const auto r = zipf_expert_load(4, exponent, 17);
    auto unlimited = plan_transition_within_budget(transition(r, -1));
    ASSERT_TRUE(unlimited);
    const double previous = ratio(r, *plan_transition_within_budget(transition(r, 0)));
    const double best = ratio(r, *unlimited);
    double last = previous;
    std::vector<double> seen;
    for (int64_t budget = 1; budget <= 1200; budget += budget < 40 ? 1 : 23) {
      auto out = plan_transition_within_budget(transition(r, budget));
      ASSERT_TRUE(out) << moe::error_text(out.error());
      const double now = ratio(r, *out);
      EXPECT_LE(now, last + 1e-12) << "budget " << budget;
      last = now;
      seen.push_back(now);
    }
    // The first loads pay most: 40 of them (10 a layer) close three quarters of the gap to the
    // unlimited plan (over 900 loads here).
    EXPECT_LT(seen[39] - best, (previous - best) * 0.25)
        << "previous " << previous << ", unlimited " << best;
    // Enough budget for the unlimited plan: at least as balanced.
    auto ample = plan_transition_within_budget(transition(r, unlimited->moves));
    ASSERT_TRUE(ample);
    EXPECT_LE(ratio(r, *ample), best + 1e-12);
    EXPECT_LE(ample->moves, unlimited->moves);
  }
}

TEST(plan_transition, node_local_layers_keep_groups_on_one_node) {
  const auto r = zipf_expert_load(4, 1.4, 21);
  for (int64_t budget : {16, 64, 256}) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    const auto t = transition(r, budget);
    auto out = plan_transition_within_budget(t);
    ASSERT_TRUE(out);
    // The even layout keeps every group on one node; the search keeps it so.
    EXPECT_EQ(out->plan.hierarchical, std::vector<bool>(4, true));
    expect_valid(t, *out);
  }
  // Ignoring the groups, replicas may cross nodes: here that balances better (1.90 against 2.36).
  auto global = r;
  global.hierarchical = false;
  auto free_out = plan_transition_within_budget(transition(global, 64));
  auto local_out = plan_transition_within_budget(transition(r, 64));
  ASSERT_TRUE(free_out && local_out);
  EXPECT_EQ(free_out->plan.hierarchical, std::vector<bool>(4, false));
  EXPECT_LE(free_out->moves, 64);
  EXPECT_LT(ratio(global, *free_out), ratio(r, *local_out));
}

TEST(plan_transition, the_same_request_gives_the_same_transition) {
  const auto r = zipf_expert_load(4, 1.0, 11);
  for (int64_t budget : {-1, 100}) {
    auto a = plan_transition_within_budget(transition(r, budget));
    auto b = plan_transition_within_budget(transition(r, budget));
    ASSERT_TRUE(a && b);
    EXPECT_EQ(a->plan.phy2log, b->plan.phy2log);
    EXPECT_EQ(a->layer_moves, b->layer_moves);
  }
}

TEST(plan_transition, bad_requests_are_refused_with_the_reason) {
  const auto base = transition(zipf_expert_load(2, 1.0, 1), 10);
  auto expect_error = [](const plan_transition_request& t, const std::string& part) {
    auto out = plan_transition_within_budget(t);
    ASSERT_FALSE(out);
    EXPECT_NE(moe::error_text(out.error()).find(part), std::string::npos)
        << moe::error_text(out.error());
  };
  auto t = base;
  t.previous.pop_back();
  expect_error(t, "the previous layout has 1 layers, the loads have 2");
  t = base;
  t.previous[1].pop_back();
  expect_error(t, "layer 1: 287 slots, the plan has 288");
  t = base;
  t.previous[0][5] = 256;
  expect_error(t, "slot 5: expert 256 is not in [0, 256)");
  t = base;
  t.previous[0][7] = -1;
  expect_error(t, "slot 7: expert -1");
  t = base;
  t.previous[1][3] = 4;  // expert 3 had one replica
  expect_error(t, "layer 1: no replica of expert 3");
  t = base;
  t.plan.num_slots = 290;
  expect_error(t, "do not divide among 32 GPUs");
  t = base;
  t.plan.load[1][0] = -1;
  expect_error(t, "finite and >= 0");
  t = base;
  t.max_moves = 0;  // checked whatever the budget
  t.previous[0][0] = 999;
  expect_error(t, "expert 999");

  auto moves = count_moves({{0, 1}}, {{0, 1}, {0, 1}}, 2);
  ASSERT_FALSE(moves);
  EXPECT_NE(moe::error_text(moves.error()).find("previous has 1 layers, next has 2"),
            std::string::npos);
  moves = count_moves({{0, 1, 2}}, {{0, 1, 2}}, 2);
  ASSERT_FALSE(moves);
  EXPECT_NE(moe::error_text(moves.error()).find("3 slots do not divide among 2 GPUs"),
            std::string::npos);
  moves = count_moves({{0, 1}}, {{0, -1}}, 2);
  ASSERT_FALSE(moves);
  EXPECT_NE(moe::error_text(moves.error()).find("negative expert id"), std::string::npos);
}
