#include "actors/cluster_messages.hpp"

#include <caf/all.hpp>

namespace moe::actors {

const char* to_string(node_errc e) noexcept {
  switch (e) {
    case node_errc::refused: return "refused";
    case node_errc::unreachable: return "unreachable";
    case node_errc::timeout: return "timeout";
    case node_errc::bad_request: return "bad_request";
  }
  return "unknown";
}

caf::error make_error(node_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("node"), caf::make_message(std::move(text))};
}

const char* to_string(member_state s) noexcept {
  switch (s) {
    case member_state::joining: return "joining";
    case member_state::up: return "up";
    case member_state::suspect: return "suspect";
    case member_state::down: return "down";
    case member_state::refused: return "refused";
  }
  return "unknown";
}

}  // namespace moe::actors
