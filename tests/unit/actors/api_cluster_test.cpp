// The job-submission API in front of the real controller and a real actor graph (tiny-v3):
// a client over 127.0.0.1 gets the golden greedy tokens, streamed, from concurrent clients;
// status, cancel and the controller's own refusals come back through the API.
#include "actors/api_server.hpp"

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "client/job_client.hpp"
#include "tests/golden/golden_data.hpp"
#include "runtime/actor_system.hpp"

using namespace moe;
using namespace std::chrono_literals;

namespace {

const std::string secret = "cluster secret for the api test";

std::filesystem::path tiny() { return std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3"; }

std::vector<int32_t> golden_ids(const std::string& name) {
  return moe::testing::golden_file::open(tiny() / "golden.safetensors").ids(name);
}

runtime::actor_system_config make_config() {
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  o.num_worker_threads = 2;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  return cfg;
}

struct api_cluster {
  runtime::actor_system_config cfg = make_config();
  caf::actor_system sys{cfg};
  std::unique_ptr<actors::local_cluster> cluster;
  actors::controller_actor controller;
  std::unique_ptr<actors::api_server> server;

  explicit api_cluster(actors::controller_limits limits = {}) {
    auto c = actors::local_cluster::start(sys, tiny(), actors::even_layout(2, 2, 16));
    EXPECT_TRUE(c) << error_text(c.error());
    if (!c) return;
    cluster = std::move(*c);
    actors::controller_options o;
    o.shards = cluster->shards();
    o.limits = limits;
    o.vocab_size = 512;
    controller = actors::spawn_controller(sys, o);
    actors::api_server_options ao;
    ao.secret = secret;
    ao.cluster.name = "tiny";
    auto s = actors::api_server::start(sys, controller, ao);
    EXPECT_TRUE(s) << error_text(s.error());
    if (s) server = std::move(*s);
  }

  ~api_cluster() {
    if (server) server->stop();
    if (controller) caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
  }

  std::unique_ptr<client::job_client> connect() {
    auto c = client::job_client::connect("127.0.0.1", server->port(), secret);
    EXPECT_TRUE(c) << error_text(c.error());
    return c ? std::move(*c) : nullptr;
  }
};

client::generation_request_spec spec_of(std::vector<int32_t> prompt, int64_t n) {
  client::generation_request_spec s;
  s.prompt = std::move(prompt);
  s.max_new_tokens = n;
  return s;
}

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
