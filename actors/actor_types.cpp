#include "actors/actor_types.hpp"

#include "actors/messages.hpp"

namespace moe::actors {

void add_actor_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::moe_actors>();
}

}  // namespace moe::actors
