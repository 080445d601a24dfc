// Inference through the actors equals the reference engine for every placement: 1 or 2
// attention shards, 1 to 4 expert groups, even and uneven splits, replicas; and it reproduces
// tiny-v3's golden greedy tokens and logits.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "protocol/load_report_codec.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/golden/golden_data.hpp"
#include "tiny_fixture.hpp"

using namespace moe;

using moe::actors::testing::golden_ids;
using moe::actors::testing::tiny;

namespace {

std::vector<float> golden_floats(const std::string& name) {
  return moe::testing::golden_file::open(tiny() / "golden.safetensors").floats(name);
}

struct layout_case {
  std::string name;
  actors::cluster_layout layout;
  friend void PrintTo(const layout_case& c, std::ostream* os) { *os << c.name; }
};

actors::expert_group_options group(int g, std::vector<int64_t> experts, bool shared = false) {
  actors::expert_group_options o;
  o.group = g;
  o.experts = std::move(experts);
  o.holds_shared_experts = shared;
  return o;
}

std::vector<layout_case> layouts() {
  std::vector<layout_case> out;
  out.push_back({"one_shard_one_group", actors::even_layout(1, 1, 16)});
  out.push_back({"one_shard_two_groups", actors::even_layout(1, 2, 16)});
  out.push_back({"two_shards_three_groups", actors::even_layout(2, 3, 16)});
  out.push_back({"two_shards_four_groups", actors::even_layout(2, 4, 16)});
  actors::cluster_layout uneven;
  uneven.num_attention_shards = 1;
  uneven.groups = {group(0, {0}), group(1, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}, true),
                   group(2, {14, 15})};
  out.push_back({"uneven_with_shared_elsewhere", uneven});
  actors::cluster_layout scattered;
  scattered.num_attention_shards = 2;
  scattered.groups = {group(0, {0, 5, 10, 15}), group(1, {1, 6, 11}), group(2, {2, 7, 12, 3}),
                      group(3, {4, 8, 9, 13, 14}, true)};
  out.push_back({"two_shards_scattered", scattered});
  actors::cluster_layout replicas;
  replicas.num_attention_shards = 1;
  replicas.groups = {group(0, {0, 1, 2, 3, 4, 5, 6, 7, 8}, true),
                     group(1, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})};
  out.push_back({"replicated_experts", replicas});
  return out;
}

class actor_exactness : public ::testing::TestWithParam<layout_case> {
 protected:
};

}  // namespace

TEST_P(actor_exactness, greedy_tokens_equal_golden_and_reference) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  auto cluster = actors::local_cluster::start(sys, tiny(), GetParam().layout);
  ASSERT_TRUE(cluster) << error_text(cluster.error());

  // The golden greedy continuation, plus a batch of prompts of different lengths and a sampled
  // request, compared with the reference engine.
  std::vector<model::generation_request> reqs(4);
  reqs[0].prompt = golden_ids("greedy_prompt");
  reqs[0].max_new_tokens = 16;
  const auto ids = golden_ids("input_ids");
  reqs[1].prompt = {ids.begin(), ids.begin() + 11};
  reqs[1].max_new_tokens = 9;
  reqs[2].prompt = {ids.begin() + 16, ids.begin() + 19};
  reqs[2].max_new_tokens = 13;
  reqs[3].prompt = {5, 17, 42};
  reqs[3].max_new_tokens = 10;
  reqs[3].sampling = {0.9f, 50, 0.9f};
  reqs[3].seed = 77;

  auto got = (*cluster)->generate(reqs);
  ASSERT_TRUE(got) << error_text(got.error());
  EXPECT_EQ((*got)[0], golden_ids("greedy_tokens"));

  auto engine = model::reference_engine::create(moe::actors::testing::tiny_checkpoint());
  ASSERT_TRUE(engine);
  auto want = model::generate(*engine, reqs);
  ASSERT_TRUE(want);
  EXPECT_EQ(*got, *want);
}

TEST_P(actor_exactness, prefill_logits_match_golden) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  auto cluster = actors::local_cluster::start(sys, tiny(), GetParam().layout);
  ASSERT_TRUE(cluster) << error_text(cluster.error());
  const auto ids = golden_ids("input_ids");
  const auto logits = golden_floats("logits");
  const size_t V = 512;
  // Feed row 0 one prefix at a time: each prefill's last-position logits must equal the golden
  // logits at that position.
  caf::scoped_actor self{sys};
  for (int64_t len : {1, 5, 16}) {
    actors::step_request req;
    req.step = static_cast<uint64_t>(len);
    req.prefill = true;
    req.want_logits = true;
    actors::step_entry e;
    e.sequence = 1000 + static_cast<uint64_t>(len);
    e.tokens = {ids.begin(), ids.begin() + len};
    req.entries.push_back(e);
    self->request((*cluster)->shards()[0], caf::infinite, actors::step_atom::value, req)
        .receive(
            [&](const actors::step_result& r) {
              ASSERT_TRUE(r.logits.data());
              float worst = 0;
              for (size_t v = 0; v < V; ++v)
                worst = std::max(worst, std::abs(r.logits.data()[v] - logits[(len - 1) * V + v]));
              EXPECT_LE(worst, 1e-4f) << "prefix length " << len;
            },
            [&](const caf::error& err) { FAIL() << error_text(err); });
  }
}

INSTANTIATE_TEST_SUITE_P(placements, actor_exactness, ::testing::ValuesIn(layouts()),
                         [](const auto& info) { return info.param.name; });

TEST(actor_errors, bad_token_ids_fail_the_step_and_leave_the_shard_usable) {
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  caf::actor_system sys{cfg};
  auto cluster = actors::local_cluster::start(sys, tiny(), actors::even_layout(1, 2, 16));
  ASSERT_TRUE(cluster);
  std::vector<model::generation_request> bad(1);
  bad[0].prompt = {5, 9999};
  bad[0].max_new_tokens = 3;
  auto r = (*cluster)->generate(bad);
  ASSERT_FALSE(r);
  EXPECT_NE(error_text(r.error()).find("outside the vocabulary"), std::string::npos);
  std::vector<model::generation_request> good(1);
  good[0].prompt = golden_ids("greedy_prompt");
  good[0].max_new_tokens = 16;
  auto g = (*cluster)->generate(good);
  ASSERT_TRUE(g) << error_text(g.error());
  EXPECT_EQ((*g)[0], golden_ids("greedy_tokens"));
}

// The router counts where tokens went: every routed token's top-k choices per MoE layer, and each
// dispatched row on the physical slot (group, expert) that served it; replicas share an
// expert's rows evenly. Reported as a Cap'n Proto LoadReport.
TEST(router_load, counts_every_choice_and_row_and_spreads_replicas_evenly) {
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  caf::actor_system sys{cfg};
  actors::cluster_layout replicas;
  replicas.num_attention_shards = 1;
  // Experts 5-8 have two replicas: slots 0-8 in group 0, slots 9-19 in group 1.
  replicas.groups = {group(0, {0, 1, 2, 3, 4, 5, 6, 7, 8}, true), group(1, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})};
  auto cluster = actors::local_cluster::start(sys, tiny(), replicas);
  ASSERT_TRUE(cluster) << error_text(cluster.error());
  std::vector<model::generation_request> reqs(2);
  reqs[0].prompt = golden_ids("greedy_prompt");
  reqs[0].max_new_tokens = 6;
  reqs[1].prompt = {5, 17, 42, 7, 9};
  reqs[1].max_new_tokens = 4;
  ASSERT_TRUE((*cluster)->generate(reqs));
  // Tokens through each MoE layer: both prompts, then one per decode step of each sequence
  // (the last sampled token is not fed back).
  const uint64_t tokens = reqs[0].prompt.size() + reqs[1].prompt.size() + (6 - 1) + (4 - 1);
  const auto& c = (*cluster)->config();
  caf::scoped_actor self{sys};
  actors::load_report_bytes bytes;
  self->request((*cluster)->routers().at(0), std::chrono::seconds(10), actors::load_report_atom::value)
      .receive([&](actors::load_report_bytes& b) { bytes = std::move(b); },
               [&](caf::error& e) { FAIL() << error_text(e); });
  auto report = protocol::decode_load_report(
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.capnp.data()), bytes.capnp.size()));
  ASSERT_TRUE(report) << error_text(report.error());
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
  ASSERT_EQ(report->layers.size(), static_cast<size_t>(moe_layers));
  for (const auto& layer : report->layers) {
    SCOPED_TRACE("layer " + std::to_string(layer.layer));
    ASSERT_EQ(layer.logical.size(), 16u);
    ASSERT_EQ(layer.physical.size(), 20u);
    const auto k = static_cast<uint64_t>(c.num_experts_per_tok);
    EXPECT_EQ(std::accumulate(layer.logical.begin(), layer.logical.end(), uint64_t{0}), tokens * k);
    EXPECT_EQ(std::accumulate(layer.physical.begin(), layer.physical.end(), uint64_t{0}), tokens * k);
    for (int e = 0; e < 16; ++e) {
      // Slots of expert e: its place in group 0 (experts 0-8) and in group 1 (experts 5-15).
      uint64_t rows = 0;
      std::vector<uint64_t> replica_rows;
      if (e <= 8) replica_rows.push_back(layer.physical[static_cast<size_t>(e)]);
      if (e >= 5) replica_rows.push_back(layer.physical[static_cast<size_t>(9 + e - 5)]);
      for (auto r : replica_rows) rows += r;
      EXPECT_EQ(rows, layer.logical[static_cast<size_t>(e)]) << "expert " << e;
      // Within a step the rows of an expert alternate between the two replicas (router.cpp):
      // per step they differ by at most one row, so over the window by at most one per step.
      if (replica_rows.size() == 2) {
        const auto gap = replica_rows[0] > replica_rows[1] ? replica_rows[0] - replica_rows[1] : replica_rows[1] - replica_rows[0];
        EXPECT_LE(gap, report->last_step - report->first_step + 1) << "expert " << e;
      }
    }
  }
}
