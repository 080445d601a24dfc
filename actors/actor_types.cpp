#include "actors/actor_types.hpp"

#include "actors/cluster_messages.hpp"
#include "actors/messages.hpp"
#include "actors/node_agent.hpp"
#include "scheduler/scheduler_actor.hpp"

namespace moe::actors {

void add_actor_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::moe_actors>();
  cfg.add_message_types<caf::id_block::moe_node>();
  cfg.add_message_types<caf::id_block::moe_cluster>();
  scheduler::add_scheduler_message_types(cfg);
}

}  // namespace moe::actors
