#include "runtime/actor_system.hpp"

#include <caf/io/middleman.hpp>

#include "runtime/caf_types.hpp"

namespace moe::runtime {

actor_system_config::actor_system_config() : actor_system_config(options{}) {}

actor_system_config::actor_system_config(const options& opts) {
  add_message_types<caf::id_block::moe>();
  if (opts.load_middleman) load<caf::io::middleman>();
  if (opts.num_worker_threads > 0) set("scheduler.max-threads", opts.num_worker_threads);
  set("scheduler.policy", caf::atom_from_string(opts.scheduler_policy));
  // No console logger and no caf-application.ini lookup surprises from CAF itself: our CLI
  // owns the command line, so CAF must not try to parse it.
  set("logger.console", caf::atom("none"));
}

}  // namespace moe::runtime
