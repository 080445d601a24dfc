// The scheduler as an actor: it holds the cluster view (the config and the model) and the
// current placement, computed by the pure plan_placement(), and answers who runs what.
// Later work adds re-planning (load-driven replication, failure re-placement) behind the same
// interface; every answer carries the placement's version.
#pragma once

#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/replies_to.hpp>
#include <caf/type_id.hpp>
#include <caf/typed_actor.hpp>

#include "base/error.hpp"
#include "model/config.hpp"
#include "runtime/cluster_config.hpp"
#include "scheduler/placement.hpp"

namespace moe::scheduler {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, device_ref& x) {
  return f(caf::meta::type_name("device_ref"), x.node, x.gpu, x.index);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, attention_assignment& x) {
  return f(caf::meta::type_name("attention_assignment"), x.shard, x.device, x.memory_bytes);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_group_assignment& x) {
  return f(caf::meta::type_name("expert_group_assignment"), x.group, x.device, x.experts,
           x.holds_shared_experts, x.memory_bytes);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, device_usage& x) {
  return f(caf::meta::type_name("device_usage"), x.device, x.capacity_bytes, x.used_bytes);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, placement& x) {
  return f(caf::meta::type_name("placement"), x.attention, x.expert_groups, x.devices,
           x.num_logical_experts, x.version);
}

using placement_atom = caf::atom_constant<caf::atom("placement")>;

/// Answers the current placement.
using scheduler_actor = caf::typed_actor<caf::replies_to<placement_atom>::with<placement>>;

/// Plans the initial placement (errors: infeasible, bad model) and spawns the actor holding it.
[[nodiscard]] caf::expected<scheduler_actor> spawn_scheduler(caf::actor_system& sys,
                                                             const runtime::cluster_config& config,
                                                             const model::model_config& model);

void add_scheduler_message_types(caf::actor_system_config& cfg);

}  // namespace moe::scheduler

CAF_BEGIN_TYPE_ID_BLOCK(moe_scheduler, caf::first_custom_type_id + 200)
CAF_ADD_TYPE_ID(moe_scheduler, (moe::scheduler::placement))
CAF_END_TYPE_ID_BLOCK(moe_scheduler)
