#include "scheduler/placement.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <numeric>
#include <tuple>

#include <nlohmann/json.hpp>

#include "base/assert.hpp"

namespace moe::scheduler {

using runtime::format_bytes;
using runtime::format_id_ranges;

std::string device_ref::to_string() const {
  return node + (gpu ? "/gpu" : "/cpu") + std::to_string(index);
}

namespace {

caf::error assignment_error(const runtime::cluster_config& c, int line, const std::string& field,
                            const std::string& what) {
  const std::string at = line > 0 ? c.source + ":" + std::to_string(line) : c.source;
  return make_error(scheduler_errc::bad_assignment, at + ": " + field + ": " + what);
}

caf::expected<std::vector<std::vector<int64_t>>> check_explicit_lists(
    const runtime::cluster_config& c, int64_t num_experts) {
  const auto& groups = c.expert_groups;
  std::vector<int> copies(static_cast<size_t>(num_experts), 0);
  int64_t num_slots = 0;
  for (size_t g = 0; g < groups.experts.size(); ++g) {
    const int line = g < groups.experts_lines.size() ? groups.experts_lines[g] : groups.line;
    for (int64_t e : groups.experts[g]) {
      if (e < 0 || e >= num_experts) {
        return assignment_error(c, line, "expert_groups.experts[" + std::to_string(g) + "]",
                                "expert " + std::to_string(e) + " is out of range (the model has " +
                                    std::to_string(num_experts) + " routed experts, 0.." +
                                    std::to_string(num_experts - 1) + ")");
      }
      ++copies[static_cast<size_t>(e)];
      ++num_slots;
    }
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (copies[static_cast<size_t>(e)] == 0) {
      return assignment_error(c, groups.line, "expert_groups.experts",
                              "expert " + std::to_string(e) +
                                  " is in no group (every expert needs at least one copy)");
    }
  }
  const int64_t num_replicas = num_slots - num_experts;
  if (c.redundant_expert_slots != 0 && c.redundant_expert_slots != num_replicas) {
    return assignment_error(c, groups.line, "redundant_expert_slots",
                            std::to_string(c.redundant_expert_slots) + " but the explicit lists hold " +
                                std::to_string(num_replicas) +
                                " replicas (leave it out, or make it match)");
  }
  return groups.experts;
}

}  // namespace

caf::expected<std::vector<std::vector<int64_t>>> assign_experts(const runtime::cluster_config& c,
                                                                int64_t num_experts) {
  if (num_experts <= 0) {
    return assignment_error(c, c.model.line, "model", "the model has no routed experts to place");
  }
  if (!c.expert_groups.experts.empty()) return check_explicit_lists(c, num_experts);

  const int64_t n = c.expert_groups.count;
  if (n > num_experts) {
    return assignment_error(c, c.expert_groups.line, "expert_groups",
                            std::to_string(n) + " groups but the model has only " +
                                std::to_string(num_experts) + " routed experts");
  }
  std::vector<std::vector<int64_t>> groups(static_cast<size_t>(n));
  int64_t next = 0;
  for (int64_t g = 0; g < n; ++g) {
    const int64_t size = num_experts / n + (g < num_experts % n ? 1 : 0);
    for (int64_t i = 0; i < size; ++i) groups[static_cast<size_t>(g)].push_back(next++);
  }

  const int64_t r = c.redundant_expert_slots;
  if (r > num_experts * (n - 1)) {
    // Round-robin gives each expert at most ceil(r / E) replicas; one copy per group.
    return assignment_error(c, c.expert_groups.line, "redundant_expert_slots",
                            std::to_string(r) + " replicas but " + std::to_string(n) +
                                " groups of " + std::to_string(num_experts) +
                                " experts hold at most " + std::to_string(num_experts * (n - 1)) +
                                " (a group holds one copy of an expert at most)");
  }
  // Sizes first: a group of more slots than the others would be the busiest under even load,
  // and the rebalancer needs equal groups. Which experts get the replicas is a guess until the
  // routers have measured the load (actors/rebalancer.hpp re-chooses them).
  std::vector<int64_t> copies(static_cast<size_t>(num_experts), 1);
  for (int64_t k = 0; k < r; ++k) {
    size_t best = 0;
    for (size_t g = 1; g < groups.size(); ++g)
      if (groups[g].size() < groups[best].size()) best = g;
    auto& list = groups[best];
    int64_t pick = -1;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (std::binary_search(list.begin(), list.end(), e)) continue;
      if (pick < 0 || copies[static_cast<size_t>(e)] < copies[static_cast<size_t>(pick)]) pick = e;
    }
    MOE_ASSERT(pick >= 0);  // the smallest group lacks some expert, by the bound above
    ++copies[static_cast<size_t>(pick)];
    list.insert(std::upper_bound(list.begin(), list.end(), pick), pick);
  }
  return groups;
}

int64_t kv_cache_tokens_per_shard(const runtime::cluster_config& c, const model::model_config& model,
                                  const placement_options& options) {
  if (options.kv_cache_tokens) return *options.kv_cache_tokens;
  const int64_t requests = (c.batching.max_running_requests + c.attention_shards - 1) / c.attention_shards;
  return requests * std::min(model.max_position_embeddings, c.batching.max_new_tokens_limit);
}

namespace {

struct device_state {
  device_ref ref;
  uint64_t capacity = 0;
  uint64_t used = 0;
  int num_attention = 0;
  int num_groups = 0;
  [[nodiscard]] uint64_t free_bytes() const noexcept { return capacity - used; }
  [[nodiscard]] int num_actors() const noexcept { return num_attention + num_groups; }
};

struct actor_demand {
  bool attention = false;
  int index = 0;
  uint64_t bytes = 0;
  std::string detail;  ///< What the bytes are made of, for messages.

  [[nodiscard]] std::string label() const {
    return (attention ? "attention shard " : "expert group ") + std::to_string(index);
  }
};

std::vector<device_state> make_devices(const runtime::cluster_config& c) {
  std::vector<device_state> devices;
  for (const auto& n : c.nodes) {
    for (int64_t g = 0; g < n.gpus; ++g) {
      devices.push_back({{n.name, true, static_cast<int>(g)}, n.gpu_memory_bytes});
    }
    for (int64_t s = 0; s < n.cpu_slots; ++s) {
      devices.push_back({{n.name, false, static_cast<int>(s)},
                         n.memory_bytes / static_cast<uint64_t>(n.cpu_slots)});
    }
  }
  return devices;
}

/// The device chosen for an actor among `devices`, or -1 when none has room.
using device_picker = std::function<int(const std::vector<device_state>&, const actor_demand&)>;

struct attempt {
  std::vector<int> device_of;  ///< Per actor (the order of `demands`).
  std::vector<device_state> devices;
  std::optional<size_t> failed;  ///< The actor that did not fit.
};

attempt run_attempt(std::vector<device_state> devices, const std::vector<actor_demand>& demands,
                    const std::vector<size_t>& order, const device_picker& pick) {
  attempt a{std::vector<int>(demands.size(), -1), std::move(devices), std::nullopt};
  for (size_t i : order) {
    const int d = pick(a.devices, demands[i]);
    if (d < 0) {
      a.failed = i;
      return a;
    }
    auto& dev = a.devices[static_cast<size_t>(d)];
    MOE_ASSERT(dev.free_bytes() >= demands[i].bytes);
    dev.used += demands[i].bytes;
    (demands[i].attention ? dev.num_attention : dev.num_groups) += 1;
    a.device_of[i] = d;
  }
  return a;
}

// Among devices with room, the smallest key wins; ties go to the first device.
template <class Key>
int pick_min(const std::vector<device_state>& devices, const actor_demand& actor, Key key) {
  int best = -1;
  for (size_t d = 0; d < devices.size(); ++d) {
    if (devices[d].free_bytes() < actor.bytes) continue;
    if (best < 0 || key(devices[d]) < key(devices[static_cast<size_t>(best)])) best = static_cast<int>(d);
  }
  return best;
}

int pick_balanced(const std::vector<device_state>& devices, const actor_demand& actor) {
  return pick_min(devices, actor, [&](const device_state& d) {
    return std::make_tuple(actor.attention ? d.num_attention : d.num_groups, d.num_actors(), d.used);
  });
}

int pick_worst_fit(const std::vector<device_state>& devices, const actor_demand& actor) {
  // Most free bytes first: the key negates them.
  return pick_min(devices, actor, [](const device_state& d) { return ~d.free_bytes(); });
}

int pick_best_fit(const std::vector<device_state>& devices, const actor_demand& actor) {
  return pick_min(devices, actor, [](const device_state& d) { return d.free_bytes(); });
}

caf::error infeasible(std::string text) {
  return make_error(scheduler_errc::infeasible, "infeasible: " + std::move(text));
}

// Checks that need no packing: an actor larger than every device, or more bytes than the cluster.
caf::error check_capacity(const std::vector<device_state>& devices, const std::vector<actor_demand>& demands) {
  if (devices.empty()) return infeasible("the cluster has no devices");
  const auto largest = std::max_element(devices.begin(), devices.end(), [](const auto& a, const auto& b) {
    return a.capacity < b.capacity;  // the first of equals
  });
  for (const auto& a : demands) {
    if (a.bytes > largest->capacity) {
      return infeasible(a.label() + " needs " + format_bytes(a.bytes) + " (" + a.detail +
                        ") but the largest device (" + largest->ref.to_string() + ") holds " +
                        format_bytes(largest->capacity));
    }
  }
  const uint64_t need = std::accumulate(demands.begin(), demands.end(), uint64_t{0},
                                        [](uint64_t s, const actor_demand& a) { return s + a.bytes; });
  const uint64_t have = std::accumulate(devices.begin(), devices.end(), uint64_t{0},
                                        [](uint64_t s, const device_state& d) { return s + d.capacity; });
  if (need > have) {
    return infeasible("the actors need " + format_bytes(need) + " in all but the " +
                      std::to_string(devices.size()) + " devices hold " + format_bytes(have));
  }
  return {};
}

}  // namespace

caf::expected<placement> plan_placement(const runtime::cluster_config& c, const model::model_config& model,
                                        const placement_options& options) {
  auto groups = assign_experts(c, model.n_routed_experts);
  if (!groups) return groups.error();
  const model_memory mem = model_memory_estimate(model, options.bytes_per_param, options.include_mtp);
  const int64_t kv_tokens = kv_cache_tokens_per_shard(c, model, options);
  const uint64_t kv_bytes = static_cast<uint64_t>(kv_tokens) * mem.kv_cache_bytes_per_token;

  std::vector<actor_demand> demands;
  for (int64_t s = 0; s < c.attention_shards; ++s) {
    demands.push_back({true, static_cast<int>(s), mem.attention_bytes + mem.router_bytes + kv_bytes,
                       "weights " + format_bytes(mem.attention_bytes) + " + router " +
                           format_bytes(mem.router_bytes) + " + KV cache " + format_bytes(kv_bytes) +
                           " for " + std::to_string(kv_tokens) + " tokens"});
  }
  for (size_t g = 0; g < groups->size(); ++g) {
    const auto num = static_cast<uint64_t>((*groups)[g].size());
    const uint64_t shared = g == 0 ? mem.shared_expert_bytes : 0;
    std::string detail = std::to_string(num) + " experts of " + format_bytes(mem.per_expert_bytes);
    if (g == 0 && shared > 0) detail += " + shared experts " + format_bytes(shared);
    demands.push_back({false, static_cast<int>(g), num * mem.per_expert_bytes + shared, std::move(detail)});
  }

  const std::vector<device_state> devices = make_devices(c);
  if (auto err = check_capacity(devices, demands)) return err;

  // Balanced pass: attention shards in order, then expert groups largest first.
  std::vector<size_t> balanced_order(demands.size());
  std::iota(balanced_order.begin(), balanced_order.end(), size_t{0});
  std::stable_sort(balanced_order.begin() + c.attention_shards, balanced_order.end(),
                   [&](size_t a, size_t b) { return demands[a].bytes > demands[b].bytes; });
  // Fallback passes: every actor largest first (attention before groups on ties: stable).
  std::vector<size_t> decreasing_order(demands.size());
  std::iota(decreasing_order.begin(), decreasing_order.end(), size_t{0});
  std::stable_sort(decreasing_order.begin(), decreasing_order.end(),
                   [&](size_t a, size_t b) { return demands[a].bytes > demands[b].bytes; });

  attempt result = run_attempt(devices, demands, balanced_order, pick_balanced);
  if (result.failed) {
    attempt worst = run_attempt(devices, demands, decreasing_order, pick_worst_fit);
    attempt best = worst.failed ? run_attempt(devices, demands, decreasing_order, pick_best_fit) : worst;
    if (best.failed) {
      // Report the worst-fit pass: at its failure the free memory is spread the most evenly.
      const actor_demand& a = demands[*worst.failed];
      const auto roomiest = std::min_element(worst.devices.begin(), worst.devices.end(),
                                             [](const auto& x, const auto& y) {
                                               return x.free_bytes() > y.free_bytes();
                                             });
      return infeasible(a.label() + " needs " + format_bytes(a.bytes) + " (" + a.detail +
                        ") but the largest free device (" + roomiest->ref.to_string() + ") has " +
                        format_bytes(roomiest->free_bytes()) + " free of " +
                        format_bytes(roomiest->capacity) + " once the larger actors are placed");
    }
    result = std::move(best);
  }

  placement p;
  p.num_logical_experts = model.n_routed_experts;
  for (size_t i = 0; i < demands.size(); ++i) {
    const device_ref& dev = result.devices[static_cast<size_t>(result.device_of[i])].ref;
    if (demands[i].attention) {
      p.attention.push_back({demands[i].index, dev, demands[i].bytes});
    } else {
      const auto g = static_cast<size_t>(demands[i].index);
      p.expert_groups.push_back({demands[i].index, dev, (*groups)[g], g == 0, demands[i].bytes});
    }
  }
  for (const auto& d : result.devices) p.devices.push_back({d.ref, d.capacity, d.used});
  return p;
}

// ---- JSON ----

namespace {

nlohmann::json device_json(const device_ref& d) {
  return {{"name", d.to_string()}, {"node", d.node}, {"kind", d.gpu ? "gpu" : "cpu"}, {"index", d.index}};
}

device_ref device_from_json(const nlohmann::json& j) {
  const std::string kind = j.at("kind").get<std::string>();
  if (kind != "gpu" && kind != "cpu") throw std::invalid_argument("device kind '" + kind + "'");
  return {j.at("node").get<std::string>(), kind == "gpu", j.at("index").get<int>()};
}

}  // namespace

nlohmann::json to_json(const placement& p) {
  nlohmann::json attention = nlohmann::json::array();
  for (const auto& a : p.attention) {
    attention.push_back({{"shard", a.shard},
                         {"device", device_json(a.device)},
                         {"router", "co-located"},
                         {"memory_bytes", a.memory_bytes}});
  }
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& g : p.expert_groups) {
    groups.push_back({{"group", g.group},
                      {"device", device_json(g.device)},
                      {"experts", g.experts},
                      {"holds_shared_experts", g.holds_shared_experts},
                      {"memory_bytes", g.memory_bytes}});
  }
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& d : p.devices) {
    devices.push_back({{"device", device_json(d.device)},
                       {"capacity_bytes", d.capacity_bytes},
                       {"used_bytes", d.used_bytes}});
  }
  return {{"version", p.version},
          {"num_logical_experts", p.num_logical_experts},
          {"attention", std::move(attention)},
          {"expert_groups", std::move(groups)},
          {"devices", std::move(devices)}};
}

caf::expected<placement> placement_from_json(const nlohmann::json& j) {
  try {
    placement p;
    p.version = j.at("version").get<uint32_t>();
    p.num_logical_experts = j.at("num_logical_experts").get<int64_t>();
    for (const auto& a : j.at("attention")) {
      p.attention.push_back({a.at("shard").get<int>(), device_from_json(a.at("device")),
                             a.at("memory_bytes").get<uint64_t>()});
    }
    for (const auto& g : j.at("expert_groups")) {
      p.expert_groups.push_back({g.at("group").get<int>(), device_from_json(g.at("device")),
                                 g.at("experts").get<std::vector<int64_t>>(),
                                 g.at("holds_shared_experts").get<bool>(), g.at("memory_bytes").get<uint64_t>()});
    }
    for (const auto& d : j.at("devices")) {
      p.devices.push_back({device_from_json(d.at("device")), d.at("capacity_bytes").get<uint64_t>(),
                           d.at("used_bytes").get<uint64_t>()});
    }
    return p;
  } catch (const std::exception& e) {
    return make_error(scheduler_errc::bad_placement, std::string("placement JSON: ") + e.what());
  }
}

// ---- table ----

namespace {

std::string render_rows(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& r : rows) {
    width.resize(std::max(width.size(), r.size()), 0);
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

}  // namespace

std::string render_table(const placement& p) {
  size_t num_slots = 0;
  for (const auto& g : p.expert_groups) num_slots += g.experts.size();
  std::string out = "placement v" + std::to_string(p.version) + ": " + std::to_string(p.attention.size()) +
                    " attention shard(s), " + std::to_string(p.expert_groups.size()) + " expert group(s), " +
                    std::to_string(p.num_logical_experts) + " logical experts in " +
                    std::to_string(num_slots) + " slots\n\n";

  std::vector<std::vector<std::string>> actors = {{"ACTOR", "DEVICE", "MEMORY", "HOLDS"}};
  for (const auto& a : p.attention) {
    actors.push_back({"attention " + std::to_string(a.shard), a.device.to_string(), format_bytes(a.memory_bytes),
                      "attention + router " + std::to_string(a.shard) + " + KV cache"});
  }
  for (const auto& g : p.expert_groups) {
    std::string holds = "experts " + format_id_ranges(g.experts) + " (" + std::to_string(g.experts.size()) + ")";
    if (g.holds_shared_experts) holds += " + shared";
    actors.push_back({"expert group " + std::to_string(g.group), g.device.to_string(),
                      format_bytes(g.memory_bytes), std::move(holds)});
  }
  out += render_rows(actors) + "\n";

  std::vector<std::vector<std::string>> devices = {{"DEVICE", "USED", "CAPACITY", "USE"}};
  for (const auto& d : p.devices) {
    char pct[16];
    std::snprintf(pct, sizeof pct, "%.1f%%",
                  d.capacity_bytes ? 100.0 * static_cast<double>(d.used_bytes) / static_cast<double>(d.capacity_bytes)
                                   : 0.0);
    devices.push_back({d.device.to_string(), format_bytes(d.used_bytes), format_bytes(d.capacity_bytes), pct});
  }
  out += render_rows(devices);
  return out;
}

}  // namespace moe::scheduler
