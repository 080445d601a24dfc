#include "actors/api_mapping.hpp"

#include <caf/sec.hpp>

#include <optional>
#include <variant>

#include "actors/rebalancer.hpp"
#include "actors/trainer.hpp"
#include "model/tokenizer.hpp"

namespace moe::actors {

using protocol::api_errc;

protocol::api_job_state to_api(job_state s) {
  switch (s) {
    case job_state::queued: return protocol::api_job_state::queued;
    case job_state::running: return protocol::api_job_state::running;
    case job_state::finished: return protocol::api_job_state::finished;
    case job_state::cancelled: return protocol::api_job_state::cancelled;
    case job_state::failed: return protocol::api_job_state::failed;
  }
  return protocol::api_job_state::failed;
}

protocol::api_job_event to_api(job_event e) {
  return {e.job, std::move(e.tokens), e.finished, to_api(e.state), std::move(e.finish_reason),
          std::move(e.error)};
}

protocol::api_job_status to_api(job_status s) {
  return {s.job, to_api(s.state), std::move(s.tokens), std::move(s.finish_reason),
          std::move(s.error), static_cast<int32_t>(s.shard)};
}

protocol::api_rebalance_report to_api(rebalance_report r) {
  protocol::api_rebalance_report out;
  out.changed = r.changed;
  out.version_before = r.version_before;
  out.version_after = r.version_after;
  out.balance_before = r.balance_before;
  out.balance_after = r.balance_after;
  out.layer_balance_before = std::move(r.layer_balance_before);
  out.layer_balance_after = std::move(r.layer_balance_after);
  out.tokens_counted = r.tokens_counted;
  out.replicas_moved = r.replicas_moved;
  out.bytes_moved = r.bytes_moved;
  out.duration_seconds = r.duration_seconds;
  out.trigger = std::move(r.trigger);
  return out;
}

protocol::api_training_event to_api(training_event e) {
  protocol::api_training_event out;
  out.job_id = e.job;
  out.step = e.step;
  out.steps = e.steps;
  out.loss = e.loss;
  out.learning_rate = e.lr;
  out.grad_norm = e.grad_norm;
  out.tokens_per_second = e.tokens_per_second;
  out.load_balance = std::move(e.load_balance);
  out.finished = e.finished;
  out.state = e.state <= static_cast<uint8_t>(job_state::failed) ? to_api(static_cast<job_state>(e.state))
                                                                  : protocol::api_job_state::failed;
  out.error = std::move(e.error);
  out.checkpoint = std::move(e.checkpoint);
  out.rollbacks = e.rollbacks;
  return out;
}

generation_job to_controller(protocol::api_generation_spec s) {
  generation_job j;
  j.prompt = std::move(s.prompt);
  j.max_new_tokens = s.max_new_tokens;
  j.sampling.temperature = s.temperature;
  j.sampling.top_k = s.top_k;
  j.sampling.top_p = s.top_p;
  j.sampling.seed = s.seed;
  j.stop_token_ids = std::move(s.stop_token_ids);
  j.deadline_ms = s.deadline_ms;
  return j;
}

training_job to_training_job(protocol::api_training_spec spec, const model::tokenizer& tokenizer) {
  training_job j;
  if (auto* tokens = std::get_if<std::vector<int32_t>>(&spec.corpus)) {
    j.tokens = std::move(*tokens);
  } else {
    j.tokens = tokenizer.encode(std::get<std::string>(spec.corpus));
  }
  j.sequence_length = spec.sequence_length;
  j.batch_sequences = spec.batch_sequences;
  j.steps = spec.steps;
  j.hyper.lr = spec.learning_rate;
  j.hyper.beta1 = spec.beta1;
  j.hyper.beta2 = spec.beta2;
  j.hyper.eps = spec.eps;
  j.hyper.weight_decay = spec.weight_decay;
  j.hyper.grad_clip = spec.grad_clip;
  j.hyper.balance_alpha = spec.balance_loss_weight;
  j.hyper.bias_update_speed = spec.bias_update_speed;
  j.warmup_steps = spec.warmup_steps;
  j.min_lr = spec.min_learning_rate;
  j.seed = spec.seed;
  return j;
}

namespace {

// A failure that `who`'s own codes do not explain: the API's codes pass through, a timeout and
// an actor that is gone are named, anything else is internal.
caf::error actor_failure(const caf::error& err, const std::string& who, std::chrono::milliseconds timeout) {
  if (err.category() == caf::atom("api")) return err;
  if (err == caf::sec::request_timeout) {
    return protocol::make_error(api_errc::internal, "the " + who + " did not answer within " +
                                                        std::to_string(timeout.count()) + " ms");
  }
  if (err == caf::sec::request_receiver_down) {
    return protocol::make_error(api_errc::internal, "the " + who + " is not running");
  }
  return protocol::make_error(api_errc::internal, who + ": " + caf::to_string(err));
}

std::optional<api_errc> controller_code(const caf::error& err) {
  if (err.category() != caf::atom("controller")) return std::nullopt;
  switch (static_cast<controller_errc>(err.code())) {
    case controller_errc::overloaded: return api_errc::overloaded;
    case controller_errc::invalid_request: return api_errc::invalid_request;
    case controller_errc::unknown_job: return api_errc::unknown_job;
    case controller_errc::unavailable: return api_errc::unavailable;
  }
  return std::nullopt;
}

}  // namespace

caf::error controller_failure(const caf::error& err, std::chrono::milliseconds timeout) {
  if (auto code = controller_code(err)) return protocol::make_error(*code, error_text(err));
  return actor_failure(err, "controller", timeout);
}

caf::error rebalance_failure(const caf::error& err, std::chrono::milliseconds timeout) {
  if (err.category() == caf::atom("rebalance")) {
    const std::string text = error_text(err);
    switch (static_cast<rebalance_errc>(err.code())) {
      case rebalance_errc::busy: return protocol::make_error(api_errc::overloaded, text);
      case rebalance_errc::no_load: return protocol::make_error(api_errc::unavailable, text);
      case rebalance_errc::unsupported: return protocol::make_error(api_errc::invalid_request, text);
      case rebalance_errc::failed: return protocol::make_error(api_errc::unavailable, text);
    }
  }
  if (err == caf::sec::request_timeout) {
    // The rebalance itself goes on: say so, or a client would retry into "busy".
    return protocol::make_error(api_errc::internal, "the rebalancer did not answer within " +
                                                        std::to_string(timeout.count()) +
                                                        " ms (the rebalance may still be running)");
  }
  return actor_failure(err, "rebalancer", timeout);
}

caf::error training_failure(const caf::error& err, std::chrono::milliseconds timeout) {
  if (auto code = controller_code(err)) return protocol::make_error(*code, error_text(err));
  if (err.category() == caf::atom("trainer") && err.code() == static_cast<uint8_t>(trainer_errc::busy))
    return protocol::make_error(api_errc::overloaded, "the trainer is busy: " + error_text(err));
  // The trainer's other failures and the file system's (model_errc) reach here from a
  // checkpoint: nothing the request could have avoided, maybe transient (a full disk).
  if (err.category() == caf::atom("trainer") || err.category() == caf::atom("model"))
    return protocol::make_error(api_errc::internal, "checkpoint: " + error_text(err));
  return actor_failure(err, "training jobs actor", timeout);
}

}  // namespace moe::actors
