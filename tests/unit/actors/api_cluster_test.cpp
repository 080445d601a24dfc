// The job-submission API in front of the real controller and a real actor graph (tiny-v3):
// a client over 127.0.0.1 gets the golden greedy tokens, streamed, from concurrent clients;
// status, cancel and the controller's own refusals come back through the API. Training through
// the API: a text corpus trains a few steps on the real trainer, every step's event streams
// back, and a checkpoint written through the API loads as a training checkpoint.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <thread>
#include <unistd.h>

#include "actors/actor_types.hpp"
#include "actors/api_server.hpp"
#include "actors/local_cluster.hpp"
#include "actors/trainer.hpp"
#include "actors/training_jobs.hpp"
#include "client/job_client.hpp"
#include "job_clients.hpp"
#include "model/training_checkpoint.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/golden/golden_data.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace std::chrono_literals;

using moe::actors::testing::golden_ids;
using moe::actors::testing::spec_of;
using moe::actors::testing::tiny;

namespace {

const std::string secret = "cluster secret for the api test";

struct api_cluster {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::unique_ptr<actors::local_cluster> cluster;
  actors::controller_actor controller;
  actors::trainer_actor trainer;
  actors::training_jobs_actor training_jobs;
  std::unique_ptr<actors::api_server> server;

  explicit api_cluster(actors::controller_limits limits = {}) {
    const auto layout = actors::even_layout(2, 2, 16);
    auto c = actors::local_cluster::start(sys, tiny(), layout);
    EXPECT_TRUE(c) << error_text(c.error());
    if (!c) return;
    cluster = std::move(*c);
    actors::controller_options o;
    o.shards = cluster->shards();
    o.limits = limits;
    o.vocab_size = 512;
    controller = actors::spawn_controller(sys, o);
    // Training through the same actors, as serving_cluster wires it.
    actors::trainer_options to;
    to.shards = cluster->shards();
    to.routers = cluster->routers();
    to.groups = cluster->groups();
    to.model = cluster->config();
    std::vector<std::vector<int64_t>> experts;
    for (const auto& g : layout.groups) experts.push_back(g.experts);
    to.layout = actors::uniform_layout(to.model, experts);
    trainer = actors::spawn_trainer(sys, to);
    actors::training_jobs_options jo;
    jo.trainer = trainer;
    jo.vocab_size = cluster->config().vocab_size;
    jo.max_position_embeddings = cluster->config().max_position_embeddings;
    training_jobs = actors::spawn_training_jobs(sys, jo);
    actors::api_server_options ao;
    ao.secret = secret;
    ao.cluster.name = "tiny";
    ao.training_jobs = training_jobs;
    ao.vocab_size = cluster->config().vocab_size;
    auto s = actors::api_server::start(sys, controller, ao);
    EXPECT_TRUE(s) << error_text(s.error());
    if (s) server = std::move(*s);
  }

  ~api_cluster() {
    if (server) server->stop();
    if (controller) caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (training_jobs) caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
    if (trainer) caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
  }

  std::unique_ptr<client::job_client> connect() {
    auto c = client::job_client::connect("127.0.0.1", server->port(), secret);
    EXPECT_TRUE(c) << error_text(c.error());
    return c ? std::move(*c) : nullptr;
  }
};

}  // namespace

TEST(api_with_real_controller, concurrent_clients_get_the_golden_greedy_tokens) {
  api_cluster h;
  ASSERT_TRUE(h.server);
  const auto prompt = golden_ids("greedy_prompt");
  const auto want = golden_ids("greedy_tokens");
  std::vector<std::vector<int32_t>> got(3), streamed(3);
  std::vector<caf::error> errors(3);
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&, i] {
      auto c = h.connect();
      if (!c) return;
      auto id = c->submit(spec_of(prompt, static_cast<int64_t>(want.size())),
                          [&, i](const client::client_event& e) {
                            streamed[i].insert(streamed[i].end(), e.tokens.begin(), e.tokens.end());
                          });
      if (!id) {
        errors[i] = id.error();
        return;
      }
      auto done = c->wait(*id, 120s);
      if (!done) {
        errors[i] = done.error();
        return;
      }
      got[i] = done->tokens;
    });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(errors[i]) << error_text(errors[i]);
    EXPECT_EQ(got[i], want) << "client " << i;
    EXPECT_EQ(streamed[i], want) << "client " << i;
  }
}

TEST(api_with_real_controller, status_cancel_and_refusals_come_through) {
  actors::controller_limits limits;
  limits.max_new_tokens_limit = 64;
  api_cluster h(limits);
  ASSERT_TRUE(h.server);
  auto c = h.connect();
  ASSERT_TRUE(c);

  auto tokens = c->generate(spec_of({5, 17, 42}, 6));
  ASSERT_TRUE(tokens) << error_text(tokens.error());
  EXPECT_EQ(tokens->size(), 6u);

  auto id = c->submit(spec_of({5, 17, 42}, 64));
  ASSERT_TRUE(id) << error_text(id.error());
  auto was_active = c->cancel(*id);
  ASSERT_TRUE(was_active) << error_text(was_active.error());
  auto done = c->wait(*id, 120s);
  ASSERT_TRUE(done) << error_text(done.error());
  if (*was_active) {
    EXPECT_EQ(done->state, client::job_state::cancelled);
  }
  auto st = c->status(*id);
  ASSERT_TRUE(st) << error_text(st.error());
  EXPECT_EQ(st->state, done->state);

  // The controller's own checks (its token limit, the vocabulary) come back as invalid_request.
  for (auto bad : {spec_of({5}, 65), spec_of({5, 600}, 4)}) {
    auto refused = c->submit(bad);
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code(), static_cast<uint8_t>(client::client_errc::invalid_request))
        << error_text(refused.error());
  }
}

TEST(api_with_real_controller, a_text_corpus_trains_through_the_api_and_its_checkpoint_loads) {
  api_cluster h;
  ASSERT_TRUE(h.server);
  auto c = h.connect();
  ASSERT_TRUE(c);
  std::string text;
  while (text.size() < 2000) text += "The quick brown fox jumps over the lazy dog; the experts route it. ";
  client::training_request_spec spec;
  spec.corpus = text;
  spec.sequence_length = 16;
  spec.batch_sequences = 4;
  spec.steps = 4;
  spec.learning_rate = 3e-3;
  std::vector<client::training_event> events;
  auto done = c->train(spec, [&](const client::training_event& e) { events.push_back(e); });
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::finished);
  EXPECT_EQ(done->step, 4);
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(events.back().finished);
  int64_t previous = 0;
  for (const auto& e : events) {
    EXPECT_GT(e.step, previous);  // a step's event is never repeated or reordered
    previous = e.step;
    EXPECT_TRUE(std::isfinite(e.loss) && e.loss > 0) << "step " << e.step << ": " << e.loss;
    EXPECT_TRUE(std::isfinite(e.grad_norm) && e.grad_norm > 0) << "step " << e.step;
    EXPECT_GT(e.tokens_per_second, 0) << "step " << e.step;
    EXPECT_GT(e.learning_rate, 0) << "step " << e.step;
    ASSERT_FALSE(e.load_balance.empty()) << "step " << e.step;
    for (double b : e.load_balance) EXPECT_TRUE(std::isfinite(b) && b >= 1.0) << b;
  }
  EXPECT_EQ(previous, 4);
  // Events are merged only for a client that falls behind (a loaded machine may make this one):
  // the steps seen rise, and the last one is the job's last.
  EXPECT_LE(events.size(), 4u);
  // The model has barely trained: the loss is near that of a uniform guess over 512 ids.
  EXPECT_LT(std::abs(events.front().loss - std::log(512.0)), 2.0) << events.front().loss;

  const auto dir = std::filesystem::temp_directory_path() /
                   ("moe-api-checkpoint-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  auto written = c->checkpoint(dir.string());
  ASSERT_TRUE(written) << error_text(written.error());
  EXPECT_EQ(*written, dir.string());
  model::training_checkpoint_options lo;
  lo.progress = false;
  auto loaded = model::load_training_checkpoint(dir, lo);
  ASSERT_TRUE(loaded) << error_text(loaded.error());
  EXPECT_EQ(loaded->step, 4);
  EXPECT_EQ(loaded->optimizer.steps(), 4);
  EXPECT_EQ(loaded->weights.config.vocab_size, 512);
  std::filesystem::remove_all(dir);

  // The model's own refusal (its context) comes back as invalid_request.
  spec.sequence_length = h.cluster->config().max_position_embeddings + 1;
  spec.batch_sequences = 1;
  auto refused = c->submit_training(spec);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), static_cast<uint8_t>(client::client_errc::invalid_request))
      << error_text(refused.error());
}
