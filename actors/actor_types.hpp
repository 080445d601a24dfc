// Registers the actors' message types with an actor-system configuration.
#pragma once

#include <caf/actor_system_config.hpp>

namespace moe::actors {

void add_actor_message_types(caf::actor_system_config& cfg);

}  // namespace moe::actors
