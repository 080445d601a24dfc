#include "scheduler/failover_plan.hpp"

#include <algorithm>
#include <string>

#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

caf::expected<failover_plan> plan_failover(const expert_layout& current, const std::vector<bool>& lost,
                                           int64_t num_experts) {
  const size_t G = lost.size();
  if (std::all_of(lost.begin(), lost.end(), [](bool l) { return l; }))
    return make_error(scheduler_errc::infeasible, "infeasible: every expert group is lost; nothing can serve the experts");
  failover_plan out;
  for (size_t i = 0; i < current.size(); ++i) {
    const auto& groups = current[i];
    if (groups.size() != G)
      return make_error(scheduler_errc::bad_assignment, "layer entry " + std::to_string(i) + " names " +
                                                            std::to_string(groups.size()) + " expert groups, not " +
                                                            std::to_string(G));
    std::vector<std::vector<int64_t>> next(G);
    std::vector<bool> served(static_cast<size_t>(num_experts), false);
    std::vector<bool> held_by_lost(static_cast<size_t>(num_experts), false);
    for (size_t g = 0; g < G; ++g) {
      for (auto e : groups[g]) {
        if (e < 0 || e >= num_experts)
          return make_error(scheduler_errc::bad_assignment, "expert " + std::to_string(e) + " does not exist");
        if (lost[g]) {
          held_by_lost[static_cast<size_t>(e)] = true;
          continue;
        }
        next[g].push_back(e);
        served[static_cast<size_t>(e)] = true;
      }
    }
    for (int64_t e = 0; e < num_experts; ++e) {
      const auto ue = static_cast<size_t>(e);
      if (served[ue]) {
        if (held_by_lost[ue]) ++out.experts_on_replicas;
        continue;
      }
      size_t best = G;
      for (size_t g = 0; g < G; ++g)
        if (!lost[g] && (best == G || next[g].size() < next[best].size())) best = g;
      next[best].push_back(e);
      ++out.replicas_added;
    }
    for (auto& list : next) std::sort(list.begin(), list.end());
    out.experts.push_back(std::move(next));
  }
  return out;
}

}  // namespace moe::scheduler
