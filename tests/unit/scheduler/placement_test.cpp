#include "scheduler/placement.hpp"

#include <gtest/gtest.h>

#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "model/init_model.hpp"
#include "model/weights.hpp"

namespace moe::scheduler {
namespace {

constexpr uint64_t gib = uint64_t{1} << 30;

model::model_config tiny() {
  auto c = model::model_preset("tiny");
  EXPECT_TRUE(c);
  return *c;
}

runtime::node_config cpu_node(std::string name, int64_t slots, uint64_t memory) {
  runtime::node_config n;
  n.name = std::move(name);
  n.cpu_slots = slots;
  n.memory_bytes = memory;
  return n;
}

runtime::node_config gpu_node(std::string name, int64_t gpus, uint64_t gpu_memory) {
  runtime::node_config n;
  n.name = std::move(name);
  n.gpus = gpus;
  n.gpu_memory_bytes = gpu_memory;
  return n;
}

runtime::cluster_config cluster(std::vector<runtime::node_config> nodes, int64_t shards, int64_t groups) {
  runtime::cluster_config c;
  c.source = "test.yaml";
  c.name = "test";
  c.secret = "secret";
  c.nodes = std::move(nodes);
  c.model.preset = "tiny";
  c.model.line = 9;
  c.attention_shards = shards;
  c.expert_groups.count = groups;
  c.expert_groups.line = 11;
  return c;
}

/// Expert groups per device name.
std::map<std::string, int> groups_per_device(const placement& p) {
  std::map<std::string, int> n;
  for (const auto& g : p.expert_groups) ++n[g.device.to_string()];
  return n;
}

std::string error_of(const caf::expected<placement>& p) {
  if (p) {
    ADD_FAILURE() << "placed, expected an error:\n" << render_table(*p);
    return {};
  }
  return error_text(p.error());
}

// ---- the memory model ----

TEST(model_memory, parts_add_up_to_the_checkpoint) {
  for (const char* name : {"tiny", "small"}) {
    for (bool mtp : {false, true}) {
      auto config = model::model_preset(name);
      ASSERT_TRUE(config);
      const auto m = model_memory_estimate(*config, 2, mtp);
      const uint64_t total = m.attention_bytes + m.router_bytes + m.shared_expert_bytes +
                             m.per_expert_bytes * static_cast<uint64_t>(config->n_routed_experts);
      EXPECT_EQ(total, 2 * static_cast<uint64_t>(model::count_parameters(*config, mtp))) << name << " " << mtp;
    }
  }
}

TEST(model_memory, tiny_in_numbers) {
  const auto m = model_memory_estimate(tiny(), 4);
  EXPECT_EQ(m.num_moe_layers, 2);  // 3 layers, the first dense
  EXPECT_EQ(m.per_expert_bytes, uint64_t{2 * 3 * 32 * 64 * 4});   // 2 layers x gate/up/down
  EXPECT_EQ(m.shared_expert_bytes, uint64_t{2 * 3 * 32 * 64 * 4});  // one shared expert
  EXPECT_EQ(m.router_bytes, uint64_t{2 * (16 * 64 + 16) * 4});
  EXPECT_EQ(m.kv_cache_bytes_per_token, uint64_t{3 * (16 + 8) * 4});
}

TEST(model_memory, resolve_preset_and_path) {
  auto c = cluster({cpu_node("n0", 1, gib)}, 1, 1);
  auto preset = resolve_model_config(c);
  ASSERT_TRUE(preset) << error_text(preset.error());
  EXPECT_EQ(preset->n_routed_experts, 16);

  c.model.preset = "huge";
  auto unknown = resolve_model_config(c);
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code(), static_cast<uint8_t>(scheduler_errc::bad_model));
  EXPECT_EQ(error_text(unknown.error()).rfind("test.yaml:9: model.preset: unknown model preset 'huge'", 0), 0u)
      << error_text(unknown.error());

  c.model.preset.clear();
  c.model.path = std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3";
  auto from_path = resolve_model_config(c);
  ASSERT_TRUE(from_path) << error_text(from_path.error());
  EXPECT_EQ(from_path->hidden_size, 64);
  c.model.path = "/no/such/checkpoint";
  auto missing = resolve_model_config(c);
  ASSERT_FALSE(missing);
  EXPECT_EQ(error_text(missing.error()).rfind("test.yaml:9: model.path: ", 0), 0u) << error_text(missing.error());
}

// ---- experts ----

TEST(assign_experts, even_contiguous_split_with_remainder_first) {
  auto groups = assign_experts(cluster({cpu_node("n0", 1, gib)}, 1, 3), 16);
  ASSERT_TRUE(groups) << error_text(groups.error());
  ASSERT_EQ(groups->size(), 3u);
  EXPECT_EQ((*groups)[0], (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ((*groups)[1], (std::vector<int64_t>{6, 7, 8, 9, 10}));
  EXPECT_EQ((*groups)[2], (std::vector<int64_t>{11, 12, 13, 14, 15}));
}

TEST(assign_experts, redundant_slots_go_to_the_smallest_group_as_its_least_copied_missing_expert) {
  auto c = cluster({cpu_node("n0", 1, gib)}, 1, 4);
  c.redundant_expert_slots = 5;
  auto groups = assign_experts(c, 16);
  ASSERT_TRUE(groups) << error_text(groups.error());
  // Each replica into the smallest group (lowest index first), copying the least-copied expert
  // it lacks (lowest id first): groups stay within one slot of each other.
  EXPECT_EQ((*groups)[0], (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ((*groups)[1], (std::vector<int64_t>{0, 4, 5, 6, 7}));
  EXPECT_EQ((*groups)[2], (std::vector<int64_t>{1, 8, 9, 10, 11}));
  EXPECT_EQ((*groups)[3], (std::vector<int64_t>{2, 12, 13, 14, 15}));
  std::multiset<int64_t> all;
  for (const auto& g : *groups) all.insert(g.begin(), g.end());
  EXPECT_EQ(all.size(), 21u);
  for (int64_t e = 0; e < 16; ++e) EXPECT_GE(all.count(e), 1u);
}

TEST(assign_experts, bad_assignments_name_the_field_and_line) {
  auto more_groups = cluster({cpu_node("n0", 1, gib)}, 1, 17);
  EXPECT_EQ(error_text(assign_experts(more_groups, 16).error()),
            "test.yaml:11: expert_groups: 17 groups but the model has only 16 routed experts");

  auto too_many_replicas = cluster({cpu_node("n0", 1, gib)}, 1, 2);
  too_many_replicas.redundant_expert_slots = 17;
  EXPECT_EQ(error_text(assign_experts(too_many_replicas, 16).error()),
            "test.yaml:11: redundant_expert_slots: 17 replicas but 2 groups of 16 experts hold at most 16 "
            "(a group holds one copy of an expert at most)");

  auto c = cluster({cpu_node("n0", 1, gib)}, 1, 2);
  c.expert_groups.experts = {{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 16}};
  c.expert_groups.experts_lines = {13, 14};
  auto out_of_range = assign_experts(c, 16);
  ASSERT_FALSE(out_of_range);
  EXPECT_EQ(out_of_range.error().code(), static_cast<uint8_t>(scheduler_errc::bad_assignment));
  EXPECT_EQ(error_text(out_of_range.error()),
            "test.yaml:14: expert_groups.experts[1]: expert 16 is out of range (the model has 16 routed "
            "experts, 0..15)");

  c.expert_groups.experts[1].back() = 14;
  c.expert_groups.experts[1].pop_back();
  EXPECT_EQ(error_text(assign_experts(c, 16).error()),
            "test.yaml:11: expert_groups.experts: expert 15 is in no group (every expert needs at least one copy)");

  c.expert_groups.experts[1].push_back(15);
  c.expert_groups.experts[1].push_back(0);  // one replica
  c.redundant_expert_slots = 2;
  EXPECT_EQ(error_text(assign_experts(c, 16).error()),
            "test.yaml:11: redundant_expert_slots: 2 but the explicit lists hold 1 replicas (leave it out, or "
            "make it match)");
  c.redundant_expert_slots = 1;
  EXPECT_TRUE(assign_experts(c, 16));
}

// ---- spreading ----

TEST(placement, four_groups_over_four_devices_one_each) {
  auto p = plan_placement(cluster({cpu_node("n0", 4, 8 * gib)}, 1, 4), tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  ASSERT_EQ(p->expert_groups.size(), 4u);
  const auto per = groups_per_device(*p);
  EXPECT_EQ(per.size(), 4u);
  for (const auto& [dev, n] : per) EXPECT_EQ(n, 1) << dev;
  EXPECT_EQ(p->num_logical_experts, 16);
  EXPECT_EQ(p->version, 1u);
}

TEST(placement, eight_groups_over_four_devices_two_each) {
  auto p = plan_placement(cluster({cpu_node("n0", 4, 8 * gib)}, 1, 8), tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  const auto per = groups_per_device(*p);
  EXPECT_EQ(per.size(), 4u);
  for (const auto& [dev, n] : per) EXPECT_EQ(n, 2) << dev;
}

TEST(placement, attention_shards_and_groups_on_distinct_devices_while_there_are_any) {
  auto p = plan_placement(cluster({cpu_node("a", 2, 4 * gib), cpu_node("b", 2, 4 * gib)}, 2, 2), tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  std::set<std::string> used;
  for (const auto& a : p->attention) used.insert(a.device.to_string());
  for (const auto& g : p->expert_groups) used.insert(g.device.to_string());
  EXPECT_EQ(used, (std::set<std::string>{"a/cpu0", "a/cpu1", "b/cpu0", "b/cpu1"}));
  EXPECT_EQ(p->attention[0].device.to_string(), "a/cpu0");  // device order: node, then index
  EXPECT_EQ(p->attention[1].device.to_string(), "a/cpu1");
}

TEST(placement, gpus_are_devices_with_their_own_memory) {
  auto p = plan_placement(cluster({gpu_node("n0", 2, 80 * gib), gpu_node("n1", 2, 80 * gib)}, 2, 4), tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  ASSERT_EQ(p->devices.size(), 4u);
  EXPECT_EQ(p->devices[0].device.to_string(), "n0/gpu0");
  EXPECT_EQ(p->devices[3].device.to_string(), "n1/gpu1");
  for (const auto& d : p->devices) {
    EXPECT_TRUE(d.device.gpu);
    EXPECT_EQ(d.capacity_bytes, 80 * gib);
  }
  const auto per = groups_per_device(*p);
  for (const auto& [dev, n] : per) EXPECT_EQ(n, 1) << dev;
}

TEST(placement, uneven_explicit_split_is_kept_and_shared_experts_live_in_group_0) {
  auto c = cluster({cpu_node("local", 4, 8 * gib)}, 1, 3);
  c.expert_groups.experts = {{0, 1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11}, {12, 13, 14, 15}};
  c.expert_groups.experts_lines = {13, 14, 15};
  auto p = plan_placement(c, tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  ASSERT_EQ(p->expert_groups.size(), 3u);
  const auto mem = model_memory_estimate(tiny(), 4);
  for (size_t g = 0; g < 3; ++g) {
    EXPECT_EQ(p->expert_groups[g].group, static_cast<int>(g));
    EXPECT_EQ(p->expert_groups[g].experts, c.expert_groups.experts[g]);
    EXPECT_EQ(p->expert_groups[g].holds_shared_experts, g == 0);
    EXPECT_EQ(p->expert_groups[g].memory_bytes,
              c.expert_groups.experts[g].size() * mem.per_expert_bytes + (g == 0 ? mem.shared_expert_bytes : 0));
  }
  // One attention shard and three groups over four slots: each alone.
  EXPECT_EQ(p->attention[0].device.to_string(), "local/cpu0");
  const auto per = groups_per_device(*p);
  EXPECT_EQ(per.size(), 3u);
  EXPECT_EQ(per.count("local/cpu0"), 0u);
}

TEST(placement, replicas_from_redundant_slots) {
  auto c = cluster({cpu_node("n0", 4, 8 * gib)}, 1, 4);
  c.redundant_expert_slots = 2;
  auto p = plan_placement(c, tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  EXPECT_EQ(p->expert_groups[0].experts, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(p->expert_groups[1].experts, (std::vector<int64_t>{0, 4, 5, 6, 7}));
  EXPECT_EQ(p->expert_groups[2].experts, (std::vector<int64_t>{8, 9, 10, 11}));
  size_t slots = 0;
  for (const auto& g : p->expert_groups) slots += g.experts.size();
  EXPECT_EQ(slots, 18u);
  EXPECT_EQ(p->num_logical_experts, 16);
}

TEST(placement, router_is_co_located_and_counted_with_its_shard) {
  auto c = cluster({cpu_node("n0", 4, 8 * gib)}, 3, 2);
  placement_options o;
  o.kv_cache_tokens = 1000;
  auto p = plan_placement(c, tiny(), o);
  ASSERT_TRUE(p) << error_text(p.error());
  const auto mem = model_memory_estimate(tiny(), 4);
  ASSERT_EQ(p->attention.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_EQ(p->attention[s].shard, static_cast<int>(s));
    EXPECT_EQ(p->attention[s].memory_bytes,
              mem.attention_bytes + mem.router_bytes + 1000 * mem.kv_cache_bytes_per_token);
  }
}

TEST(placement, default_kv_cache_budget_follows_batching) {
  auto c = cluster({cpu_node("n0", 1, 8 * gib)}, 3, 1);
  c.batching.max_running_requests = 64;
  c.batching.max_new_tokens_limit = 1000;
  EXPECT_EQ(kv_cache_tokens_per_shard(c, tiny()), 22 * 1000);  // ceil(64 / 3) requests
}

TEST(placement, memory_is_respected_and_accounted) {
  for (int64_t groups : {1, 3, 7, 16}) {
    auto c = cluster({cpu_node("a", 3, 3 * gib), gpu_node("b", 2, gib)}, 2, groups);
    c.redundant_expert_slots = groups > 1 ? 5 : 0;
    auto p = plan_placement(c, tiny());
    ASSERT_TRUE(p) << error_text(p.error());
    std::map<std::string, uint64_t> used;
    for (const auto& a : p->attention) used[a.device.to_string()] += a.memory_bytes;
    for (const auto& g : p->expert_groups) used[g.device.to_string()] += g.memory_bytes;
    for (const auto& d : p->devices) {
      EXPECT_LE(d.used_bytes, d.capacity_bytes) << d.device.to_string();
      EXPECT_EQ(d.used_bytes, used[d.device.to_string()]) << d.device.to_string();
    }
  }
}

TEST(placement, packs_tighter_when_spreading_does_not_fit) {
  // Two slots of exactly two attention shards each, and one expert group bigger than what is
  // left beside a shard: spreading the shards fails, packing them together fits.
  placement_options o;
  o.kv_cache_tokens = 0;
  const auto mem = model_memory_estimate(tiny(), 4);
  const uint64_t shard = mem.attention_bytes + mem.router_bytes;
  const uint64_t group = 16 * mem.per_expert_bytes + mem.shared_expert_bytes;
  ASSERT_GT(group, shard);
  ASSERT_LE(group, 2 * shard);
  auto p = plan_placement(cluster({cpu_node("n0", 2, 4 * shard)}, 2, 1), tiny(), o);
  ASSERT_TRUE(p) << error_text(p.error());
  EXPECT_EQ(p->expert_groups[0].device.to_string(), "n0/cpu0");
  EXPECT_EQ(p->attention[0].device.to_string(), "n0/cpu1");
  EXPECT_EQ(p->attention[1].device.to_string(), "n0/cpu1");
}

// ---- infeasible ----

TEST(placement_infeasible, an_actor_larger_than_every_device) {
  auto p = plan_placement(cluster({cpu_node("n0", 4, 64 << 20)}, 1, 2), tiny());  // 16 MiB slots
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code(), static_cast<uint8_t>(scheduler_errc::infeasible));
  const std::string text = error_of(p);
  EXPECT_EQ(text.rfind("infeasible: attention shard 0 needs 72.5 MiB (weights ", 0), 0u) << text;
  EXPECT_NE(text.find("KV cache 72 MiB for 262144 tokens"), std::string::npos) << text;
  EXPECT_NE(text.find("but the largest device (n0/cpu0) holds 16 MiB"), std::string::npos) << text;
}

TEST(placement_infeasible, more_bytes_than_the_cluster) {
  placement_options o;
  o.kv_cache_tokens = 0;
  const auto mem = model_memory_estimate(tiny(), 4);
  // Each shard fits a slot, all four do not fit the node.
  const uint64_t shard = mem.attention_bytes + mem.router_bytes;
  auto p = plan_placement(cluster({cpu_node("n0", 2, 2 * shard + 2 * mem.per_expert_bytes * 16)}, 4, 1),
                          tiny(), o);
  EXPECT_EQ(error_of(p).rfind("infeasible: the actors need ", 0), 0u) << error_of(p);
  EXPECT_NE(error_of(p).find("but the 2 devices hold "), std::string::npos) << error_of(p);
}

TEST(placement_infeasible, no_packing_fits) {
  // Three shards over two slots of 1.6 shards (plus the expert group): every actor fits alone
  // and the total fits, but no slot takes two shards.
  placement_options o;
  o.kv_cache_tokens = 36000;  // shards of ~10.6 MiB, far larger than the 816 KiB group
  const auto mem = model_memory_estimate(tiny(), 4);
  const uint64_t shard = mem.attention_bytes + mem.router_bytes + 36000 * mem.kv_cache_bytes_per_token;
  const uint64_t group = 16 * mem.per_expert_bytes + mem.shared_expert_bytes;
  const uint64_t slot = shard * 16 / 10 + group;
  ASSERT_LT(slot, 2 * shard);
  auto p = plan_placement(cluster({cpu_node("n0", 2, 2 * slot)}, 3, 1), tiny(), o);
  const std::string text = error_of(p);
  EXPECT_EQ(text.rfind("infeasible: attention shard 2 needs ", 0), 0u) << text;
  EXPECT_NE(text.find("but the largest free device (n0/cpu"), std::string::npos) << text;
}

TEST(placement_infeasible, bad_assignment_is_not_infeasible) {
  auto p = plan_placement(cluster({cpu_node("n0", 4, 8 * gib)}, 1, 20), tiny());
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code(), static_cast<uint8_t>(scheduler_errc::bad_assignment));
}

// ---- determinism and renderings ----

TEST(placement, deterministic) {
  auto c = cluster({cpu_node("a", 3, 2 * gib), gpu_node("b", 3, gib), cpu_node("c", 1, gib)}, 3, 9);
  c.redundant_expert_slots = 7;
  auto first = plan_placement(c, tiny());
  ASSERT_TRUE(first) << error_text(first.error());
  for (int i = 0; i < 5; ++i) {
    auto again = plan_placement(c, tiny());
    ASSERT_TRUE(again);
    EXPECT_EQ(*again, *first);
    EXPECT_EQ(to_json(*again).dump(), to_json(*first).dump());
  }
}

TEST(placement, json_round_trip) {
  auto c = cluster({cpu_node("a", 2, 2 * gib), gpu_node("b", 2, gib)}, 2, 5);
  c.redundant_expert_slots = 3;
  auto p = plan_placement(c, tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  const auto j = to_json(*p);
  EXPECT_EQ(j["version"], 1);
  EXPECT_EQ(j["attention"][0]["device"]["name"], p->attention[0].device.to_string());
  EXPECT_EQ(j["expert_groups"][0]["holds_shared_experts"], true);
  auto back = placement_from_json(j);
  ASSERT_TRUE(back) << error_text(back.error());
  EXPECT_EQ(*back, *p);

  auto broken = j;
  broken["devices"][0]["device"]["kind"] = "tpu";
  auto bad = placement_from_json(broken);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), static_cast<uint8_t>(scheduler_errc::bad_placement));
  EXPECT_FALSE(placement_from_json(nlohmann::json::object()));
}

TEST(placement, table_lists_actors_and_devices) {
  auto c = cluster({cpu_node("local", 4, 8 * gib)}, 1, 3);
  c.expert_groups.experts = {{0, 1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11}, {12, 13, 14, 15}};
  auto p = plan_placement(c, tiny());
  ASSERT_TRUE(p) << error_text(p.error());
  const std::string t = render_table(*p);
  EXPECT_NE(t.find("attention 0"), std::string::npos) << t;
  EXPECT_NE(t.find("experts 0-6 (7) + shared"), std::string::npos) << t;
  EXPECT_NE(t.find("experts 12-15 (4)"), std::string::npos) << t;
  EXPECT_NE(t.find("local/cpu3"), std::string::npos) << t;
  EXPECT_NE(t.find("2 GiB"), std::string::npos) << t;
}

}  // namespace
}  // namespace moe::scheduler
