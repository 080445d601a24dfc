// A node process's control endpoint while its actors compute: the gatekeeper answers joins and
// status requests from another actor system, over the network, while every worker of the node's
// pool is held (as CPU expert groups hold them). A coordinator (re)joining a busy node, or an
// operator's `moe status`, must not time out for it.
#include "actors/node_process.hpp"

#include <caf/all.hpp>
#include <caf/io/middleman.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "actors/cluster_messages.hpp"
#include "base/error.hpp"
#include "busy_worker.hpp"
#include "node_children.hpp"
#include "runtime/cluster_config.hpp"
#include "system_config.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;

TEST(node_process, answers_joins_and_status_while_every_worker_is_busy) {
  const auto [control, metrics] = moe::test::free_ports<2>();
  const std::string yaml =
      "cluster:\n  name: node-process-test\n  secret: right-secret\nnodes:\n"
      "  - {name: n0, host: 127.0.0.1, control_port: " +
      std::to_string(control) + ", metrics_port: " + std::to_string(metrics) +
      ", devices: {cpu_slots: 1}, memory: 1GiB}\nmodel: {preset: tiny}\n"
      "ports: {control: 0, api: 0, metrics: 0}\n";
  auto cfg = runtime::parse_cluster_config(yaml, "node-process-test.yaml");
  ASSERT_TRUE(cfg) << error_text(cfg.error());

  auto node_cfg = actors::testing::networked_system_config(1);
  caf::actor_system node_sys{node_cfg};
  node_process_options o;
  o.node = "n0";
  auto node = node_process::start(node_sys, *cfg, o);
  ASSERT_TRUE(node) << error_text(node.error());

  auto coord_cfg = actors::testing::networked_system_config();
  caf::actor_system coord_sys{coord_cfg};
  auto gatekeeper = coord_sys.middleman().remote_actor<node_gatekeeper_actor>(
      "127.0.0.1", (*node)->info().control_port);
  ASSERT_TRUE(gatekeeper) << error_text(gatekeeper.error());
  caf::scoped_actor self{coord_sys};
  const node_credentials creds{"node-process-test", "right-secret", "test-coordinator"};
  // Once idle first: the connection and its handshakes are done before the pool is taken.
  self->request(*gatekeeper, 30s, node_status_atom::value, creds)
      .receive([](const node_status&) {},
               [](caf::error& e) { FAIL() << "no status answer when idle: " << error_text(e); });

  moe::test::busy_worker busy{node_sys};
  ASSERT_TRUE(busy.held());
  bool status_answered = false, joined = false;
  self->request(*gatekeeper, 10s, node_status_atom::value, creds)
      .receive(
          [&](const node_status& s) {
            status_answered = true;
            EXPECT_EQ(s.info.name, "n0");
          },
          [](caf::error& e) {
            ADD_FAILURE() << "no status answer while the pool is busy: " << error_text(e);
          });
  self->request(*gatekeeper, 10s, join_atom::value, creds)
      .receive(
          [&](const node_join_reply& r) {
            joined = true;
            EXPECT_EQ(r.info.name, "n0");
            EXPECT_TRUE(r.agent);
          },
          [](caf::error& e) {
            ADD_FAILURE() << "no join answer while the pool is busy: " << error_text(e);
          });
  busy.release();
  EXPECT_TRUE(status_answered);
  EXPECT_TRUE(joined);
  (*node)->stop();
}
