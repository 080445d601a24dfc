// A serving cluster of whole-model engine shards (serving_options::make_engine: what
// `moe serve --engine gpu|reference` runs) behind the real controller and job API, reached by
// the C++ job client over Cap'n Proto: concurrent clients get tiny-v3's golden greedy tokens and
// the reference engine's sampled ones; describe() lists the shards and their engines; rebalance
// and training are refused with the reason; a factory's error fails the start with the shard
// named. The shards' engines here are the CPU reference engine; the GPU engine's adapter is
// tested in tests/unit/engine/gpu_step_engine_test.cpp.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include "actors/actor_types.hpp"
#include "actors/serving_cluster.hpp"
#include "client/job_client.hpp"
#include "job_clients.hpp"
#include "model/model_errc.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/golden/golden_data.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;

using moe::actors::testing::spec_of;
using moe::actors::testing::tiny;

namespace {

runtime::cluster_config engine_config() {
  const std::string yaml =
      "cluster: {name: engine-test, secret: engine-secret}\n"
      "nodes:\n  - {name: n0, host: 127.0.0.1, devices: {cpu_slots: 2}, memory: 4GiB}\n"
      "model: {path: " +
      tiny().string() +
      "}\n"
      "ports: {control: 0, api: 0, metrics: 0}\n";
  auto c = runtime::parse_cluster_config(yaml, "engine-test.yaml");
  EXPECT_TRUE(c) << error_text(c.error());
  return *c;
}

// Reference engines over one checkpoint, sized by the cluster's cache budget; `calls` counts
// the factory's calls.
serving_options engine_options(int shards, std::shared_ptr<int> calls) {
  serving_options o;
  o.api_port = 0;
  o.metrics_port = 0;
  o.num_engine_shards = shards;
  o.make_engine = [calls](int, const std::filesystem::path& dir,
                          const model::latent_cache_options& cache)
      -> caf::expected<std::unique_ptr<model::step_engine>> {
    ++*calls;
    auto cfg = model::load_config(dir);
    if (!cfg) return cfg.error();
    auto ckpt = model::load_checkpoint(dir, *cfg);
    if (!ckpt) return ckpt.error();
    model::engine_options eo;
    eo.cache = cache;
    auto e = model::reference_engine::create(
        std::make_shared<const model::checkpoint>(std::move(*ckpt)), eo);
    if (!e) return e.error();
    return std::make_unique<model::reference_step_engine>(std::move(*e));
  };
  return o;
}

}  // namespace

TEST(engine_serving, clients_get_the_reference_engines_tokens_and_refusals_say_why) {
  auto sys_cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{sys_cfg};
  auto calls = std::make_shared<int>(0);
  auto cluster = serving_cluster::start(sys, engine_config(), engine_options(2, calls));
  ASSERT_TRUE(cluster) << error_text(cluster.error());
  auto& c = **cluster;
  EXPECT_TRUE(c.serves_engine_shards());
  EXPECT_EQ(*calls, 2);
  EXPECT_EQ(c.shards().size(), 2u);
  EXPECT_TRUE(c.routers().empty());
  EXPECT_FALSE(c.rebalancer());

  const auto golden = moe::testing::golden_file::open(tiny() / "golden.safetensors");
  auto reference = model::reference_engine::create(moe::actors::testing::tiny_checkpoint());
  ASSERT_TRUE(reference);

  // Four clients at once: the golden greedy prompt, and sampled requests.
  std::vector<client::generation_request_spec> specs;
  specs.push_back(spec_of(golden.ids("greedy_prompt"), 16));
  for (int i = 0; i < 3; ++i) {
    auto s = spec_of({5, 17, static_cast<int32_t>(42 + i)}, 7);
    s.temperature = 0.9f;
    s.top_k = 40;
    s.seed = static_cast<uint64_t>(100 + i);
    specs.push_back(s);
  }
  const auto got =
      moe::actors::testing::generate_concurrently(c.api_port(), "engine-secret", specs);
  for (size_t i = 0; i < specs.size(); ++i) {
    ASSERT_TRUE(got[i]) << "client " << i << ": " << error_text(got[i].error());
    model::generation_request r;
    r.prompt = specs[i].prompt;
    r.max_new_tokens = specs[i].max_new_tokens;
    r.sampling = {specs[i].temperature, specs[i].top_k, specs[i].top_p};
    r.seed = specs[i].seed;
    auto want = model::generate(*reference, std::span(&r, 1));
    ASSERT_TRUE(want);
    EXPECT_EQ(*got[i], (*want)[0]) << "client " << i;
  }
  EXPECT_EQ(*got[0], golden.ids("greedy_tokens"));

  auto cl = client::job_client::connect("127.0.0.1", c.api_port(), "engine-secret");
  ASSERT_TRUE(cl) << error_text(cl.error());
  auto d = (*cl)->describe();
  ASSERT_TRUE(d) << error_text(d.error());
  size_t engine_shards = 0;
  for (const auto& a : d->actors) {
    EXPECT_NE(a.kind, "router");
    EXPECT_NE(a.kind, "expert_group");
    if (a.kind == "engine_shard") {
      ++engine_shards;
      EXPECT_EQ(a.device, "cpu f32 (reference engine)");
      EXPECT_EQ(a.node, "n0");
    }
  }
  EXPECT_EQ(engine_shards, 2u);
  auto rebalanced = (*cl)->rebalance();
  ASSERT_FALSE(rebalanced);
  EXPECT_NE(error_text(rebalanced.error()).find("whole-model engine shards"), std::string::npos)
      << error_text(rebalanced.error());
  client::training_request_spec t;
  t.corpus = std::string("some text to train on, which this cluster cannot");
  auto trained = (*cl)->submit_training(t);
  ASSERT_FALSE(trained);
  EXPECT_NE(error_text(trained.error()).find("training runs on the actor graph"), std::string::npos)
      << error_text(trained.error());
  c.stop();
}

TEST(engine_serving, a_shard_whose_engine_cannot_be_made_fails_the_start_and_names_it) {
  auto sys_cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{sys_cfg};
  auto calls = std::make_shared<int>(0);
  auto o = engine_options(3, calls);
  auto good = o.make_engine;
  o.make_engine = [good](int shard, const std::filesystem::path& dir,
                         const model::latent_cache_options& cache)
      -> caf::expected<std::unique_ptr<model::step_engine>> {
    if (shard == 1)
      return model::make_error(model::model_errc::bad_input, "device 1 does not exist");
    return good(shard, dir, cache);
  };
  auto cluster = serving_cluster::start(sys, engine_config(), o);
  ASSERT_FALSE(cluster);
  EXPECT_NE(error_text(cluster.error()).find("engine shard 1: "), std::string::npos)
      << error_text(cluster.error());
  EXPECT_NE(error_text(cluster.error()).find("device 1 does not exist"), std::string::npos);
  // The engine's own code reaches the caller: a bad checkpoint is not a bad request.
  EXPECT_EQ(cluster.error().category(), caf::atom("model")) << error_text(cluster.error());
  EXPECT_EQ(static_cast<model::model_errc>(cluster.error().code()), model::model_errc::bad_input);

  o = engine_options(1, calls);
  o.join_nodes = true;
  cluster = serving_cluster::start(sys, engine_config(), o);
  ASSERT_FALSE(cluster);
  EXPECT_NE(error_text(cluster.error()).find("join_nodes"), std::string::npos)
      << error_text(cluster.error());
}
