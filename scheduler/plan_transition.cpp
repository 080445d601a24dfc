#include "scheduler/plan_transition.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <utility>

#include "base/assert.hpp"
#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

namespace {

// A step must lower its layer's busiest GPU by more than this much of the mean GPU load.
constexpr double min_gain = 1e-6;

caf::error bad(const std::string& why) {
  return make_error(scheduler_errc::bad_assignment, "plan transition: " + why);
}

struct geometry {
  int64_t num_experts = 0;
  int64_t num_slots = 0;
  int64_t num_gpus = 0;
  int64_t num_nodes = 0;
  int64_t per_gpu = 0;
  int64_t gpus_per_node = 0;
  /// Experts per routing group where groups may be kept on one node (as plan_experts decides
  /// it), else 0.
  int64_t group_size = 0;

  [[nodiscard]] size_t gpu(size_t slot) const { return slot / static_cast<size_t>(per_gpu); }
  [[nodiscard]] int64_t node(size_t gpu) const { return static_cast<int64_t>(gpu) / gpus_per_node; }
};

geometry make_geometry(const expert_plan_request& p) {
  geometry g;
  g.num_experts = static_cast<int64_t>(p.load.front().size());
  g.num_slots = p.num_slots;
  g.num_gpus = p.num_gpus;
  g.num_nodes = p.num_nodes;
  g.per_gpu = p.num_slots / p.num_gpus;
  g.gpus_per_node = p.num_gpus / p.num_nodes;
  // The rule of plan_experts: groups divide among the nodes and every node has a slot per expert.
  if (p.hierarchical && p.num_groups % p.num_nodes == 0 && g.num_experts % p.num_groups == 0 &&
      p.num_slots / p.num_nodes >= g.num_experts / p.num_nodes)
    g.group_size = g.num_experts / p.num_groups;
  return g;
}

// plan_experts checks the request the same way; a limited budget may never call it, so the
// transition checks what it relies on itself, then the previous layout.
caf::error check(const plan_transition_request& r) {
  const auto& p = r.plan;
  if (p.load.empty() || p.load.front().empty()) return bad("no loads");
  const size_t num_experts = p.load.front().size();
  for (size_t l = 0; l < p.load.size(); ++l) {
    if (p.load[l].size() != num_experts)
      return bad("layer " + std::to_string(l) + " has " + std::to_string(p.load[l].size()) +
                 " experts, layer 0 has " + std::to_string(num_experts));
    for (double v : p.load[l])
      if (!std::isfinite(v) || v < 0)
        return bad("layer " + std::to_string(l) + ": loads must be finite and >= 0");
  }
  if (p.num_nodes < 1 || p.num_gpus < 1 || p.num_groups < 1)
    return bad("nodes, GPUs and groups must be >= 1");
  if (p.num_gpus % p.num_nodes != 0)
    return bad(std::to_string(p.num_gpus) + " GPUs do not divide among " +
               std::to_string(p.num_nodes) + " nodes");
  if (p.num_slots % p.num_gpus != 0)
    return bad(std::to_string(p.num_slots) + " slots do not divide among " +
               std::to_string(p.num_gpus) + " GPUs");
  if (p.num_slots < static_cast<int64_t>(num_experts))
    return bad(std::to_string(p.num_slots) + " slots cannot hold " + std::to_string(num_experts) +
               " experts");
  if (!(p.hierarchy_tolerance >= 0)) return bad("hierarchy_tolerance must be >= 0");
  if (r.previous.size() != p.load.size())
    return bad("the previous layout has " + std::to_string(r.previous.size()) +
               " layers, the loads have " + std::to_string(p.load.size()));
  std::vector<char> seen(num_experts);
  for (size_t l = 0; l < r.previous.size(); ++l) {
    const auto& row = r.previous[l];
    const auto where = "previous layout, layer " + std::to_string(l);
    if (static_cast<int64_t>(row.size()) != p.num_slots)
      return bad(where + ": " + std::to_string(row.size()) + " slots, the plan has " +
                 std::to_string(p.num_slots));
    std::fill(seen.begin(), seen.end(), 0);
    for (size_t j = 0; j < row.size(); ++j) {
      if (row[j] < 0 || static_cast<size_t>(row[j]) >= num_experts)
        return bad(where + ", slot " + std::to_string(j) + ": expert " + std::to_string(row[j]) +
                   " is not in [0, " + std::to_string(num_experts) + ")");
      seen[static_cast<size_t>(row[j])] = 1;
    }
    const auto missing = std::find(seen.begin(), seen.end(), 0);
    if (missing != seen.end())
      return bad(where + ": no replica of expert " + std::to_string(missing - seen.begin()));
  }
  return {};
}

// Experts that `next` holds and `previous` does not, GPU by GPU (`per_gpu` slots each).
int64_t moves_between(const std::vector<int32_t>& previous, const std::vector<int32_t>& next,
                      size_t per_gpu) {
  int64_t moves = 0;
  if (per_gpu == 0) return moves;
  std::vector<int32_t> had, has;
  for (size_t begin = 0; begin < next.size(); begin += per_gpu) {
    had.assign(previous.begin() + static_cast<std::ptrdiff_t>(begin),
               previous.begin() + static_cast<std::ptrdiff_t>(begin + per_gpu));
    has.assign(next.begin() + static_cast<std::ptrdiff_t>(begin),
               next.begin() + static_cast<std::ptrdiff_t>(begin + per_gpu));
    std::sort(had.begin(), had.end());
    std::sort(has.begin(), has.end());
    has.erase(std::unique(has.begin(), has.end()), has.end());
    for (auto e : has)
      if (!std::binary_search(had.begin(), had.end(), e)) ++moves;
  }
  return moves;
}

// Whether every routing group's replicas sit on one node (only where groups may be node-local).
bool groups_node_local(const geometry& geo, const std::vector<int32_t>& row) {
  if (geo.group_size == 0) return false;
  std::vector<int64_t> node_of_group(static_cast<size_t>(geo.num_experts / geo.group_size), -1);
  for (size_t s = 0; s < row.size(); ++s) {
    auto& n = node_of_group[static_cast<size_t>(row[s] / geo.group_size)];
    const int64_t here = geo.node(geo.gpu(s));
    if (n < 0) n = here;
    if (n != here) return false;
  }
  return true;
}

std::vector<int32_t> replica_counts(const geometry& geo, const std::vector<int32_t>& row) {
  std::vector<int32_t> count(static_cast<size_t>(geo.num_experts), 0);
  for (auto e : row) ++count[static_cast<size_t>(e)];
  return count;
}

// The layer's busiest GPU over its mean GPU load (1 for a layer without load).
double gpu_ratio(const geometry& geo, const std::vector<double>& w,
                 const std::vector<int32_t>& row) {
  const auto count = replica_counts(geo, row);
  std::vector<double> load(static_cast<size_t>(geo.num_gpus), 0.0);
  for (size_t s = 0; s < row.size(); ++s) {
    const auto e = static_cast<size_t>(row[s]);
    load[geo.gpu(s)] += w[e] / count[e];
  }
  const double mean = std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(geo.num_gpus);
  return mean > 0 ? *std::max_element(load.begin(), load.end()) / mean : 1.0;
}

// Min-cost perfect matching of the rows of a square n x n cost matrix to its columns
// (Kuhn-Munkres with potentials, O(n^3)); returns each row's column.
std::vector<size_t> min_cost_assignment(const std::vector<int64_t>& cost, size_t n) {
  constexpr int64_t inf = std::numeric_limits<int64_t>::max() / 4;
  std::vector<int64_t> u(n + 1, 0), v(n + 1, 0), min_to(n + 1);
  std::vector<size_t> row_of(n + 1, 0), way(n + 1, 0);  // 1-based; column 0 is a sentinel
  std::vector<char> used(n + 1);
  for (size_t i = 1; i <= n; ++i) {
    row_of[0] = i;
    size_t j0 = 0;
    std::fill(min_to.begin(), min_to.end(), inf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[j0] = 1;
      const size_t i0 = row_of[j0];
      int64_t delta = inf;
      size_t j1 = 0;
      for (size_t j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const int64_t reduced = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
        if (reduced < min_to[j]) {
          min_to[j] = reduced;
          way[j] = j0;
        }
        if (min_to[j] < delta) {
          delta = min_to[j];
          j1 = j;
        }
      }
      for (size_t j = 0; j <= n; ++j) {
        if (used[j]) {
          u[row_of[j]] += delta;
          v[j] -= delta;
        } else {
          min_to[j] -= delta;
        }
      }
      j0 = j1;
    } while (row_of[j0] != 0);
    do {
      const size_t j1 = way[j0];
      row_of[j0] = row_of[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<size_t> column(n);
  for (size_t j = 1; j <= n; ++j) column[row_of[j] - 1] = j - 1;
  return column;
}

// Puts each GPU of `next` (its set of experts) on the physical GPU that keeps the most of the
// previous layout's experts in place: a min-cost assignment on the experts each pairing would
// load. `node_local`: the GPUs of one new node go to one old node (node assignment over the best
// GPU assignment within each pair of nodes). Each GPU's slots come out in ascending expert order.
std::vector<int32_t> align_layer(const geometry& geo, const std::vector<int32_t>& previous,
                                 const std::vector<int32_t>& next, bool node_local) {
  const auto num_gpus = static_cast<size_t>(geo.num_gpus),
             per_gpu = static_cast<size_t>(geo.per_gpu);
  const auto num_experts = static_cast<size_t>(geo.num_experts);
  std::vector<char> had(num_gpus * num_experts, 0);
  for (size_t s = 0; s < previous.size(); ++s)
    had[geo.gpu(s) * num_experts + static_cast<size_t>(previous[s])] = 1;
  std::vector<std::vector<int32_t>> sets(num_gpus);
  for (size_t a = 0; a < num_gpus; ++a) {
    auto& set = sets[a];
    set.assign(next.begin() + static_cast<std::ptrdiff_t>(a * per_gpu),
               next.begin() + static_cast<std::ptrdiff_t>((a + 1) * per_gpu));
    std::sort(set.begin(), set.end());
    set.erase(std::unique(set.begin(), set.end()), set.end());
  }
  auto loads_needed = [&](size_t a, size_t b) {
    int64_t n = 0;
    for (auto e : sets[a]) n += had[b * num_experts + static_cast<size_t>(e)] ? 0 : 1;
    return n;
  };
  std::vector<size_t> target(num_gpus);  // new GPU -> physical GPU
  if (node_local) {
    const auto num_nodes = static_cast<size_t>(geo.num_nodes),
               per_node = static_cast<size_t>(geo.gpus_per_node);
    std::vector<int64_t> node_cost(num_nodes * num_nodes), sub(per_node * per_node);
    std::vector<std::vector<size_t>> within(num_nodes * num_nodes);
    for (size_t m = 0; m < num_nodes; ++m) {
      for (size_t n = 0; n < num_nodes; ++n) {
        for (size_t i = 0; i < per_node; ++i)
          for (size_t j = 0; j < per_node; ++j)
            sub[i * per_node + j] = loads_needed(m * per_node + i, n * per_node + j);
        auto& w = within[m * num_nodes + n];
        w = min_cost_assignment(sub, per_node);
        int64_t total = 0;
        for (size_t i = 0; i < per_node; ++i) total += sub[i * per_node + w[i]];
        node_cost[m * num_nodes + n] = total;
      }
    }
    const auto node_of = min_cost_assignment(node_cost, num_nodes);
    for (size_t m = 0; m < num_nodes; ++m)
      for (size_t i = 0; i < per_node; ++i)
        target[m * per_node + i] = node_of[m] * per_node + within[m * num_nodes + node_of[m]][i];
  } else {
    std::vector<int64_t> cost(num_gpus * num_gpus);
    for (size_t a = 0; a < num_gpus; ++a)
      for (size_t b = 0; b < num_gpus; ++b) cost[a * num_gpus + b] = loads_needed(a, b);
    target = min_cost_assignment(cost, num_gpus);
  }
  std::vector<int32_t> row(next.size());
  for (size_t a = 0; a < num_gpus; ++a) {
    const auto out = row.begin() + static_cast<std::ptrdiff_t>(target[a] * per_gpu);
    std::copy_n(next.begin() + static_cast<std::ptrdiff_t>(a * per_gpu), per_gpu, out);
    std::sort(out, out + static_cast<std::ptrdiff_t>(per_gpu));
  }
  return row;
}

// One improvement of one layer.
struct step {
  enum class kind : uint8_t { none, repoint, swap };
  kind what = kind::none;
  int32_t at = -1;    ///< repoint: the slot that changes expert; swap: the slot on the busiest GPU
  int32_t with = -1;  ///< repoint: the expert the slot gets; swap: the slot on the other GPU
  int64_t cost = 0;   ///< Change of the layer's moves (-2..2).
  double gain = 0;    ///< Drop of the layer's busiest GPU load, over its mean GPU load.
};

// Whether `a` comes before `b` in the sequence of steps: steps that load nothing first (largest
// gain first), then the largest gain per load.
bool before(const step& a, const step& b) {
  if (a.what == step::kind::none) return false;
  if (b.what == step::kind::none) return true;
  const bool free_a = a.cost <= 0, free_b = b.cost <= 0;
  if (free_a != free_b) return free_a;
  if (free_a) return a.gain > b.gain;
  return a.gain * static_cast<double>(b.cost) > b.gain * static_cast<double>(a.cost);
}

// The local search of one layer from its previous layout: its state and its best next step.
// Every step lowers the busiest GPU, so only steps that unload it are tried; candidates are
// pruned by cheap lower bounds on the busiest GPU they leave, against the bar the best step
// found so far sets for their cost.
class layer_search {
 public:
  layer_search(const geometry& geo, const std::vector<double>& w,
               const std::vector<int32_t>& previous)
      : geo_(&geo), w_(&w), slots_(previous), count_(replica_counts(geo, previous)) {
    const auto num_gpus = static_cast<size_t>(geo.num_gpus),
               num_experts = static_cast<size_t>(geo.num_experts);
    on_gpu_.assign(num_gpus * num_experts, 0);
    had_.assign(num_gpus * num_experts, 0);
    holders_.resize(num_experts);
    for (size_t s = 0; s < slots_.size(); ++s) {
      ++on_gpu_[index(geo.gpu(s), slots_[s])];
      had_[index(geo.gpu(s), slots_[s])] = 1;
      holders_[static_cast<size_t>(slots_[s])].push_back(static_cast<int32_t>(s));
    }
    if (groups_node_local(geo, previous)) {
      expert_node_.assign(num_experts, 0);
      for (size_t s = 0; s < slots_.size(); ++s)
        expert_node_[static_cast<size_t>(slots_[s])] = geo.node(geo.gpu(s));
    }
    load_.assign(num_gpus, 0.0);
    for (size_t g = 0; g < num_gpus; ++g) load_[g] = gpu_load(g);
    mean_ = std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(num_gpus);
    touched_.assign(num_gpus, 0);
    order_.resize(num_gpus);
    new_load_.assign(num_gpus, 0.0);
    x_load_.assign(num_gpus, 0.0);
    donor_top_.resize(num_experts);
    in_e_.assign(num_gpus, 0);
    in_x_.assign(num_gpus, 0);
    find_next();
  }

  /// The best step from here (kind none: no step lowers the busiest GPU).
  [[nodiscard]] const step& next() const { return next_; }
  /// The step of most gain that loads at most one replica (next() stays as it is).
  [[nodiscard]] step most_within_one() {
    const step keep = next_;
    within_one_ = true;
    find_next();
    within_one_ = false;
    return std::exchange(next_, keep);
  }
  [[nodiscard]] int64_t moves() const { return moves_; }
  [[nodiscard]] double ratio() const {
    return mean_ > 0 ? *std::max_element(load_.begin(), load_.end()) / mean_ : 1.0;
  }

  /// The layout now; each GPU the search changed lists its experts in ascending order.
  [[nodiscard]] std::vector<int32_t> row() const {
    auto row = slots_;
    const auto per_gpu = static_cast<std::ptrdiff_t>(geo_->per_gpu);
    for (size_t g = 0; g < touched_.size(); ++g)
      if (touched_[g])
        std::sort(row.begin() + static_cast<std::ptrdiff_t>(g) * per_gpu,
                  row.begin() + static_cast<std::ptrdiff_t>(g + 1) * per_gpu);
    return row;
  }

  void take(const step& s) {
    MOE_ASSERT(s.what != step::kind::none);
    moves_ += s.cost;
    const auto a = static_cast<size_t>(s.at);
    if (s.what == step::kind::repoint) {
      const int32_t x = slots_[a];
      set_slot(a, s.with);
      for (auto e : {x, s.with})
        for (auto t : holders_[static_cast<size_t>(e)]) refresh(geo_->gpu(static_cast<size_t>(t)));
    } else {
      const auto b = static_cast<size_t>(s.with);
      const int32_t ea = slots_[a], eb = slots_[b];
      set_slot(a, eb);
      set_slot(b, ea);
      refresh(geo_->gpu(a));
      refresh(geo_->gpu(b));
    }
    ++steps_;
    find_next();
  }

 private:
  [[nodiscard]] size_t index(size_t gpu, int32_t expert) const {
    return gpu * static_cast<size_t>(geo_->num_experts) + static_cast<size_t>(expert);
  }
  [[nodiscard]] double weight(int32_t e) const { return (*w_)[static_cast<size_t>(e)]; }
  [[nodiscard]] double count(int32_t e) const { return count_[static_cast<size_t>(e)]; }
  [[nodiscard]] double per_replica(int32_t e) const { return weight(e) / count(e); }
  [[nodiscard]] double gpu_load(size_t g) const {
    double sum = 0;
    const auto per_gpu = static_cast<size_t>(geo_->per_gpu);
    for (size_t s = g * per_gpu; s < (g + 1) * per_gpu; ++s) sum += per_replica(slots_[s]);
    return sum;
  }
  void refresh(size_t g) { load_[g] = gpu_load(g); }
  // Whether expert e may gain a replica on GPU g: not there yet, and on its group's node where
  // the layer keeps groups node-local.
  [[nodiscard]] bool may_hold(size_t g, int32_t e) const {
    return on_gpu_[index(g, e)] == 0 &&
           (expert_node_.empty() || expert_node_[static_cast<size_t>(e)] == geo_->node(g));
  }
  // Moves the layer gains when GPU g gets expert `in` and loses one replica of `out`.
  [[nodiscard]] int64_t cost_of(size_t g, int32_t in, int32_t out) const {
    return (had_[index(g, in)] ? 0 : 1) -
           (on_gpu_[index(g, out)] == 1 && !had_[index(g, out)] ? 1 : 0);
  }
  void set_slot(size_t slot, int32_t e) {
    const int32_t x = slots_[slot];
    const size_t g = geo_->gpu(slot);
    auto& from = holders_[static_cast<size_t>(x)];
    from.erase(std::find(from.begin(), from.end(), static_cast<int32_t>(slot)));
    holders_[static_cast<size_t>(e)].push_back(static_cast<int32_t>(slot));
    --on_gpu_[index(g, x)];
    ++on_gpu_[index(g, e)];
    --count_[static_cast<size_t>(x)];
    ++count_[static_cast<size_t>(e)];
    slots_[slot] = e;
    touched_[g] = 1;
  }

  // The busiest GPU load (exclusive) a candidate of this cost (-2..2) must leave to come before
  // the best step found so far (within_one_: to gain more, loading at most one replica).
  [[nodiscard]] double bar(int64_t cost) const { return bars_[static_cast<size_t>(cost + 2)]; }
  void set_bars() {
    constexpr double none = -std::numeric_limits<double>::infinity();
    const double any = top_ - min_gain * mean_;
    for (int64_t cost = -2; cost <= 2; ++cost) {
      double b = any;
      if (within_one_)
        b = cost > 1 ? none : next_.what == step::kind::none ? any : top_ - next_.gain * mean_;
      else if (next_.what == step::kind::none)
        b = any;
      else if (cost <= 0)
        b = next_.cost <= 0 ? top_ - next_.gain * mean_ : any;
      else if (next_.cost <= 0)
        b = none;
      else
        b = top_ - next_.gain * static_cast<double>(cost) / static_cast<double>(next_.cost) * mean_;
      bars_[static_cast<size_t>(cost + 2)] = b;
    }
    loosest_ = *std::max_element(std::begin(bars_), std::end(bars_));
  }
  void consider(step::kind what, size_t at, size_t with, int64_t cost, double new_max) {
    const step s{what, static_cast<int32_t>(at), static_cast<int32_t>(with), cost,
                 (top_ - new_max) / mean_};
    if (s.gain <= min_gain) return;
    if (within_one_ ? cost <= 1 && (next_.what == step::kind::none || s.gain > next_.gain)
                    : before(s, next_)) {
      next_ = s;
      set_bars();
    }
  }
  // The busiest GPU outside the marked sets, busiest first.
  [[nodiscard]] double busiest_unmarked(size_t skip) const {
    for (auto g : order_)
      if (in_e_[g] != stamp_e_ && in_x_[g] != stamp_x_ && g != skip) return load_[g];
    return 0;
  }

  // Swaps of a replica on the busiest GPU with a lighter one elsewhere (on the same node where the
  // layer keeps groups node-local), lightest GPUs first.
  void try_swaps(size_t busiest) {
    const auto num_gpus = order_.size(), per_gpu = static_cast<size_t>(geo_->per_gpu);
    const size_t first = busiest * per_gpu;
    // Cost parts per slot: whether its expert arrives as a new load, whether leaving unloads one.
    undo_here_.resize(per_gpu);
    undo_there_.resize(per_gpu);
    new_here_.resize(per_gpu);
    for (size_t i = 0; i < per_gpu; ++i) {
      const int32_t a = slots_[first + i];
      undo_here_[i] = on_gpu_[index(busiest, a)] == 1 && !had_[index(busiest, a)] ? 1 : 0;
    }
    for (size_t k = num_gpus; k-- > 1;) {
      const size_t gpu = order_[k];
      if (!expert_node_.empty() && geo_->node(gpu) != geo_->node(busiest)) continue;
      double floor = 0;  // the busiest GPU the swap leaves alone
      if (k != 1)
        floor = load_[order_[1]];
      else if (num_gpus > 2)
        floor = load_[order_[2]];
      if (std::max(floor, (top_ + load_[gpu]) / 2) >= loosest_) continue;
      const size_t there = gpu * per_gpu;
      for (size_t j = 0; j < per_gpu; ++j) {
        const int32_t b = slots_[there + j];
        // -1: already on the busiest GPU, no swap.
        new_here_[j] = on_gpu_[index(busiest, b)] != 0 ? -1 : (had_[index(busiest, b)] ? 0 : 1);
        undo_there_[j] = on_gpu_[index(gpu, b)] == 1 && !had_[index(gpu, b)] ? 1 : 0;
      }
      for (size_t i = 0; i < per_gpu; ++i) {
        const int32_t a = slots_[first + i];
        if (on_gpu_[index(gpu, a)] != 0) continue;
        const int64_t new_there = had_[index(gpu, a)] ? 0 : 1;
        const double la = slot_load_[first + i];
        for (size_t j = 0; j < per_gpu; ++j) {
          const double d = la - slot_load_[there + j];
          if (d <= 0 || new_here_[j] < 0) continue;
          const double new_max = std::max({top_ - d, load_[gpu] + d, floor});
          if (new_max >= loosest_) continue;
          const int64_t cost = new_there + new_here_[j] - undo_here_[i] - undo_there_[j];
          if (new_max < bar(cost)) consider(step::kind::swap, first + i, there + j, cost, new_max);
        }
      }
    }
  }

  // Another replica of expert e (on the busiest GPU) in a slot elsewhere whose expert x has one to
  // spare: e's replicas carry less, x's others more, and the slot's GPU trades one for the other.
  void try_more_replicas(size_t busiest, int32_t e) {
    const double we = weight(e), ce = count(e), de = we / ce - we / (ce + 1);
    const double busiest_after = top_ - de * on_gpu_[index(busiest, e)];
    if (busiest_after >= loosest_) return;
    // e's GPUs with their loads after, heaviest first.
    ++stamp_e_;
    e_gpus_.clear();
    for (auto t : holders_[static_cast<size_t>(e)]) {
      const size_t g = geo_->gpu(static_cast<size_t>(t));
      if (in_e_[g] != stamp_e_) {
        in_e_[g] = stamp_e_;
        new_load_[g] = load_[g];
        e_gpus_.push_back(g);
      }
      new_load_[g] -= de;
    }
    std::sort(e_gpus_.begin(), e_gpus_.end(), [&](size_t a, size_t b) {
      return new_load_[a] > new_load_[b] || (new_load_[a] == new_load_[b] && a < b);
    });
    for (size_t d = 0; d < donors_.size(); ++d) {
      const size_t s = donors_[d], g = geo_->gpu(s);
      const int32_t x = slots_[s];
      if (x == e || !may_hold(g, e)) continue;
      const double wx = weight(x), cx = count(x), dx = wx / (cx - 1) - wx / cx;
      const int64_t cost = cost_of(g, e, x);
      const double limit = bar(cost);
      const double g_after = load_[g] + we / (ce + 1) - wx / cx;
      // x's busiest other GPU (g's own copy leaves), with its load after.
      const auto& top2 = donor_top_[static_cast<size_t>(x)];
      const size_t h = top2.first.first == g ? top2.second.first : top2.first.first;
      const double x_bound =
          h == load_.size() ? 0.0 : (in_e_[h] == stamp_e_ ? new_load_[h] : load_[h]) + dx;
      if (busiest_after >= limit || g_after >= limit || x_bound >= limit) continue;
      // Exact: x's other GPUs, g, e's GPUs not among them, and the rest.
      ++stamp_x_;
      double new_max = g_after;
      for (auto t : holders_[static_cast<size_t>(x)]) {
        const size_t h = geo_->gpu(static_cast<size_t>(t));
        if (static_cast<size_t>(t) == s) continue;
        if (in_x_[h] != stamp_x_) {
          in_x_[h] = stamp_x_;
          x_load_[h] = in_e_[h] == stamp_e_ ? new_load_[h] : load_[h];
        }
        x_load_[h] += dx;
        if (h != g) new_max = std::max(new_max, x_load_[h]);
      }
      if (in_x_[g] == stamp_x_) new_max = std::max(new_max, g_after + (x_load_[g] - load_[g]));
      in_x_[g] = stamp_x_;
      for (auto h : e_gpus_)
        if (in_x_[h] != stamp_x_) {
          new_max = std::max(new_max, new_load_[h]);
          break;
        }
      new_max = std::max(new_max, busiest_unmarked(g));
      if (new_max < limit) consider(step::kind::repoint, s, static_cast<size_t>(e), cost, new_max);
    }
  }

  // A replica to spare on the busiest GPU (slot i, expert x) gives its slot to expert e.
  void try_repoint_here(size_t i, int32_t e) {
    const int32_t x = slots_[i];
    const size_t busiest = geo_->gpu(i);
    const int64_t cost = cost_of(busiest, e, x);
    const double limit = bar(cost);
    const double wx = weight(x), cx = count(x), dx = wx / (cx - 1) - wx / cx;
    const double we = weight(e), ce = count(e), de = we / ce - we / (ce + 1);
    const double busiest_after =
        top_ - wx / cx + we / (ce + 1) + dx * (on_gpu_[index(busiest, x)] - 1);
    if (busiest_after >= limit) return;
    ++stamp_e_;
    ++stamp_x_;
    double new_max = busiest_after;
    in_x_[busiest] = stamp_x_;
    for (auto t : holders_[static_cast<size_t>(e)]) {
      const size_t g = geo_->gpu(static_cast<size_t>(t));
      if (in_e_[g] != stamp_e_) {
        in_e_[g] = stamp_e_;
        new_load_[g] = load_[g];
      }
      new_load_[g] -= de;
    }
    for (auto t : holders_[static_cast<size_t>(x)]) {
      const size_t g = geo_->gpu(static_cast<size_t>(t));
      if (g == busiest) continue;
      if (in_e_[g] != stamp_e_) {
        in_e_[g] = stamp_e_;
        new_load_[g] = load_[g];
      }
      new_load_[g] += dx;
    }
    for (auto t : holders_[static_cast<size_t>(e)])
      new_max = std::max(new_max, new_load_[geo_->gpu(static_cast<size_t>(t))]);
    for (auto t : holders_[static_cast<size_t>(x)])
      if (geo_->gpu(static_cast<size_t>(t)) != busiest)
        new_max = std::max(new_max, new_load_[geo_->gpu(static_cast<size_t>(t))]);
    new_max = std::max(new_max, busiest_unmarked(busiest));
    if (new_max < limit) consider(step::kind::repoint, i, static_cast<size_t>(e), cost, new_max);
  }

  void find_next() {
    next_ = {};
    const auto num_gpus = static_cast<size_t>(geo_->num_gpus),
               per_gpu = static_cast<size_t>(geo_->per_gpu);
    if (mean_ <= 0 || num_gpus < 2 || steps_ >= 2 * geo_->num_slots) return;
    std::iota(order_.begin(), order_.end(), size_t{0});
    std::sort(order_.begin(), order_.end(), [&](size_t a, size_t b) {
      return load_[a] > load_[b] || (load_[a] == load_[b] && a < b);
    });
    const size_t busiest = order_[0];
    top_ = load_[busiest];
    set_bars();
    slot_load_.resize(slots_.size());
    for (size_t s = 0; s < slots_.size(); ++s) slot_load_[s] = per_replica(slots_[s]);
    const size_t first = busiest * per_gpu, last = first + per_gpu;
    try_swaps(busiest);
    // Donor slots (off the busiest GPU, their expert has a replica to spare), and for each donor
    // expert its two busiest GPUs.
    donors_.clear();
    for (size_t s = 0; s < slots_.size(); ++s)
      if (count_[static_cast<size_t>(slots_[s])] >= 2)
        donor_top_[static_cast<size_t>(slots_[s])] = {{num_gpus, 0.0}, {num_gpus, 0.0}};
    for (size_t s = 0; s < slots_.size(); ++s) {
      const int32_t x = slots_[s];
      if (count_[static_cast<size_t>(x)] < 2) continue;
      if (geo_->gpu(s) != busiest) donors_.push_back(s);
      auto& top2 = donor_top_[static_cast<size_t>(x)];
      const size_t g = geo_->gpu(s);
      if (g == top2.first.first || g == top2.second.first) continue;
      if (top2.first.first == num_gpus || load_[g] > top2.first.second) {
        top2.second = top2.first;
        top2.first = {g, load_[g]};
      } else if (top2.second.first == num_gpus || load_[g] > top2.second.second) {
        top2.second = {g, load_[g]};
      }
    }
    for (size_t i = first; i < last; ++i)
      if (std::find(slots_.begin() + static_cast<std::ptrdiff_t>(first),
                    slots_.begin() + static_cast<std::ptrdiff_t>(i),
                    slots_[i]) == slots_.begin() + static_cast<std::ptrdiff_t>(i))
        try_more_replicas(busiest, slots_[i]);
    // A replica to spare on the busiest GPU gives its slot to an expert of the next busiest GPUs.
    for (size_t i = first; i < last; ++i) {
      if (count_[static_cast<size_t>(slots_[i])] < 2) continue;
      for (size_t k = 1; k < std::min<size_t>(5, num_gpus); ++k)
        for (size_t j = order_[k] * per_gpu; j < (order_[k] + 1) * per_gpu; ++j)
          if (slots_[j] != slots_[i] && may_hold(busiest, slots_[j]))
            try_repoint_here(i, slots_[j]);
    }
  }

  const geometry* geo_;
  const std::vector<double>* w_;
  std::vector<int32_t> slots_;
  std::vector<int32_t> count_;                 // per expert
  std::vector<double> load_;                   // per GPU
  std::vector<int32_t> on_gpu_;                // [gpu][expert]: replicas now
  std::vector<char> had_;                      // [gpu][expert]: in the previous layout
  std::vector<std::vector<int32_t>> holders_;  // per expert, its slots
  std::vector<int64_t> expert_node_;           // node-local layers: each expert's node; else empty
  std::vector<char> touched_;                  // per GPU
  double mean_ = 0;
  int64_t moves_ = 0;
  int64_t steps_ = 0;
  step next_;
  bool within_one_ = false;  // find_next looks for the most gain at one load or less
  // Scratch of find_next.
  double top_ = 0;                                          // the busiest GPU's load
  std::vector<size_t> order_;                               // GPUs, busiest first
  double bars_[5] = {};                                     // bar() per cost -2..2
  double loosest_ = 0;                                      // the highest of them
  std::vector<double> slot_load_;                           // per slot, its replica's load
  std::vector<int64_t> undo_here_, undo_there_, new_here_;  // try_swaps, per slot of a GPU
  std::vector<size_t> donors_;  // slots whose expert has a replica to spare
  // Per donor expert, its two busiest GPUs (GPU, load); GPU num_gpus: none.
  std::vector<std::pair<std::pair<size_t, double>, std::pair<size_t, double>>> donor_top_;
  std::vector<double> new_load_;  // per GPU, valid where in_e_ == stamp_e_
  std::vector<double> x_load_;    // per GPU, valid where in_x_ == stamp_x_
  std::vector<uint32_t> in_e_, in_x_;
  uint32_t stamp_e_ = 0, stamp_x_ = 0;
  std::vector<size_t> e_gpus_;
};

// The aligned plan_experts layers, planned one layer at a time as they are needed (a layer's plan
// depends on its loads alone).
struct aligned_layers {
  aligned_layers(const plan_transition_request& r, const geometry& geo)
      : r(&r),
        geo(&geo),
        row(r.plan.load.size()),
        hierarchical(r.plan.load.size()),
        moves(r.plan.load.size(), -1),
        ratio(r.plan.load.size()) {}

  caf::error plan(size_t l) {
    if (moves[l] >= 0) return {};
    expert_plan_request one;
    one.load = {r->plan.load[l]};
    one.num_slots = r->plan.num_slots;
    one.num_groups = r->plan.num_groups;
    one.num_nodes = r->plan.num_nodes;
    one.num_gpus = r->plan.num_gpus;
    one.hierarchical = r->plan.hierarchical;
    one.hierarchy_tolerance = r->plan.hierarchy_tolerance;
    auto p = plan_experts(one);
    if (!p) return p.error();
    hierarchical[l] = p->hierarchical.front();
    row[l] = align_layer(*geo, r->previous[l], p->phy2log.front(), hierarchical[l]);
    moves[l] = moves_between(r->previous[l], row[l], static_cast<size_t>(geo->per_gpu));
    ratio[l] = gpu_ratio(*geo, r->plan.load[l], row[l]);
    return {};
  }

  const plan_transition_request* r;
  const geometry* geo;
  std::vector<std::vector<int32_t>> row;
  std::vector<bool> hierarchical;
  std::vector<int64_t> moves;  // -1: not planned yet
  std::vector<double> ratio;
};

// The layers to switch to their aligned plan: the most gain within `capacity` moves (exact 0/1
// knapsack; gains and costs per layer).
std::vector<size_t> best_switches(const std::vector<size_t>& layers,
                                  const std::vector<int64_t>& cost, const std::vector<double>& gain,
                                  int64_t capacity) {
  const int64_t total = std::accumulate(cost.begin(), cost.end(), int64_t{0});
  const auto cap = static_cast<size_t>(std::min(capacity, total));
  std::vector<double> best(cap + 1, 0.0);
  std::vector<char> taken(layers.size() * (cap + 1), 0);
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto c = static_cast<size_t>(cost[i]);
    for (size_t room = cap + 1; room-- > c;) {
      if (best[room - c] + gain[i] > best[room]) {
        best[room] = best[room - c] + gain[i];
        taken[i * (cap + 1) + room] = 1;
      }
    }
  }
  std::vector<size_t> out;
  size_t room = cap;
  for (size_t i = layers.size(); i-- > 0;) {
    if (taken[i * (cap + 1) + room]) {
      out.push_back(layers[i]);
      room -= static_cast<size_t>(cost[i]);
    }
  }
  return out;
}

caf::expected<plan_transition> finish(const plan_transition_request& r, const geometry& geo,
                                      expert_plan plan) {
  plan.logcnt.clear();
  for (const auto& row : plan.phy2log) plan.logcnt.push_back(replica_counts(geo, row));
  auto moves = count_moves(r.previous, plan.phy2log, r.plan.num_gpus);
  if (!moves) return moves.error();
  plan_transition out;
  out.plan = std::move(plan);
  out.layer_moves = std::move(*moves);
  out.moves = std::accumulate(out.layer_moves.begin(), out.layer_moves.end(), int64_t{0});
  MOE_ASSERT(r.max_moves < 0 || out.moves <= r.max_moves);
  return out;
}

caf::expected<plan_transition> within_limit(const plan_transition_request& r, const geometry& geo) {
  const size_t num_layers = r.plan.load.size();
  const int64_t budget = r.max_moves;
  std::vector<layer_search> search;
  search.reserve(num_layers);
  for (size_t l = 0; l < num_layers; ++l) search.emplace_back(geo, r.plan.load[l], r.previous[l]);
  // The longest prefix of the sequence of steps that fits, best gain per load first.
  int64_t spent = 0;
  bool complete = false;
  for (;;) {
    size_t best = num_layers;
    for (size_t l = 0; l < num_layers; ++l)
      if (before(search[l].next(), best == num_layers ? step{} : search[best].next())) best = l;
    if (best == num_layers) {
      complete = true;
      break;
    }
    const step s = search[best].next();
    if (spent + s.cost <= budget) {
      search[best].take(s);
      spent += s.cost;
      continue;
    }
    // One load left and the next step needs two: the step of most gain that loads one instead.
    // It gains at most half as much as the step it replaces, so one more load never does worse.
    if (budget - spent == 1) {
      size_t fill = num_layers;
      step f;
      for (size_t l = 0; l < num_layers; ++l) {
        const step c = search[l].most_within_one();
        if (c.what != step::kind::none && (fill == num_layers || c.gain > f.gain)) {
          fill = l;
          f = c;
        }
      }
      if (fill < num_layers) {
        search[fill].take(f);
        spent += f.cost;
      }
    }
    break;
  }
  aligned_layers aligned(r, geo);
  std::vector<char> use_aligned(num_layers, 0);
  if (complete) {
    // Every step taken: the rest of the budget switches the layers whose aligned plan balances
    // better, most gain first.
    int64_t capacity = budget - spent;
    std::vector<size_t> layers;
    std::vector<int64_t> cost;
    std::vector<double> gain;
    for (size_t l = 0; l < num_layers; ++l) {
      if (auto err = aligned.plan(l)) return err;
      const double g = search[l].ratio() - aligned.ratio[l];
      if (g <= min_gain) continue;
      const int64_t c = aligned.moves[l] - search[l].moves();
      if (c <= 0) {
        use_aligned[l] = 1;
        capacity -= c;
      } else {
        layers.push_back(l);
        cost.push_back(c);
        gain.push_back(g);
      }
    }
    for (auto l : best_switches(layers, cost, gain, capacity)) use_aligned[l] = 1;
  }
  // The aligned unlimited plan, where it fits and balances at least as well.
  int64_t aligned_moves = 0;
  for (size_t l = 0; l < num_layers && aligned_moves <= budget; ++l) {
    if (auto err = aligned.plan(l)) return err;
    aligned_moves += aligned.moves[l];
  }
  if (aligned_moves <= budget) {
    double mixed = 0, all_aligned = 0;
    for (size_t l = 0; l < num_layers; ++l) {
      mixed += use_aligned[l] ? aligned.ratio[l] : search[l].ratio();
      all_aligned += aligned.ratio[l];
    }
    if (all_aligned <= mixed + 1e-12) std::fill(use_aligned.begin(), use_aligned.end(), 1);
  }
  expert_plan plan;
  for (size_t l = 0; l < num_layers; ++l) {
    if (use_aligned[l]) {
      plan.phy2log.push_back(aligned.row[l]);
      plan.hierarchical.push_back(aligned.hierarchical[l]);
    } else {
      plan.phy2log.push_back(search[l].row());
      plan.hierarchical.push_back(groups_node_local(geo, plan.phy2log.back()));
      MOE_ASSERT(search[l].moves() == moves_between(r.previous[l], plan.phy2log.back(),
                                                    static_cast<size_t>(geo.per_gpu)));
    }
  }
  return finish(r, geo, std::move(plan));
}

}  // namespace

caf::expected<std::vector<int64_t>> count_moves(const std::vector<std::vector<int32_t>>& previous,
                                                const std::vector<std::vector<int32_t>>& next,
                                                int64_t num_gpus) {
  auto fail = [](const std::string& why) {
    return make_error(scheduler_errc::bad_assignment, "count moves: " + why);
  };
  if (num_gpus < 1) return fail("num_gpus must be >= 1");
  if (previous.size() != next.size())
    return fail("previous has " + std::to_string(previous.size()) + " layers, next has " +
                std::to_string(next.size()));
  std::vector<int64_t> out;
  out.reserve(next.size());
  for (size_t l = 0; l < next.size(); ++l) {
    const auto where = "layer " + std::to_string(l) + ": ";
    if (previous[l].size() != next[l].size())
      return fail(where + "previous has " + std::to_string(previous[l].size()) +
                  " slots, next has " + std::to_string(next[l].size()));
    if (next[l].size() % static_cast<size_t>(num_gpus) != 0)
      return fail(where + std::to_string(next[l].size()) + " slots do not divide among " +
                  std::to_string(num_gpus) + " GPUs");
    const auto negative = [](int32_t e) { return e < 0; };
    if (std::any_of(previous[l].begin(), previous[l].end(), negative) ||
        std::any_of(next[l].begin(), next[l].end(), negative))
      return fail(where + "negative expert id");
    out.push_back(
        moves_between(previous[l], next[l], next[l].size() / static_cast<size_t>(num_gpus)));
  }
  return out;
}

caf::expected<plan_transition> plan_transition_within_budget(const plan_transition_request& r) {
  if (auto err = check(r)) return err;
  const auto geo = make_geometry(r.plan);
  if (r.max_moves < 0) {
    auto plan = plan_experts(r.plan);
    if (!plan) return plan.error();
    for (size_t l = 0; l < plan->phy2log.size(); ++l)
      plan->phy2log[l] = align_layer(geo, r.previous[l], plan->phy2log[l], plan->hierarchical[l]);
    return finish(r, geo, std::move(*plan));
  }
  if (r.max_moves == 0) {
    expert_plan plan;
    plan.phy2log = r.previous;
    for (const auto& row : plan.phy2log) plan.hierarchical.push_back(groups_node_local(geo, row));
    return finish(r, geo, std::move(plan));
  }
  return within_limit(r, geo);
}

}  // namespace moe::scheduler
