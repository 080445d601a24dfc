// Online expert rebalancing under load, in one run: decode tokens/s and inter-token latency
// (p50, p99) before, during and after a rebalance of a serving cluster (one process) decoding a
// skewed workload: `--streams` jobs whose prompts repeat one token, which sends most rows to a
// few experts. Each phase starts fresh streams, waits for their prefill and half a second of
// decoding (so all three phases decode at the same context lengths) and cancels them after it: "before" and "after" last
// `--phase-seconds`; "during" spans from the rebalance request to its answer (the groups' loads
// of new replicas, the step hold and the routers' switch). An inter-token interval belongs to
// the phase in which it ends. Ratios compare each phase with "before" of the same run.
//
// Prints one JSON object.
//   moe_bench_rebalance [--preset small] [--streams 16] [--phase-seconds 4] [--groups 4]
//                       [--redundant 4] [--max-moved -1] [--shards 1]
#include <caf/all.hpp>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/actor_types.hpp"
#include "actors/controller.hpp"
#include "actors/rebalancer.hpp"
#include "actors/serving_cluster.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/cluster_config.hpp"

using clock_type = std::chrono::steady_clock;
using namespace moe;
using namespace std::chrono_literals;

namespace {

struct token_arrival {
  clock_type::time_point at;
  uint64_t job = 0;
  size_t tokens = 0;
};

// Receives every job's events from the controller and timestamps them.
struct arrivals {
  std::mutex mutex;
  std::vector<token_arrival> log;
  std::map<uint64_t, bool> finished;
};

struct phase_figures {
  double seconds = 0;
  size_t tokens = 0;
  std::vector<double> itl_ms;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

nlohmann::json to_json(const phase_figures& f) {
  return {{"seconds", f.seconds},
          {"tokens", f.tokens},
          {"tokens_per_s", f.seconds > 0 ? static_cast<double>(f.tokens) / f.seconds : 0.0},
          {"itl_samples", f.itl_ms.size()},
          {"itl_p50_ms", percentile(f.itl_ms, 0.50)},
          {"itl_p99_ms", percentile(f.itl_ms, 0.99)},
          {"itl_max_ms", percentile(f.itl_ms, 1.0)}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Decode throughput and inter-token latency before, during and after an online expert rebalance"};
  std::string preset = "small";
  int streams = 16, groups = 4, redundant = 4, shards = 1;
  double phase_seconds = 4;
  int64_t max_moved = -1;
  app.add_option("--preset", preset, "Model preset (tiny, small)");
  app.add_option("--streams", streams, "Jobs decoding at all times");
  app.add_option("--phase-seconds", phase_seconds, "Length of the before and after phases");
  app.add_option("--groups", groups, "Expert groups");
  app.add_option("--redundant", redundant, "Redundant expert slots");
  app.add_option("--max-moved", max_moved, "Move budget of the rebalance (-1: none)");
  app.add_option("--shards", shards, "Attention shards");
  CLI11_PARSE(app, argc, argv);

  const std::string yaml =
      "cluster: {name: rebalance-bench, secret: rebalance-bench-secret}\n"
      "nodes:\n  - {name: n0, host: 127.0.0.1, devices: {cpu_slots: " + std::to_string(groups + shards) +
      "}, memory: 16GiB}\n"
      "model: {preset: " + preset + ", seed: 0}\n"
      "attention_shards: " + std::to_string(shards) + "\nexpert_groups: {count: " + std::to_string(groups) +
      "}\nredundant_expert_slots: " + std::to_string(redundant) + "\n" +
      "rebalancing: {load_window_steps: 256" + (max_moved >= 0 ? ", max_moved_replicas: " + std::to_string(max_moved) : std::string()) +
      "}\nbatching: {max_running_requests: 64, max_new_tokens_limit: 4096}\n"
      "ports: {control: 0, api: 0, metrics: 0}\n";
  auto cfg = runtime::parse_cluster_config(yaml, "rebalance-bench.yaml");
  if (!cfg) {
    std::fprintf(stderr, "config: %s\n", error_text(cfg.error()).c_str());
    return 1;
  }
  runtime::actor_system_config::options so;
  so.load_middleman = false;
  runtime::actor_system_config sys_cfg{so};
  actors::add_actor_message_types(sys_cfg);
  caf::actor_system sys{sys_cfg};
  actors::serving_options opts;
  opts.api_port = 0;
  opts.metrics_port = 0;
  opts.preset_cache_dir = std::filesystem::temp_directory_path() / "moe-bench-models";
  auto started = actors::serving_cluster::start(sys, *cfg, opts);
  if (!started) {
    std::fprintf(stderr, "cluster: %s\n", error_text(started.error()).c_str());
    return 1;
  }
  auto& cluster = **started;
  if (!cluster.rebalancer()) {
    std::fprintf(stderr, "rebalancing is off: %s\n", cluster.rebalance_unavailable().c_str());
    return 1;
  }

  auto log = std::make_shared<arrivals>();
  auto collector = sys.spawn([log](caf::event_based_actor*) -> caf::behavior {
    return {[log](actors::job_event_atom, const actors::job_event& ev) {
      const auto now = clock_type::now();
      std::lock_guard<std::mutex> lock(log->mutex);
      if (!ev.tokens.empty()) log->log.push_back({now, ev.job, ev.tokens.size()});
      if (ev.finished) log->finished[ev.job] = true;
    }};
  });
  caf::scoped_actor self{sys};
  // Each phase runs on fresh streams started `warm` before it, so that all three see the same
  // context lengths (decode attention slows down as the contexts grow).
  const auto warm = 500ms;
  auto start_streams = [&] {
    std::vector<uint64_t> jobs;
    for (int i = 0; i < streams; ++i) {
      actors::generation_job j;
      for (int k = 0; k < 16; ++k) j.prompt.push_back(k % 4 == 0 ? 7 + i : 7);
      j.max_new_tokens = 4096;  // longer than a phase: cancelled at its end
      self->request(cluster.controller(), 30s, actors::submit_atom::value, j, caf::actor_cast<caf::actor>(collector))
          .receive([&](uint64_t id) { jobs.push_back(id); },
                   [&](caf::error& e) { std::fprintf(stderr, "submit: %s\n", error_text(e).c_str()); });
    }
    // Prefill first (every stream has its first token), then `warm` of decoding.
    const auto deadline = clock_type::now() + 300s;
    while (clock_type::now() < deadline) {
      {
        std::lock_guard<std::mutex> lock(log->mutex);
        size_t started = 0;
        for (auto id : jobs)
          started += std::any_of(log->log.begin(), log->log.end(), [&](const token_arrival& a) { return a.job == id; });
        if (started == jobs.size()) break;
      }
      std::this_thread::sleep_for(20ms);
    }
    std::this_thread::sleep_for(warm);
    return jobs;
  };
  auto stop_streams = [&](const std::vector<uint64_t>& jobs) {
    for (auto id : jobs) self->send(cluster.controller(), actors::cancel_atom::value, id);
    for (int tries = 0; tries < 600; ++tries) {
      {
        std::lock_guard<std::mutex> lock(log->mutex);
        if (std::all_of(jobs.begin(), jobs.end(), [&](uint64_t id) { return log->finished.count(id) != 0; })) return;
      }
      std::this_thread::sleep_for(10ms);
    }
  };
  const auto phase = std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(phase_seconds));
  auto jobs = start_streams();
  if (jobs.size() != static_cast<size_t>(streams)) return 1;
  const auto before_start = clock_type::now();
  std::this_thread::sleep_for(phase);
  const auto before_end = clock_type::now();
  stop_streams(jobs);

  jobs = start_streams();
  const auto during_start = clock_type::now();
  caf::expected<actors::rebalance_report> report{actors::rebalance_report{}};
  self->request(cluster.rebalancer(), 10min, actors::rebalance_atom::value)
      .receive([&](actors::rebalance_report& r) { report = std::move(r); }, [&](caf::error& e) { report = std::move(e); });
  const auto during_end = clock_type::now();
  stop_streams(jobs);

  jobs = start_streams();
  const auto after_start = clock_type::now();
  std::this_thread::sleep_for(phase);
  const auto after_end = clock_type::now();
  stop_streams(jobs);

  std::vector<token_arrival> arrivals_copy;
  {
    std::lock_guard<std::mutex> lock(log->mutex);
    arrivals_copy = log->log;
  }
  phase_figures before, during, after;
  before.seconds = std::chrono::duration<double>(before_end - before_start).count();
  during.seconds = std::chrono::duration<double>(during_end - during_start).count();
  after.seconds = std::chrono::duration<double>(after_end - after_start).count();
  std::map<uint64_t, clock_type::time_point> last;
  for (const auto& a : arrivals_copy) {
    phase_figures* p = nullptr;
    if (a.at >= before_start && a.at < before_end) p = &before;
    else if (a.at >= during_start && a.at < during_end) p = &during;
    else if (a.at >= after_start && a.at < after_end) p = &after;
    auto prev = last.find(a.job);
    if (p) {
      p->tokens += a.tokens;
      if (prev != last.end()) p->itl_ms.push_back(std::chrono::duration<double, std::milli>(a.at - prev->second).count());
    }
    last[a.job] = a.at;
  }
  nlohmann::json out;
  out["bench"] = "rebalance";
  out["preset"] = preset;
  out["streams"] = streams;
  out["expert_groups"] = groups;
  out["redundant_expert_slots"] = redundant;
  out["attention_shards"] = shards;
  out["before"] = to_json(before);
  out["during"] = to_json(during);
  out["after"] = to_json(after);
  const double tps_before = before.seconds > 0 ? static_cast<double>(before.tokens) / before.seconds : 0;
  const double tps_after = after.seconds > 0 ? static_cast<double>(after.tokens) / after.seconds : 0;
  const double tps_during = during.seconds > 0 ? static_cast<double>(during.tokens) / during.seconds : 0;
  out["ratio_tokens_per_s_after_over_before"] = tps_before > 0 ? tps_after / tps_before : 0;
  out["ratio_tokens_per_s_during_over_before"] = tps_before > 0 ? tps_during / tps_before : 0;
  const double p99_before = percentile(before.itl_ms, 0.99);
  out["ratio_itl_p99_during_over_before"] = p99_before > 0 ? percentile(during.itl_ms, 0.99) / p99_before : 0;
  out["ratio_itl_p99_after_over_before"] = p99_before > 0 ? percentile(after.itl_ms, 0.99) / p99_before : 0;
  if (report) {
    out["rebalance"] = {{"changed", report->changed},
                        {"balance_before", report->balance_before},
                        {"balance_after_planned", report->balance_after},
                        {"replicas_moved", report->replicas_moved},
                        {"bytes_moved", report->bytes_moved},
                        {"duration_s", report->duration_seconds}};
  } else {
    out["rebalance"] = {{"error", error_text(report.error())}};
  }
  std::printf("%s\n", out.dump(2).c_str());
  cluster.stop();
  caf::anon_send_exit(collector, caf::exit_reason::user_shutdown);
  return report ? 0 : 1;
}
