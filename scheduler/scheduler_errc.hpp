// Error codes of the scheduler component (placement now; replication and rebalancing later).
#pragma once

#include <cstdint>
#include <string>

#include "base/error.hpp"

namespace moe::scheduler {

enum class scheduler_errc : uint8_t {
  /// Permanent for this cluster and config: the actors do not fit the devices. The text starts
  /// with "infeasible: " and names the resource; retry only after adding devices or memory, or
  /// after cutting the model differently.
  infeasible = 1,
  /// Permanent: the expert assignment does not match the model (an id out of range, an expert
  /// in no group, more groups than experts, more replicas than groups can hold).
  bad_assignment,
  /// Permanent: the model named by the config cannot be resolved (unknown preset, unreadable or
  /// invalid config.json).
  bad_model,
  /// Permanent: a serialised placement is malformed.
  bad_placement,
};

[[nodiscard]] const char* to_string(scheduler_errc e) noexcept;

/// caf::error carrying `text` as its reason (moe::error_text returns it).
[[nodiscard]] caf::error make_error(scheduler_errc code, std::string text);

}  // namespace moe::scheduler

MOE_ERROR_ENUM(moe::scheduler::scheduler_errc, "scheduler")
