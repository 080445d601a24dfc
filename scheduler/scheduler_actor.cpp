#include "scheduler/scheduler_actor.hpp"

#include <caf/all.hpp>

namespace moe::scheduler {

namespace {

struct scheduler_state {
  runtime::cluster_config config;
  model::model_config model;
  placement current;
  static inline const char* name = "scheduler";
};

}  // namespace

caf::expected<scheduler_actor> spawn_scheduler(caf::actor_system& sys,
                                               const runtime::cluster_config& config,
                                               const model::model_config& model) {
  auto planned = plan_placement(config, model);
  if (!planned) return planned.error();
  auto impl = [](scheduler_actor::stateful_pointer<scheduler_state> self,
                 runtime::cluster_config cfg, model::model_config m,
                 placement p) -> scheduler_actor::behavior_type {
    self->state.config = std::move(cfg);
    self->state.model = std::move(m);
    self->state.current = std::move(p);
    return {[self](placement_atom) { return self->state.current; }};
  };
  return sys.spawn(impl, config, model, std::move(*planned));
}

void add_scheduler_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::moe_scheduler>();
}

}  // namespace moe::scheduler
