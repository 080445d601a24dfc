#include "runtime/control_plane.hpp"

#include <caf/atom.hpp>
#include <caf/function_view.hpp>
#include <caf/openssl/manager.hpp>

namespace moe::runtime {

bool control_plane_uses_tls(caf::actor_system& sys) {
  return sys.has_openssl_manager();
}

caf::io::middleman_actor control_plane_handle(caf::actor_system& sys) {
  if (sys.has_openssl_manager()) return sys.openssl_manager().actor_handle();
  return sys.middleman().actor_handle();
}

std::string render_connect_error(caf::actor_system& sys, const caf::error& e) {
  std::string text = sys.render(e);
  if (e == caf::sec::disconnect_during_handshake ||
      (control_plane_uses_tls(sys) && e == caf::sec::cannot_connect_to_node)) {
    text += control_plane_uses_tls(sys)
                ? " (this process uses TLS: is the peer configured with cluster.tls and a "
                  "certificate from the same CA?)"
                : " (this process does not use TLS: does the peer's config have cluster.tls?)";
  }
  return text;
}

caf::error unpublish_control(caf::actor_system& sys, const caf::actor_addr& whom, uint16_t port,
                             std::chrono::milliseconds timeout) {
  if (!whom) return caf::sec::invalid_argument;
  auto f = caf::make_function_view(control_plane_handle(sys), caf::duration{timeout});
  auto res = f(caf::unpublish_atom::value, whom, port);
  return res ? caf::error{} : std::move(res.error());
}

}  // namespace moe::runtime
