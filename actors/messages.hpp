// The messages the actors exchange and the typed interfaces they expose.
//
// Bulk data never rides inside a control message: a tensor_ref carries a shape and a transfer
// id (what the data plane uses between processes) plus, within one process, a shared pointer
// to the immutable buffer itself, which is handed over without a copy and never serialised.
// Every type here is in the moe_actors type-ID block, so it can cross a process boundary.
#pragma once

#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>
#include <caf/typed_actor.hpp>
#include <caf/replies_to.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actors/rebalance_messages.hpp"
#include "actors/tensor_ref.hpp"
#include "actors/training_messages.hpp"

namespace moe::actors {

/// Rows for an expert group: row r is the input of one (token, chosen expert) pair.
struct expert_batch {
  int64_t layer = 0;
  uint64_t step = 0;
  uint32_t placement_version = 0;
  tensor_ref rows;               ///< (n, hidden)
  std::vector<int32_t> experts;  ///< (n) logical expert per row; shared_expert_row for shared
  std::vector<float> weights;    ///< (n) routing weight per row (1 for shared rows)
};

/// Marks a row for the shared experts in expert_batch::experts.
inline constexpr int32_t shared_expert_row = -1;

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_batch& x) {
  return f(caf::meta::type_name("expert_batch"), x.layer, x.step, x.placement_version, x.rows,
           x.experts, x.weights);
}

/// weights[r] * expert(rows[r]) for every row, in the batch's row order.
struct expert_result {
  int64_t layer = 0;
  uint64_t step = 0;
  tensor_ref rows;  ///< (n, hidden)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_result& x) {
  return f(caf::meta::type_name("expert_result"), x.layer, x.step, x.rows);
}

/// Post-attention-normed states of one MoE layer, for the router.
struct route_request {
  int64_t layer = 0;
  uint64_t step = 0;
  tensor_ref x;  ///< (T, hidden)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, route_request& x) {
  return f(caf::meta::type_name("route_request"), x.layer, x.step, x.x);
}

/// The layer's MoE output for the attention shard to add to its residual stream.
struct route_result {
  int64_t layer = 0;
  uint64_t step = 0;
  tensor_ref y;                         ///< (T, hidden)
  std::vector<int32_t> expert_choices;  ///< (T, top_k), for load statistics and tests
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, route_result& x) {
  return f(caf::meta::type_name("route_result"), x.layer, x.step, x.y, x.expert_choices);
}

/// How one sequence picks its next token.
struct sampling_spec {
  float temperature = 0.0f;  ///< 0: greedy
  uint32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling_spec& x) {
  return f(caf::meta::type_name("sampling_spec"), x.temperature, x.top_k, x.top_p, x.seed);
}

/// One sequence's share of a step: a whole prompt (prefill) or its newest token (decode).
struct step_entry {
  uint64_t sequence = 0;
  std::vector<int32_t> tokens;  ///< prefill: the prompt; decode: exactly one token
  sampling_spec sampling;
  uint64_t sample_offset = 0;   ///< tokens this sequence has sampled so far (the RNG offset)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_entry& x) {
  return f(caf::meta::type_name("step_entry"), x.sequence, x.tokens, x.sampling, x.sample_offset);
}

struct step_request {
  uint64_t step = 0;
  bool prefill = false;
  std::vector<step_entry> entries;
  bool want_logits = false;  ///< return each entry's last-position logits (tests, dumps)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_request& x) {
  return f(caf::meta::type_name("step_request"), x.step, x.prefill, x.entries, x.want_logits);
}

struct step_result {
  uint64_t step = 0;
  std::vector<uint64_t> sequences;
  std::vector<int32_t> tokens;  ///< the sampled next token of each sequence
  tensor_ref logits;            ///< (entries, vocab) when asked for
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_result& x) {
  return f(caf::meta::type_name("step_result"), x.step, x.sequences, x.tokens, x.logits);
}

// --- jobs (controller) ---------------------------------------------------------------------

struct generation_job {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  sampling_spec sampling;
  std::vector<int32_t> stop_token_ids;
  /// Milliseconds from submission by which the request must have finished, or it fails with
  /// "deadline exceeded"; 0: the controller's default (controller_options::request_timeout).
  uint64_t deadline_ms = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_job& x) {
  return f(caf::meta::type_name("generation_job"), x.prompt, x.max_new_tokens, x.sampling,
           x.stop_token_ids, x.deadline_ms);
}

enum class job_state : uint8_t { queued, running, finished, cancelled, failed };
[[nodiscard]] const char* to_string(job_state s) noexcept;

/// Sent to a job's subscriber as tokens arrive, and once at the end (finished = true).
struct job_event {
  uint64_t job = 0;
  std::vector<int32_t> tokens;  ///< new tokens since the previous event
  bool finished = false;
  job_state state = job_state::running;
  std::string finish_reason;    ///< "length", "stop", "cancelled" or "error"
  std::string error;            ///< set when state == failed
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, job_event& x) {
  return f(caf::meta::type_name("job_event"), x.job, x.tokens, x.finished, x.state,
           x.finish_reason, x.error);
}

struct job_status {
  uint64_t job = 0;
  job_state state = job_state::queued;
  std::vector<int32_t> tokens;  ///< generated so far
  std::string finish_reason;
  std::string error;
  int shard = -1;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, job_status& x) {
  return f(caf::meta::type_name("job_status"), x.job, x.state, x.tokens, x.finish_reason,
           x.error, x.shard);
}

/// A router's expert load over its recent steps: a Cap'n Proto LoadReport
/// (protocol/load_report.capnp, protocol/load_report_codec.hpp), as the scheduler receives it.
struct load_report_bytes {
  std::vector<uint8_t> capnp;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, load_report_bytes& x) {
  return f(caf::meta::type_name("load_report_bytes"), x.capnp);
}

using expert_forward_atom = caf::atom_constant<caf::atom("expert_fwd")>;
using load_report_atom = caf::atom_constant<caf::atom("load_rep")>;
using route_atom = caf::atom_constant<caf::atom("route")>;
using step_atom = caf::atom_constant<caf::atom("step")>;
using release_atom = caf::atom_constant<caf::atom("release")>;

/// What a router may ask of an expert group, and the rebalancer (actors/rebalance_messages.hpp):
/// prepare a placement version, commit one (dropping older ones) or abort a prepared one.
using expert_group_actor =
    caf::typed_actor<caf::replies_to<expert_forward_atom, expert_batch>::with<expert_result>,
                     caf::replies_to<prepare_layout_atom, group_layout>::with<prepare_result>,
                     caf::replies_to<commit_layout_atom, uint32_t>::with<uint64_t>,
                     caf::reacts_to<abort_layout_atom, uint32_t>,
                     caf::replies_to<train_forward_atom, train_expert_batch>::with<expert_result>,
                     caf::replies_to<train_backward_atom, train_expert_grad>::with<expert_result>,
                     caf::replies_to<train_grads_atom, uint64_t, std::vector<int64_t>>::with<gradient_report>,
                     caf::replies_to<train_apply_atom, train_update>::with<uint64_t>,
                     caf::replies_to<train_state_atom>::with<owner_state>,
                     caf::replies_to<train_state_atom, std::vector<int64_t>>::with<owner_state>,
                     caf::replies_to<train_restore_atom, owner_state, train_hyper>::with<int64_t>>;

/// What an attention shard asks of its (co-located) router; load_report: the expert load the
/// router counted over its recent steps (router_options::load_window_steps); switch_layout: use
/// this placement version from the next route request on (answers the version); groups_down:
/// these expert groups are gone (actors/rebalance_messages.hpp, failover).
using router_actor =
    caf::typed_actor<caf::replies_to<route_atom, route_request>::with<route_result>,
                     caf::replies_to<load_report_atom>::with<load_report_bytes>,
                     caf::replies_to<switch_layout_atom, router_layout>::with<uint32_t>,
                     caf::reacts_to<groups_down_atom, std::vector<int64_t>>,
                     caf::replies_to<train_forward_atom, train_route_request>::with<route_result>,
                     caf::replies_to<train_backward_atom, layer_gradient>::with<layer_gradient>,
                     caf::replies_to<train_grads_atom, uint64_t>::with<gradient_report>,
                     caf::replies_to<train_apply_atom, train_update>::with<uint64_t>,
                     caf::replies_to<train_state_atom>::with<owner_state>,
                     caf::replies_to<train_restore_atom, owner_state, train_hyper>::with<int64_t>>;

/// What the controller asks of an attention shard.
using attention_actor =
    caf::typed_actor<caf::replies_to<step_atom, step_request>::with<step_result>,
                     caf::reacts_to<release_atom, std::vector<uint64_t>>,
                     caf::replies_to<train_step_atom, train_request>::with<train_result>,
                     caf::replies_to<train_grads_atom, uint64_t>::with<gradient_report>,
                     caf::replies_to<train_apply_atom, train_update>::with<uint64_t>,
                     caf::replies_to<train_state_atom>::with<owner_state>,
                     caf::replies_to<train_restore_atom, owner_state, train_hyper>::with<int64_t>>;

}  // namespace moe::actors

CAF_BEGIN_TYPE_ID_BLOCK(moe_actors, caf::first_custom_type_id + 100)
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::tensor_ref))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::expert_batch))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::expert_result))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::route_request))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::route_result))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::sampling_spec))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::step_entry))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::step_request))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::step_result))
CAF_ADD_TYPE_ID(moe_actors, (std::vector<uint64_t>))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::generation_job))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::job_event))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::job_status))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::load_report_bytes))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::group_layout))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::router_layout))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::prepare_result))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::rebalance_report))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_request))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_result))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_route_request))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::layer_gradient))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_expert_batch))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_expert_grad))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::gradient_report))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_update))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_hyper))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_batch))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::train_step_report))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::owner_state))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::training_job))
CAF_ADD_TYPE_ID(moe_actors, (moe::actors::training_event))
// train_grads to an expert group carries its replicated (layer, expert) pairs.
CAF_ADD_TYPE_ID(moe_actors, (std::vector<int64_t>))
CAF_END_TYPE_ID_BLOCK(moe_actors)
