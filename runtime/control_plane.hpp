// The control plane's network entry points. Every connection to another process's control
// endpoint and every published control endpoint goes through here, so that one switch decides
// for the whole process whether CAF's BASP runs over plain TCP or over TLS:
// actor_system_config::options::tls (set from cluster.tls by the CLI) loads caf::openssl's
// manager, and then these helpers use its middleman actor instead of the plain middleman's.
//
// What TLS gives (CAF 0.17.6, libcaf_openssl): with certificates configured, every connection is
// TLS with SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT on both sides: each side presents
// its certificate and refuses a peer whose certificate does not chain to the CA file. CAF does
// not check host names (no SSL_set1_host): any certificate the CA signed is accepted from any
// address, so the CA must sign certificates for this cluster's nodes only. The cluster secret
// (node_credentials) is still checked by every gatekeeper on top of this.
//
// A plain system and a TLS system do not talk: a plain peer's connect to a TLS endpoint fails
// with sec::disconnect_during_handshake (the TLS side sees BASP bytes and drops the connection),
// and so does a TLS peer's connect with a certificate from another CA; a TLS connect to a plain
// endpoint fails with sec::cannot_connect_to_node. CAF 0.17.6 reports these at once
// (tests/unit/runtime/control_plane_test.cpp); connect with a request timeout all the same.
//
// CAF reads the certificate, key and CA files again for every connection (one SSL_CTX per
// session) and throws from its I/O thread when they do not load, which terminates the process.
// load_cluster_config checks them at start (check_tls_files); replace them on disk only
// atomically (write, then rename; Kubernetes updates Secret volumes that way). New files take
// effect for new connections without a restart.
//
// Both middleman actors share one BASP broker, so a TLS system keeps `sys.middleman()` working
// for its existing connections; but `sys.middleman().publish` or `.remote_actor` on a TLS system
// opens a plain TCP endpoint or connection. Use these helpers for every control endpoint.
//
// Thread safety: plain functions; each may be called from any thread or actor of `sys`.
#pragma once

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/middleman_actor.hpp>
#include <caf/openssl/publish.hpp>

#include <chrono>
#include <cstdint>
#include <string>

namespace moe::runtime {

/// True when `sys` was configured with TLS (actor_system_config::options::tls).
[[nodiscard]] bool control_plane_uses_tls(caf::actor_system& sys);

/// The middleman actor to send (connect_atom, host, port) and friends to: caf::openssl's when
/// TLS is on, else the plain middleman's. Needs the middleman loaded.
[[nodiscard]] caf::io::middleman_actor control_plane_handle(caf::actor_system& sys);

/// sys.render(e) for an error of a connect through control_plane_handle, with a hint where
/// CAF's error hides the usual cause: a TLS handshake refused by either side (TLS on one side
/// only, or a certificate the other side's CA did not sign) reaches the caller as
/// sec::disconnect_during_handshake, and a TLS connect to a plain endpoint as
/// sec::cannot_connect_to_node.
[[nodiscard]] std::string render_connect_error(caf::actor_system& sys, const caf::error& e);

/// Publishes `whom` (any actor handle of `sys`) on `host:port` (empty host: every interface;
/// port 0: an ephemeral one) over TLS or plain TCP as control_plane_handle would connect, and
/// returns the bound port. Blocks until the middleman has bound the socket.
template <class Handle>
[[nodiscard]] caf::expected<uint16_t> publish_control(caf::actor_system& sys, const Handle& whom,
                                                      uint16_t port, const std::string& host = {},
                                                      bool reuse_addr = false) {
  if (!whom) return caf::sec::cannot_publish_invalid_actor;
  const char* in = host.empty() ? nullptr : host.c_str();
  if (control_plane_uses_tls(sys)) {
    return caf::openssl::publish(sys, caf::actor_cast<caf::strong_actor_ptr>(whom),
                                 sys.message_types(whom), port, in, reuse_addr);
  }
  return sys.middleman().publish(whom, port, in, reuse_addr);
}

/// Closes `port` (0: every port) where `whom` is published. caf::openssl::unpublish does not
/// compile against CAF 0.17.6 (its header names 0.18's unpublish_atom_v), so this asks the
/// middleman actor itself, waiting at most `timeout`.
[[nodiscard]] caf::error unpublish_control(
    caf::actor_system& sys, const caf::actor_addr& whom, uint16_t port,
    std::chrono::milliseconds timeout = std::chrono::seconds(5));

template <class Handle>
[[nodiscard]] caf::error unpublish_control(
    caf::actor_system& sys, const Handle& whom, uint16_t port,
    std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  return unpublish_control(sys, whom.address(), port, timeout);
}

}  // namespace moe::runtime
