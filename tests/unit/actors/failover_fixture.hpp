// What the recovery tests share (recovery_test.cpp while serving, training_recovery_test.cpp
// while training): a cluster in this process whose attention shard s stands for node "a<s>" and
// expert group g for node "g<g>", the controller options that say so, the rebalancer that fails
// lost groups over, the member_event the membership sends when a node goes down, and reading a
// series from the metrics.
#pragma once

#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "actors/controller.hpp"
#include "actors/local_cluster.hpp"
#include "actors/rebalancer.hpp"
#include "actors/trainer.hpp"

namespace moe::actors::testing {

/// The experts of each group of `layout`, in group order.
inline std::vector<std::vector<int64_t>> group_experts(const cluster_layout& layout) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& g : layout.groups) out.push_back(g.experts);
  return out;
}

/// The first group holding the shared experts, or -1.
inline int64_t shared_experts_group(const cluster_layout& layout) {
  for (size_t g = 0; g < layout.groups.size(); ++g)
    if (layout.groups[g].holds_shared_experts) return static_cast<int64_t>(g);
  return -1;
}

/// A controller over the cluster's shards, each shard and group on a node of its own.
inline controller_options failover_controller_options(const local_cluster& cluster, const cluster_layout& layout,
                                                      std::shared_ptr<prometheus::Registry> registry) {
  controller_options o;
  o.shards = cluster.shards();
  o.vocab_size = cluster.config().vocab_size;
  o.metrics = std::move(registry);
  for (size_t s = 0; s < o.shards.size(); ++s) o.shards_on_node["a" + std::to_string(s)] = {s};
  for (size_t g = 0; g < layout.groups.size(); ++g)
    o.groups_on_node["g" + std::to_string(g)] = {static_cast<int64_t>(g)};
  return o;
}

/// The rebalancer that fails lost groups over (told to the controller, and holding the trainer's
/// steps too when there is one); invalid (with a test failure) when it cannot be spawned.
inline rebalancer_actor spawn_failover(caf::actor_system& sys, const local_cluster& cluster,
                                       const cluster_layout& layout, const controller_actor& controller,
                                       std::shared_ptr<prometheus::Registry> registry, trainer_actor trainer = {}) {
  using namespace std::chrono_literals;
  rebalancer_options r;
  r.model = cluster.config();
  r.routers = cluster.routers();
  r.groups = cluster.groups();
  r.group_node.assign(r.groups.size(), 0);
  r.controller = controller;
  r.trainer = std::move(trainer);
  r.current = uniform_layout(cluster.config(), group_experts(layout), 1);
  r.shared_experts_group = shared_experts_group(layout);
  r.phase_timeout = 60s;
  r.metrics = std::move(registry);
  auto spawned = spawn_rebalancer(sys, r);
  EXPECT_TRUE(spawned) << error_text(spawned.error());
  if (!spawned) return {};
  caf::anon_send(controller, use_failover_atom::value, *spawned);
  return *spawned;
}

/// What the membership sends when `node` goes down.
inline member_event node_down(const std::string& node) {
  member_event ev;
  ev.node = node;
  ev.from = member_state::up;
  ev.to = member_state::down;
  ev.reason = "killed by the test";
  return ev;
}

inline std::string metrics_text(const prometheus::Registry& registry) {
  return prometheus::TextSerializer{}.Serialize(registry.Collect());
}

/// The value of one series (name with its labels, as the text format writes it); -1 if absent.
inline double counter(const std::string& text, const std::string& series) {
  auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

}  // namespace moe::actors::testing
