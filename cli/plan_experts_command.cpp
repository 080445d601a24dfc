// `moe plan-experts --trace T.json --out P.json`: expert replication and placement from a load
// trace, in the format of DeepSeek's EPLB (scheduler/expert_plan.hpp):
//   T.json: weight [layers][logical experts] (token counts), num_replicas, num_groups,
//           num_nodes, num_gpus (other keys are ignored);
//   P.json: phy2log [layers][num_replicas] (GPU-major slots), logcnt [layers][experts], plus
//           how it was planned (hierarchical, the balance figures, planning time).
// With `--previous OLD.json` (a plan this command wrote; its phy2log is the layout served now) the
// plan becomes a transition from it (scheduler/plan_transition.hpp): GPUs keep as many of their
// experts as possible, `--max-moves N` caps the replicas to load, and P.json gains "moves" and
// "layer_moves".
// Prints the balance figures; exit 0, or 1 with the reason for a bad trace or previous plan.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "scheduler/expert_plan.hpp"
#include "scheduler/plan_transition.hpp"
#include "scheduler/scheduler_errc.hpp"

namespace moe::cli {

namespace {

struct plan_experts_options {
  std::string trace;
  std::string out;
  bool global = false;
  bool node_local = false;
  double tolerance = 0.02;
  std::string previous;     // empty: plan from scratch
  int64_t max_moves = -1;  // -1: no limit
};

// The phy2log of a plan file this command wrote.
caf::expected<std::vector<std::vector<int32_t>>> read_previous(const std::string& path) {
  auto bad = [&](const std::string& why) {
    return scheduler::make_error(scheduler::scheduler_errc::bad_assignment, path + ": " + why);
  };
  std::ifstream in(path);
  if (!in) return bad("cannot read the file");
  try {
    const auto j = nlohmann::json::parse(in);
    if (!j.contains("phy2log")) return bad("missing key 'phy2log' (a plan written by moe plan-experts)");
    return j.at("phy2log").get<std::vector<std::vector<int32_t>>>();
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("not a plan: ") + e.what());
  }
}

caf::expected<scheduler::expert_plan_request> read_trace(const std::string& path) {
  auto bad = [&](const std::string& why) {
    return scheduler::make_error(scheduler::scheduler_errc::bad_assignment, path + ": " + why);
  };
  std::ifstream in(path);
  if (!in) return bad("cannot read the file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("not JSON: ") + e.what());
  }
  scheduler::expert_plan_request r;
  try {
    for (const char* key : {"weight", "num_replicas", "num_groups", "num_nodes", "num_gpus"})
      if (!j.contains(key)) return bad(std::string("missing key '") + key + "'");
    r.load = j.at("weight").get<std::vector<std::vector<double>>>();
    r.num_slots = j.at("num_replicas").get<int64_t>();
    r.num_groups = j.at("num_groups").get<int64_t>();
    r.num_nodes = j.at("num_nodes").get<int64_t>();
    r.num_gpus = j.at("num_gpus").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("wrong type: ") + e.what());
  }
  return r;
}

int plan_experts(const plan_experts_options& o) {
  auto request = read_trace(o.trace);
  if (!request) {
    fmt::print(stderr, "moe plan-experts: error: {}\n", error_text(request.error()));
    return 1;
  }
  request->hierarchical = !o.global;
  request->hierarchy_tolerance = o.node_local ? std::numeric_limits<double>::infinity() : o.tolerance;
  scheduler::plan_transition_request transition;
  if (!o.previous.empty()) {
    auto previous = read_previous(o.previous);
    if (!previous) {
      fmt::print(stderr, "moe plan-experts: error: {}\n", error_text(previous.error()));
      return 1;
    }
    transition.previous = std::move(*previous);
    transition.max_moves = o.max_moves;
  }
  const auto start = std::chrono::steady_clock::now();
  std::optional<scheduler::plan_transition> moved;
  auto plan = [&]() -> caf::expected<scheduler::expert_plan> {
    if (o.previous.empty()) return scheduler::plan_experts(*request);
    transition.plan = *request;
    auto t = scheduler::plan_transition_within_budget(transition);
    if (!t) return t.error();
    moved = std::move(*t);
    return moved->plan;
  }();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!plan) {
    fmt::print(stderr, "moe plan-experts: error: {}{}: {}\n", o.trace,
               o.previous.empty() ? "" : " from " + o.previous, error_text(plan.error()));
    return 1;
  }
  const auto score = scheduler::score_expert_plan(*request, *plan);
  const auto local_layers = std::count(plan->hierarchical.begin(), plan->hierarchical.end(), true);
  nlohmann::json out = {{"phy2log", plan->phy2log},
                        {"logcnt", plan->logcnt},
                        {"hierarchical", plan->hierarchical},
                        {"gpu_ratio_mean", score.gpu_ratio_mean},
                        {"gpu_ratio_max", score.gpu_ratio_max},
                        {"node_ratio_mean", score.node_ratio_mean},
                        {"lower_bound_gpu_ratio_mean", score.lower_bound_mean},
                        {"planning_ms", ms}};
  if (!o.previous.empty()) {
    out["moves"] = moved->moves;
    out["layer_moves"] = moved->layer_moves;
  }
  std::ofstream file(o.out);
  file << out.dump() << "\n";
  if (!file) {
    fmt::print(stderr, "moe plan-experts: error: cannot write {}\n", o.out);
    return 1;
  }
  fmt::print("{} layers x {} experts -> {} slots on {} GPUs, {} nodes ({}): gpu ratio mean {:.4f} max {:.4f}, "
             "node ratio mean {:.4f}, lower bound {:.4f}; planned in {:.1f} ms -> {}\n",
             request->load.size(), request->load.front().size(), request->num_slots, request->num_gpus,
             request->num_nodes, fmt::format("{} of {} layers keep their groups on one node", local_layers, plan->hierarchical.size()), score.gpu_ratio_mean,
             score.gpu_ratio_max, score.node_ratio_mean, score.lower_bound_mean, ms, o.out);
  if (!o.previous.empty())
    fmt::print("{} replicas to load from {} ({})\n", moved->moves, o.previous,
               o.max_moves < 0 ? std::string("no limit") : fmt::format("at most {}", o.max_moves));
  return 0;
}

}  // namespace

void add_plan_experts_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<plan_experts_options>();
  auto* cmd = app.add_subcommand("plan-experts", "Replicate and place experts from a load trace (EPLB's format)");
  cmd->add_option("--trace", o->trace, "Load trace JSON: weight [layers][experts], num_replicas, num_groups, "
                                       "num_nodes, num_gpus")
      ->required();
  cmd->add_option("--out", o->out, "Where to write the plan (phy2log, logcnt)")->required();
  cmd->add_flag("--global", o->global, "Ignore the routing groups (no group-per-node rule)");
  cmd->add_flag("--node-local", o->node_local, "Keep every routing group on one node whatever it costs");
  cmd->add_option("--hierarchy-tolerance", o->tolerance,
                  "GPU balance the group-per-node rule may cost per layer (default 0.02 = 2%)")
      ->check(real_number(0.0, HUGE_VAL));
  auto* previous = cmd->add_option("--previous", o->previous,
                                   "The plan served now (a --out file of this command): keep as many "
                                   "experts on their GPUs as possible, and report the moves (replicas "
                                   "to load) in the output");
  cmd->add_option("--max-moves", o->max_moves,
                  "Most replicas to load over all layers (needs --previous): the best plan within "
                  "that many moves; 0 keeps the previous plan (default: no limit)")
      ->check(whole_number(0))
      ->needs(previous);
  cmd->callback([o, &ctx] { ctx.exit_code = plan_experts(*o); });
}

}  // namespace moe::cli
