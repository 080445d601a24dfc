// Training jobs: what `moe train --config` and the job API's training calls run. A job cuts its
// tokenised corpus into windows of sequence_length tokens, visits them in a seeded shuffled
// order (reshuffled every epoch), and runs `steps` steps of batch_sequences windows through the
// trainer (actors/trainer.hpp) with a warmup-cosine learning rate. Its subscriber gets a
// training_event after every step and a last one when it ends (finished, cancelled or failed).
// A checkpoint asked for while a job runs is written between two steps. With snapshot_every, a
// job survives node failures: when the trainer rolls back to its snapshot
// (trainer_errc::rolled_back), the job goes back to the step the snapshot was taken at and runs
// the same batches again, so its losses are those of a run without the failure; its subscriber
// sees the step count go back (training_event::rollbacks counts how often).
//
// One job trains at a time; later ones wait in a bounded queue, in submission order.
// Thread safety: an actor; all state is confined to it.
#pragma once

#include <caf/fwd.hpp>
#include <caf/typed_actor.hpp>

#include <memory>

#include "actors/controller.hpp"
#include "actors/messages.hpp"
#include "actors/trainer.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

using train_submit_atom = caf::atom_constant<caf::atom("train_sub")>;
using train_event_atom = caf::atom_constant<caf::atom("train_evt")>;
using train_checkpoint_atom = caf::atom_constant<caf::atom("train_ckpt")>;

/// submit: answers the job id, or controller_errc::invalid_request (the text says what is wrong)
/// / overloaded (the queue is full). The subscriber (may be invalid) receives
/// (train_event_atom, training_event) messages, in order, none lost.
/// cancel: whether the job was still queued or running (it stops after its running step).
/// status: the job's latest event. checkpoint: writes a training checkpoint of the model as it is
/// after the running step (or now, between jobs) to the directory, and answers it.
using training_jobs_actor =
    caf::typed_actor<caf::replies_to<train_submit_atom, training_job, caf::actor>::with<uint64_t>,
                     caf::replies_to<cancel_atom, uint64_t>::with<bool>,
                     caf::replies_to<status_atom, uint64_t>::with<training_event>,
                     caf::replies_to<train_checkpoint_atom, std::string>::with<std::string>>;

struct training_jobs_options {
  trainer_actor trainer;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;  ///< sequence_length may not exceed it
  int64_t max_queue = 16;
  /// The trainer keeps a snapshot (trainer_actor's snapshot) before a job's first step and every
  /// this many steps: a node failure rolls the job back to it, and its later steps run again.
  /// 0: no snapshot, and a node failure fails the job.
  int64_t snapshot_every = 0;
};

[[nodiscard]] training_jobs_actor spawn_training_jobs(caf::actor_system& sys, training_jobs_options options);

/// The batch of step `step` (from 0) of `job`: batch_sequences windows of the corpus, packed.
/// Requires a job that check_training_job accepted.
[[nodiscard]] train_batch batch_of(const training_job& job, int64_t step);

/// Why `job` cannot run on a model of this vocabulary and context (empty: it can).
[[nodiscard]] std::string check_training_job(const training_job& job, int64_t vocab_size,
                                             int64_t max_position_embeddings);

}  // namespace moe::actors
