// CAF wired for real: a typed actor answers a request locally, and the same actor answers a
// request that crosses the I/O middleman over 127.0.0.1 carrying one of our registered types.
// await_released: a detached actor that another system holds a proxy of is released before its
// system goes, so the system's destructor returns (it used to wait forever now and then).
#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>

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

// Runs f(); aborts, saying what hung, when it has not returned within `limit`: a hang would
// otherwise end only at ctest's timeout, without a word of where.
template <class F>
void within(std::chrono::seconds limit, const char* what, F f) {
  std::promise<void> done;
  auto returned = done.get_future();
  std::thread watchdog([&returned, limit, what] {
    if (returned.wait_for(limit) == std::future_status::ready) return;
    std::fprintf(stderr, "FAIL: %s has not returned after %lld s\n", what, static_cast<long long>(limit.count()));
    std::abort();
  });
  f();
  done.set_value();
  watchdog.join();
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

TEST(caf_system, await_released_waits_for_the_last_handle) {
  actor_system_config cfg{opts(false)};
  caf::actor_system sys{cfg};
  EXPECT_TRUE(await_released(caf::actor_addr{}, std::chrono::milliseconds(0)));
  echo_actor echo = sys.spawn<caf::detached>(echo_impl);
  const auto addr = echo.address();
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
  // Ended, but this handle still holds it.
  EXPECT_FALSE(await_released(addr, std::chrono::milliseconds(50)));
  echo = nullptr;
  EXPECT_TRUE(await_released(addr, std::chrono::seconds(30)));
}

// The node's shutdown: its detached actor ends while a coordinator holds a proxy of it (so the
// node's BASP broker monitors it), then the node's system is destroyed at once. Repeated, as the
// broker reading its down message late was a matter of timing.
TEST(caf_system, a_detached_actor_known_remotely_is_released_before_its_system_goes) {
  actor_system_config client_cfg{opts(true)};
  caf::actor_system client{client_cfg};
  for (int round = 0; round < 50; ++round) {
    SCOPED_TRACE(round);
    actor_system_config server_cfg{opts(true)};
    auto server = std::make_unique<caf::actor_system>(server_cfg);
    echo_actor echo = server->spawn<caf::detached>(echo_impl);
    auto port = server->middleman().publish(echo, 0, "127.0.0.1");
    ASSERT_TRUE(port) << server->render(port.error());
    auto remote = client.middleman().remote_actor<echo_actor>("127.0.0.1", *port);
    ASSERT_TRUE(remote) << client.render(remote.error());
    {
      caf::scoped_actor self{client};
      bool answered = false;
      self->request(*remote, std::chrono::seconds(10), heartbeat_atom::value, node_heartbeat{"n", 0, 0})
          .receive([&](const node_heartbeat&) { answered = true; },
                   [&](const caf::error& e) { FAIL() << client.render(e); });
      ASSERT_TRUE(answered);
    }
    auto unpublished = server->middleman().unpublish(echo, *port);
    ASSERT_TRUE(unpublished) << server->render(unpublished.error());
    // Ending the actor and destroying the system in one go, as a node does on SIGTERM; the
    // destructor returns when no thread of the system waits for the actor any more.
    within(std::chrono::seconds(60), "ending the actor and destroying its system", [&] {
      const auto addr = echo.address();
      caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
      echo = nullptr;
      EXPECT_TRUE(await_released(addr, std::chrono::seconds(30)));
      server.reset();
    });
  }
}

