// The job API's training calls end to end over 127.0.0.1: moe::client's job_client against the
// api_server in front of scripted fakes (fake_training_jobs.hpp, fake_controller.hpp). Every
// step's event arrives in order (a slow client gets the newest instead of a backlog, and always
// the final one), the spec reaches the training jobs actor intact (a text corpus tokenised by
// bytes), every refusal is an error naming its cause, cancel and checkpoint work, and the
// server cancels a training job nobody reads any more.
#include "actors/api_server.hpp"

#include <capnp/ez-rpc.h>
#include <capnp/message.h>
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <thread>

#include "actors/actor_types.hpp"
#include "client/job_client.hpp"
#include "protocol/api.capnp.h"
#include "protocol/api_codec.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/unit/actors/fake_controller.hpp"
#include "tests/unit/actors/fake_training_jobs.hpp"

using namespace moe;
using namespace std::chrono_literals;
using actors::testing::fake_loss;
using actors::testing::fake_training_options;

namespace {

const std::string secret = "training api test secret";

std::vector<int32_t> corpus_of(size_t n) {
  std::vector<int32_t> out;
  for (size_t i = 0; i < n; ++i) out.push_back(static_cast<int32_t>(1 + i % 400));
  return out;
}

client::training_request_spec spec_of(int64_t steps) {
  client::training_request_spec s;
  s.corpus = corpus_of(256);
  s.sequence_length = 16;
  s.batch_sequences = 2;
  s.steps = steps;
  return s;
}

bool is(const caf::error& e, client::client_errc code) {
  return e.category() == caf::atom("client") && e.code() == static_cast<uint8_t>(code);
}

bool contains(const caf::error& e, const std::string& what) {
  return error_text(e).find(what) != std::string::npos;
}

class api_training_test : public ::testing::Test {
 protected:
  ~api_training_test() override {
    if (server) server->stop();
    if (controller) caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (training_jobs) caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
  }

  void start(fake_training_options opts = {},
             const std::function<void(actors::api_server_options&)>& adjust = {}) {
    controller = actors::testing::spawn_fake_controller(sys, {}, std::make_shared<actors::testing::fake_controller_log>());
    training_jobs = actors::testing::spawn_fake_training_jobs(sys, opts, log);
    actors::api_server_options o;
    o.secret = secret;
    o.stop_grace = 2s;
    o.failed_login_delay = 10ms;
    o.training_jobs = training_jobs;
    o.vocab_size = opts.vocab_size;
    if (adjust) adjust(o);
    auto s = actors::api_server::start(sys, controller, o);
    ASSERT_TRUE(s) << error_text(s.error());
    server = std::move(*s);
  }

  std::unique_ptr<client::job_client> connected() {
    auto c = client::job_client::connect("127.0.0.1", server->port(), secret);
    EXPECT_TRUE(c) << error_text(c.error());
    return c ? std::move(*c) : nullptr;
  }

  // Delivers events on `c` until `done` holds or 10 s passed.
  static bool deliver_until(client::job_client& c, uint64_t job, const std::function<bool()>& done) {
    for (int i = 0; i < 500 && !done(); ++i) {
      auto r = c.wait_training(job, 20ms);
      if (r) return done();  // the job ended
    }
    return done();
  }

  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::shared_ptr<actors::testing::fake_training_log> log =
      std::make_shared<actors::testing::fake_training_log>();
  actors::controller_actor controller;
  actors::training_jobs_actor training_jobs;
  std::unique_ptr<actors::api_server> server;
};

}  // namespace

// The three places that state a training job's defaults agree: the actors' struct (what
// `moe train` runs), the API's plain value, and the schema's default values (what a client
// that leaves a field unset sends).
TEST(api_training_defaults, the_api_the_schema_and_the_actors_agree) {
  const client::training_request_spec api;
  const actors::training_job actor;
  EXPECT_EQ(api.sequence_length, actor.sequence_length);
  EXPECT_EQ(api.batch_sequences, actor.batch_sequences);
  EXPECT_EQ(api.steps, actor.steps);
  EXPECT_EQ(api.learning_rate, actor.hyper.lr);
  EXPECT_EQ(api.warmup_steps, actor.warmup_steps);
  EXPECT_EQ(api.min_learning_rate, actor.min_lr);
  EXPECT_EQ(api.beta1, actor.hyper.beta1);
  EXPECT_EQ(api.beta2, actor.hyper.beta2);
  EXPECT_EQ(api.eps, actor.hyper.eps);
  EXPECT_EQ(api.weight_decay, actor.hyper.weight_decay);
  EXPECT_EQ(api.grad_clip, actor.hyper.grad_clip);
  EXPECT_EQ(api.balance_loss_weight, actor.hyper.balance_alpha);
  EXPECT_EQ(api.bias_update_speed, actor.hyper.bias_update_speed);
  EXPECT_EQ(api.seed, actor.seed);

  ::capnp::MallocMessageBuilder message;
  auto unset = message.initRoot<protocol::capnp::TrainingJob>();
  const auto wire = protocol::from_wire(unset.asReader());
  EXPECT_EQ(wire.sequence_length, api.sequence_length);
  EXPECT_EQ(wire.batch_sequences, api.batch_sequences);
  EXPECT_EQ(wire.steps, api.steps);
  EXPECT_EQ(wire.learning_rate, api.learning_rate);
  EXPECT_EQ(wire.warmup_steps, api.warmup_steps);
  EXPECT_EQ(wire.min_learning_rate, api.min_learning_rate);
  EXPECT_EQ(wire.beta1, api.beta1);
  EXPECT_EQ(wire.beta2, api.beta2);
  EXPECT_EQ(wire.eps, api.eps);
  EXPECT_EQ(wire.weight_decay, api.weight_decay);
  EXPECT_EQ(wire.grad_clip, api.grad_clip);
  EXPECT_EQ(wire.balance_loss_weight, api.balance_loss_weight);
  EXPECT_EQ(wire.bias_update_speed, api.bias_update_speed);
  EXPECT_EQ(wire.seed, api.seed);
}

TEST_F(api_training_test, train_streams_every_step_in_order_then_one_final_event) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  std::vector<client::training_event> events;
  auto spec = spec_of(12);
  spec.learning_rate = 0.02;
  auto done = c->train(spec, [&](const client::training_event& e) { events.push_back(e); });
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::finished);
  EXPECT_TRUE(done->finished);
  EXPECT_EQ(done->step, 12);
  EXPECT_EQ(done->steps, 12);
  EXPECT_DOUBLE_EQ(done->loss, fake_loss(12));
  EXPECT_DOUBLE_EQ(done->learning_rate, 0.02);
  EXPECT_EQ(done->load_balance, (std::vector<double>{1.0 + 1.0 / 12, 1.5}));
  EXPECT_DOUBLE_EQ(done->tokens_per_second, 1000);
  EXPECT_TRUE(done->error.empty());

  ASSERT_FALSE(events.empty());
  int64_t previous = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const auto& e = events[i];
    EXPECT_EQ(e.job_id, done->job_id);
    EXPECT_GT(e.step, previous) << "event " << i;
    previous = e.step;
    EXPECT_EQ(e.finished, i + 1 == events.size()) << "event " << i;
    EXPECT_EQ(e.steps, 12);
    EXPECT_DOUBLE_EQ(e.loss, fake_loss(e.step));
    EXPECT_DOUBLE_EQ(e.grad_norm, 1.0 / static_cast<double>(e.step));
    if (!e.finished) {
      EXPECT_EQ(e.state, client::job_state::running);
    }
  }
  EXPECT_EQ(events.back().step, 12);
  auto st = c->training_status(done->job_id);
  ASSERT_TRUE(st) << error_text(st.error());
  EXPECT_EQ(st->state, client::job_state::finished);
  EXPECT_EQ(st->step, 12);
}

TEST_F(api_training_test, a_slow_client_gets_the_newest_event_and_always_the_final_one) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  std::vector<int64_t> steps;
  bool saw_final = false;
  auto done = c->train(spec_of(60), [&](const client::training_event& e) {
    steps.push_back(e.step);
    saw_final = e.finished;
    std::this_thread::sleep_for(25ms);  // 60 steps of 1 ms pile up meanwhile
  });
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_TRUE(saw_final);
  ASSERT_FALSE(steps.empty());
  EXPECT_EQ(steps.back(), 60);
  EXPECT_LT(steps.size(), 30u) << "the server sent a backlog instead of the newest event";
  EXPECT_TRUE(std::is_sorted(steps.begin(), steps.end()));
  EXPECT_EQ(std::adjacent_find(steps.begin(), steps.end()), steps.end()) << "a step was sent twice";
}

TEST_F(api_training_test, the_spec_reaches_the_training_jobs_intact_and_text_is_tokenised_by_bytes) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  client::training_request_spec s;
  s.corpus = corpus_of(100);
  s.sequence_length = 10;
  s.batch_sequences = 3;
  s.steps = 2;
  s.learning_rate = 0.01;
  s.warmup_steps = 1;
  s.min_learning_rate = 0.001;
  s.beta1 = 0.8;
  s.beta2 = 0.9;
  s.eps = 1e-6;
  s.weight_decay = 0.05;
  s.grad_clip = 0;
  s.balance_loss_weight = 0.01;
  s.bias_update_speed = 0.002;
  s.seed = 77;
  ASSERT_TRUE(c->train(s));
  const std::string text = "Cap'n Proto, caf \xc3\xa9t\xc3\xa9: bytes all the way down.";
  client::training_request_spec t = spec_of(1);
  t.corpus = text;
  ASSERT_TRUE(c->train(t));

  const auto seen = log->submitted();
  ASSERT_EQ(seen.size(), 2u);
  const auto& j = seen[0];
  EXPECT_EQ(j.tokens, corpus_of(100));
  EXPECT_EQ(j.sequence_length, 10);
  EXPECT_EQ(j.batch_sequences, 3);
  EXPECT_EQ(j.steps, 2);
  EXPECT_EQ(j.hyper.lr, 0.01);
  EXPECT_EQ(j.warmup_steps, 1);
  EXPECT_EQ(j.min_lr, 0.001);
  EXPECT_EQ(j.hyper.beta1, 0.8);
  EXPECT_EQ(j.hyper.beta2, 0.9);
  EXPECT_EQ(j.hyper.eps, 1e-6);
  EXPECT_EQ(j.hyper.weight_decay, 0.05);
  EXPECT_EQ(j.hyper.grad_clip, 0);
  EXPECT_EQ(j.hyper.balance_alpha, 0.01);
  EXPECT_EQ(j.hyper.bias_update_speed, 0.002);
  EXPECT_EQ(j.seed, 77u);
  std::vector<int32_t> bytes;
  for (unsigned char ch : text) bytes.push_back(ch);
  EXPECT_EQ(seen[1].tokens, bytes);
}

TEST_F(api_training_test, invalid_specs_are_refused_with_the_field_named) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  struct bad_case {
    std::function<void(client::training_request_spec&)> change;
    std::string field;
  };
  const std::vector<bad_case> cases = {
      {[](auto& s) { s.corpus = std::vector<int32_t>{}; }, "corpus.tokens: is empty"},
      {[](auto& s) { s.corpus = std::string(); }, "corpus.text: is empty"},
      {[](auto& s) { std::get<0>(s.corpus)[3] = -1; }, "corpus.tokens[3]"},
      {[](auto& s) { s.sequence_length = 1; }, "sequenceLength"},
      {[](auto& s) { s.sequence_length = 300; }, "fewer than one sequence"},
      {[](auto& s) { s.batch_sequences = 0; }, "batchSequences"},
      {[](auto& s) { s.batch_sequences = 1 << 20; }, "tokens per step"},
      {[](auto& s) { s.steps = 0; }, "steps"},
      {[](auto& s) { s.warmup_steps = -1; }, "warmupSteps"},
      {[](auto& s) { s.learning_rate = 0; }, "learningRate"},
      {[](auto& s) { s.learning_rate = std::nan(""); }, "learningRate"},
      {[](auto& s) { s.min_learning_rate = 1; }, "minLearningRate"},
      {[](auto& s) { s.beta1 = 1; }, "beta1"},
      {[](auto& s) { s.beta2 = -0.1; }, "beta2"},
      {[](auto& s) { s.eps = 0; }, "eps"},
      {[](auto& s) { s.weight_decay = -1; }, "weightDecay"},
      {[](auto& s) { s.grad_clip = INFINITY; }, "gradClip"},
      {[](auto& s) { s.balance_loss_weight = -1e-3; }, "balanceLossWeight"},
      {[](auto& s) { s.bias_update_speed = std::nan(""); }, "biasUpdateSpeed"},
  };
  for (const auto& bad : cases) {
    auto s = spec_of(3);
    bad.change(s);
    auto id = c->submit_training(s);
    ASSERT_FALSE(id) << bad.field;
    EXPECT_TRUE(is(id.error(), client::client_errc::invalid_request)) << error_text(id.error());
    EXPECT_TRUE(contains(id.error(), bad.field)) << error_text(id.error());
  }
  EXPECT_TRUE(log->submitted().empty());

  // What only the model knows comes back from the server as invalid_request too.
  auto outside = spec_of(3);
  std::get<0>(outside.corpus)[5] = 600;  // the fake's vocabulary has 512 ids
  auto long_sequences = spec_of(3);
  long_sequences.corpus = corpus_of(1000);
  long_sequences.sequence_length = 300;  // its context is 256
  auto short_text = spec_of(3);
  short_text.corpus = std::string("too short");
  for (const auto& [spec, what] : {std::pair{outside, std::string("outside the vocabulary")},
                                   std::pair{long_sequences, std::string("exceeds the model's context")},
                                   std::pair{short_text, std::string("fewer than one sequence")}}) {
    auto id = c->submit_training(spec);
    ASSERT_FALSE(id) << what;
    EXPECT_TRUE(is(id.error(), client::client_errc::invalid_request)) << error_text(id.error());
    EXPECT_TRUE(contains(id.error(), what)) << error_text(id.error());
  }
  EXPECT_TRUE(log->submitted().empty());
}

// A client that skips moe::client's checks meets the same ones in the server.
TEST_F(api_training_test, the_server_validates_what_a_raw_client_sends) {
  start();
  namespace wire = moe::protocol::capnp;
  capnp::EzRpcClient rpc("127.0.0.1", server->port());
  auto& ws = rpc.getWaitScope();
  auto login = rpc.getMain<wire::Gateway>().loginRequest();
  login.setSecret(secret);
  login.setClientVersion(wire::API_VERSION);
  auto service = login.send().wait(ws).getService();
  auto expect_invalid = [&](auto&& send, const std::string& what) {
    try {
      send();
      ADD_FAILURE() << what << ": accepted";
    } catch (const kj::Exception& e) {
      std::string d = e.getDescription().cStr();
      EXPECT_NE(d.find("invalid_request: "), std::string::npos) << d;
      EXPECT_NE(d.find(what), std::string::npos) << d;
    }
  };
  expect_invalid([&] { service.trainRequest().send().wait(ws); }, "corpus.tokens: is empty");
  expect_invalid(
      [&] {
        auto req = service.trainRequest();
        auto job = req.initJob();
        job.getCorpus().setText("some text long enough for one sequence of sixty-four bytes, yes it is");
        job.setSequenceLength(1);
        req.send().wait(ws);
      },
      "sequenceLength");
  expect_invalid(
      [&] {
        auto req = service.checkpointRequest();
        req.setDirectory("relative/dir");
        req.send().wait(ws);
      },
      "not an absolute path");
  expect_invalid(
      [&] {
        auto req = service.submitRequest();
        req.initJob().initTraining();
        req.send().wait(ws);
      },
      "JobService.train()");
  EXPECT_TRUE(log->submitted().empty());
  EXPECT_TRUE(log->checkpoints().empty());

  // Without a sink the job runs, and trainingStatus shows it.
  auto req = service.trainRequest();
  auto job = req.initJob();
  auto tokens = job.getCorpus().initTokens(40);
  for (unsigned i = 0; i < 40; ++i) tokens.set(i, static_cast<int32_t>(i));
  job.setSequenceLength(8);
  job.setSteps(3);
  const auto id = req.send().wait(ws).getJobId();
  for (int i = 0; i < 500; ++i) {
    auto st = service.trainingStatusRequest();
    st.setJobId(id);
    // The reader points into the response: keep the response alive while it is read.
    auto response = st.send().wait(ws);
    auto e = response.getEvent();
    if (e.getFinished()) {
      EXPECT_EQ(e.getState(), wire::JobState::FINISHED);
      EXPECT_EQ(e.getStep(), 3);
      EXPECT_EQ(e.getJobId(), id);
      return;
    }
    std::this_thread::sleep_for(5ms);
  }
  ADD_FAILURE() << "the training job without a sink never finished";
}

TEST_F(api_training_test, status_cancel_and_unknown_jobs) {
  fake_training_options o;
  o.step_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto running = c->submit_training(spec_of(1000));
  ASSERT_TRUE(running) << error_text(running.error());
  auto queued = c->submit_training(spec_of(5));  // waits behind the first: one job at a time
  ASSERT_TRUE(queued) << error_text(queued.error());
  auto q = c->training_status(*queued);
  ASSERT_TRUE(q) << error_text(q.error());
  EXPECT_EQ(q->state, client::job_state::queued);
  EXPECT_EQ(q->step, 0);
  EXPECT_EQ(q->steps, 5);

  auto was_active = c->cancel_training(*queued);
  ASSERT_TRUE(was_active) << error_text(was_active.error());
  EXPECT_TRUE(*was_active);
  auto cancelled = c->wait_training(*queued, 10s);
  ASSERT_TRUE(cancelled) << error_text(cancelled.error());
  EXPECT_EQ(cancelled->state, client::job_state::cancelled);
  EXPECT_EQ(cancelled->step, 0);

  EXPECT_FALSE(c->wait_training(*running, 50ms));  // still running
  ASSERT_TRUE(c->cancel_training(*running));
  auto done = c->wait_training(*running, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::cancelled);
  EXPECT_LT(done->step, 1000);
  auto again = c->cancel_training(*running);
  ASSERT_TRUE(again);
  EXPECT_FALSE(*again);
  auto st = c->training_status(*running);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->state, client::job_state::cancelled);

  for (auto r : {c->training_status(4242).error(), c->cancel_training(4242).error()}) {
    EXPECT_TRUE(is(r, client::client_errc::unknown_job)) << error_text(r);
    EXPECT_TRUE(contains(r, "unknown_job: no training job 4242")) << error_text(r);
  }
  auto not_mine = c->wait_training(4242);
  ASSERT_FALSE(not_mine);
  EXPECT_TRUE(is(not_mine.error(), client::client_errc::unknown_job));

  // train() reports the cancellation as an error that says at which step.
  auto c2 = connected();
  ASSERT_TRUE(c2);
  std::thread canceller([&] {
    auto watcher = connected();
    for (int i = 0; i < 500; ++i) {
      auto e = watcher->training_status(*running + 2);
      if (e && e->step > 0) break;
      std::this_thread::sleep_for(5ms);
    }
    EXPECT_TRUE(watcher->cancel_training(*running + 2));
  });
  auto trained = c2->train(spec_of(1000));
  canceller.join();
  ASSERT_FALSE(trained);
  EXPECT_TRUE(is(trained.error(), client::client_errc::job_cancelled)) << error_text(trained.error());
  EXPECT_TRUE(contains(trained.error(), "was cancelled at step")) << error_text(trained.error());
}

TEST_F(api_training_test, overloaded_and_failed_jobs_are_named_errors) {
  fake_training_options o;
  o.max_active = 1;
  o.step_interval = 5ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto first = c->submit_training(spec_of(1000));
  ASSERT_TRUE(first);
  auto second = c->submit_training(spec_of(3));
  ASSERT_FALSE(second);
  EXPECT_TRUE(is(second.error(), client::client_errc::overloaded)) << error_text(second.error());
  EXPECT_TRUE(contains(second.error(), "overloaded: ")) << error_text(second.error());
  ASSERT_TRUE(c->cancel_training(*first));
  ASSERT_TRUE(c->wait_training(*first, 10s));

  auto failing = spec_of(5);
  std::get<0>(failing.corpus)[0] = o.fail_token;
  auto failed = c->train(failing);
  ASSERT_FALSE(failed);
  EXPECT_TRUE(is(failed.error(), client::client_errc::job_failed)) << error_text(failed.error());
  EXPECT_TRUE(contains(failed.error(), "failed at step 1 of 5: scripted failure")) << error_text(failed.error());
}

TEST_F(api_training_test, a_checkpoint_is_written_between_steps_and_shows_in_the_stream) {
  fake_training_options o;
  o.step_interval = 5ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  // Between jobs: answered at once.
  auto idle = c->checkpoint("/checkpoints/idle");
  ASSERT_TRUE(idle) << error_text(idle.error());
  EXPECT_EQ(*idle, "/checkpoints/idle");

  std::vector<client::training_event> events;
  auto id = c->submit_training(spec_of(1000), [&](const client::training_event& e) { events.push_back(e); });
  ASSERT_TRUE(id) << error_text(id.error());
  ASSERT_TRUE(deliver_until(*c, *id, [&] { return !events.empty(); }));
  const std::string dir = "/checkpoints/run-1/step-n";
  auto written = c->checkpoint(dir);
  ASSERT_TRUE(written) << error_text(written.error());
  EXPECT_EQ(*written, dir);
  auto carries = [&] {
    return std::any_of(events.begin(), events.end(), [&](const auto& e) { return e.checkpoint == dir; });
  };
  EXPECT_TRUE(deliver_until(*c, *id, carries)) << "no event carried the checkpoint";
  EXPECT_EQ(log->checkpoints(), (std::vector<std::string>{"/checkpoints/idle", dir}));

  // The file system's refusal is the server's error, with its text; bad paths never leave.
  auto unwritable = c->checkpoint("/checkpoints/unwritable");
  ASSERT_FALSE(unwritable);
  EXPECT_TRUE(is(unwritable.error(), client::client_errc::server_error)) << error_text(unwritable.error());
  EXPECT_TRUE(contains(unwritable.error(), "internal: checkpoint: ")) << error_text(unwritable.error());
  EXPECT_TRUE(contains(unwritable.error(), "Permission denied")) << error_text(unwritable.error());
  for (const auto& bad : std::vector<std::string>{"", "relative/dir", std::string("/with\0nul", 9)}) {
    auto r = c->checkpoint(bad);
    ASSERT_FALSE(r) << bad;
    EXPECT_TRUE(is(r.error(), client::client_errc::invalid_request)) << error_text(r.error());
    EXPECT_TRUE(contains(r.error(), "directory: ")) << error_text(r.error());
  }
  EXPECT_EQ(log->checkpoints().size(), 2u);
  ASSERT_TRUE(c->cancel_training(*id));
  ASSERT_TRUE(c->wait_training(*id, 10s));
}

TEST_F(api_training_test, training_calls_are_unavailable_without_training) {
  for (const auto& [adjust, why] :
       {std::pair<std::function<void(actors::api_server_options&)>, std::string>{
            [](auto& o) { o.training_jobs = nullptr; }, "no training jobs actor runs"},
        {[](auto& o) { o.vocab_size = 100; }, "vocabulary of at least 256 ids"},
        {[](auto& o) { o.vocab_size = 0; }, "vocabulary of at least 256 ids"}}) {
    start({}, adjust);
    auto c = connected();
    ASSERT_TRUE(c);
    const std::string want = "unavailable: training is not enabled on this server (";
    for (auto err : {c->submit_training(spec_of(3)).error(), c->training_status(1).error(),
                     c->cancel_training(1).error(), c->checkpoint("/tmp/x").error()}) {
      EXPECT_TRUE(is(err, client::client_errc::unavailable)) << error_text(err);
      EXPECT_EQ(error_text(err).rfind(want, 0), 0u) << error_text(err);
      EXPECT_TRUE(contains(err, why)) << error_text(err);
    }
    EXPECT_TRUE(c->describe());  // the rest of the API is fine
    c.reset();
    server->stop();
    server.reset();
    caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
  }
  EXPECT_TRUE(log->submitted().empty());
}

TEST_F(api_training_test, a_client_that_disconnects_mid_stream_gets_its_training_job_cancelled) {
  fake_training_options o;
  o.step_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  size_t num_events = 0;
  auto id = c->submit_training(spec_of(1000), [&](const client::training_event&) { ++num_events; });
  ASSERT_TRUE(id);
  ASSERT_TRUE(deliver_until(*c, *id, [&] { return num_events > 0; }));
  c.reset();  // closes the connection
  EXPECT_TRUE(log->wait_for_cancel(*id, 10s));
}

TEST_F(api_training_test, a_throwing_handler_fails_the_training_job_and_the_server_cancels_it) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit_training(spec_of(1000), [](const client::training_event&) {
    throw std::runtime_error("handler bug");
  });
  ASSERT_TRUE(id);
  auto done = c->wait_training(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::failed);
  EXPECT_NE(done->error.find("handler bug"), std::string::npos) << done->error;
  EXPECT_TRUE(log->wait_for_cancel(*id, 10s));
  EXPECT_TRUE(c->describe());
}

TEST_F(api_training_test, training_jobs_that_die_fail_the_stream_and_later_calls) {
  fake_training_options o;
  o.step_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit_training(spec_of(1000));
  ASSERT_TRUE(id);
  caf::anon_send_exit(training_jobs, caf::exit_reason::kill);
  auto done = c->wait_training(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::failed);
  EXPECT_NE(done->error.find("training jobs actor terminated"), std::string::npos) << done->error;
  auto st = c->training_status(*id);
  ASSERT_FALSE(st);
  EXPECT_TRUE(is(st.error(), client::client_errc::server_error)) << error_text(st.error());
  EXPECT_TRUE(contains(st.error(), "the training jobs actor is not running")) << error_text(st.error());
}
