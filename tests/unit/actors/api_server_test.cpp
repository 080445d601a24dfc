// The job-submission API end to end over 127.0.0.1: moe::client's job_client against the
// api_server in front of a scripted fake controller (fake_controller.hpp) and, for rebalance(),
// a scripted fake rebalancer (below). Streams arrive whole and in order, every call answers,
// every failure is an error that names its cause, and the server cancels what nobody reads any
// more (a client that went away, a stopping server).
#include "actors/api_server.hpp"

#include <caf/all.hpp>
#include <capnp/ez-rpc.h>
#include <gtest/gtest.h>
#include <kj/async-io.h>

#include <atomic>
#include <cmath>
#include <deque>
#include <functional>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/rebalancer.hpp"
#include "client/job_client.hpp"
#include "job_clients.hpp"
#include "protocol/api.capnp.h"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/unit/actors/fake_controller.hpp"

using namespace moe;
using namespace std::chrono_literals;
using actors::testing::fake_controller_options;
using actors::testing::spec_of;

namespace {

const std::string secret = "correct horse battery staple";

actors::generation_job job_of(const client::generation_request_spec& s) {
  actors::generation_job j;
  j.prompt = s.prompt;
  j.max_new_tokens = s.max_new_tokens;
  j.stop_token_ids = s.stop_token_ids;
  return j;
}

protocol::api_cluster_description two_node_cluster() {
  protocol::api_cluster_description c;
  c.name = "test-cluster";
  c.nodes = {{"n0", "127.0.0.1", {"n0/cpu0", "n0/cpu1"}}, {"n1", "127.0.0.2", {"n1/gpu0"}}};
  c.actors = {{"controller", "controller", "n0", "n0/cpu0"},
              {"attention", "attention/0", "n0", "n0/cpu1"},
              {"expert_group", "expert_group/0", "n1", "n1/gpu0"}};
  c.placement_version = 7;
  c.placement_json = R"({"groups":[[0,1,2,3]]})";
  return c;
}

// --- a scripted stand-in for the rebalancer (actors/rebalancer.hpp) ---------------------

// One answer of the fake rebalancer: the report, or else the error; after `delay`, or never.
struct fake_rebalance_answer {
  std::optional<actors::rebalance_report> report;
  caf::error error;
  std::chrono::milliseconds delay{0};
  bool never = false;
};

fake_rebalance_answer answer_report(actors::rebalance_report r) { return {std::move(r), {}}; }

fake_rebalance_answer answer_error(actors::rebalance_errc code, std::string text) {
  return {std::nullopt, actors::make_error(code, std::move(text))};
}

using fake_tick_atom = caf::atom_constant<caf::atom("fake_tick")>;
// The rebalancer's interface plus the tick that delivers a delayed answer.
using fake_rebalancer_actor = actors::rebalancer_actor::extend<caf::reacts_to<fake_tick_atom>>;

struct fake_rebalancer_state {
  std::deque<std::pair<caf::typed_response_promise<actors::rebalance_report>,
                       fake_rebalance_answer>>
      delayed;
};

void deliver(caf::typed_response_promise<actors::rebalance_report>& rp,
             const fake_rebalance_answer& a) {
  if (a.report) {
    rp.deliver(*a.report);
  } else {
    rp.deliver(a.error);
  }
}

// Answers the i-th rebalance request with answers[i] (the last one again once they run out)
// and counts the requests in `calls`.
fake_rebalancer_actor::behavior_type fake_rebalancer(
    fake_rebalancer_actor::stateful_pointer<fake_rebalancer_state> self,
    std::vector<fake_rebalance_answer> answers, std::shared_ptr<std::atomic<int>> calls) {
  return {
      [=](actors::rebalance_atom) -> caf::result<actors::rebalance_report> {
        const size_t i = static_cast<size_t>(calls->fetch_add(1));
        const fake_rebalance_answer& a = answers[std::min(i, answers.size() - 1)];
        if (a.delay.count() == 0 && !a.never) {
          if (a.report) return *a.report;
          return a.error;
        }
        auto rp = self->make_response_promise<actors::rebalance_report>();
        self->state.delayed.emplace_back(rp, a);
        if (!a.never) self->delayed_send(self, a.delay, fake_tick_atom::value);
        return rp;
      },
      [](actors::failover_atom, const std::vector<int64_t>&, const std::vector<int64_t>&)
          -> caf::result<actors::rebalance_report> {
        return actors::make_error(actors::rebalance_errc::unsupported, "the API never fails over");
      },
      [=](fake_tick_atom) {
        auto& [rp, a] = self->state.delayed.front();
        deliver(rp, a);
        self->state.delayed.pop_front();
      },
  };
}

actors::rebalance_report canned_report() {
  actors::rebalance_report r;
  r.changed = true;
  r.version_before = 1;
  r.version_after = 2;
  r.balance_before = 1.84;
  r.balance_after = 1.07;
  r.layer_balance_before = {2.0, 1.75, 1.77};
  r.layer_balance_after = {1.125, 1.0, 1.09};
  r.tokens_counted = 48'213;
  r.replicas_moved = 12;
  r.bytes_moved = 3'250'585;
  r.duration_seconds = 0.42;
  r.trigger = "on_demand";
  return r;
}

class api_server_test : public ::testing::Test {
 protected:
  ~api_server_test() override {
    if (server) server->stop();
    if (controller) caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (rebalancer) caf::anon_send_exit(rebalancer, caf::exit_reason::user_shutdown);
  }

  void start(fake_controller_options opts = {},
             const std::function<void(actors::api_server_options&)>& adjust = {}) {
    controller = actors::testing::spawn_fake_controller(sys, opts, log);
    actors::api_server_options o;
    o.secret = secret;
    o.cluster = two_node_cluster();
    o.stop_grace = 2s;
    o.failed_login_delay = 10ms;
    o.rebalancer = rebalancer;
    if (adjust) adjust(o);
    auto s = actors::api_server::start(sys, controller, o);
    ASSERT_TRUE(s) << error_text(s.error());
    server = std::move(*s);
    ASSERT_NE(server->port(), 0);
  }

  caf::expected<std::unique_ptr<client::job_client>> connect(const std::string& s = secret) {
    return client::job_client::connect("127.0.0.1", server->port(), s);
  }

  std::unique_ptr<client::job_client> connected() {
    auto c = connect();
    EXPECT_TRUE(c) << error_text(c.error());
    return c ? std::move(*c) : nullptr;
  }

  // A fake rebalancer that start() hands to the server.
  void script_rebalancer(std::vector<fake_rebalance_answer> answers) {
    rebalancer = sys.spawn(fake_rebalancer, std::move(answers), rebalance_calls);
  }

  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::shared_ptr<actors::testing::fake_controller_log> log =
      std::make_shared<actors::testing::fake_controller_log>();
  actors::controller_actor controller;
  actors::rebalancer_actor rebalancer;  // null unless script_rebalancer ran
  std::shared_ptr<std::atomic<int>> rebalance_calls = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<actors::api_server> server;
};

bool is(const caf::error& e, client::client_errc code) {
  return e.category() == caf::atom("client") && e.code() == static_cast<uint8_t>(code);
}

}  // namespace

TEST_F(api_server_test, submit_streams_every_token_in_order_then_one_final_event) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  auto spec = spec_of({5, 17, 42}, 40);
  std::vector<client::client_event> events;
  auto id = c->submit(spec, [&](const client::client_event& e) { events.push_back(e); });
  ASSERT_TRUE(id) << error_text(id.error());
  auto done = c->wait(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());

  const auto want = actors::testing::fake_tokens(job_of(spec));
  EXPECT_EQ(done->tokens, want);
  EXPECT_EQ(done->state, client::job_state::finished);
  EXPECT_EQ(done->finish_reason, "length");
  std::vector<int32_t> streamed;
  ASSERT_FALSE(events.empty());
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].job_id, *id);
    EXPECT_EQ(events[i].finished, i + 1 == events.size()) << "event " << i;
    streamed.insert(streamed.end(), events[i].tokens.begin(), events[i].tokens.end());
  }
  EXPECT_EQ(streamed, want);
}

TEST_F(api_server_test, concurrent_jobs_each_get_their_own_stream) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  std::vector<client::generation_request_spec> specs;
  std::vector<std::vector<int32_t>> streamed(8);
  std::vector<uint64_t> ids;
  for (int i = 0; i < 8; ++i) {
    specs.push_back(spec_of({1, 100 * i}, 5 + i));
    auto id = c->submit(specs.back(), [&streamed, i](const client::client_event& e) {
      streamed[i].insert(streamed[i].end(), e.tokens.begin(), e.tokens.end());
    });
    ASSERT_TRUE(id) << error_text(id.error());
    ids.push_back(*id);
  }
  for (int i = 0; i < 8; ++i) {
    auto done = c->wait(ids[i], 10s);
    ASSERT_TRUE(done) << error_text(done.error());
    EXPECT_EQ(done->tokens, actors::testing::fake_tokens(job_of(specs[i])));
    EXPECT_EQ(streamed[i], done->tokens);
  }
}

TEST_F(api_server_test, generate_returns_the_tokens_and_honours_stop_ids) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  auto spec = spec_of({10}, 20);
  spec.stop_token_ids = {14};
  auto tokens = c->generate(spec);
  ASSERT_TRUE(tokens) << error_text(tokens.error());
  EXPECT_EQ(*tokens, (std::vector<int32_t>{11, 12, 13, 14}));
  // The sampling parameters reach the controller as given.
  spec.temperature = 0.7f;
  spec.top_k = 40;
  spec.top_p = 0.9f;
  spec.seed = 1234;
  ASSERT_TRUE(c->generate(spec));
  auto seen = log->submitted().back();
  EXPECT_FLOAT_EQ(seen.sampling.temperature, 0.7f);
  EXPECT_EQ(seen.sampling.top_k, 40u);
  EXPECT_FLOAT_EQ(seen.sampling.top_p, 0.9f);
  EXPECT_EQ(seen.sampling.seed, 1234u);
  EXPECT_EQ(seen.stop_token_ids, std::vector<int32_t>{14});
  EXPECT_EQ(seen.prompt, std::vector<int32_t>{10});
}

TEST_F(api_server_test, a_failed_job_is_an_error_naming_the_reason) {
  fake_controller_options o;
  o.fail_token = 77;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto tokens = c->generate(spec_of({77, 1}, 5));
  ASSERT_FALSE(tokens);
  EXPECT_TRUE(is(tokens.error(), client::client_errc::job_failed)) << error_text(tokens.error());
  EXPECT_NE(error_text(tokens.error()).find("scripted failure"), std::string::npos);
}

TEST_F(api_server_test, status_reports_progress_and_unknown_jobs) {
  fake_controller_options o;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto running = c->submit(spec_of({3}, 4000));  // 40 s: still active at the first status
  ASSERT_TRUE(running);
  auto early = c->status(*running);
  ASSERT_TRUE(early) << error_text(early.error());
  EXPECT_EQ(early->job_id, *running);
  EXPECT_TRUE(early->state == client::job_state::queued ||
              early->state == client::job_state::running);
  ASSERT_TRUE(c->cancel(*running));

  auto id = c->submit(spec_of({3}, 3));
  ASSERT_TRUE(id);
  ASSERT_TRUE(c->wait(*id, 10s));
  auto late = c->status(*id);
  ASSERT_TRUE(late);
  EXPECT_EQ(late->state, client::job_state::finished);
  EXPECT_EQ(late->tokens, (std::vector<int32_t>{4, 5, 6}));
  EXPECT_EQ(late->finish_reason, "length");

  auto unknown = c->status(4242);
  ASSERT_FALSE(unknown);
  EXPECT_TRUE(is(unknown.error(), client::client_errc::unknown_job)) << error_text(unknown.error());
  EXPECT_NE(error_text(unknown.error()).find("unknown_job: no job 4242"), std::string::npos)
      << error_text(unknown.error());
}

TEST_F(api_server_test, cancel_ends_a_running_job) {
  fake_controller_options o;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit(spec_of({1}, 4000));
  ASSERT_TRUE(id);
  EXPECT_FALSE(c->wait(*id, 50ms));  // still running
  auto was_active = c->cancel(*id);
  ASSERT_TRUE(was_active) << error_text(was_active.error());
  EXPECT_TRUE(*was_active);
  auto done = c->wait(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::cancelled);
  EXPECT_EQ(done->finish_reason, "cancelled");
  EXPECT_LT(done->tokens.size(), 4000u);
  auto again = c->cancel(*id);
  ASSERT_TRUE(again);
  EXPECT_FALSE(*again);
}

TEST_F(api_server_test, describe_answers_the_description_it_was_given) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  auto d = c->describe();
  ASSERT_TRUE(d) << error_text(d.error());
  const auto want = two_node_cluster();
  EXPECT_EQ(d->name, want.name);
  ASSERT_EQ(d->nodes.size(), 2u);
  EXPECT_EQ(d->nodes[1].name, "n1");
  EXPECT_EQ(d->nodes[1].host, "127.0.0.2");
  EXPECT_EQ(d->nodes[0].devices, (std::vector<std::string>{"n0/cpu0", "n0/cpu1"}));
  ASSERT_EQ(d->actors.size(), 3u);
  EXPECT_EQ(d->actors[2].kind, "expert_group");
  EXPECT_EQ(d->actors[2].id, "expert_group/0");
  EXPECT_EQ(d->actors[2].node, "n1");
  EXPECT_EQ(d->actors[2].device, "n1/gpu0");
  EXPECT_EQ(d->placement_version, 7u);
  EXPECT_EQ(d->placement_json, want.placement_json);

  auto changed = want;
  changed.placement_version = 8;
  server->set_cluster_description(changed);
  auto d2 = c->describe();
  ASSERT_TRUE(d2);
  EXPECT_EQ(d2->placement_version, 8u);
}

TEST_F(api_server_test, a_wrong_secret_is_unauthenticated_and_never_echoed) {
  start();
  const std::string wrong = "not the secret at all";
  auto c = connect(wrong);
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::unauthenticated)) << error_text(c.error());
  const auto text = error_text(c.error());
  EXPECT_NE(text.find("unauthenticated"), std::string::npos) << text;
  EXPECT_EQ(text.find(wrong), std::string::npos) << text;
  EXPECT_EQ(text.find(secret), std::string::npos) << text;
  // A prefix of the secret, and the empty secret, are wrong too.
  EXPECT_FALSE(connect(secret.substr(0, 5)));
  EXPECT_FALSE(connect(""));
  EXPECT_FALSE(connect(secret + "x"));
  EXPECT_EQ(log->num_submitted(), 0u);
}

TEST_F(api_server_test, overloaded_is_a_clear_retryable_error) {
  fake_controller_options o;
  o.max_active = 1;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto first = c->submit(spec_of({1}, 4000));
  ASSERT_TRUE(first);
  auto second = c->submit(spec_of({2}, 4));
  ASSERT_FALSE(second);
  EXPECT_TRUE(is(second.error(), client::client_errc::overloaded)) << error_text(second.error());
  EXPECT_EQ(error_text(second.error()).rfind("overloaded: the queue is full", 0), 0u)
      << error_text(second.error());
  // The server stays healthy: the first job can still be cancelled and the slot reused.
  ASSERT_TRUE(c->cancel(*first));
  ASSERT_TRUE(c->wait(*first, 10s));
  EXPECT_TRUE(c->generate(spec_of({2}, 4)));
}

TEST_F(api_server_test, invalid_arguments_are_refused_with_the_field_named) {
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  struct bad_case {
    client::generation_request_spec spec;
    std::string field;
  };
  std::vector<bad_case> cases;
  cases.push_back({spec_of({}, 4), "prompt"});
  cases.push_back({spec_of({1, -5}, 4), "prompt[1]"});
  cases.push_back({spec_of({1}, -1), "maxNewTokens"});
  auto s = spec_of({1}, 4);
  s.top_p = 0.0f;
  cases.push_back({s, "topP"});
  s.top_p = 1.5f;
  cases.push_back({s, "topP"});
  s = spec_of({1}, 4);
  s.temperature = -0.5f;
  cases.push_back({s, "temperature"});
  s.temperature = std::nanf("");
  cases.push_back({s, "temperature"});
  s = spec_of({1}, 4);
  s.stop_token_ids = {-1};
  cases.push_back({s, "stopTokenIds[0]"});
  for (const auto& bad : cases) {
    auto id = c->submit(bad.spec);
    ASSERT_FALSE(id) << bad.field;
    EXPECT_TRUE(is(id.error(), client::client_errc::invalid_request)) << error_text(id.error());
    EXPECT_NE(error_text(id.error()).find(bad.field), std::string::npos) << error_text(id.error());
  }
  // What only the controller knows (its max_new_tokens limit) comes back the same way.
  auto too_long = c->submit(spec_of({1}, 5000));
  ASSERT_FALSE(too_long);
  EXPECT_TRUE(is(too_long.error(), client::client_errc::invalid_request))
      << error_text(too_long.error());
  EXPECT_NE(error_text(too_long.error()).find("exceeds the limit of 4096"), std::string::npos);
  EXPECT_EQ(log->num_submitted(), 0u);
}

// A client that skips moe::client's checks (any language, any version) meets the same checks
// in the server, before the controller sees anything.
TEST_F(api_server_test, the_server_validates_what_a_raw_client_sends) {
  start();
  namespace wire = moe::protocol::capnp;
  capnp::EzRpcClient rpc("127.0.0.1", server->port());
  auto& ws = rpc.getWaitScope();
  auto gateway = rpc.getMain<wire::Gateway>();

  auto old = gateway.loginRequest();
  old.setSecret(secret);
  old.setClientVersion(wire::API_VERSION + 1);
  try {
    old.send().wait(ws);
    ADD_FAILURE() << "a wrong API version logged in";
  } catch (const kj::Exception& e) {
    EXPECT_NE(std::string(e.getDescription().cStr()).find("unsupported_version"), std::string::npos)
        << e.getDescription().cStr();
  }

  auto login = gateway.loginRequest();
  login.setSecret(secret);
  login.setClientVersion(wire::API_VERSION);
  auto service = login.send().wait(ws).getService();

  auto expect_invalid = [&](auto&& fill, const std::string& what) {
    auto req = service.submitRequest();
    fill(req);
    try {
      req.send().wait(ws);
      ADD_FAILURE() << what << ": accepted";
    } catch (const kj::Exception& e) {
      std::string d = e.getDescription().cStr();
      EXPECT_NE(d.find("invalid_request: "), std::string::npos) << d;
      EXPECT_NE(d.find(what), std::string::npos) << d;
    }
  };
  expect_invalid([](auto& req) { req.initJob().initGeneration().setMaxNewTokens(3); }, "prompt");
  expect_invalid(
      [](auto& req) {
        auto g = req.initJob().initGeneration();
        g.initPrompt(1).set(0, 1);
        g.setTopP(0.0f);
      },
      "topP");
  expect_invalid([](auto& req) { req.initJob().initTraining(); }, "training");
  EXPECT_EQ(log->num_submitted(), 0u);

  // Without a sink the job runs, and status() shows it.
  auto req = service.submitRequest();
  auto g = req.initJob().initGeneration();
  g.initPrompt(1).set(0, 9);
  g.setMaxNewTokens(2);
  auto id = req.send().wait(ws).getJobId();
  for (int i = 0; i < 500; ++i) {
    auto st = service.statusRequest();
    st.setJobId(id);
    auto r = st.send().wait(ws);
    if (r.getStatus().getState() == wire::JobState::FINISHED) {
      EXPECT_EQ(r.getStatus().getTokens().size(), 2u);
      return;
    }
    std::this_thread::sleep_for(5ms);
  }
  ADD_FAILURE() << "the job without a sink never finished";
}

TEST_F(api_server_test, a_client_that_disconnects_mid_stream_gets_its_job_cancelled) {
  fake_controller_options o;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  size_t num_events = 0;
  auto id = c->submit(spec_of({1}, 4000), [&](const client::client_event&) { ++num_events; });
  ASSERT_TRUE(id);
  // Delivers events until some arrived: the job is streaming now.
  for (int i = 0; i < 500 && num_events == 0; ++i) {
    auto running = c->wait(*id, 20ms);
    ASSERT_FALSE(running);
    EXPECT_TRUE(is(running.error(), client::client_errc::timed_out));
  }
  ASSERT_GT(num_events, 0u);
  c.reset();  // closes the connection
  EXPECT_TRUE(log->wait_for_cancel(*id, 10s));
}

TEST_F(api_server_test, a_throwing_event_handler_fails_the_job_and_the_server_cancels_it) {
  fake_controller_options o;
  o.token_interval = 5ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit(spec_of({1}, 4000), [](const client::client_event&) {
    throw std::runtime_error("handler bug");
  });
  ASSERT_TRUE(id);
  auto done = c->wait(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::failed);
  EXPECT_NE(done->error.find("handler bug"), std::string::npos) << done->error;
  EXPECT_TRUE(log->wait_for_cancel(*id, 10s));
  EXPECT_TRUE(c->describe());  // the connection is still fine
}

TEST_F(api_server_test, stopping_the_server_mid_stream_cancels_and_ends_the_stream) {
  fake_controller_options o;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit(spec_of({1}, 4000));
  ASSERT_TRUE(id);
  ASSERT_FALSE(c->wait(*id, 50ms));
  std::thread stopper([&] { server->stop(); });
  auto done = c->wait(*id, 20s);
  stopper.join();
  // Either the final "cancelled" event arrived before the connection closed, or the
  // connection closed first: never a hang, never a silent success.
  if (done) {
    EXPECT_EQ(done->state, client::job_state::cancelled);
  } else {
    EXPECT_TRUE(is(done.error(), client::client_errc::disconnected)) << error_text(done.error());
  }
  EXPECT_TRUE(log->wait_for_cancel(*id, 10s));
  auto after = c->describe();
  ASSERT_FALSE(after);
  auto again = connect();
  ASSERT_FALSE(again);
  EXPECT_TRUE(is(again.error(), client::client_errc::connection_failed)) << error_text(again.error());
  server->stop();  // idempotent
}

TEST_F(api_server_test, a_controller_that_dies_fails_the_stream_and_later_calls) {
  fake_controller_options o;
  o.token_interval = 10ms;
  start(o);
  auto c = connected();
  ASSERT_TRUE(c);
  auto id = c->submit(spec_of({1}, 4000));
  ASSERT_TRUE(id);
  ASSERT_FALSE(c->wait(*id, 50ms));
  caf::anon_send_exit(controller, caf::exit_reason::kill);
  auto done = c->wait(*id, 10s);
  ASSERT_TRUE(done) << error_text(done.error());
  EXPECT_EQ(done->state, client::job_state::failed);
  EXPECT_NE(done->error.find("controller terminated"), std::string::npos) << done->error;
  auto st = c->status(*id);
  ASSERT_FALSE(st);
  EXPECT_TRUE(is(st.error(), client::client_errc::server_error)) << error_text(st.error());
  EXPECT_NE(error_text(st.error()).find("controller"), std::string::npos);
}

// --- rebalance() ---------------------------------------------------------------------------

TEST_F(api_server_test, rebalance_answers_the_rebalancers_report_intact) {
  actors::rebalance_report same;  // the second rebalance: nothing to move
  same.version_before = same.version_after = 2;
  same.balance_before = same.balance_after = 1.03;
  same.layer_balance_before = same.layer_balance_after = {1.01, 1.05};
  same.tokens_counted = 700;
  same.trigger = "on_demand";
  script_rebalancer({answer_report(canned_report()), answer_report(same)});
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  auto r = c->rebalance();
  ASSERT_TRUE(r) << error_text(r.error());
  EXPECT_TRUE(r->changed);
  EXPECT_EQ(r->version_before, 1u);
  EXPECT_EQ(r->version_after, 2u);
  EXPECT_DOUBLE_EQ(r->balance_before, 1.84);
  EXPECT_DOUBLE_EQ(r->balance_after, 1.07);
  EXPECT_EQ(r->layer_balance_before, (std::vector<double>{2.0, 1.75, 1.77}));
  EXPECT_EQ(r->layer_balance_after, (std::vector<double>{1.125, 1.0, 1.09}));
  EXPECT_EQ(r->tokens_counted, 48'213u);
  EXPECT_EQ(r->replicas_moved, 12);
  EXPECT_EQ(r->bytes_moved, 3'250'585u);
  EXPECT_DOUBLE_EQ(r->duration_seconds, 0.42);
  EXPECT_EQ(r->trigger, "on_demand");
  EXPECT_EQ(rebalance_calls->load(), 1);

  auto unchanged = c->rebalance();
  ASSERT_TRUE(unchanged) << error_text(unchanged.error());
  EXPECT_FALSE(unchanged->changed);
  EXPECT_EQ(unchanged->version_before, 2u);
  EXPECT_EQ(unchanged->version_after, 2u);
  EXPECT_DOUBLE_EQ(unchanged->balance_after, 1.03);
  EXPECT_EQ(unchanged->layer_balance_before, (std::vector<double>{1.01, 1.05}));
  EXPECT_EQ(unchanged->replicas_moved, 0);
  EXPECT_EQ(unchanged->bytes_moved, 0u);
  EXPECT_EQ(unchanged->tokens_counted, 700u);
  EXPECT_EQ(rebalance_calls->load(), 2);
}

TEST_F(api_server_test, rebalance_errors_map_to_api_codes_and_keep_their_text) {
  using actors::rebalance_errc;
  struct error_case {
    rebalance_errc code;
    std::string text;
    client::client_errc want;
    std::string api_code;
  };
  const std::vector<error_case> cases = {
      {rebalance_errc::busy, "a rebalance is already running (since 3 s)",
       client::client_errc::overloaded, "overloaded"},
      {rebalance_errc::no_load, "the routers counted no routed tokens yet; retry after traffic",
       client::client_errc::unavailable, "unavailable"},
      {rebalance_errc::unsupported, "expert groups hold unequal numbers of slots (4, 5)",
       client::client_errc::invalid_request, "invalid_request"},
      {rebalance_errc::failed, "prepare: expert group 2 failed to load layer 3 expert 7",
       client::client_errc::unavailable, "unavailable"},
  };
  std::vector<fake_rebalance_answer> answers;
  for (const auto& e : cases) answers.push_back(answer_error(e.code, e.text));
  answers.push_back(answer_report(canned_report()));
  script_rebalancer(answers);
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  for (const auto& e : cases) {
    auto r = c->rebalance();
    ASSERT_FALSE(r) << e.text;
    EXPECT_TRUE(is(r.error(), e.want)) << error_text(r.error());
    EXPECT_EQ(error_text(r.error()), e.api_code + ": " + e.text);
  }
  // The connection and the server are fine after every refusal.
  auto ok = c->rebalance();
  ASSERT_TRUE(ok) << error_text(ok.error());
  EXPECT_EQ(ok->version_after, 2u);
  EXPECT_EQ(rebalance_calls->load(), static_cast<int>(cases.size()) + 1);
}

TEST_F(api_server_test, rebalance_without_a_rebalancer_says_it_is_not_enabled) {
  start();  // no rebalancer
  auto c = connected();
  ASSERT_TRUE(c);
  auto r = c->rebalance();
  ASSERT_FALSE(r);
  EXPECT_TRUE(is(r.error(), client::client_errc::unavailable)) << error_text(r.error());
  const std::string want = "unavailable: rebalancing is not enabled on this cluster";
  EXPECT_EQ(error_text(r.error()).rfind(want, 0), 0u) << error_text(r.error());
  EXPECT_TRUE(c->describe());  // the connection is still fine
}

TEST_F(api_server_test, rebalance_is_unreachable_without_a_login) {
  script_rebalancer({answer_error(actors::rebalance_errc::busy, "a rebalance is already running"),
                     answer_report(canned_report())});
  start();
  // The C++ client cannot even get a service with a wrong secret.
  EXPECT_FALSE(connect("not the secret"));

  namespace wire = moe::protocol::capnp;
  capnp::EzRpcClient rpc("127.0.0.1", server->port());
  auto& ws = rpc.getWaitScope();
  auto gateway = rpc.getMain<wire::Gateway>();
  // The bootstrap capability is a Gateway: a JobService call on it reaches nothing.
  try {
    gateway.castAs<wire::JobService>().rebalanceRequest().send().wait(ws);
    ADD_FAILURE() << "rebalance answered before login";
  } catch (const kj::Exception& e) {
    EXPECT_EQ(e.getType(), kj::Exception::Type::UNIMPLEMENTED) << e.getDescription().cStr();
  }
  auto wrong = gateway.loginRequest();
  wrong.setSecret("not the secret");
  wrong.setClientVersion(wire::API_VERSION);
  try {
    wrong.send().wait(ws);
    ADD_FAILURE() << "a wrong secret logged in";
  } catch (const kj::Exception& e) {
    EXPECT_NE(std::string(e.getDescription().cStr()).find("unauthenticated"), std::string::npos);
  }
  EXPECT_EQ(rebalance_calls->load(), 0);

  // Logged in, the call reaches the rebalancer; "busy" is a retryable OVERLOADED exception.
  auto login = gateway.loginRequest();
  login.setSecret(secret);
  login.setClientVersion(wire::API_VERSION);
  auto service = login.send().wait(ws).getService();
  try {
    service.rebalanceRequest().send().wait(ws);
    ADD_FAILURE() << "busy was not refused";
  } catch (const kj::Exception& e) {
    EXPECT_EQ(e.getType(), kj::Exception::Type::OVERLOADED);
    EXPECT_NE(std::string(e.getDescription().cStr())
                  .find("overloaded: a rebalance is already running"),
              std::string::npos)
        << e.getDescription().cStr();
  }
  // The reader points into the response: keep the response alive while it is read.
  auto response = service.rebalanceRequest().send().wait(ws);
  auto report = response.getReport();
  EXPECT_EQ(report.getTokensCounted(), 48'213u);
  EXPECT_EQ(report.getLayerBalanceAfter().size(), 3u);
  EXPECT_EQ(rebalance_calls->load(), 2);
}

TEST_F(api_server_test, rebalance_has_its_own_longer_timeout) {
  auto slow = answer_report(canned_report());
  slow.delay = 400ms;  // longer than request_timeout below
  fake_rebalance_answer hung;
  hung.never = true;
  script_rebalancer({slow, hung});
  start({}, [](actors::api_server_options& o) {
    o.request_timeout = 100ms;
    o.rebalance_timeout = 1500ms;
  });
  auto c = connected();
  ASSERT_TRUE(c);
  auto r = c->rebalance();
  ASSERT_TRUE(r) << error_text(r.error());
  EXPECT_EQ(r->replicas_moved, 12);

  // One that outlives rebalance_timeout fails, and says the rebalance may still be running.
  auto late = c->rebalance();
  ASSERT_FALSE(late);
  EXPECT_TRUE(is(late.error(), client::client_errc::server_error)) << error_text(late.error());
  EXPECT_NE(error_text(late.error()).find("did not answer within 1500 ms"), std::string::npos)
      << error_text(late.error());
  EXPECT_NE(error_text(late.error()).find("may still be running"), std::string::npos);
}

TEST_F(api_server_test, a_rebalancer_that_is_gone_is_a_named_server_error) {
  script_rebalancer({answer_report(canned_report())});
  start();
  auto c = connected();
  ASSERT_TRUE(c);
  caf::anon_send_exit(rebalancer, caf::exit_reason::kill);
  // The exit is asynchronous: wait until the rebalancer is gone.
  caf::scoped_actor self{sys};
  self->wait_for(rebalancer);
  auto r = c->rebalance();
  ASSERT_FALSE(r);
  EXPECT_TRUE(is(r.error(), client::client_errc::server_error)) << error_text(r.error());
  EXPECT_NE(error_text(r.error()).find("the rebalancer is not running"), std::string::npos)
      << error_text(r.error());
}

TEST(api_client, connection_refused_and_bad_addresses_are_named) {
  // A port nobody listens on: bind one, note it, close it.
  uint16_t port = 0;
  {
    auto io = kj::setupAsyncIo();
    auto listener = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
    port = static_cast<uint16_t>(listener->getPort());
  }
  auto c = client::job_client::connect("127.0.0.1", port, secret);
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::connection_failed)) << error_text(c.error());
  EXPECT_NE(error_text(c.error()).find("refused"), std::string::npos) << error_text(c.error());

  EXPECT_TRUE(client::parse_address("127.0.0.1:7101"));
  EXPECT_EQ(client::parse_address("[::1]:7101")->first, "[::1]");
  EXPECT_EQ(client::parse_address("localhost:80")->second, 80);
  for (const char* bad : {"", "7101", "host:", ":7101", "host:0", "host:70000", "host:12x", "::1:80"})
    EXPECT_FALSE(client::parse_address(bad)) << bad;
}
