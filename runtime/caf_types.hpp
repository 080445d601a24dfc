// The CAF message types of the whole project, registered in one type-ID block.
//
// Every type that travels in a CAF message is listed here, with an `inspect` overload, so it
// can cross a process boundary; a type missing from this block compiles but fails at run time.
// Later components append to this block (its IDs are contiguous from first_custom_type_id).
#pragma once

#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>

#include <cstdint>
#include <string>

namespace moe::runtime {

/// Liveness report a node agent sends its peers and the controller.
struct node_heartbeat {
  std::string node;
  uint64_t sequence = 0;
  uint64_t sent_unix_ms = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_heartbeat& x) {
  return f(caf::meta::type_name("node_heartbeat"), x.node, x.sequence, x.sent_unix_ms);
}

inline bool operator==(const node_heartbeat& a, const node_heartbeat& b) {
  return a.node == b.node && a.sequence == b.sequence && a.sent_unix_ms == b.sent_unix_ms;
}

using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>;

}  // namespace moe::runtime

CAF_BEGIN_TYPE_ID_BLOCK(moe, caf::first_custom_type_id)
CAF_ADD_TYPE_ID(moe, (moe::runtime::node_heartbeat))
CAF_END_TYPE_ID_BLOCK(moe)
