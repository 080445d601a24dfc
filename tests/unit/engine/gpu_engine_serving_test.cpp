// `moe serve --engine gpu`'s path end to end: a serving cluster whose engine shard runs the GPU
// engine (engine::gpu_step_engine, f32) behind the real controller and job API, reached by the
// C++ job client over Cap'n Proto. Concurrent clients get tiny-v3's golden greedy continuation
// and the reference engine's greedy tokens (f32 logits within ~1e-6 of the reference's, far
// below these paths' top-1 margins: gpu_engine_test.cpp), sampled requests their full length;
// describe() names the shard's device; the shard reports its steps on /metrics. The same with the
// shard an expert-parallel group of two GPUs (`moe serve --engine gpu --expert-parallel 2`:
// engine::expert_parallel_step_engine, the routed experts split between them). Skipped without
// a GPU (the group: without two); CI runs it in the emulator (tests/emulator/engine), where it
// is the only test of the GPU engine behind the actors.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "actors/serving_cluster.hpp"
#include "engine/expert_parallel_step_engine.hpp"
#include "engine/gpu_step_engine.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/actors/job_clients.hpp"
#include "tests/unit/actors/system_config.hpp"
#include "tests/unit/actors/tiny_fixture.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/runtime/nccl_world.hpp"

using namespace moe;
using moe::actors::testing::tiny;

namespace {

runtime::cluster_config gpu_config() {
  const std::string yaml =
      "cluster: {name: gpu-serving-test, secret: gpu-secret}\n"
      "nodes:\n  - {name: n0, host: 127.0.0.1, devices: {cpu_slots: 2}, memory: 4GiB}\n"
      "model: {path: " +
      tiny().string() +
      "}\n"
      "batching: {max_running_requests: 8}\n"
      "ports: {control: 0, api: 0, metrics: 0}\n";
  auto c = runtime::parse_cluster_config(yaml, "gpu-serving-test.yaml");
  EXPECT_TRUE(c) << error_text(c.error());
  return *c;
}

}  // namespace

/// GPUs per engine shard: 1, the GPU engine; more, an expert-parallel group.
class gpu_engine_serving : public ::testing::TestWithParam<int> {};

TEST_P(gpu_engine_serving, clients_get_the_reference_engines_greedy_tokens_from_a_gpu_shard) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const int group = GetParam();
  if (const auto why = moe::test_support::cannot_form(group); !why.empty()) GTEST_SKIP() << why;
  const auto ckpt = moe::testing::load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  auto sys_cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{sys_cfg};

  actors::serving_options o;
  o.api_port = 0;
  o.metrics_port = 0;
  o.num_engine_shards = 1;
  o.make_engine = [ckpt, group](int shard, const std::filesystem::path&,
                                const model::latent_cache_options& cache)
      -> caf::expected<std::unique_ptr<model::step_engine>> {
    engine::gpu_engine_options eo;
    eo.dtype = kernels::dtype::f32;
    eo.device = shard;
    eo.cache = cache;
    if (group > 1) {
      engine::expert_parallel_group_options go;
      go.engine = eo;
      for (int r = 0; r < group; ++r) go.devices.push_back(r);
      go.max_tokens_per_rank = 64;
      auto g = engine::expert_parallel_step_engine::create(ckpt, go);
      if (!g) return g.error();
      return std::unique_ptr<model::step_engine>(std::move(*g));
    }
    auto e = engine::gpu_engine::create(ckpt, eo);
    if (!e) return e.error();
    return std::make_unique<engine::gpu_step_engine>(std::move(*e), shard);
  };
  auto cluster = actors::serving_cluster::start(sys, gpu_config(), o);
  ASSERT_TRUE(cluster) << error_text(cluster.error());
  auto& c = **cluster;
  ASSERT_TRUE(c.serves_engine_shards());

  const auto golden = moe::testing::golden_file::open(tiny() / "golden.safetensors");
  std::vector<client::generation_request_spec> specs(4);
  specs[0].prompt = golden.ids("greedy_prompt");
  specs[0].max_new_tokens = 16;
  specs[1].prompt = {5, 17, 42};
  specs[1].max_new_tokens = 9;
  specs[2].prompt = {100, 200, 300, 400, 500, 7, 8};
  specs[2].max_new_tokens = 6;
  specs[3].prompt = {9, 99, 199};
  specs[3].max_new_tokens = 7;
  specs[3].temperature = 0.9f;
  specs[3].top_k = 40;
  specs[3].seed = 11;
  const auto got = moe::actors::testing::generate_concurrently(c.api_port(), "gpu-secret", specs);

  auto reference = model::reference_engine::create(ckpt);
  ASSERT_TRUE(reference);
  for (size_t i = 0; i < specs.size(); ++i) {
    ASSERT_TRUE(got[i]) << "client " << i << ": " << error_text(got[i].error());
    EXPECT_EQ(got[i]->size(), static_cast<size_t>(specs[i].max_new_tokens)) << "client " << i;
    if (specs[i].temperature > 0.0f) continue;  // a draw may differ near a boundary
    model::generation_request r;
    r.prompt = specs[i].prompt;
    r.max_new_tokens = specs[i].max_new_tokens;
    auto want = model::generate(*reference, std::span(&r, 1));
    ASSERT_TRUE(want);
    EXPECT_EQ(*got[i], (*want)[0]) << "client " << i;
  }
  EXPECT_EQ(*got[0], golden.ids("greedy_tokens"));

  auto cl = client::job_client::connect("127.0.0.1", c.api_port(), "gpu-secret");
  ASSERT_TRUE(cl) << error_text(cl.error());
  auto d = (*cl)->describe();
  ASSERT_TRUE(d) << error_text(d.error());
  bool described = false;
  for (const auto& a : d->actors)
    if (a.kind == "engine_shard") {
      described = true;
      EXPECT_NE(a.device.find(group > 1 ? "cuda:0,1" : "cuda:0"), std::string::npos) << a.device;
    }
  EXPECT_TRUE(described);
  const auto text = prometheus::TextSerializer().Serialize(c.registry()->Collect());
  EXPECT_NE(text.find("moe_engine_tokens_total{phase=\"decode\",shard=\"0\"}"), std::string::npos)
      << text;
  c.stop();
}

INSTANTIATE_TEST_SUITE_P(gpus_per_shard, gpu_engine_serving, ::testing::Values(1, 2),
                         [](const auto& info) { return "of_" + std::to_string(info.param); });
