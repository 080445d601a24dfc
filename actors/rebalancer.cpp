#include "actors/rebalancer.hpp"

#include <caf/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>

#include "protocol/load_report_codec.hpp"
#include "scheduler/expert_plan.hpp"
#include "scheduler/failover_plan.hpp"
#include "scheduler/plan_transition.hpp"

namespace moe::actors {

const char* to_string(rebalance_errc e) noexcept {
  switch (e) {
    case rebalance_errc::busy: return "busy";
    case rebalance_errc::no_load: return "no_load";
    case rebalance_errc::unsupported: return "unsupported";
    case rebalance_errc::failed: return "failed";
  }
  return "unknown";
}

caf::error make_error(rebalance_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("rebalance"),
                    caf::make_message(std::move(text))};
}

namespace {

using clock_type = std::chrono::steady_clock;
using rebalance_tick_atom = caf::atom_constant<caf::atom("rebal_tick")>;
using stats_tick_atom = caf::atom_constant<caf::atom("stats_tick")>;

// The metrics of docs/metrics.md "Expert load balancing"; the families live in the registry,
// the series pointers here.
class rebalancer_metrics {
 public:
  rebalancer_metrics(prometheus::Registry& r, const std::vector<int64_t>& layers, int64_t num_experts,
                     size_t num_groups)
      : balance_(prometheus::BuildGauge()
                     .Name("moe_expert_balance_ratio")
                     .Help("Per MoE layer: max / mean expert-group load over the routers' last load window (1: even)")
                     .Register(r)),
        replicas_(prometheus::BuildGauge()
                      .Name("moe_expert_replicas")
                      .Help("Replicas of each logical expert in the served placement, per MoE layer")
                      .Register(r)),
        group_rows_(prometheus::BuildGauge()
                        .Name("moe_expert_group_window_rows")
                        .Help("Rows each expert group served per MoE layer over the routers' last load window")
                        .Register(r)),
        replica_rows_(prometheus::BuildGauge()
                          .Name("moe_expert_replica_window_rows")
                          .Help("Rows each replica (expert group, logical expert) served per MoE layer over the "
                                "routers' last load window")
                          .Register(r)),
        rebalances_(prometheus::BuildCounter()
                        .Name("moe_rebalances_total")
                        .Help("Expert rebalances by outcome (moved, unchanged, failed)")
                        .Register(r)),
        moved_(rebalances_.Add({{"outcome", "moved"}})),
        unchanged_(rebalances_.Add({{"outcome", "unchanged"}})),
        failed_(rebalances_.Add({{"outcome", "failed"}})),
        duration_(prometheus::BuildHistogram()
                      .Name("moe_rebalance_duration_seconds")
                      .Help("From the load reports to the commit of one rebalance that moved replicas")
                      .Register(r)
                      .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                                       30, 60, 120, 300})),
        bytes_moved_(prometheus::BuildCounter()
                         .Name("moe_rebalance_bytes_moved_total")
                         .Help("Weight bytes expert groups loaded for new replicas")
                         .Register(r)
                         .Add({})),
        replicas_moved_(prometheus::BuildCounter()
                            .Name("moe_rebalance_replicas_moved_total")
                            .Help("(layer, expert) replicas expert groups loaded")
                            .Register(r)
                            .Add({})),
        version_(prometheus::BuildGauge()
                     .Name("moe_placement_version")
                     .Help("The expert placement version the routers serve")
                     .Register(r)
                     .Add({})) {
    for (auto l : layers) {
      const auto ls = std::to_string(l);
      balance_series_.push_back(&balance_.Add({{"layer", ls}}));
      std::vector<prometheus::Gauge*> per_expert;
      for (int64_t e = 0; e < num_experts; ++e)
        per_expert.push_back(&replicas_.Add({{"layer", ls}, {"expert", std::to_string(e)}}));
      replica_series_.push_back(std::move(per_expert));
      std::vector<prometheus::Gauge*> per_group;
      for (size_t g = 0; g < num_groups; ++g)
        per_group.push_back(&group_rows_.Add({{"layer", ls}, {"group", std::to_string(g)}}));
      group_series_.push_back(std::move(per_group));
    }
  }

  void set_layout(const router_layout& l) {
    version_.Set(l.version);
    // Replicas that moved away leave no stale series behind.
    for (auto& layer : replica_series_by_slot_)
      for (auto* g : layer) replica_rows_.Remove(g);
    replica_series_by_slot_.clear();
    for (size_t i = 0; i < l.experts.size(); ++i) {
      std::vector<prometheus::Gauge*> slots;
      for (size_t g = 0; g < l.experts[i].size(); ++g)
        for (auto e : l.experts[i][g])
          slots.push_back(&replica_rows_.Add(
              {{"layer", std::to_string(l.layers[i])}, {"group", std::to_string(g)}, {"expert", std::to_string(e)}}));
      replica_series_by_slot_.push_back(std::move(slots));
    }
    for (size_t i = 0; i < l.experts.size() && i < replica_series_.size(); ++i) {
      std::vector<int> count(replica_series_[i].size(), 0);
      for (const auto& group : l.experts[i])
        for (auto e : group) ++count[static_cast<size_t>(e)];
      for (size_t e = 0; e < count.size(); ++e) replica_series_[i][e]->Set(count[e]);
    }
  }
  /// Per layer entry: the ratio (nullopt: nothing counted), each group's rows and each slot's.
  void set_window(const std::vector<std::optional<double>>& ratio, const std::vector<std::vector<double>>& rows,
                  const std::vector<std::vector<double>>& slot_rows) {
    for (size_t i = 0; i < ratio.size() && i < balance_series_.size(); ++i) {
      if (ratio[i]) balance_series_[i]->Set(*ratio[i]);
      for (size_t g = 0; g < rows[i].size() && g < group_series_[i].size(); ++g) group_series_[i][g]->Set(rows[i][g]);
      if (i >= replica_series_by_slot_.size()) continue;
      for (size_t k = 0; k < slot_rows[i].size() && k < replica_series_by_slot_[i].size(); ++k)
        replica_series_by_slot_[i][k]->Set(slot_rows[i][k]);
    }
  }
  void outcome(const rebalance_report& r) {
    if (!r.changed) {
      unchanged_.Increment();
      return;
    }
    moved_.Increment();
    duration_.Observe(r.duration_seconds);
    bytes_moved_.Increment(static_cast<double>(r.bytes_moved));
    replicas_moved_.Increment(static_cast<double>(r.replicas_moved));
  }
  void failed() { failed_.Increment(); }

 private:
  prometheus::Family<prometheus::Gauge>& balance_;
  prometheus::Family<prometheus::Gauge>& replicas_;
  prometheus::Family<prometheus::Gauge>& group_rows_;
  prometheus::Family<prometheus::Gauge>& replica_rows_;
  prometheus::Family<prometheus::Counter>& rebalances_;
  prometheus::Counter& moved_;
  prometheus::Counter& unchanged_;
  prometheus::Counter& failed_;
  prometheus::Histogram& duration_;
  prometheus::Counter& bytes_moved_;
  prometheus::Counter& replicas_moved_;
  prometheus::Gauge& version_;
  std::vector<prometheus::Gauge*> balance_series_;
  std::vector<std::vector<prometheus::Gauge*>> replica_series_;
  std::vector<std::vector<prometheus::Gauge*>> group_series_;
  std::vector<std::vector<prometheus::Gauge*>> replica_series_by_slot_;  // [layer entry][slot] of the served layout
};

// The routers' windows summed: per layer entry, tokens per logical expert and rows per group.
struct window_load {
  std::vector<std::vector<double>> logical;  // [layer entry][expert]
  std::vector<std::vector<double>> group_rows;  // [layer entry][group], as routed under `current`
  std::vector<std::vector<double>> slot_rows;   // [layer entry][slot] of `current`
  uint64_t tokens = 0;
};

// max / mean over the groups; nullopt when nothing was counted.
std::optional<double> balance_ratio(const std::vector<double>& group_load) {
  const double total = std::accumulate(group_load.begin(), group_load.end(), 0.0);
  if (total <= 0 || group_load.empty()) return std::nullopt;
  return *std::max_element(group_load.begin(), group_load.end()) / (total / static_cast<double>(group_load.size()));
}

// Group loads of one layer under the load model (an expert's load split evenly over its replicas).
std::vector<double> predicted_group_load(const std::vector<double>& logical, const std::vector<std::vector<int64_t>>& groups) {
  std::vector<int> replicas(logical.size(), 0);
  for (const auto& g : groups)
    for (auto e : g) ++replicas[static_cast<size_t>(e)];
  std::vector<double> out;
  for (const auto& g : groups) {
    double sum = 0;
    for (auto e : g) sum += logical[static_cast<size_t>(e)] / replicas[static_cast<size_t>(e)];
    out.push_back(sum);
  }
  return out;
}

double mean_of(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

// Collects one answer from each of n requests; the first failure wins and later answers are
// dropped. send(i, ok, fail) issues request i.
template <class Result>
struct fan_in {
  std::vector<Result> results;
  size_t outstanding = 0;
  bool done = false;
  std::function<void(std::vector<Result>)> on_all;
  std::function<void(size_t, caf::error)> on_error;
};

template <class Result, class Send>
void gather(size_t n, Send send, std::function<void(std::vector<Result>)> on_all,
            std::function<void(size_t, caf::error)> on_error) {
  auto f = std::make_shared<fan_in<Result>>();
  f->results.resize(n);
  f->outstanding = n;
  f->on_all = std::move(on_all);
  f->on_error = std::move(on_error);
  if (n == 0) {
    f->done = true;
    f->on_all({});
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    send(
        i,
        [f, i](Result& r) {
          if (f->done) return;
          f->results[i] = std::move(r);
          if (--f->outstanding == 0) {
            f->done = true;
            f->on_all(std::move(f->results));
          }
        },
        [f, i](caf::error& e) {
          if (f->done) return;
          f->done = true;
          f->on_error(i, std::move(e));
        });
  }
}

struct rebalancer_state {
  rebalancer_options options;
  router_layout current;
  std::vector<size_t> gpu_group;  // plan GPU index -> group (groups ordered by node)
  int64_t plan_nodes = 1;         // nodes as the planner sees them (1: a global plan)
  int64_t slots_per_group = 0;
  // Why the planner cannot move this layout (groups of unequal size); failover still works.
  std::string unplannable;
  bool busy = false;
  // Members gone with failed nodes: phases skip them (they would never answer).
  std::vector<bool> lost_groups, lost_routers;
  std::deque<std::function<void()>> queued;  // failovers waiting for the running rebalance
  std::optional<rebalancer_metrics> metrics;
  static inline const char* name = "rebalancer";
};

using pointer = caf::stateful_actor<rebalancer_state>*;
// Where a rebalance's outcome goes: the caller's promise, or the log for a periodic one.
using report_promise = std::function<void(caf::expected<rebalance_report>)>;

std::vector<size_t> alive(const std::vector<bool>& lost, size_t n) {
  std::vector<size_t> out;
  for (size_t i = 0; i < n; ++i)
    if (i >= lost.size() || !lost[i]) out.push_back(i);
  return out;
}

std::vector<size_t> live_groups(const rebalancer_state& st) { return alive(st.lost_groups, st.options.groups.size()); }
std::vector<size_t> live_routers(const rebalancer_state& st) { return alive(st.lost_routers, st.options.routers.size()); }

// Decodes and sums the routers' reports; physical slots are read under `current`'s numbering.
caf::expected<window_load> sum_reports(const rebalancer_state& st, const std::vector<load_report_bytes>& reports) {
  const auto& cur = st.current;
  const size_t L = cur.layers.size();
  const size_t E = static_cast<size_t>(st.options.model.n_routed_experts);
  const size_t G = st.options.groups.size();
  // slot -> group, per layer entry (groups' sorted experts in group order).
  std::vector<std::vector<size_t>> slot_group(L);
  for (size_t i = 0; i < L; ++i)
    for (size_t g = 0; g < G; ++g) slot_group[i].insert(slot_group[i].end(), cur.experts[i][g].size(), g);
  window_load w;
  w.logical.assign(L, std::vector<double>(E, 0.0));
  w.group_rows.assign(L, std::vector<double>(G, 0.0));
  w.slot_rows.resize(L);
  for (size_t i = 0; i < L; ++i) w.slot_rows[i].assign(slot_group[i].size(), 0.0);
  for (const auto& bytes : reports) {
    auto r = protocol::decode_load_report(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.capnp.data()), bytes.capnp.size()));
    if (!r) return r.error();
    // A router still counting an older version (it switched since) would misname slots: its
    // logical counts stay valid, its physical ones are skipped.
    const bool same_version = r->placement_version == cur.version;
    for (const auto& layer : r->layers) {
      auto it = std::find(cur.layers.begin(), cur.layers.end(), static_cast<int64_t>(layer.layer));
      if (it == cur.layers.end() || layer.logical.size() != E)
        return make_error(rebalance_errc::failed, "router " + std::to_string(r->shard) +
                                                      " reported a layer or expert count the model does not have");
      const size_t i = static_cast<size_t>(it - cur.layers.begin());
      for (size_t e = 0; e < E; ++e) {
        w.logical[i][e] += static_cast<double>(layer.logical[e]);
        w.tokens += layer.logical[e];
      }
      if (!same_version) continue;
      for (size_t s = 0; s < layer.physical.size() && s < slot_group[i].size(); ++s)
      {
        w.group_rows[i][slot_group[i][s]] += static_cast<double>(layer.physical[s]);
        w.slot_rows[i][s] += static_cast<double>(layer.physical[s]);
      }
    }
  }
  return w;
}

// The current layout as the planner's phy2log (GPU-major, GPUs in gpu_group order).
std::vector<std::vector<int32_t>> to_phy2log(const rebalancer_state& st, const router_layout& l) {
  std::vector<std::vector<int32_t>> out(l.layers.size());
  for (size_t i = 0; i < l.layers.size(); ++i)
    for (size_t g : st.gpu_group)
      for (auto e : l.experts[i][g]) out[i].push_back(static_cast<int32_t>(e));
  return out;
}

caf::expected<router_layout> from_phy2log(const rebalancer_state& st, const std::vector<std::vector<int32_t>>& p,
                                          uint32_t version) {
  router_layout l;
  l.version = version;
  l.layers = st.current.layers;
  const size_t per = static_cast<size_t>(st.slots_per_group);
  for (size_t i = 0; i < p.size(); ++i) {
    std::vector<std::vector<int64_t>> groups(st.gpu_group.size());
    for (size_t gpu = 0; gpu < st.gpu_group.size(); ++gpu) {
      auto& list = groups[st.gpu_group[gpu]];
      for (size_t j = 0; j < per; ++j) list.push_back(p[i][gpu * per + j]);
      std::sort(list.begin(), list.end());
      if (std::adjacent_find(list.begin(), list.end()) != list.end())
        return make_error(rebalance_errc::failed, "the plan puts two replicas of one expert on expert group " +
                                                      std::to_string(st.gpu_group[gpu]) + " in layer " +
                                                      std::to_string(l.layers[i]));
    }
    l.experts.push_back(std::move(groups));
  }
  return l;
}

void collect(pointer self, std::function<void(caf::expected<window_load>)> done) {
  auto& st = self->state;
  const auto timeout = st.options.phase_timeout;
  const auto routers = live_routers(st);
  gather<load_report_bytes>(
      routers.size(),
      [self, timeout, routers](size_t k, auto ok, auto fail) {
        self->request(self->state.options.routers[routers[k]], timeout, load_report_atom::value).then(ok, fail);
      },
      [self, done](std::vector<load_report_bytes> reports) { done(sum_reports(self->state, reports)); },
      [done, routers](size_t k, caf::error e) {
        done(make_error(rebalance_errc::failed,
                        "load report of router " + std::to_string(routers[k]) + ": " + error_text(e)));
      });
}

// Publishes the window's per-layer balance (and group rows) as metrics; returns the ratios.
std::vector<std::optional<double>> publish_window(rebalancer_state& st, const window_load& w) {
  std::vector<std::optional<double>> ratio;
  for (const auto& rows : w.group_rows) ratio.push_back(balance_ratio(rows));
  if (st.metrics) st.metrics->set_window(ratio, w.group_rows, w.slot_rows);
  return ratio;
}

void finish(pointer self, report_promise rp, caf::expected<rebalance_report> r) {
  auto& st = self->state;
  st.busy = false;
  // A failover that waited for this rebalance starts before anyone else can.
  auto run_queued = [self] {
    auto& st = self->state;
    if (st.busy || st.queued.empty()) return;
    auto next = std::move(st.queued.front());
    st.queued.pop_front();
    next();
  };
  if (!r) {
    const bool no_load = r.error().category() == caf::atom("rebalance") &&
                         r.error().code() == static_cast<uint8_t>(rebalance_errc::no_load);
    // Nothing to balance yet is not a failure (a periodic rebalance on an idle cluster).
    if (!no_load) {
      if (st.metrics) st.metrics->failed();
      spdlog::warn("rebalance failed: {}", error_text(r.error()));
    }
    rp(std::move(r.error()));
    run_queued();
    return;
  }
  if (st.metrics) st.metrics->outcome(*r);
  if (r->changed)
    spdlog::info("rebalance ({}): placement {} -> {}, balance {:.3f} -> {:.3f}, {} replicas ({} bytes) in {:.3f} s",
                 r->trigger, r->version_before, r->version_after, r->balance_before, r->balance_after,
                 r->replicas_moved, r->bytes_moved, r->duration_seconds);
  rp(std::move(*r));
  run_queued();
}

// Phase 3: every group frees what only older versions used.
void commit(pointer self, report_promise rp, rebalance_report report, router_layout next, clock_type::time_point start) {
  auto& st = self->state;
  const auto timeout = st.options.phase_timeout;
  if (next.shared_group >= 0) st.options.shared_experts_group = next.shared_group;
  st.current = std::move(next);
  if (st.metrics) st.metrics->set_layout(st.current);
  const uint32_t v = st.current.version;
  const auto groups = live_groups(st);
  gather<uint64_t>(
      groups.size(),
      [self, timeout, v, groups](size_t k, auto ok, auto fail) {
        self->request(self->state.options.groups[groups[k]], timeout, commit_layout_atom::value, v).then(ok, fail);
      },
      [self, rp, report, start](std::vector<uint64_t>) mutable {
        report.duration_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        finish(self, rp, std::move(report));
      },
      [self, rp, report, start, groups](size_t k, caf::error e) mutable {
        // The routers serve the new version already; a group that failed to free keeps the old
        // replicas a while longer (its next commit frees them).
        spdlog::warn("rebalance: expert group {} did not commit: {}", groups[k], error_text(e));
        report.duration_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        finish(self, rp, std::move(report));
      });
}

void abort_prepared(pointer self, uint32_t version) {
  for (auto i : live_groups(self->state)) self->send(self->state.options.groups[i], abort_layout_atom::value, version);
}

// Phase 2: hold the steps, switch every router, resume. A router that refuses leaves the rest
// switched: they go back to the old version (still held by every group) before steps resume.
void switch_routers(pointer self, report_promise rp, rebalance_report report, router_layout next,
                    clock_type::time_point start) {
  auto& st = self->state;
  const auto timeout = st.options.phase_timeout;
  auto do_switch = [self, rp, report, next, start, timeout](uint64_t hold, uint64_t training_hold) mutable {
    auto resume = [self, hold, training_hold] {
      if (hold != 0) self->send(self->state.options.controller, resume_steps_atom::value, hold);
      if (training_hold != 0) self->send(self->state.options.trainer, resume_steps_atom::value, training_hold);
    };
    const auto routers = live_routers(self->state);
    gather<uint32_t>(
        routers.size(),
        [self, timeout, next, routers](size_t k, auto ok, auto fail) {
          self->request(self->state.options.routers[routers[k]], timeout, switch_layout_atom::value, next).then(ok, fail);
        },
        [self, rp, report, next, start, resume](std::vector<uint32_t>) mutable {
          // Before the trainer resumes (messages from one sender arrive in order).
          if (self->state.options.trainer) self->send(self->state.options.trainer, switch_layout_atom::value, next);
          resume();
          commit(self, rp, std::move(report), std::move(next), start);
        },
        [self, rp, next, resume, routers](size_t k, caf::error e) mutable {
          auto& st = self->state;
          const size_t i = routers[k];
          for (auto r : routers) self->send(st.options.routers[r], switch_layout_atom::value, st.current);
          resume();
          abort_prepared(self, next.version);
          finish(self, rp, make_error(rebalance_errc::failed, "router " + std::to_string(i) + " did not switch to version " +
                                                                  std::to_string(next.version) + ": " + error_text(e)));
        });
  };
  // Training steps are held first, then serving steps; both resume after the switch.
  auto hold_serving = [self, rp, next, timeout, do_switch](uint64_t training_hold) mutable {
    if (!self->state.options.controller) return do_switch(0, training_hold);
    self->request(self->state.options.controller, timeout, hold_steps_atom::value)
        .then([do_switch, training_hold](uint64_t hold) mutable { do_switch(hold, training_hold); },
              [self, rp, next, training_hold](caf::error& e) mutable {
                if (training_hold != 0) self->send(self->state.options.trainer, resume_steps_atom::value, training_hold);
                abort_prepared(self, next.version);
                finish(self, rp, make_error(rebalance_errc::failed, "the controller did not hold steps: " + error_text(e)));
              });
  };
  if (!st.options.trainer) return hold_serving(0);
  self->request(st.options.trainer, timeout, hold_steps_atom::value)
      .then([hold_serving](uint64_t hold) mutable { hold_serving(hold); },
            [self, rp, next](caf::error& e) mutable {
              abort_prepared(self, next.version);
              finish(self, rp, make_error(rebalance_errc::failed, "the trainer did not hold its steps: " + error_text(e)));
            });
}

// Phase 1: the groups load their new replicas while serving.
void prepare(pointer self, report_promise rp, rebalance_report report, router_layout next, clock_type::time_point start) {
  auto& st = self->state;
  const bool urgent = report.trigger == "failover";
  const auto timeout = st.options.phase_timeout;
  const auto groups = live_groups(st);
  gather<prepare_result>(
      groups.size(),
      [self, timeout, next, groups, urgent](size_t k, auto ok, auto fail) {
        auto& st = self->state;
        const size_t i = groups[k];
        group_layout g;
        g.urgent = urgent;
        g.holds_shared = next.shared_group >= 0 && static_cast<size_t>(next.shared_group) == i &&
                         next.shared_group != st.options.shared_experts_group;
        g.version = next.version;
        g.layers = next.layers;
        for (const auto& layer : next.experts) g.experts.push_back(layer[i]);
        // Each replica the group gains, with a group that holds it now.
        for (size_t l = 0; l < next.layers.size(); ++l) {
          const auto& now = st.current.experts[l];
          for (auto e : next.experts[l][i]) {
            if (std::find(now[i].begin(), now[i].end(), e) != now[i].end()) continue;
            for (size_t h = 0; h < now.size(); ++h) {
              if (h < st.lost_groups.size() && st.lost_groups[h]) continue;
              if (std::find(now[h].begin(), now[h].end(), e) == now[h].end()) continue;
              g.sources.insert(g.sources.end(), {next.layers[l], e, static_cast<int64_t>(h)});
              break;
            }
          }
        }
        for (const auto& group : st.options.groups) g.peers.push_back(caf::actor_cast<caf::actor>(group));
        self->request(self->state.options.groups[i], timeout, prepare_layout_atom::value, std::move(g)).then(ok, fail);
      },
      [self, rp, report, next, start](std::vector<prepare_result> results) mutable {
        for (const auto& r : results) {
          report.replicas_moved += r.replicas_loaded;
          report.bytes_moved += r.bytes_loaded;
        }
        switch_routers(self, rp, std::move(report), std::move(next), start);
      },
      [self, rp, next, groups](size_t k, caf::error e) mutable {
        abort_prepared(self, next.version);
        finish(self, rp, make_error(rebalance_errc::failed, "expert group " + std::to_string(groups[k]) +
                                                                " could not prepare version " +
                                                                std::to_string(next.version) + ": " + error_text(e)));
      });
}

// Plans from the window and, when the plan differs, runs the three phases.
void plan_and_move(pointer self, report_promise rp, const window_load& w, std::string trigger,
                   clock_type::time_point start) {
  auto& st = self->state;
  if (w.tokens == 0) {
    finish(self, rp, make_error(rebalance_errc::no_load, "the routers counted no routed tokens yet; rebalance after some traffic"));
    return;
  }
  const auto measured = publish_window(st, w);
  scheduler::plan_transition_request req;
  req.plan.load = w.logical;
  req.plan.num_slots = st.slots_per_group * static_cast<int64_t>(st.gpu_group.size());
  req.plan.num_gpus = static_cast<int64_t>(st.gpu_group.size());
  req.plan.num_nodes = st.plan_nodes;
  req.plan.num_groups = std::max<int64_t>(1, st.options.model.n_group);
  req.previous = to_phy2log(st, st.current);
  req.max_moves = st.options.max_moved_replicas;
  auto planned = scheduler::plan_transition_within_budget(req);
  if (!planned) {
    finish(self, rp, make_error(rebalance_errc::failed, "planning: " + error_text(planned.error())));
    return;
  }
  auto next = from_phy2log(st, planned->plan.phy2log, st.current.version + 1);
  if (!next) {
    finish(self, rp, std::move(next.error()));
    return;
  }
  rebalance_report report;
  report.trigger = std::move(trigger);
  report.version_before = st.current.version;
  report.tokens_counted = w.tokens;
  for (size_t i = 0; i < w.logical.size(); ++i) {
    // Layers without counts in the window are left out of both means.
    if (!measured[i]) continue;
    report.layer_balance_before.push_back(*measured[i]);
    report.layer_balance_after.push_back(balance_ratio(predicted_group_load(w.logical[i], next->experts[i])).value_or(1.0));
  }
  report.balance_before = mean_of(report.layer_balance_before);
  report.balance_after = mean_of(report.layer_balance_after);
  const bool same = next->experts == st.current.experts;
  const bool worth_it = report.trigger != "periodic" ||
                        report.balance_before - report.balance_after >= st.options.min_improvement;
  if (same || !worth_it) {
    report.version_after = st.current.version;
    report.layer_balance_after = report.layer_balance_before;
    report.balance_after = report.balance_before;
    report.duration_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
    finish(self, rp, std::move(report));
    return;
  }
  report.changed = true;
  report.version_after = next->version;
  prepare(self, rp, std::move(report), std::move(*next), start);
}

void run(pointer self, report_promise rp, std::string trigger) {
  auto& st = self->state;
  if (st.busy) {
    rp(make_error(rebalance_errc::busy, "a rebalance is already running; retry when it ends"));
    return;
  }
  if (!st.unplannable.empty()) {
    rp(make_error(rebalance_errc::unsupported, st.unplannable));
    return;
  }
  if (std::find(st.lost_groups.begin(), st.lost_groups.end(), true) != st.lost_groups.end()) {
    // The planner spreads equal slot counts over every group; with groups gone it has no such
    // layout to offer. Restarting the cluster on the surviving nodes plans afresh.
    rp(make_error(rebalance_errc::unsupported,
                  "expert groups were lost to node failures; restart the cluster to rebalance again"));
    return;
  }
  st.busy = true;
  const auto start = clock_type::now();
  collect(self, [self, rp, trigger, start](caf::expected<window_load> w) mutable {
    if (!w) return finish(self, rp, std::move(w.error()));
    plan_and_move(self, rp, *w, std::move(trigger), start);
  });
}

// The groups (and the routers) of a failed node are gone: the routers stop waiting on them, the
// experts they alone held are loaded by survivors, and the routers switch to a layout without
// them, through the same prepare / switch / commit phases as a rebalance.
void failover(pointer self, report_promise rp, std::vector<int64_t> groups, std::vector<int64_t> routers) {
  auto& st = self->state;
  const auto start = clock_type::now();
  st.lost_groups.resize(st.options.groups.size(), false);
  st.lost_routers.resize(st.options.routers.size(), false);
  for (auto r : routers)
    if (r >= 0 && static_cast<size_t>(r) < st.lost_routers.size()) st.lost_routers[static_cast<size_t>(r)] = true;
  std::vector<int64_t> lost;
  for (auto g : groups) {
    if (g < 0 || static_cast<size_t>(g) >= st.lost_groups.size()) {
      rp(make_error(rebalance_errc::failed, "failover: there is no expert group " + std::to_string(g)));
      return;
    }
    st.lost_groups[static_cast<size_t>(g)] = true;
  }
  for (size_t g = 0; g < st.lost_groups.size(); ++g)
    if (st.lost_groups[g]) lost.push_back(static_cast<int64_t>(g));
  // First, before anything else can wait on them: no route request waits on a lost group.
  for (auto r : live_routers(st)) self->send(st.options.routers[r], groups_down_atom::value, lost);
  if (st.busy) {
    st.queued.push_back([self, rp, groups, routers] { failover(self, rp, groups, routers); });
    return;
  }
  st.busy = true;
  auto plan = scheduler::plan_failover(st.current.experts, st.lost_groups, st.options.model.n_routed_experts);
  if (!plan) return finish(self, rp, make_error(rebalance_errc::failed, "failover: " + error_text(plan.error())));
  // The shared experts' group is lost: the surviving group holding the fewest experts takes them.
  const auto shared = st.options.shared_experts_group;
  int64_t new_shared = -1;
  if (shared >= 0 && static_cast<size_t>(shared) < st.lost_groups.size() && st.lost_groups[static_cast<size_t>(shared)]) {
    size_t fewest = SIZE_MAX;
    for (auto g : live_groups(st)) {
      size_t held = 0;
      for (const auto& layer : plan->experts) held += layer[g].size();
      if (held < fewest) {
        fewest = held;
        new_shared = static_cast<int64_t>(g);
      }
    }
    if (new_shared < 0) return finish(self, rp, make_error(rebalance_errc::failed, "failover: no expert group survives"));
  }
  rebalance_report report;
  report.trigger = "failover";
  report.version_before = st.current.version;
  if (plan->experts == st.current.experts && new_shared < 0) {
    report.version_after = st.current.version;
    return finish(self, rp, std::move(report));
  }
  router_layout next;
  next.version = st.current.version + 1;
  next.layers = st.current.layers;
  next.experts = std::move(plan->experts);
  next.shared_group = new_shared;
  report.changed = true;
  report.version_after = next.version;
  spdlog::warn("failover: expert groups {} lost; {} (layer, expert) replicas keep serving elsewhere, {} are loaded by "
               "survivors{} (placement {} -> {})",
               fmt::join(lost, ","), plan->experts_on_replicas, plan->replicas_added,
               new_shared >= 0 ? ", the shared experts by expert group " + std::to_string(new_shared) : std::string(),
               next.version - 1, next.version);
  prepare(self, rp, std::move(report), std::move(next), start);
}

// Checks the options and derives how the planner sees the groups.
caf::error setup(rebalancer_state& st) {
  auto unsupported = [](std::string text) { return make_error(rebalance_errc::unsupported, std::move(text)); };
  const auto& o = st.options;
  const auto& c = o.model;
  if (o.routers.empty() || o.groups.empty()) return unsupported("rebalancing needs routers and expert groups");
  if (o.group_node.size() != o.groups.size()) return unsupported("one node index per expert group expected");
  std::vector<int64_t> moe_layers;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (c.is_moe_layer(l)) moe_layers.push_back(l);
  if (o.current.layers != moe_layers || o.current.experts.size() != moe_layers.size())
    return unsupported("the current layout does not name the model's MoE layers");
  for (const auto& groups : o.current.experts)
    if (groups.size() != o.groups.size()) return unsupported("the current layout names another number of expert groups");
  st.unplannable = rebalance_unplannable(o.current, c.n_routed_experts);
  st.slots_per_group = o.current.experts.empty() || o.current.experts[0].empty()
                           ? 0
                           : static_cast<int64_t>(o.current.experts[0][0].size());
  // GPUs node-major for the planner; the hierarchical rule needs every node to hold as many groups.
  st.gpu_group.resize(o.groups.size());
  std::iota(st.gpu_group.begin(), st.gpu_group.end(), size_t{0});
  std::stable_sort(st.gpu_group.begin(), st.gpu_group.end(),
                   [&](size_t a, size_t b) { return o.group_node[a] < o.group_node[b]; });
  std::map<int, size_t> per_node;
  for (auto n : o.group_node) ++per_node[n];
  bool even = true;
  for (const auto& [n, count] : per_node) even = even && count == per_node.begin()->second;
  st.plan_nodes = even ? static_cast<int64_t>(per_node.size()) : 1;
  st.current = o.current;
  return {};
}

}  // namespace

std::string rebalance_unplannable(const router_layout& current, int64_t num_experts) {
  size_t per = 0;
  for (size_t i = 0; i < current.experts.size(); ++i) {
    const auto& groups = current.experts[i];
    for (size_t g = 0; g < groups.size(); ++g) {
      if (i == 0 && g == 0) per = groups[g].size();
      if (groups[g].size() != per)
        return "rebalancing needs the same number of expert slots in every expert group; group " + std::to_string(g) +
               " holds " + std::to_string(groups[g].size()) + " and group 0 holds " + std::to_string(per) +
               " (choose redundant_expert_slots so that experts + slots divide by the groups)";
    }
  }
  if (per == 0 || per > static_cast<size_t>(num_experts))
    return "every expert group must hold between 1 and " + std::to_string(num_experts) + " experts";
  return {};
}

caf::expected<rebalancer_actor> spawn_rebalancer(caf::actor_system& sys, rebalancer_options options) {
  rebalancer_state probe;
  probe.options = options;
  if (auto err = setup(probe)) return err;
  auto impl = [](pointer self, rebalancer_options opts) -> caf::behavior {
    auto& st = self->state;
    st.options = std::move(opts);
    (void)setup(st);  // checked before the spawn
    if (st.options.metrics)
      st.metrics.emplace(*st.options.metrics, st.current.layers, st.options.model.n_routed_experts,
                         st.options.groups.size());
    if (st.metrics) st.metrics->set_layout(st.current);
    if (st.options.period.count() > 0) self->delayed_send(self, st.options.period, rebalance_tick_atom::value);
    if (st.options.stats_interval.count() > 0) self->delayed_send(self, st.options.stats_interval, stats_tick_atom::value);
    return {
        [self](rebalance_atom) -> caf::result<rebalance_report> {
          auto rp = self->make_response_promise<rebalance_report>();
          run(self, [rp](caf::expected<rebalance_report> r) mutable {
            if (r) rp.deliver(std::move(*r));
            else rp.deliver(std::move(r.error()));
          }, "on_demand");
          return rp;
        },
        [self](failover_atom, std::vector<int64_t>& groups, std::vector<int64_t>& routers)
            -> caf::result<rebalance_report> {
          auto rp = self->make_response_promise<rebalance_report>();
          failover(self, [self, rp](caf::expected<rebalance_report> r) mutable -> void {
            if (r) return void(rp.deliver(std::move(*r)));
            // A recovering trainer waits for the failover's layout: it stops at once instead.
            if (const auto& trainer = self->state.options.trainer)
              self->send(trainer, failover_failed_atom::value, error_text(r.error()));
            rp.deliver(std::move(r.error()));
          }, std::move(groups), std::move(routers));
          return rp;
        },
        [self](rebalance_tick_atom) {
          auto& st = self->state;
          self->delayed_send(self, st.options.period, rebalance_tick_atom::value);
          if (st.busy || !st.unplannable.empty()) return;
          // Nobody awaits a periodic rebalance: finish() logs it and counts it in the metrics.
          run(self, [](caf::expected<rebalance_report>) {}, "periodic");
        },
        [self](stats_tick_atom) {
          auto& st = self->state;
          self->delayed_send(self, st.options.stats_interval, stats_tick_atom::value);
          if (st.busy) return;
          collect(self, [self](caf::expected<window_load> w) {
            if (w) publish_window(self->state, *w);
          });
        },
    };
  };
  return caf::actor_cast<rebalancer_actor>(sys.spawn(impl, std::move(options)));
}

}  // namespace moe::actors
