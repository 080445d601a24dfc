// Online expert rebalancing, the messages: what the rebalancer (actors/rebalancer.hpp) tells
// expert groups and routers, what the controller does for it, and what a rebalance reports.
//
// A placement version is the expert layout of every MoE layer: per layer, the logical experts
// each expert group holds (the physical slots are the groups' experts in group order, each
// group's list sorted). A rebalance moves the cluster from version v to v + 1 in three phases:
//  1. prepare: every expert group loads the weights of the replicas it gains in v + 1 while it
//     keeps serving v (it answers batches of either version from then on);
//  2. switch: the controller holds new steps until every step in flight has returned, the
//     routers switch to v + 1 (all of them, before the next step), then steps resume;
//  3. commit: the groups free what v held and v + 1 does not.
// A failure in phase 1 aborts (the groups drop v + 1); nothing changed for the routers.
#pragma once

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moe::actors {

/// One expert group's part of a placement version.
struct group_layout {
  uint32_t version = 0;
  std::vector<int64_t> layers;                ///< the model's MoE layers, ascending
  std::vector<std::vector<int64_t>> experts;  ///< per entry of `layers`: logical experts, sorted
  /// Where the replicas this group gains are held now: (layer, expert, group index) triples, and
  /// the groups (expert_group_actor handles) in group order. A group whose experts were trained
  /// copies new replicas from these holders (weights and AdamW moments), as the checkpoint on
  /// disk no longer has their values; an untrained group reads the checkpoint.
  std::vector<int64_t> sources;
  std::vector<caf::actor> peers;
  /// Serving waits for this version (a failover): load at normal priority. Otherwise (a
  /// rebalance) the load runs only on cores serving leaves idle, which a busy host may not have
  /// for minutes.
  bool urgent = false;
  /// The group takes over the shared experts in this version (a failover lost their group): it
  /// loads them from the checkpoint and computes them from then on.
  bool holds_shared = false;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_layout& x) {
  return f(caf::meta::type_name("group_layout"), x.version, x.layers, x.experts, x.sources, x.peers, x.urgent,
           x.holds_shared);
}

/// A whole placement version as the routers need it.
struct router_layout {
  uint32_t version = 0;
  std::vector<int64_t> layers;  ///< the model's MoE layers, ascending
  /// [layer entry][group]: logical experts the group holds in that layer, sorted.
  std::vector<std::vector<std::vector<int64_t>>> experts;
  /// The group that computes the shared experts from this version on; -1: the one it was.
  int64_t shared_group = -1;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, router_layout& x) {
  return f(caf::meta::type_name("router_layout"), x.version, x.layers, x.experts, x.shared_group);
}

/// An expert group's answer to prepare: what it loaded for the new version.
struct prepare_result {
  int64_t replicas_loaded = 0;  ///< (layer, expert) replicas it did not hold before
  uint64_t bytes_loaded = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, prepare_result& x) {
  return f(caf::meta::type_name("prepare_result"), x.replicas_loaded, x.bytes_loaded);
}

/// What one rebalance did. Balance ratios are max / mean expert-group load per MoE layer
/// (1 is perfect), averaged over the layers, from the routers' load window: `before` as
/// measured under the old placement, `after` predicted for the new one from the same counts.
struct rebalance_report {
  bool changed = false;  ///< false: the plan kept the placement (nothing moved)
  uint32_t version_before = 0;
  uint32_t version_after = 0;
  double balance_before = 0;
  double balance_after = 0;
  std::vector<double> layer_balance_before;  ///< per MoE layer, ascending layer id
  std::vector<double> layer_balance_after;
  uint64_t tokens_counted = 0;  ///< routed (token, expert) choices in the window, all layers
  int64_t replicas_moved = 0;   ///< replicas some group loaded
  uint64_t bytes_moved = 0;     ///< weight bytes those loads read
  double duration_seconds = 0;  ///< from the load reports to the commit
  std::string trigger;          ///< "on_demand" or "periodic"
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rebalance_report& x) {
  return f(caf::meta::type_name("rebalance_report"), x.changed, x.version_before, x.version_after,
           x.balance_before, x.balance_after, x.layer_balance_before, x.layer_balance_after,
           x.tokens_counted, x.replicas_moved, x.bytes_moved, x.duration_seconds, x.trigger);
}

using prepare_layout_atom = caf::atom_constant<caf::atom("lay_prep")>;
using commit_layout_atom = caf::atom_constant<caf::atom("lay_commit")>;
using abort_layout_atom = caf::atom_constant<caf::atom("lay_abort")>;
using switch_layout_atom = caf::atom_constant<caf::atom("lay_switch")>;
using hold_steps_atom = caf::atom_constant<caf::atom("hold_steps")>;
using resume_steps_atom = caf::atom_constant<caf::atom("resume_stp")>;
using rebalance_atom = caf::atom_constant<caf::atom("rebalance")>;
/// Failover after a node failure: the expert groups (indices) that were lost with it.
using groups_down_atom = caf::atom_constant<caf::atom("grp_down")>;
using failover_atom = caf::atom_constant<caf::atom("failover")>;

/// rebalance: a rebalance now; answers its report. Errors: rebalance_errc (actors/rebalancer.hpp).
/// failover: the given expert groups and routers (indices) are gone (their node failed). Every router stops using them
/// at once (requests waiting on them fail as replayable), survivors load the experts that had no
/// other replica, and the routers switch to a placement without the lost groups; answers the
/// report (trigger "failover"). Failovers queue behind a running rebalance.
using rebalancer_actor =
    caf::typed_actor<caf::replies_to<rebalance_atom>::with<rebalance_report>,
                     caf::replies_to<failover_atom, std::vector<int64_t>, std::vector<int64_t>>::with<rebalance_report>>;

}  // namespace moe::actors
