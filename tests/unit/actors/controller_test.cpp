// The controller with real actors: continuous batching of many concurrent requests of different
// lengths gives each exactly what it gets alone; stop tokens, max tokens, per-request sampling,
// cancellation and backpressure.
#include "actors/controller.hpp"

#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <map>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;

using moe::actors::testing::tiny;

namespace {

struct harness {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::unique_ptr<local_cluster> cluster;
  controller_actor controller;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();

  explicit harness(controller_limits limits, int shards = 2, int groups = 3) {
    auto layout = even_layout(shards, groups, 16);
    layout.metrics = registry;
    auto c = local_cluster::start(sys, tiny(), layout);
    EXPECT_TRUE(c) << error_text(c.error());
    cluster = std::move(*c);
    controller_options o;
    o.shards = cluster->shards();
    o.limits = limits;
    o.vocab_size = 512;
    o.metrics = registry;
    controller = spawn_controller(sys, o);
  }
  ~harness() { caf::anon_send_exit(controller, caf::exit_reason::user_shutdown); }
};

generation_job job_of(std::vector<int32_t> prompt, int64_t n) {
  generation_job j;
  j.prompt = std::move(prompt);
  j.max_new_tokens = n;
  return j;
}

// Submits every job, then collects events until each has finished. Returns per job: tokens.
std::map<uint64_t, job_event> run_all(harness& h, caf::scoped_actor& self,
                                      const std::vector<generation_job>& jobs,
                                      std::vector<uint64_t>& ids,
                                      std::map<uint64_t, std::vector<int32_t>>& streamed) {
  for (const auto& j : jobs) {
    self->request(h.controller, caf::infinite, submit_atom::value, j, caf::actor{self})
        .receive([&](uint64_t id) { ids.push_back(id); },
                 [&](const caf::error& e) { ADD_FAILURE() << error_text(e); });
  }
  std::map<uint64_t, job_event> finals;
  while (finals.size() < ids.size()) {
    self->receive(
        [&](job_event_atom, const job_event& ev) {
          auto& s = streamed[ev.job];
          s.insert(s.end(), ev.tokens.begin(), ev.tokens.end());
          if (ev.finished) finals[ev.job] = ev;
        },
        caf::after(std::chrono::seconds(60)) >> [&] { ADD_FAILURE() << "timed out"; });
    if (::testing::Test::HasFailure()) break;
  }
  return finals;
}

}  // namespace

TEST(controller, concurrent_requests_each_get_what_they_get_alone) {
  controller_limits lim;
  lim.max_running_requests = 5;  // forces later requests to join running batches
  lim.max_batch_tokens = 24;     // and to split prefills
  harness h(lim);
  caf::scoped_actor self{h.sys};
  std::vector<generation_job> jobs;
  for (int i = 0; i < 14; ++i) {
    std::vector<int32_t> prompt;
    for (int t = 0; t <= i % 7; ++t) prompt.push_back((37 * i + 11 * t + 3) % 512);
    auto j = job_of(prompt, 3 + (i * 5) % 11);
    if (i % 4 == 3) j.sampling = {0.8f, 20, 0.9f, static_cast<uint64_t>(i)};
    jobs.push_back(j);
  }
  std::vector<uint64_t> ids;
  std::map<uint64_t, std::vector<int32_t>> streamed;
  auto finals = run_all(h, self, jobs, ids, streamed);
  ASSERT_EQ(finals.size(), jobs.size());

  // Alone: the reference engine, one request at a time.
  auto engine = model::reference_engine::create(moe::actors::testing::tiny_checkpoint());
  ASSERT_TRUE(engine);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto r = moe::actors::testing::reference_request_of(jobs[i]);
    auto alone = model::generate(*engine, std::span(&r, 1));
    ASSERT_TRUE(alone);
    EXPECT_EQ(streamed[ids[i]], (*alone)[0]) << "request " << i;
    EXPECT_EQ(finals[ids[i]].state, job_state::finished);
    EXPECT_EQ(finals[ids[i]].finish_reason, "length");
  }
  // Status agrees with the stream; metrics counted every request.
  self->request(h.controller, caf::infinite, status_atom::value, ids[3])
      .receive([&](const job_status& s) { EXPECT_EQ(s.tokens, streamed[ids[3]]); },
               [&](const caf::error& e) { FAIL() << error_text(e); });
  const auto text = prometheus::TextSerializer().Serialize(h.registry->Collect());
  EXPECT_NE(text.find("moe_controller_requests_total{outcome=\"finished\"} 14"), std::string::npos)
      << text;
  // Every generated token but the last of each request went through the routers of both MoE
  // layers, plus the prompts: top-4 choices per token per layer.
  size_t tokens_through_model = 0;
  for (size_t i = 0; i < jobs.size(); ++i)
    tokens_through_model += jobs[i].prompt.size() + streamed[ids[i]].size() - 1;
  double routed = 0;
  for (const auto& fam : h.registry->Collect())
    if (fam.name == "moe_router_tokens_routed_total")
      for (const auto& m : fam.metric) routed += m.counter.value;
  EXPECT_EQ(routed, static_cast<double>(tokens_through_model * 2 * 4));
  EXPECT_NE(text.find("moe_actor_mailbox_depth{actor=\"expert_group\""), std::string::npos);
}

TEST(controller, stop_tokens_end_a_request_and_are_kept) {
  harness h(controller_limits{}, 1, 2);
  caf::scoped_actor self{h.sys};
  // First learn what greedy produces, then stop at its third token.
  std::vector<uint64_t> ids;
  std::map<uint64_t, std::vector<int32_t>> streamed;
  auto free_run = run_all(h, self, {job_of({5, 17, 42}, 8)}, ids, streamed);
  const auto tokens = streamed[ids[0]];
  ASSERT_EQ(tokens.size(), 8u);
  auto j = job_of({5, 17, 42}, 8);
  j.stop_token_ids = {tokens[2]};
  std::vector<uint64_t> ids2;
  std::map<uint64_t, std::vector<int32_t>> streamed2;
  auto finals = run_all(h, self, {j}, ids2, streamed2);
  const auto first = std::find(tokens.begin(), tokens.end(), tokens[2]);
  EXPECT_EQ(streamed2[ids2[0]], std::vector<int32_t>(tokens.begin(), first + 1));
  EXPECT_EQ(finals[ids2[0]].finish_reason, "stop");
}

TEST(controller, a_full_queue_answers_overloaded_and_loses_nothing) {
  controller_limits lim;
  lim.max_queue = 2;
  lim.max_running_requests = 1;
  harness h(lim, 1, 1);
  caf::scoped_actor self{h.sys};
  std::vector<uint64_t> accepted;
  int overloaded = 0;
  // All eight submits are in the controller's mailbox before the first answer is read: sent one
  // at a time, each after the answer to the one before, a fast run could finish the running
  // job between two of them, and nothing would ever be refused.
  using handle = decltype(self->request(h.controller, caf::infinite, submit_atom::value,
                                        job_of({1, 2, 3}, 30), caf::actor{self}));
  std::vector<handle> submits;
  for (int i = 0; i < 8; ++i)
    submits.push_back(self->request(h.controller, caf::infinite, submit_atom::value,
                                    job_of({1, 2, 3}, 30), caf::actor{self}));
  for (auto& submit : submits)
    submit.receive([&](uint64_t id) { accepted.push_back(id); },
                   [&](const caf::error& e) {
                     EXPECT_NE(error_text(e).find("overloaded"), std::string::npos)
                         << error_text(e);
                     ++overloaded;
                   });
  EXPECT_GT(overloaded, 0);
  EXPECT_EQ(accepted.size() + overloaded, 8u);
  // Every accepted request completes.
  std::map<uint64_t, bool> done;
  while (done.size() < accepted.size()) {
    self->receive([&](job_event_atom, const job_event& ev) { if (ev.finished) done[ev.job] = true; },
                  caf::after(std::chrono::seconds(60)) >> [&] { FAIL() << "timed out"; });
  }
  for (auto id : accepted) EXPECT_TRUE(done[id]);
}

TEST(controller, cancellation_ends_queued_and_running_requests) {
  controller_limits lim;
  lim.max_running_requests = 1;
  harness h(lim, 1, 2);
  caf::scoped_actor self{h.sys};
  uint64_t running = 0, queued = 0;
  self->request(h.controller, caf::infinite, submit_atom::value, job_of({9, 8, 7}, 400), caf::actor{self})
      .receive([&](uint64_t id) { running = id; }, [&](const caf::error& e) { FAIL() << error_text(e); });
  self->request(h.controller, caf::infinite, submit_atom::value, job_of({1}, 400), caf::actor{self})
      .receive([&](uint64_t id) { queued = id; }, [&](const caf::error& e) { FAIL() << error_text(e); });
  // Let the first produce a few tokens, then cancel both.
  int seen = 0;
  while (seen < 3) {
    self->receive([&](job_event_atom, const job_event& ev) { if (ev.job == running) seen += ev.tokens.size(); });
  }
  for (auto id : {queued, running}) {
    self->request(h.controller, caf::infinite, cancel_atom::value, id)
        .receive([&](bool active) { EXPECT_TRUE(active); },
                 [&](const caf::error& e) { FAIL() << error_text(e); });
  }
  std::map<uint64_t, job_event> finals;
  while (finals.size() < 2) {
    self->receive([&](job_event_atom, const job_event& ev) { if (ev.finished) finals[ev.job] = ev; },
                  caf::after(std::chrono::seconds(60)) >> [&] { FAIL() << "timed out"; });
  }
  EXPECT_EQ(finals[queued].state, job_state::cancelled);
  EXPECT_EQ(finals[running].state, job_state::cancelled);
  // The shard is free again: a new request runs to completion.
  std::vector<uint64_t> ids;
  std::map<uint64_t, std::vector<int32_t>> streamed;
  auto after = run_all(h, self, {job_of({4, 5}, 4)}, ids, streamed);
  EXPECT_EQ(streamed[ids[0]].size(), 4u);
}

TEST(controller, invalid_requests_are_rejected_with_a_reason) {
  harness h(controller_limits{}, 1, 1);
  caf::scoped_actor self{h.sys};
  auto expect_invalid = [&](generation_job j, const std::string& what) {
    self->request(h.controller, caf::infinite, submit_atom::value, j, caf::actor{self})
        .receive([&](uint64_t) { ADD_FAILURE() << "accepted: " << what; },
                 [&](const caf::error& e) { EXPECT_NE(error_text(e).find(what), std::string::npos) << error_text(e); });
  };
  expect_invalid(job_of({}, 3), "empty");
  expect_invalid(job_of({1, 512}, 3), "outside the vocabulary");
  expect_invalid(job_of({1}, -1), "max_new_tokens");
  auto j = job_of({1}, 3);
  j.sampling.top_p = 0.0f;
  expect_invalid(j, "top_p");
}
