// The rebalancer: online expert load balancing for one serving cluster. On demand (rebalance_atom,
// `moe rebalance`) or on a period, it collects the routers' load reports, plans a new expert
// layout from the counted loads (scheduler/expert_plan.hpp, within the move budget of
// scheduler/plan_transition.hpp) and moves the cluster to it while serving continues, in the
// three phases of actors/rebalance_messages.hpp. One rebalance at a time.
//
// Ownership: holds the handles it was given and the current layout; owns its metrics.
// Thread safety: an actor; all state is confined to it.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actors/controller.hpp"
#include "actors/messages.hpp"
#include "actors/trainer.hpp"
#include "actors/rebalance_messages.hpp"
#include "base/error.hpp"
#include "model/config.hpp"

namespace prometheus {
class Registry;
}

namespace moe::actors {

enum class rebalance_errc : uint8_t {
  busy = 1,     ///< Transient: a rebalance is already running.
  no_load,      ///< Transient: the routers counted no routed tokens yet; retry after traffic.
  unsupported,  ///< Permanent: this layout cannot be rebalanced (the text says why).
  failed,       ///< Transient: a phase failed (text names it); the placement did not change.
};

[[nodiscard]] const char* to_string(rebalance_errc e) noexcept;
[[nodiscard]] caf::error make_error(rebalance_errc code, std::string text);

}  // namespace moe::actors

MOE_ERROR_ENUM(moe::actors::rebalance_errc, "rebalance")

namespace moe::actors {

struct rebalancer_options {
  model::model_config model;
  std::vector<router_actor> routers;
  std::vector<expert_group_actor> groups;  ///< in group order
  /// The group holding the shared experts (-1: none). Failover cannot re-place them yet: losing
  /// that group fails the failover with a clear error.
  int64_t shared_experts_group = -1;
  /// Node index of each group. The planner keeps routing groups node-local when every node
  /// holds as many groups; otherwise it plans globally.
  std::vector<int> group_node;
  /// Holds steps while the routers switch; may be null when nothing else sends steps (tests).
  controller_actor controller;
  /// Holds training steps likewise and learns the new layout (replicated experts' gradients are
  /// summed by it); may be null.
  trainer_actor trainer;
  /// The layout the cluster serves now (version, per MoE layer per group experts).
  router_layout current;
  /// Most (layer, expert) replicas one rebalance may load; negative: no limit.
  int64_t max_moved_replicas = -1;
  /// A periodic rebalance; zero: on demand only.
  std::chrono::milliseconds period{0};
  /// A periodic rebalance moves nothing unless the mean balance ratio improves by this much.
  double min_improvement = 0.02;
  /// How often the balance metrics are refreshed from the routers' windows; zero: only when
  /// a rebalance runs.
  std::chrono::milliseconds stats_interval{0};
  /// Longest wait for any one phase's answers (load reports, prepare, hold, switch).
  std::chrono::milliseconds phase_timeout{120'000};
  std::shared_ptr<prometheus::Registry> metrics;  ///< may be null
};

/// Why the planner cannot move this layout (groups holding unequal numbers of slots), or empty.
/// Such a cluster still fails over (failover_atom); rebalance_atom answers unsupported.
[[nodiscard]] std::string rebalance_unplannable(const router_layout& current, int64_t num_experts);

/// Errors (rebalance_errc::unsupported): no router or group, a layout that does not match the
/// model.
[[nodiscard]] caf::expected<rebalancer_actor> spawn_rebalancer(caf::actor_system& sys,
                                                               rebalancer_options options);

}  // namespace moe::actors
