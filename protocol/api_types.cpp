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

}  // namespace moe::protocol
