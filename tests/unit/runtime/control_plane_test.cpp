// The control plane over TLS (runtime/control_plane.hpp): two actor systems in this process,
// each with its own middleman, talk through publish_control and control_plane_handle. With
// certificates from one CA a typed request crosses; a plain peer, a peer whose certificate
// another CA signed, and a TLS peer of a plain endpoint are all refused within a bounded time,
// and the endpoint keeps serving good peers afterwards.
#include "runtime/control_plane.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <optional>

#include "runtime/actor_system.hpp"
#include "runtime/caf_types.hpp"
#include "tests/unit/runtime/tls_test_certs.hpp"

namespace moe::runtime {
namespace {

using namespace std::chrono_literals;

using echo_actor =
    caf::typed_actor<caf::replies_to<heartbeat_atom, node_heartbeat>::with<node_heartbeat>>;

echo_actor::behavior_type echo_impl() {
  return {[](heartbeat_atom, node_heartbeat hb) {
    hb.sequence += 1;
    hb.node = "echo:" + hb.node;
    return hb;
  }};
}

/// One actor system with its config (which must outlive it).
struct test_system {
  explicit test_system(const std::optional<tls_config>& tls) : cfg(make_options(tls)), sys(cfg) {}

  static actor_system_config::options make_options(const std::optional<tls_config>& tls) {
    actor_system_config::options o;
    o.num_worker_threads = 2;
    o.load_middleman = true;
    o.tls = tls;
    return o;
  }

  actor_system_config cfg;
  caf::actor_system sys;
};

tls_config tls_of(const test::tls_test_certs::identity& node,
                  const test::tls_test_certs::identity& ca) {
  tls_config t;
  t.certificate = node.cert_file;
  t.key = node.key_file;
  t.ca_file = ca.cert_file;
  return t;
}

/// connect_atom through control_plane_handle, as node_client and cluster_membership do.
caf::expected<echo_actor> connect(caf::actor_system& sys, uint16_t port,
                                  std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  caf::expected<echo_actor> out{caf::error{}};
  self->request(control_plane_handle(sys), timeout, caf::connect_atom::value,
                std::string("127.0.0.1"), port)
      .receive(
          [&](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
            if (ptr)
              out = caf::actor_cast<echo_actor>(ptr);
            else
              out = caf::make_error(caf::sec::no_actor_published_at_port);
          },
          [&](const caf::error& e) { out = e; });
  return out;
}

/// The echo's reply to one heartbeat, or the error.
caf::expected<node_heartbeat> ask(caf::actor_system& sys, const echo_actor& echo,
                                  const std::string& who) {
  caf::scoped_actor self{sys};
  caf::expected<node_heartbeat> out{caf::error{}};
  self->request(echo, 10s, heartbeat_atom::value, node_heartbeat{who, 1, 77})
      .receive([&](const node_heartbeat& hb) { out = hb; }, [&](const caf::error& e) { out = e; });
  return out;
}

class control_plane_tls : public ::testing::Test {
 protected:
  void SetUp() override {
    ca_ = certs_.make_ca("cluster-ca");
    n0_ = certs_.make_node(ca_, "n0");
    n1_ = certs_.make_node(ca_, "n1");
    other_ca_ = certs_.make_ca("other-ca");
    stranger_ = certs_.make_node(other_ca_, "stranger");
  }

  /// A TLS system with n0's certificate publishing an echo on 127.0.0.1.
  void start_server() {
    server_ = std::make_unique<test_system>(tls_of(n0_, ca_));
    echo_ = server_->sys.spawn(echo_impl);
    auto port = publish_control(server_->sys, echo_, 0, "127.0.0.1", /*reuse_addr=*/true);
    ASSERT_TRUE(port) << server_->sys.render(port.error());
    port_ = *port;
  }

  void TearDown() override {
    if (echo_) caf::anon_send_exit(echo_, caf::exit_reason::user_shutdown);
  }

  /// A good client gets an answer: the endpoint still serves.
  void expect_good_client_served() {
    test_system client{tls_of(n1_, ca_)};
    auto remote = connect(client.sys, port_, 10s);
    ASSERT_TRUE(remote) << client.sys.render(remote.error());
    auto reply = ask(client.sys, *remote, "n1");
    ASSERT_TRUE(reply) << client.sys.render(reply.error());
    EXPECT_EQ(reply->node, "echo:n1");
  }

  test::tls_test_certs certs_;
  test::tls_test_certs::identity ca_, n0_, n1_, other_ca_, stranger_;
  std::unique_ptr<test_system> server_;
  echo_actor echo_;
  uint16_t port_ = 0;
};

TEST_F(control_plane_tls, typed_request_crosses_between_two_tls_systems) {
  start_server();
  ASSERT_TRUE(control_plane_uses_tls(server_->sys));
  test_system client{tls_of(n1_, ca_)};
  ASSERT_TRUE(control_plane_uses_tls(client.sys));
  auto remote = connect(client.sys, port_, 10s);
  ASSERT_TRUE(remote) << client.sys.render(remote.error());
  auto reply = ask(client.sys, *remote, "n1");
  ASSERT_TRUE(reply) << client.sys.render(reply.error());
  EXPECT_EQ(*reply, (node_heartbeat{"echo:n1", 2, 77}));
}

TEST_F(control_plane_tls, encrypted_key_opens_with_its_passphrase) {
  test::tls_node_options o;
  o.passphrase = "open sesame";
  auto enc = certs_.make_node(ca_, "enc", o);
  auto tls = tls_of(enc, ca_);
  tls.passphrase = "open sesame";
  test_system server{tls};
  auto echo = server.sys.spawn(echo_impl);
  auto port = publish_control(server.sys, echo, 0, "127.0.0.1");
  ASSERT_TRUE(port) << server.sys.render(port.error());
  test_system client{tls};  // the same identity on both sides: host names are not checked
  auto remote = connect(client.sys, *port, 10s);
  ASSERT_TRUE(remote) << client.sys.render(remote.error());
  auto reply = ask(client.sys, *remote, "enc");
  ASSERT_TRUE(reply) << client.sys.render(reply.error());
  EXPECT_EQ(reply->node, "echo:enc");
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
}

TEST_F(control_plane_tls, plain_client_cannot_talk_to_a_tls_endpoint) {
  start_server();
  test_system plain{std::nullopt};
  ASSERT_FALSE(control_plane_uses_tls(plain.sys));
  // CAF 0.17.6 reports disconnect_during_handshake at once; the timeout only bounds the test.
  auto remote = connect(plain.sys, port_, 3s);
  EXPECT_FALSE(remote) << "a plain client connected to a TLS endpoint";
  expect_good_client_served();
}

TEST_F(control_plane_tls, client_with_a_certificate_from_another_ca_is_refused) {
  start_server();
  test_system stranger{tls_of(stranger_, other_ca_)};
  auto remote = connect(stranger.sys, port_, 3s);
  EXPECT_FALSE(remote) << "a certificate from another CA was accepted";
  // Trusting the cluster CA does not help while presenting a certificate it did not sign.
  test_system half{tls_of(stranger_, ca_)};
  auto remote2 = connect(half.sys, port_, 3s);
  EXPECT_FALSE(remote2) << "a client certificate from another CA was accepted";
  expect_good_client_served();
}

TEST_F(control_plane_tls, tls_client_cannot_talk_to_a_plain_endpoint) {
  test_system plain{std::nullopt};
  auto echo = plain.sys.spawn(echo_impl);
  auto port = publish_control(plain.sys, echo, 0, "127.0.0.1");
  ASSERT_TRUE(port) << plain.sys.render(port.error());
  test_system client{tls_of(n1_, ca_)};
  auto remote = connect(client.sys, *port, 3s);
  EXPECT_FALSE(remote) << "a TLS client connected to a plain endpoint";
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
}

TEST_F(control_plane_tls, unpublish_closes_the_endpoint) {
  start_server();
  auto err = unpublish_control(server_->sys, echo_, port_);
  ASSERT_FALSE(err) << server_->sys.render(err);
  test_system client{tls_of(n1_, ca_)};
  auto remote = connect(client.sys, port_, 3s);
  EXPECT_FALSE(remote) << "still published after unpublish_control";
}

TEST(control_plane_plain, publish_and_connect_without_tls) {
  test_system server{std::nullopt};
  auto echo = server.sys.spawn(echo_impl);
  auto port = publish_control(server.sys, echo, 0, "127.0.0.1");
  ASSERT_TRUE(port) << server.sys.render(port.error());
  test_system client{std::nullopt};
  auto remote = connect(client.sys, *port, 10s);
  ASSERT_TRUE(remote) << client.sys.render(remote.error());
  auto reply = ask(client.sys, *remote, "p");
  ASSERT_TRUE(reply) << client.sys.render(reply.error());
  EXPECT_EQ(reply->node, "echo:p");
  EXPECT_FALSE(unpublish_control(server.sys, echo, *port));
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace moe::runtime
