#include "scheduler/expert_plan.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <queue>
#include <string>

#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

namespace {

constexpr double eps = 1e-9;

// Replica counts (each >= 1, summing to `slots`) minimising the heaviest replica: each spare slot
// goes to the expert whose replicas currently carry the most (optimal for that objective). No
// expert gets more than `max_count` (the GPUs: a GPU holds an expert once) while another can
// take the slot; past that, as before.
std::vector<int32_t> water_fill(const std::vector<double>& w, int64_t slots, int64_t max_count) {
  std::vector<int32_t> count(w.size(), 1);
  using entry = std::pair<double, size_t>;  // (load per replica, expert); ties: lower expert id
  auto cmp = [](const entry& a, const entry& b) { return a.first < b.first || (a.first == b.first && a.second > b.second); };
  std::priority_queue<entry, std::vector<entry>, decltype(cmp)> heap(cmp), capped(cmp);
  for (size_t e = 0; e < w.size(); ++e) (count[e] < max_count ? heap : capped).emplace(w[e], e);
  for (int64_t s = static_cast<int64_t>(w.size()); s < slots; ++s) {
    auto& from = heap.empty() ? capped : heap;
    auto [load, e] = from.top();
    from.pop();
    ++count[e];
    (count[e] < max_count || &from == &capped ? from : capped).emplace(w[e] / count[e], e);
  }
  return count;
}

struct bins {
  std::vector<std::vector<int32_t>> experts;  // per bin, the experts of its slots
  std::vector<std::vector<double>> loads;     // per bin, the load of each slot
  std::vector<double> total;
  [[nodiscard]] double max_load() const { return total.empty() ? 0 : *std::max_element(total.begin(), total.end()); }
};

bool holds(const std::vector<int32_t>& bin, int32_t expert) {
  return std::find(bin.begin(), bin.end(), expert) != bin.end();
}

// Packs every replica (expert e has count[e] replicas of w[e] / count[e]; `ids` maps the local
// index to the logical id) into `num_bins` bins of `per_bin` slots: heaviest first onto the
// least loaded bin with room that lacks that expert, then swaps between the most loaded bin and
// the others while they lower it.
bins pack(const std::vector<int32_t>& ids, const std::vector<double>& w, const std::vector<int32_t>& count,
          int64_t num_bins, int64_t per_bin) {
  struct item {
    double load;
    int32_t expert;
  };
  std::vector<item> items;
  for (size_t e = 0; e < w.size(); ++e)
    for (int32_t r = 0; r < count[e]; ++r) items.push_back({w[e] / count[e], ids[e]});
  std::stable_sort(items.begin(), items.end(), [](const item& a, const item& b) { return a.load > b.load; });
  bins b;
  b.experts.resize(static_cast<size_t>(num_bins));
  b.loads.resize(static_cast<size_t>(num_bins));
  b.total.assign(static_cast<size_t>(num_bins), 0.0);
  const auto per = static_cast<size_t>(per_bin);
  for (const auto& it : items) {
    int best = -1;
    bool best_clean = false;
    for (size_t k = 0; k < b.experts.size(); ++k) {
      if (b.experts[k].size() >= per) continue;
      const bool clean = !holds(b.experts[k], it.expert);
      // A bin without this expert beats one with it; then the lighter one; then the first.
      if (best < 0 || (clean && !best_clean) ||
          (clean == best_clean && b.total[k] < b.total[static_cast<size_t>(best)] - eps)) {
        best = static_cast<int>(k);
        best_clean = clean;
      }
    }
    auto& k = b.experts[static_cast<size_t>(best)];
    k.push_back(it.expert);
    b.loads[static_cast<size_t>(best)].push_back(it.load);
    b.total[static_cast<size_t>(best)] += it.load;
  }
  // Swaps: the heaviest bin trades one slot with another bin when that lowers the larger of the
  // two below the heaviest, and creates no duplicate expert in either. Nothing beats the mean.
  const double mean = std::accumulate(b.total.begin(), b.total.end(), 0.0) / static_cast<double>(num_bins);
  for (int round = 0; round < 64 * static_cast<int>(num_bins); ++round) {
    const auto a = static_cast<size_t>(std::max_element(b.total.begin(), b.total.end()) - b.total.begin());
    if (b.total[a] <= mean * (1 + 1e-4)) break;
    double best_max = b.total[a] - eps;
    size_t best_b = 0, best_i = 0, best_j = 0;
    bool found = false;
    for (size_t o = 0; o < b.experts.size(); ++o) {
      if (o == a) continue;
      for (size_t i = 0; i < b.experts[a].size(); ++i) {
        for (size_t j = 0; j < b.experts[o].size(); ++j) {
          const double d = b.loads[a][i] - b.loads[o][j];
          if (d <= eps) continue;
          const double new_max = std::max(b.total[a] - d, b.total[o] + d);
          if (new_max >= best_max) continue;
          const int32_t ea = b.experts[a][i], eo = b.experts[o][j];
          if (ea != eo && (holds(b.experts[o], ea) || holds(b.experts[a], eo))) continue;
          best_max = new_max;
          best_b = o;
          best_i = i;
          best_j = j;
          found = true;
        }
      }
    }
    if (!found) break;
    const double d = b.loads[a][best_i] - b.loads[best_b][best_j];
    std::swap(b.experts[a][best_i], b.experts[best_b][best_j]);
    std::swap(b.loads[a][best_i], b.loads[best_b][best_j]);
    b.total[a] -= d;
    b.total[best_b] += d;
  }
  return b;
}

// One node (or, globally, the whole cluster): its experts, its slots and its GPUs.
// Water-filling minimises the heaviest replica, but with more heavy replicas than GPUs two of
// them share one. So: while the busiest GPU's heaviest replica belongs to an expert that could
// use another replica, take one from the expert that misses it least (the smallest load per
// replica after losing it) and repack; keep the change only when the busiest GPU gets lighter.
bins plan_domain(const std::vector<double>& layer_load, const std::vector<int32_t>& experts, int64_t slots,
                 int64_t gpus) {
  std::vector<double> w;
  w.reserve(experts.size());
  for (auto e : experts) w.push_back(layer_load[static_cast<size_t>(e)]);
  auto count = water_fill(w, slots, gpus);
  auto best = pack(experts, w, count, gpus, slots / gpus);
  const double mean = std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(gpus);
  for (int round = 0; round < 8 && best.max_load() > mean * (1 + 1e-4); ++round) {
    const auto a = static_cast<size_t>(std::max_element(best.total.begin(), best.total.end()) - best.total.begin());
    const auto heaviest = std::max_element(best.loads[a].begin(), best.loads[a].end()) - best.loads[a].begin();
    const int32_t hot = best.experts[a][static_cast<size_t>(heaviest)];
    const auto x = static_cast<size_t>(std::find(experts.begin(), experts.end(), hot) - experts.begin());
    if (count[x] >= gpus) break;  // one replica per GPU already
    size_t donor = w.size();
    for (size_t d = 0; d < w.size(); ++d) {
      if (d == x || count[d] < 2) continue;
      if (donor == w.size() || w[d] / (count[d] - 1) < w[donor] / (count[donor] - 1)) donor = d;
    }
    if (donor == w.size()) break;
    ++count[x];
    --count[donor];
    auto candidate = pack(experts, w, count, gpus, slots / gpus);
    if (candidate.max_load() >= best.max_load() - eps) break;
    best = std::move(candidate);
  }
  return best;
}

struct layer_result {
  std::vector<bins> per_node;  // hierarchical: one per node; global: one
};

std::vector<int32_t> experts_of_groups(const std::vector<int64_t>& groups, int64_t group_size) {
  std::vector<int32_t> out;
  for (auto g : groups)
    for (int64_t i = 0; i < group_size; ++i) out.push_back(static_cast<int32_t>(g * group_size + i));
  return out;
}

layer_result plan_hierarchical(const std::vector<double>& w, const expert_plan_request& r) {
  const int64_t E = static_cast<int64_t>(w.size());
  const int64_t G = r.num_groups, N = r.num_nodes, group_size = E / G, per_node = G / N;
  const int64_t slots_per_node = r.num_slots / N, gpus_per_node = r.num_gpus / N;
  std::vector<double> group_load(static_cast<size_t>(G), 0.0);
  for (int64_t e = 0; e < E; ++e) group_load[static_cast<size_t>(e / group_size)] += w[static_cast<size_t>(e)];
  // Groups to nodes: heaviest first onto the lightest node with room.
  std::vector<int64_t> order(static_cast<size_t>(G));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return group_load[a] > group_load[b]; });
  std::vector<std::vector<int64_t>> node_groups(static_cast<size_t>(N));
  std::vector<double> node_load(static_cast<size_t>(N), 0.0);
  for (auto g : order) {
    size_t best = 0;
    bool any = false;
    for (size_t n = 0; n < node_groups.size(); ++n) {
      if (static_cast<int64_t>(node_groups[n].size()) >= per_node) continue;
      if (!any || node_load[n] < node_load[best] - eps) {
        best = n;
        any = true;
      }
    }
    node_groups[best].push_back(g);
    node_load[best] += group_load[static_cast<size_t>(g)];
  }
  // Swaps of groups between the busiest node and another while they lower the busiest node's
  // load. Judged by node load alone: planning the nodes for every candidate swap cost ten times
  // more for no better plans on the traces tried.
  for (int round = 0; round < 4 * static_cast<int>(G); ++round) {
    const auto a = static_cast<size_t>(std::max_element(node_load.begin(), node_load.end()) - node_load.begin());
    double best = node_load[a] - eps;
    size_t best_b = 0, best_i = 0, best_j = 0;
    bool found = false;
    for (size_t b = 0; b < node_groups.size(); ++b) {
      if (b == a) continue;
      for (size_t i = 0; i < node_groups[a].size(); ++i) {
        for (size_t j = 0; j < node_groups[b].size(); ++j) {
          const double d = group_load[static_cast<size_t>(node_groups[a][i])] -
                           group_load[static_cast<size_t>(node_groups[b][j])];
          if (d <= eps) continue;
          const double new_max = std::max(node_load[a] - d, node_load[b] + d);
          if (new_max >= best) continue;
          best = new_max;
          best_b = b;
          best_i = i;
          best_j = j;
          found = true;
        }
      }
    }
    if (!found) break;
    const double d = group_load[static_cast<size_t>(node_groups[a][best_i])] -
                     group_load[static_cast<size_t>(node_groups[best_b][best_j])];
    std::swap(node_groups[a][best_i], node_groups[best_b][best_j]);
    node_load[a] -= d;
    node_load[best_b] += d;
  }
  layer_result out;
  for (size_t n = 0; n < node_groups.size(); ++n)
    out.per_node.push_back(plan_domain(w, experts_of_groups(node_groups[n], group_size), slots_per_node,
                                       gpus_per_node));
  return out;
}

caf::error check(const expert_plan_request& r) {
  auto bad = [](std::string why) { return make_error(scheduler_errc::bad_assignment, "expert plan: " + why); };
  if (r.load.empty() || r.load.front().empty()) return bad("no loads");
  const size_t E = r.load.front().size();
  for (size_t l = 0; l < r.load.size(); ++l) {
    if (r.load[l].size() != E)
      return bad("layer " + std::to_string(l) + " has " + std::to_string(r.load[l].size()) + " experts, layer 0 has " +
                 std::to_string(E));
    for (double v : r.load[l])
      if (!std::isfinite(v) || v < 0) return bad("layer " + std::to_string(l) + ": loads must be finite and >= 0");
  }
  if (r.num_nodes < 1 || r.num_gpus < 1 || r.num_groups < 1) return bad("nodes, GPUs and groups must be >= 1");
  if (r.num_gpus % r.num_nodes != 0)
    return bad(std::to_string(r.num_gpus) + " GPUs do not divide among " + std::to_string(r.num_nodes) + " nodes");
  if (r.num_slots % r.num_gpus != 0)
    return bad(std::to_string(r.num_slots) + " slots do not divide among " + std::to_string(r.num_gpus) + " GPUs");
  if (r.num_slots < static_cast<int64_t>(E))
    return bad(std::to_string(r.num_slots) + " slots cannot hold " + std::to_string(E) + " experts");
  return {};
}

bool can_be_hierarchical(const expert_plan_request& r, int64_t E) {
  if (!r.hierarchical || r.num_groups % r.num_nodes != 0 || E % r.num_groups != 0) return false;
  // Every node must have at least a slot per expert of its groups.
  return r.num_slots / r.num_nodes >= E / r.num_nodes;
}

}  // namespace

caf::expected<expert_plan> plan_experts(const expert_plan_request& r) {
  if (auto err = check(r)) return err;
  const auto E = static_cast<int64_t>(r.load.front().size());
  if (!(r.hierarchy_tolerance >= 0))
    return make_error(scheduler_errc::bad_assignment, "expert plan: hierarchy_tolerance must be >= 0");
  expert_plan plan;
  const bool node_local = can_be_hierarchical(r, E);
  std::vector<int32_t> all(static_cast<size_t>(E));
  std::iota(all.begin(), all.end(), 0);
  for (const auto& w : r.load) {
    layer_result lr;
    bool kept_local = false;
    const bool global_needed = !node_local || std::isfinite(r.hierarchy_tolerance);
    layer_result global;
    if (global_needed) global.per_node.push_back(plan_domain(w, all, r.num_slots, r.num_gpus));
    if (node_local) {
      auto local = plan_hierarchical(w, r);
      double local_max = 0;
      for (const auto& n : local.per_node) local_max = std::max(local_max, n.max_load());
      if (!global_needed || local_max <= global.per_node.front().max_load() * (1.0 + r.hierarchy_tolerance) + eps) {
        lr = std::move(local);
        kept_local = true;
      }
    }
    if (!kept_local) lr = std::move(global);
    std::vector<int32_t> row;
    row.reserve(static_cast<size_t>(r.num_slots));
    for (auto& node : lr.per_node) {
      for (auto& gpu : node.experts) {
        std::sort(gpu.begin(), gpu.end());
        row.insert(row.end(), gpu.begin(), gpu.end());
      }
    }
    std::vector<int32_t> count(static_cast<size_t>(E), 0);
    for (auto e : row) ++count[static_cast<size_t>(e)];
    plan.phy2log.push_back(std::move(row));
    plan.logcnt.push_back(std::move(count));
    plan.hierarchical.push_back(kept_local);
  }
  return plan;
}

expert_plan_score score_expert_plan(const expert_plan_request& r, const expert_plan& plan) {
  expert_plan_score s;
  const int64_t per_gpu = r.num_slots / r.num_gpus, gpus_per_node = r.num_gpus / r.num_nodes;
  for (size_t l = 0; l < r.load.size() && l < plan.phy2log.size(); ++l) {
    const auto& w = r.load[l];
    const auto& row = plan.phy2log[l];
    const auto& cnt = plan.logcnt[l];
    std::vector<double> gpu(static_cast<size_t>(r.num_gpus), 0.0), node(static_cast<size_t>(r.num_nodes), 0.0);
    for (size_t j = 0; j < row.size(); ++j) {
      const auto e = static_cast<size_t>(row[j]);
      const double load = w[e] / cnt[e];
      gpu[j / static_cast<size_t>(per_gpu)] += load;
      node[j / static_cast<size_t>(per_gpu * gpus_per_node)] += load;
    }
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    const double ratio = total > 0 ? *std::max_element(gpu.begin(), gpu.end()) / (total / r.num_gpus) : 1.0;
    const double node_ratio = total > 0 ? *std::max_element(node.begin(), node.end()) / (total / r.num_nodes) : 1.0;
    const auto best = water_fill(w, r.num_slots, r.num_gpus);
    double heaviest = 0;
    for (size_t e = 0; e < w.size(); ++e) heaviest = std::max(heaviest, w[e] / best[e]);
    const double bound = total > 0 ? std::max(1.0, heaviest / (total / r.num_gpus)) : 1.0;
    s.gpu_ratio.push_back(ratio);
    s.gpu_ratio_mean += ratio;
    s.gpu_ratio_max = std::max(s.gpu_ratio_max, ratio);
    s.node_ratio_mean += node_ratio;
    s.lower_bound_mean += bound;
  }
  const double n = static_cast<double>(std::max<size_t>(1, s.gpu_ratio.size()));
  s.gpu_ratio_mean /= n;
  s.node_ratio_mean /= n;
  s.lower_bound_mean /= n;
  return s;
}

}  // namespace moe::scheduler
