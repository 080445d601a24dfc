// CAF wired for real: a typed actor answers a request locally, and the same actor answers a
// request that crosses the I/O middleman over 127.0.0.1 carrying one of our registered types.
#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <gtest/gtest.h>

#include "runtime/actor_system.hpp"
#include "runtime/caf_types.hpp"

using namespace moe::runtime;

namespace {

using echo_actor =
    caf::typed_actor<caf::replies_to<heartbeat_atom, node_heartbeat>::with<node_heartbeat>>;

echo_actor::behavior_type echo_impl() {
  return {[](heartbeat_atom, node_heartbeat hb) {
    hb.sequence += 1;
    hb.node = "echo:" + hb.node;
    return hb;
  }};
}

actor_system_config::options opts(bool middleman) {
  actor_system_config::options o;
  o.num_worker_threads = 2;
  o.load_middleman = middleman;
  return o;
}

}  // namespace

TEST(caf_system, typed_request_response_in_process) {
  actor_system_config cfg{opts(false)};
  caf::actor_system sys{cfg};
  auto echo = sys.spawn(echo_impl);
  caf::scoped_actor self{sys};
  std::optional<node_heartbeat> got;
  self->request(echo, std::chrono::seconds(10), heartbeat_atom::value, node_heartbeat{"n0", 41, 7})
      .receive([&](const node_heartbeat& hb) { got = hb; },
               [&](const caf::error& e) { FAIL() << sys.render(e); });
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (node_heartbeat{"echo:n0", 42, 7}));
}

TEST(caf_system, typed_request_crosses_the_middleman_on_loopback) {
  actor_system_config server_cfg{opts(true)};
  caf::actor_system server{server_cfg};
  auto echo = server.spawn(echo_impl);
  auto port = server.middleman().publish(echo, 0, "127.0.0.1");
  ASSERT_TRUE(port) << server.render(port.error());

  actor_system_config client_cfg{opts(true)};
  caf::actor_system client{client_cfg};
  auto remote = client.middleman().remote_actor<echo_actor>("127.0.0.1", *port);
  ASSERT_TRUE(remote) << client.render(remote.error());

  caf::scoped_actor self{client};
  std::optional<node_heartbeat> got;
  self->request(*remote, std::chrono::seconds(10), heartbeat_atom::value,
                node_heartbeat{"n1", 1, 123456789})
      .receive([&](const node_heartbeat& hb) { got = hb; },
               [&](const caf::error& e) { FAIL() << client.render(e); });
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (node_heartbeat{"echo:n1", 2, 123456789}));
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
}
