// The controller: requests and jobs. Continuous batching over the attention shards: new
// requests wait in a bounded queue, join as a prefill step (a stage of their own) within the
// per-step token budget, then their sequences join the shard's decode batch; finished,
// cancelled or failed sequences leave between steps and free their cache.
//
// Every request gets exactly what it gets alone (greedy): a sequence's tokens depend only on
// its prompt and sampling spec, never on its batch neighbours (see the exactness tests).
// Thread safety: an actor; all state is confined to it.
#pragma once

#include <caf/fwd.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/cluster_messages.hpp"
#include "actors/messages.hpp"
#include "base/error.hpp"

namespace moe::actors {

struct controller_limits {
  int64_t max_running_requests = 64;  ///< per shard, in the decode batch
  int64_t max_batch_tokens = 4096;    ///< prompt tokens per prefill step
  int64_t max_queue = 256;            ///< waiting requests; beyond: "overloaded"
  int64_t max_new_tokens_limit = 4096;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, controller_limits& x) {
  return f(caf::meta::type_name("controller_limits"), x.max_running_requests, x.max_batch_tokens,
           x.max_queue, x.max_new_tokens_limit);
}

using submit_atom = caf::atom_constant<caf::atom("submit")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using job_event_atom = caf::atom_constant<caf::atom("job_event")>;
/// The rebalancer that fails expert groups over when their node goes down (sent once, after
/// both are spawned: the rebalancer holds the controller to hold steps).
using use_failover_atom = caf::atom_constant<caf::atom("use_failov")>;
/// To itself: a request's deadline passed.
using deadline_atom = caf::atom_constant<caf::atom("deadline")>;
/// To itself: a shard's step failed for a vanished actor and no down event explained it in time.
using step_grace_atom = caf::atom_constant<caf::atom("step_grace")>;

/// Submit answers the job id, or controller_errc::overloaded / invalid_request. The subscriber
/// (may be invalid) receives (job_event_atom, job_event) messages; none are lost or reordered.
/// Cancel answers whether the job was still active.
/// hold_steps: no new step starts until resume_steps with the hold's id (or until
/// controller_options::max_step_hold passed); answered with that id once every step in flight
/// has returned, so the caller can change the cluster between two steps (the rebalancer
/// switches the routers' placement there). One hold at a time: a second waits for the first.
using controller_actor = caf::typed_actor<
    caf::replies_to<submit_atom, generation_job, caf::actor>::with<uint64_t>,
    caf::replies_to<status_atom, uint64_t>::with<job_status>,
    caf::replies_to<cancel_atom, uint64_t>::with<bool>,
    caf::replies_to<hold_steps_atom>::with<uint64_t>,
    caf::reacts_to<resume_steps_atom, uint64_t>,
    caf::reacts_to<member_event>,
    caf::reacts_to<use_failover_atom, rebalancer_actor>,
    caf::reacts_to<deadline_atom, uint64_t>,
    caf::reacts_to<step_grace_atom, uint64_t, uint64_t>>;

enum class controller_errc : uint8_t {
  overloaded = 1,   ///< Transient: the queue is full; retry later.
  invalid_request,  ///< Permanent: the request itself is malformed (the text says how).
  unknown_job,      ///< Permanent: no job with that id.
  unavailable,      ///< Until the cluster is restored: a node the work needs is down.
};

[[nodiscard]] caf::error make_error(controller_errc code, std::string text);

}  // namespace moe::actors

MOE_ERROR_ENUM(moe::actors::controller_errc, "controller")

namespace prometheus {
class Registry;
}

namespace moe::actors {

struct controller_options {
  std::vector<attention_actor> shards;
  controller_limits limits;
  int64_t vocab_size = 0;  ///< token ids are checked here, so one bad request fails alone
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
  /// Per node name: the attention shards (indices into `shards`) and the expert groups (group
  /// indices) it runs. A member_event saying the node is down:
  ///  - its shards stop; their requests are replayed (prompt plus the tokens generated so far,
  ///    as a prefill) on the surviving shards, so greedy outputs do not change;
  ///  - its expert groups fail over (use_failover_atom's rebalancer): no new step starts until
  ///    the routers serve a placement without them; steps that waited on them fail and are
  ///    replayed. Without a rebalancer, every request fails with the reason instead.
  /// With no shard left, requests fail and new submissions get controller_errc::unavailable.
  std::map<std::string, std::vector<size_t>> shards_on_node;
  std::map<std::string, std::vector<int64_t>> groups_on_node;
  /// Replays of one request (after failures) before it fails with the last failure's text.
  int max_replays = 3;
  /// Deadline of a request that names none (generation_job::deadline_ms == 0); zero: none. A
  /// request not finished by its deadline fails ("deadline exceeded") and frees what it held.
  std::chrono::milliseconds request_timeout{0};
  /// A step that fails because an actor or a data-plane peer it needed is gone
  /// (caf::sec::request_receiver_down, data_plane_errc::peer_lost, UCX transfer or connect
  /// failures) is usually the first sign of a node failure: the connection drops before the
  /// membership's down event arrives. Its requests wait this long for that event (then they are
  /// replayed like any other interrupted request; the shard takes no step meanwhile) before
  /// failing with the error; within this long *after* a node failure such an error is replayed
  /// at once. Zero: they fail at once. (A step in flight when a node went down is replayed
  /// whatever its error.)
  std::chrono::milliseconds failure_grace{3'000};
  /// A hold_steps that is not resumed within this time ends by itself (its holder failed).
  std::chrono::milliseconds max_step_hold{30'000};
};

[[nodiscard]] controller_actor spawn_controller(caf::actor_system& sys, controller_options options);

}  // namespace moe::actors
