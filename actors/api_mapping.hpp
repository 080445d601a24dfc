// Between the actors' messages (controller, rebalancer, training jobs) and the job API's plain
// values (protocol/api_types.hpp), for the API server (actors/api_server.cpp): conversions both
// ways, and a failed actor request as the API error a client sees (api category, the code that
// keeps its retry semantics, the actor's text after it).
// Thread safety: pure functions.
#pragma once

#include <chrono>
#include <string>

#include "actors/controller.hpp"
#include "actors/rebalance_messages.hpp"
#include "actors/training_messages.hpp"
#include "base/error.hpp"
#include "protocol/api_types.hpp"

namespace moe::model {
class tokenizer;
}

namespace moe::actors {

[[nodiscard]] protocol::api_job_state to_api(job_state s);
[[nodiscard]] protocol::api_job_event to_api(job_event e);
[[nodiscard]] protocol::api_job_status to_api(job_status s);
[[nodiscard]] protocol::api_rebalance_report to_api(rebalance_report r);
/// A state byte that names no job_state reads as failed.
[[nodiscard]] protocol::api_training_event to_api(training_event e);

[[nodiscard]] generation_job to_controller(protocol::api_generation_spec s);
/// `spec` as the training jobs actor takes it, a text corpus encoded by `tokenizer`.
[[nodiscard]] training_job to_training_job(protocol::api_training_spec spec, const model::tokenizer& tokenizer);

/// A failed request to the controller: its own codes keep their meaning (overloaded stays
/// retryable), the API's pass through, anything else is internal (a timeout names `timeout`).
[[nodiscard]] caf::error controller_failure(const caf::error& err, std::chrono::milliseconds timeout);

/// A failed rebalance, the rebalancer's text kept. busy is overloaded (retry later); no_load and
/// a failed phase are unavailable (the placement did not change; retry after traffic / once the
/// cause is fixed); a layout that cannot be rebalanced is invalid_request.
[[nodiscard]] caf::error rebalance_failure(const caf::error& err, std::chrono::milliseconds timeout);

/// A failed request to the training jobs actor: its controller_errc codes as the controller's;
/// a checkpoint the trainer could not write is internal with the trainer's (or the file
/// system's) text, except trainer_errc::busy, which is overloaded.
[[nodiscard]] caf::error training_failure(const caf::error& err, std::chrono::milliseconds timeout);

}  // namespace moe::actors
