#include "actors/node_client.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "runtime/control_plane.hpp"

namespace moe::actors {

namespace {

// CAF's own codes, mapped onto ours so callers can tell "not running" from "not answering".
caf::error classify(caf::actor_system& sys, const caf::error& e, const std::string& what) {
  if (e.category() == caf::atom("node")) return e;
  if (e == caf::sec::request_timeout) return make_error(node_errc::timeout, what + ": no answer in time");
  return make_error(node_errc::unreachable, what + ": " + runtime::render_connect_error(sys, e));
}

}  // namespace

caf::expected<node_gatekeeper_actor> connect_gatekeeper(caf::actor_system& sys, const std::string& host,
                                                        uint16_t port, std::chrono::milliseconds timeout) {
  const std::string where = host + ":" + std::to_string(port);
  caf::scoped_actor self{sys};
  caf::expected<node_gatekeeper_actor> out{caf::error{}};
  self->request(runtime::control_plane_handle(sys), timeout, caf::connect_atom::value, host, port)
      .receive(
          [&](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
            if (ptr) out = caf::actor_cast<node_gatekeeper_actor>(ptr);
            else out = make_error(node_errc::unreachable, "nothing published at " + where);
          },
          [&](const caf::error& e) { out = classify(sys, e, "cannot connect to " + where); });
  return out;
}

caf::expected<node_status> request_node_status(caf::actor_system& sys, const node_gatekeeper_actor& gatekeeper,
                                               const node_credentials& credentials,
                                               std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  caf::expected<node_status> out{caf::error{}};
  self->request(gatekeeper, timeout, node_status_atom::value, credentials)
      .receive([&](node_status& s) { out = std::move(s); },
               [&](const caf::error& e) { out = classify(sys, e, "status"); });
  return out;
}

caf::error request_node_shutdown(caf::actor_system& sys, const node_gatekeeper_actor& gatekeeper,
                                 const node_credentials& credentials, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  caf::error out;
  self->request(gatekeeper, timeout, shutdown_atom::value, credentials)
      .receive([&](caf::atom_value) {}, [&](const caf::error& e) { out = classify(sys, e, "shutdown"); });
  return out;
}

}  // namespace moe::actors
