// Shards that run the whole model on one engine (actors/engine_shard.hpp), behind the real
// controller: many concurrent requests, greedy and sampled, get the reference engine's tokens
// alone (tiny-v3's golden continuation among them), as from the actor graph; a step's logits are
// the engine's; bad steps are refused and leave the cache as it was; training is refused; the
// shard reports its cache and its steps (docs/metrics.md).
// The engine here is the reference engine (model::reference_step_engine); the GPU engine's
// adapter is tested against it in tests/unit/engine/gpu_step_engine_test.cpp.
#include "actors/engine_shard.hpp"

#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <map>

#include "actors/actor_types.hpp"
#include "actors/controller.hpp"
#include "model/model_errc.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/golden/golden_data.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;

using moe::actors::testing::tiny;
using moe::actors::testing::tiny_checkpoint;

namespace {

std::unique_ptr<model::step_engine> reference_shard_engine(int64_t cache_blocks = 64) {
  model::engine_options o;
  o.cache.block_size = 16;
  o.cache.num_blocks = cache_blocks;
  auto e = model::reference_engine::create(tiny_checkpoint(), o);
  EXPECT_TRUE(e) << error_text(e.error());
  return std::make_unique<model::reference_step_engine>(std::move(*e));
}

struct harness {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::vector<attention_actor> shards;
  controller_actor controller;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();

  explicit harness(int num_shards, controller_limits limits = {}) {
    for (int s = 0; s < num_shards; ++s) {
      engine_shard_options o;
      o.shard = s;
      o.metrics = registry;
      shards.push_back(spawn_engine_shard(sys, reference_shard_engine(), o));
    }
    controller_options o;
    o.shards = shards;
    o.limits = limits;
    o.vocab_size = 512;
    o.metrics = registry;
    controller = spawn_controller(sys, o);
  }
  ~harness() {
    caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    // Detached: the system waits for their threads, so they must end before it goes.
    caf::scoped_actor self{sys};
    for (auto& s : shards) {
      caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
      self->wait_for(s);
    }
  }
};

step_result step(caf::scoped_actor& self, const attention_actor& shard, step_request req,
                 caf::error* failure) {
  step_result out;
  self->request(shard, 60s, step_atom::value, std::move(req))
      .receive([&](step_result& r) { out = std::move(r); },
               [&](caf::error& e) { *failure = std::move(e); });
  return out;
}

step_request prefill_of(uint64_t step,
                        std::vector<std::pair<uint64_t, std::vector<int32_t>>> prompts,
                        bool want_logits = false) {
  step_request r;
  r.step = step;
  r.prefill = true;
  r.want_logits = want_logits;
  for (auto& [id, tokens] : prompts) r.entries.push_back({id, std::move(tokens), {}, 0});
  return r;
}

}  // namespace

TEST(engine_shard, concurrent_requests_through_the_controller_get_the_reference_engines_tokens) {
  controller_limits lim;
  lim.max_running_requests = 5;  // later requests join running batches
  lim.max_batch_tokens = 24;     // and prefills are split
  harness h(2, lim);
  caf::scoped_actor self{h.sys};
  std::vector<generation_job> jobs;
  const auto golden = moe::testing::golden_file::open(tiny() / "golden.safetensors");
  generation_job first;
  first.prompt = golden.ids("greedy_prompt");
  first.max_new_tokens = 16;
  jobs.push_back(first);
  for (int i = 0; i < 11; ++i) {
    generation_job j;
    for (int t = 0; t <= i % 7; ++t) j.prompt.push_back((37 * i + 11 * t + 3) % 512);
    j.max_new_tokens = 3 + (i * 5) % 11;
    if (i % 3 == 2) j.sampling = {0.8f, 20, 0.9f, static_cast<uint64_t>(i)};
    jobs.push_back(j);
  }
  std::vector<uint64_t> ids;
  for (const auto& j : jobs)
    self->request(h.controller, caf::infinite, submit_atom::value, j, caf::actor{self})
        .receive([&](uint64_t id) { ids.push_back(id); },
                 [&](const caf::error& e) { FAIL() << error_text(e); });
  std::map<uint64_t, std::vector<int32_t>> streamed;
  std::map<uint64_t, job_event> finals;
  while (finals.size() < ids.size()) {
    bool timed_out = false;
    self->receive(
        [&](job_event_atom, const job_event& ev) {
          auto& s = streamed[ev.job];
          s.insert(s.end(), ev.tokens.begin(), ev.tokens.end());
          if (ev.finished) finals[ev.job] = ev;
        },
        caf::after(60s) >> [&] { timed_out = true; });
    ASSERT_FALSE(timed_out) << finals.size() << " of " << ids.size() << " requests finished";
  }
  EXPECT_EQ(streamed[ids[0]], golden.ids("greedy_tokens"));

  auto engine = model::reference_engine::create(tiny_checkpoint());
  ASSERT_TRUE(engine);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto r = moe::actors::testing::reference_request_of(jobs[i]);
    auto alone = model::generate(*engine, std::span(&r, 1));
    ASSERT_TRUE(alone);
    EXPECT_EQ(streamed[ids[i]], (*alone)[0]) << "request " << i;
    EXPECT_EQ(finals[ids[i]].state, job_state::finished) << finals[ids[i]].error;
  }
  const auto text = prometheus::TextSerializer().Serialize(h.registry->Collect());
  EXPECT_NE(text.find("moe_controller_requests_total{outcome=\"finished\"} 12"), std::string::npos)
      << text;
  EXPECT_NE(text.find("moe_actor_mailbox_depth{actor=\"attention\",id=\"1\"}"), std::string::npos)
      << text;
}

TEST(engine_shard, logits_are_the_engines_and_bad_steps_change_nothing) {
  harness h(1);
  caf::scoped_actor self{h.sys};
  const auto& shard = h.shards[0];
  const auto golden = moe::testing::golden_file::open(tiny() / "golden.safetensors");
  const auto ids = golden.ids("input_ids");
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 9);

  caf::error failure;
  auto first = step(self, shard, prefill_of(1, {{7, prompt}}, true), &failure);
  ASSERT_FALSE(failure) << error_text(failure);
  ASSERT_EQ(first.sequences, std::vector<uint64_t>{7});
  ASSERT_EQ(first.logits.shape, (std::vector<int64_t>{1, 512}));
  auto want = model::reference_engine::create(tiny_checkpoint());
  ASSERT_TRUE(want);
  const model::sequence_input in{7, prompt};
  auto want_logits = want->prefill(std::span(&in, 1));
  ASSERT_TRUE(want_logits);
  ASSERT_EQ(first.logits.num_elements(), 512);
  EXPECT_TRUE(
      std::equal(want_logits->logits.begin(), want_logits->logits.end(), first.logits.data()));
  int32_t greedy = 0;
  ASSERT_EQ(kernels::cpu::sample_greedy(want_logits->logits.data(), 512, &greedy),
            kernels::kernel_status::ok);
  EXPECT_EQ(first.tokens, std::vector<int32_t>{greedy});

  // Refused, and nothing of them stays: a sequence already cached, a token outside the
  // vocabulary beside a good prompt, a decode of an unknown sequence, out-of-range sampling.
  step(self, shard, prefill_of(2, {{7, {1, 2}}}), &failure);
  EXPECT_TRUE(failure) << "a cached sequence prefilled again";
  failure = {};
  step(self, shard, prefill_of(3, {{8, {1, 2}}, {9, {3, 512}}}), &failure);
  ASSERT_TRUE(failure);
  EXPECT_NE(error_text(failure).find("512"), std::string::npos) << error_text(failure);
  failure = {};
  step_request decode;
  decode.step = 4;
  decode.entries.push_back({99, {5}, {}, 0});
  step(self, shard, decode, &failure);
  EXPECT_TRUE(failure) << "a decode of an unknown sequence";
  failure = {};
  auto bad_sampling = prefill_of(5, {{10, {1, 2}}});
  bad_sampling.entries[0].sampling.top_p = 0.0f;
  step(self, shard, bad_sampling, &failure);
  ASSERT_TRUE(failure);
  EXPECT_NE(error_text(failure).find("top_p"), std::string::npos) << error_text(failure);
  failure = {};

  // Sequences 8 and 10 were not cached by their failed steps; 7 decodes on as if none had run.
  auto again = step(self, shard, prefill_of(6, {{8, {1, 2}}, {10, {4}}}), &failure);
  ASSERT_FALSE(failure) << error_text(failure);
  EXPECT_EQ(again.sequences, (std::vector<uint64_t>{8, 10}));
  decode.step = 7;
  decode.want_logits = true;
  decode.entries = {{7, {first.tokens[0]}, {}, 0}};
  auto next = step(self, shard, decode, &failure);
  ASSERT_FALSE(failure) << error_text(failure);
  const model::decode_input d{7, first.tokens[0]};
  auto want_next = want->decode(std::span(&d, 1));
  ASSERT_TRUE(want_next);
  ASSERT_EQ(next.logits.num_elements(), 512);
  EXPECT_TRUE(std::equal(want_next->begin(), want_next->end(), next.logits.data()));

  // Released, 7 can be prefilled anew.
  caf::anon_send(shard, release_atom::value, std::vector<uint64_t>{7});
  step(self, shard, prefill_of(8, {{7, {1}}}), &failure);
  EXPECT_FALSE(failure) << error_text(failure);
}

TEST(engine_shard, a_full_cache_fails_the_step_and_frees_what_it_took) {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto registry = std::make_shared<prometheus::Registry>();
  engine_shard_options o;
  o.metrics = registry;
  // Two blocks of 16 tokens: a 20-token prompt beside a 16-token one does not fit.
  auto shard = spawn_engine_shard(sys, reference_shard_engine(2), o);
  caf::error failure;
  step(self, shard,
       prefill_of(1, {{1, std::vector<int32_t>(16, 3)}, {2, std::vector<int32_t>(20, 4)}}),
       &failure);
  ASSERT_TRUE(failure);
  EXPECT_EQ(failure.category(), caf::atom("model")) << error_text(failure);
  EXPECT_EQ(static_cast<model::model_errc>(failure.code()), model::model_errc::cache_full)
      << error_text(failure);
  auto metrics = [&] { return prometheus::TextSerializer().Serialize(registry->Collect()); };
  auto text = metrics();
  EXPECT_NE(text.find("moe_attention_free_cache_blocks{shard=\"0\"} 2\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("moe_engine_step_failures_total{phase=\"prefill\",shard=\"0\"} 1\n"),
            std::string::npos)
      << text;

  failure = {};
  auto ran = step(self, shard, prefill_of(2, {{2, std::vector<int32_t>(20, 4)}}), &failure);
  EXPECT_FALSE(failure) << "the failed step kept blocks: " << error_text(failure);
  step_request decode;
  decode.step = 3;
  decode.entries.push_back({2, {ran.tokens.at(0)}, {}, 0});
  step(self, shard, decode, &failure);
  EXPECT_FALSE(failure) << error_text(failure);
  text = metrics();
  EXPECT_NE(text.find("moe_attention_free_cache_blocks{shard=\"0\"} 0\n"), std::string::npos)
      << text;
  // The failed step's 36 prompt tokens are not counted; both prefills were timed.
  EXPECT_NE(text.find("moe_engine_tokens_total{phase=\"prefill\",shard=\"0\"} 20\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("moe_engine_tokens_total{phase=\"decode\",shard=\"0\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("moe_engine_step_seconds_count{phase=\"prefill\",shard=\"0\"} 2\n"),
            std::string::npos)
      << text;

  // A release frees the blocks, and the gauge says so once it has run: a request answered
  // after it (mailbox order) that runs no step, training's refusal, tells when.
  caf::anon_send(shard, release_atom::value, std::vector<uint64_t>{2});
  self->request(shard, 10s, train_state_atom::value)
      .receive([](owner_state&) { ADD_FAILURE() << "answered"; }, [](caf::error&) {});
  text = metrics();
  EXPECT_NE(text.find("moe_attention_free_cache_blocks{shard=\"0\"} 2\n"), std::string::npos)
      << text;
  step(self, shard, decode, &failure);
  EXPECT_TRUE(failure) << "a decode of a released sequence";
  text = metrics();
  EXPECT_NE(text.find("moe_engine_step_failures_total{phase=\"decode\",shard=\"0\"} 1\n"),
            std::string::npos)
      << text;
  caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
  self->wait_for(shard);
}

TEST(engine_shard, training_is_refused_with_the_reason) {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto shard = spawn_engine_shard(sys, reference_shard_engine(), {});
  std::string text;
  self->request(shard, 10s, train_state_atom::value)
      .receive([](owner_state&) { ADD_FAILURE() << "answered"; },
               [&](caf::error& e) { text = error_text(e); });
  EXPECT_NE(text.find("training runs on the actor graph"), std::string::npos) << text;
  caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
  self->wait_for(shard);
}
