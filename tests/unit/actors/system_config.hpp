// The actor systems the actor tests run in, with every actor message type registered: local (no
// middleman: one process) or networked (CAF's middleman, as node processes and coordinators
// run). Two scheduler workers unless a test asks for another pool (one, to hold it busy).
#pragma once

#include <cstddef>

#include "actors/actor_types.hpp"
#include "runtime/actor_system.hpp"

namespace moe::actors::testing {

inline runtime::actor_system_config system_config(bool networked, size_t workers) {
  runtime::actor_system_config::options o;
  o.load_middleman = networked;
  o.num_worker_threads = workers;
  runtime::actor_system_config cfg{o};
  add_actor_message_types(cfg);
  return cfg;
}

inline runtime::actor_system_config local_system_config(size_t workers = 2) {
  return system_config(false, workers);
}

inline runtime::actor_system_config networked_system_config(size_t workers = 2) {
  return system_config(true, workers);
}

}  // namespace moe::actors::testing
