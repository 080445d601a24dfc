#include "protocol/api_types.hpp"

#include <cmath>
#include <cstdio>

#include "protocol/api.capnp.h"

namespace moe::protocol {

uint16_t api_version() noexcept { return capnp::API_VERSION; }

const char* to_string(api_errc code) noexcept {
  switch (code) {
    case api_errc::unauthenticated: return "unauthenticated";
    case api_errc::unsupported_version: return "unsupported_version";
    case api_errc::invalid_request: return "invalid_request";
    case api_errc::overloaded: return "overloaded";
    case api_errc::unknown_job: return "unknown_job";
    case api_errc::unavailable: return "unavailable";
    case api_errc::internal: return "internal";
  }
  return "internal";
}

std::optional<api_errc> parse_api_errc(std::string_view code) noexcept {
  for (auto c : {api_errc::unauthenticated, api_errc::unsupported_version,
                 api_errc::invalid_request, api_errc::overloaded, api_errc::unknown_job,
                 api_errc::unavailable, api_errc::internal}) {
    if (code == to_string(c)) return c;
  }
  return std::nullopt;
}

caf::error make_error(api_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("api"),
                    caf::make_message(std::move(text))};
}

const char* to_string(api_job_state s) noexcept {
  switch (s) {
    case api_job_state::queued: return "queued";
    case api_job_state::running: return "running";
    case api_job_state::finished: return "finished";
    case api_job_state::cancelled: return "cancelled";
    case api_job_state::failed: return "failed";
  }
  return "unknown";
}

namespace {

caf::error check_ids(const std::vector<int32_t>& ids, const char* field) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) {
      return make_error(api_errc::invalid_request, std::string(field) + "[" + std::to_string(i) +
                                                       "]: token id " + std::to_string(ids[i]) +
                                                       " is negative");
    }
  }
  return {};
}

}  // namespace

caf::error validate(const api_generation_spec& spec, const api_limits& limits) {
  if (spec.prompt.empty()) return make_error(api_errc::invalid_request, "prompt: is empty");
  if (spec.prompt.size() > limits.max_prompt_tokens) {
    return make_error(api_errc::invalid_request,
                      "prompt: " + std::to_string(spec.prompt.size()) + " tokens exceed the limit of " +
                          std::to_string(limits.max_prompt_tokens));
  }
  if (auto err = check_ids(spec.prompt, "prompt")) return err;
  if (spec.max_new_tokens < 0) {
    return make_error(api_errc::invalid_request,
                      "maxNewTokens: " + std::to_string(spec.max_new_tokens) + " is negative");
  }
  // Written as negations so that NaN fails each check.
  if (!(spec.temperature >= 0.0f) || !std::isfinite(spec.temperature)) {
    return make_error(api_errc::invalid_request,
                      "temperature: " + std::to_string(spec.temperature) +
                          " is not a finite number >= 0");
  }
  if (!(spec.top_p > 0.0f && spec.top_p <= 1.0f)) {
    return make_error(api_errc::invalid_request,
                      "topP: " + std::to_string(spec.top_p) + " is not in (0, 1]");
  }
  if (spec.stop_token_ids.size() > limits.max_stop_token_ids) {
    return make_error(api_errc::invalid_request,
                      "stopTokenIds: " + std::to_string(spec.stop_token_ids.size()) +
                          " ids exceed the limit of " + std::to_string(limits.max_stop_token_ids));
  }
  return check_ids(spec.stop_token_ids, "stopTokenIds");
}

namespace {

bool is_ratio(double x) { return std::isfinite(x) && x >= 0.0; }

std::string number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

caf::error check_ratios(const std::vector<double>& ratios, const char* field) {
  for (size_t i = 0; i < ratios.size(); ++i) {
    if (!is_ratio(ratios[i])) {
      return make_error(api_errc::invalid_request, std::string(field) + "[" + std::to_string(i) +
                                                       "]: " + number(ratios[i]) +
                                                       " is not a finite ratio >= 0");
    }
  }
  return {};
}

}  // namespace

caf::error validate(const api_rebalance_report& report) {
  if (!is_ratio(report.balance_before)) {
    return make_error(api_errc::invalid_request, "balanceBefore: " + number(report.balance_before) +
                                                     " is not a finite ratio >= 0");
  }
  if (!is_ratio(report.balance_after)) {
    return make_error(api_errc::invalid_request, "balanceAfter: " + number(report.balance_after) +
                                                     " is not a finite ratio >= 0");
  }
  if (report.layer_balance_after.size() != report.layer_balance_before.size()) {
    return make_error(api_errc::invalid_request,
                      "layerBalanceAfter: " + std::to_string(report.layer_balance_after.size()) +
                          " layers, layerBalanceBefore has " +
                          std::to_string(report.layer_balance_before.size()));
  }
  if (auto err = check_ratios(report.layer_balance_before, "layerBalanceBefore")) return err;
  if (auto err = check_ratios(report.layer_balance_after, "layerBalanceAfter")) return err;
  if (report.replicas_moved < 0) {
    return make_error(api_errc::invalid_request,
                      "replicasMoved: " + std::to_string(report.replicas_moved) + " is negative");
  }
  if (!is_ratio(report.duration_seconds)) {
    return make_error(api_errc::invalid_request, "durationSeconds: " +
                                                     number(report.duration_seconds) +
                                                     " is not a finite number >= 0");
  }
  return {};
}

namespace {

caf::error invalid(std::string text) { return make_error(api_errc::invalid_request, std::move(text)); }

caf::error check_at_least(int64_t value, int64_t min, const char* field) {
  if (value >= min) return {};
  return invalid(std::string(field) + ": " + std::to_string(value) + " is below " + std::to_string(min));
}

// The checks of doubles are written so that NaN fails each (every comparison with it is false).
caf::error check_non_negative(double value, const char* field) {
  if (std::isfinite(value) && value >= 0.0) return {};
  return invalid(std::string(field) + ": " + number(value) + " is not a finite number >= 0");
}

caf::error check_unit_interval(double value, const char* field) {
  if (value >= 0.0 && value < 1.0) return {};
  return invalid(std::string(field) + ": " + number(value) + " is not in [0, 1)");
}

}  // namespace

caf::error validate(const api_training_spec& spec, const api_limits& limits) {
  if (const auto* tokens = std::get_if<std::vector<int32_t>>(&spec.corpus)) {
    if (tokens->empty()) return invalid("corpus.tokens: is empty");
    if (tokens->size() > limits.max_corpus_tokens) {
      return invalid("corpus.tokens: " + std::to_string(tokens->size()) + " tokens exceed the limit of " +
                     std::to_string(limits.max_corpus_tokens));
    }
    if (auto err = check_ids(*tokens, "corpus.tokens")) return err;
  } else {
    const auto& text = std::get<std::string>(spec.corpus);
    if (text.empty()) return invalid("corpus.text: is empty");
    if (text.size() > limits.max_corpus_bytes) {
      return invalid("corpus.text: " + std::to_string(text.size()) + " bytes exceed the limit of " +
                     std::to_string(limits.max_corpus_bytes));
    }
  }
  if (auto err = check_at_least(spec.sequence_length, 2, "sequenceLength")) return err;
  if (auto err = check_at_least(spec.batch_sequences, 1, "batchSequences")) return err;
  if (auto err = check_at_least(spec.steps, 1, "steps")) return err;
  if (auto err = check_at_least(spec.warmup_steps, 0, "warmupSteps")) return err;
  // Both factors are at most the limit here, so the product cannot overflow.
  if (spec.sequence_length > limits.max_training_batch_tokens ||
      spec.batch_sequences > limits.max_training_batch_tokens ||
      spec.sequence_length * spec.batch_sequences > limits.max_training_batch_tokens) {
    return invalid("batchSequences: " + std::to_string(spec.batch_sequences) + " sequences of " +
                   std::to_string(spec.sequence_length) + " tokens exceed the limit of " +
                   std::to_string(limits.max_training_batch_tokens) + " tokens per step");
  }
  if (const auto* tokens = std::get_if<std::vector<int32_t>>(&spec.corpus);
      tokens && static_cast<int64_t>(tokens->size()) < spec.sequence_length) {
    return invalid("corpus.tokens: " + std::to_string(tokens->size()) +
                   " tokens are fewer than one sequence of sequenceLength " + std::to_string(spec.sequence_length));
  }
  if (!(std::isfinite(spec.learning_rate) && spec.learning_rate > 0.0)) {
    return invalid("learningRate: " + number(spec.learning_rate) + " is not a finite number > 0");
  }
  if (!(std::isfinite(spec.min_learning_rate) && spec.min_learning_rate >= 0.0 &&
        spec.min_learning_rate <= spec.learning_rate)) {
    return invalid("minLearningRate: " + number(spec.min_learning_rate) + " is not in [0, learningRate = " +
                   number(spec.learning_rate) + "]");
  }
  if (auto err = check_unit_interval(spec.beta1, "beta1")) return err;
  if (auto err = check_unit_interval(spec.beta2, "beta2")) return err;
  if (!(std::isfinite(spec.eps) && spec.eps > 0.0)) {
    return invalid("eps: " + number(spec.eps) + " is not a finite number > 0");
  }
  if (auto err = check_non_negative(spec.weight_decay, "weightDecay")) return err;
  if (!std::isfinite(spec.grad_clip)) {
    return invalid("gradClip: " + number(spec.grad_clip) + " is not finite (<= 0 turns clipping off)");
  }
  if (auto err = check_non_negative(spec.balance_loss_weight, "balanceLossWeight")) return err;
  return check_non_negative(spec.bias_update_speed, "biasUpdateSpeed");
}

caf::error validate_checkpoint_directory(std::string_view directory, const api_limits& limits) {
  if (directory.empty()) return invalid("directory: is empty");
  if (directory.size() > limits.max_checkpoint_directory_bytes) {
    return invalid("directory: " + std::to_string(directory.size()) + " bytes exceed the limit of " +
                   std::to_string(limits.max_checkpoint_directory_bytes));
  }
  if (directory.find('\0') != std::string_view::npos) return invalid("directory: contains a NUL byte");
  if (directory.front() != '/') {
    return invalid("directory: '" + std::string(directory) +
                   "' is not an absolute path (it names a directory on the server's file system)");
  }
  return {};
}

api_training_event merge_training_events(std::vector<api_training_event> events) {
  if (events.empty()) return {};
  api_training_event merged = std::move(events.back());
  for (size_t i = events.size() - 1; merged.checkpoint.empty() && i-- > 0;) {
    merged.checkpoint = std::move(events[i].checkpoint);
  }
  return merged;
}

}  // namespace moe::protocol
