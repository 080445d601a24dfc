// The node agent while it reads weights: heartbeats and session requests are answered as the
// checkpoint loads (a large model takes minutes; the membership calls a node down after
// failure_timeout_ms without an answer), and weights loaded for a session that closed meanwhile
// spawn nothing. The load is held by node_agent_options::before_loading. Heartbeats from another
// process are also answered while every worker of the node's pool is busy.

#include "actors/node_agent.hpp"

#include <caf/all.hpp>
#include <caf/io/middleman.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <memory>

#include "actors/actor_types.hpp"
#include "actors/cluster_messages.hpp"
#include "base/error.hpp"
#include "busy_worker.hpp"
#include "model/config.hpp"
#include "runtime/actor_system.hpp"
#include "scheduler/placement.hpp"
#include "system_config.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;

using moe::actors::testing::tiny;

namespace {

/// Holds the agent's loading thread until released; says when it has got there.
struct load_gate {
  std::promise<void> reached, release;
  std::shared_future<void> released = release.get_future().share();
  std::function<void()> hook() {
    return [this] {
      reached.set_value();
      released.wait();
    };
  }
};

/// One expert group (every routed expert and the shared ones) and one attention shard on n0.
scheduler::placement one_node_placement() {
  auto cfg = model::load_config(tiny());
  EXPECT_TRUE(cfg) << error_text(cfg.error());
  scheduler::placement p;
  scheduler::expert_group_assignment g;
  g.group = 0;
  g.device.node = "n0";
  for (int64_t e = 0; e < cfg->n_routed_experts; ++e) g.experts.push_back(e);
  g.holds_shared_experts = true;
  p.expert_groups.push_back(g);
  scheduler::attention_assignment a;
  a.shard = 0;
  a.device.node = "n0";
  p.attention.push_back(a);
  p.num_logical_experts = cfg->n_routed_experts;
  return p;
}

struct agent_fixture {
  runtime::actor_system_config sys_cfg = actors::testing::local_system_config();
  caf::actor_system sys{sys_cfg};
  load_gate gate;
  node_agent_actor agent;
  agent_fixture() {
    node_agent_options o;
    o.node = "n0";
    o.model_dir = tiny();
    o.cache.block_size = 16;
    o.cache.num_blocks = 8;
    o.before_loading = gate.hook();
    agent = spawn_node_agent(sys, std::move(o));
  }
  ~agent_fixture() {
    // Never leave the loader blocked (a failed assertion returns early).
    try {
      gate.release.set_value();
    } catch (const std::future_error&) {
    }
    caf::anon_send_exit(agent, caf::exit_reason::user_shutdown);
  }
  void wait_until_loading() {
    ASSERT_EQ(gate.reached.get_future().wait_for(30s), std::future_status::ready)
        << "the load never started";
  }
};

}  // namespace

TEST(node_agent, answers_heartbeats_while_weights_load_then_spawns) {
  agent_fixture f;
  caf::scoped_actor self{f.sys};
  const auto placement = one_node_placement();
  auto groups = self->request(f.agent, caf::infinite, spawn_groups_atom::value, placement);
  f.wait_until_loading();

  runtime::node_heartbeat hb;
  hb.sequence = 7;
  bool answered = false;
  self->request(f.agent, 10s, runtime::heartbeat_atom::value, hb)
      .receive(
          [&](const runtime::node_heartbeat& r) {
            answered = true;
            EXPECT_EQ(r.node, "n0");
            EXPECT_EQ(r.sequence, 7u);
          },
          [&](caf::error& e) {
            ADD_FAILURE() << "no heartbeat answer while loading: " << error_text(e);
          });
  EXPECT_TRUE(answered);

  f.gate.release.set_value();
  group_handles got;
  groups.receive([&](group_handles& g) { got = std::move(g); },
                 [&](caf::error& e) { ADD_FAILURE() << error_text(e); });
  ASSERT_EQ(got.groups, std::vector<int32_t>{0});
  ASSERT_EQ(got.handles.size(), 1u);
  EXPECT_TRUE(got.handles.front());

  // The second phase loads too (held again, released at once) and gets the group's handle.
  f.gate.reached = {};
  f.gate.release = {};
  f.gate.released = f.gate.release.get_future().share();
  f.gate.release.set_value();
  shard_handles shards;
  self->request(f.agent, caf::infinite, spawn_shards_atom::value, placement, got)
      .receive([&](shard_handles& h) { shards = std::move(h); },
               [&](caf::error& e) { ADD_FAILURE() << error_text(e); });
  EXPECT_EQ(shards.shards, std::vector<int32_t>{0});
  EXPECT_EQ(shards.handles.size(), 1u);
  EXPECT_EQ(shards.routers.size(), 1u);
}

TEST(node_agent, weights_loaded_for_a_closed_session_spawn_nothing) {
  agent_fixture f;
  caf::scoped_actor self{f.sys};
  cluster_session session;
  session.owner = caf::actor_cast<caf::actor>(self);
  self->request(f.agent, 10s, open_session_atom::value, session)
      .receive([](caf::atom_value) {}, [](caf::error& e) { FAIL() << error_text(e); });

  auto groups =
      self->request(f.agent, caf::infinite, spawn_groups_atom::value, one_node_placement());
  f.wait_until_loading();
  // Answered while the load is held: the agent is not busy with it.
  self->request(f.agent, 10s, close_session_atom::value)
      .receive([](caf::atom_value) {},
               [](caf::error& e) {
                 ADD_FAILURE() << "close_session not answered while loading: " << error_text(e);
               });
  f.gate.release.set_value();
  groups.receive(
      [](group_handles&) { ADD_FAILURE() << "spawned expert groups for a closed session"; },
      [](caf::error& e) {
        EXPECT_NE(error_text(e).find("session closed"), std::string::npos) << error_text(e);
      });

  // A new session gets a clean node: the same request now spawns.
  f.gate.reached = {};
  f.gate.release = {};
  f.gate.released = f.gate.release.get_future().share();
  f.gate.release.set_value();
  self->request(f.agent, 10s, open_session_atom::value, session)
      .receive([](caf::atom_value) {}, [](caf::error& e) { FAIL() << error_text(e); });
  self->request(f.agent, caf::infinite, spawn_groups_atom::value, one_node_placement())
      .receive([](group_handles& g) { EXPECT_EQ(g.handles.size(), 1u); },
               [](caf::error& e) { ADD_FAILURE() << error_text(e); });
}

// A node's actors compute on CAF's worker pool (a CPU expert group's forward can hold a worker
// for seconds). Heartbeats must not queue behind them: the agent has a thread of its own, and a
// heartbeat arriving over the network is read off the wire without a pool worker. Here the node
// side has one worker and a busy actor holds it while the coordinator side asks, remotely.
TEST(node_agent, answers_remote_heartbeats_while_every_worker_is_busy) {
  auto node_cfg = actors::testing::networked_system_config(1);
  caf::actor_system node_sys{node_cfg};
  auto coord_cfg = actors::testing::networked_system_config();
  caf::actor_system coord_sys{coord_cfg};

  node_agent_options o;
  o.node = "n0";
  o.model_dir = tiny();
  auto agent = spawn_node_agent(node_sys, std::move(o));
  auto port = node_sys.middleman().publish(agent, 0, "127.0.0.1");
  ASSERT_TRUE(port) << error_text(port.error());
  auto remote = coord_sys.middleman().remote_actor<node_agent_actor>("127.0.0.1", *port);
  ASSERT_TRUE(remote) << error_text(remote.error());

  // Once warm: the connection is up and every handshake is done before the pool is taken.
  caf::scoped_actor self{coord_sys};
  runtime::node_heartbeat hb;
  self->request(*remote, 30s, runtime::heartbeat_atom::value, hb)
      .receive([](const runtime::node_heartbeat&) {},
               [](caf::error& e) { FAIL() << "no heartbeat answer when idle: " << error_text(e); });

  moe::test::busy_worker busy{node_sys};
  ASSERT_TRUE(busy.held());

  hb.sequence = 11;
  bool answered = false;
  self->request(*remote, 10s, runtime::heartbeat_atom::value, hb)
      .receive(
          [&](const runtime::node_heartbeat& r) {
            answered = true;
            EXPECT_EQ(r.sequence, 11u);
          },
          [&](caf::error& e) {
            ADD_FAILURE() << "no heartbeat answer while the pool is busy: " << error_text(e);
          });
  busy.release();
  EXPECT_TRUE(answered);
  caf::anon_send_exit(agent, caf::exit_reason::user_shutdown);
}
