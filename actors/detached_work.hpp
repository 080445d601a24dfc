// Slow blocking work (reading a checkpoint) off an actor's thread: a detached worker of its own
// runs it, and the actor carries on with its messages meanwhile (a node agent answers heartbeats,
// an expert group serves batches), then continues in its own context once the work is done.
//
// Ownership: the worker holds `work` until it has run; whatever `work` fills in (a shared slot)
// is read by `done` only, after the worker's reply, so the two threads never touch it at once.
#pragma once

#include <caf/all.hpp>

#include <functional>
#include <utility>

namespace moe::actors {

using detached_work_atom = caf::atom_constant<caf::atom("det_work")>;

/// Runs `work` on a new detached actor, then `done(caf::error{})` in `self`'s context; or
/// `done(error)` if the worker ended without running it.
template <class Self, class Done>
void run_detached(Self* self, std::function<void()> work, Done done) {
  auto worker = self->template spawn<caf::detached>(
      [](caf::blocking_actor* b, std::function<void()> w) {
        b->receive([&](detached_work_atom) {
          w();
          return true;
        });
      },
      std::move(work));
  self->request(worker, caf::infinite, detached_work_atom::value)
      .then([done](bool) mutable { done(caf::error{}); },
            [done](caf::error& e) mutable { done(std::move(e)); });
}

}  // namespace moe::actors
