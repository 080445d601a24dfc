// `moe plan --config FILE [--json]`: where each actor of the cluster config would run.
// Output contract: the table (default) is for people; --json prints scheduler::to_json of the
// placement under "placement", with the cluster name, the model and the memory model used.
// Errors: "moe plan: error: ..." on stderr, exit status 1.
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "model/weights.hpp"
#include "runtime/cluster_config.hpp"
#include "scheduler/placement.hpp"

namespace moe::cli {

namespace {

struct plan_options {
  std::string config_file;
  bool json = false;
  size_t bytes_per_param = 4;
  std::optional<int64_t> kv_cache_tokens;
};

int plan(const plan_options& o) {
  auto fail = [](const caf::error& err) {
    fmt::print(stderr, "moe plan: error: {}\n", error_text(err));
    return 1;
  };
  auto config = runtime::load_cluster_config(o.config_file);
  if (!config) return fail(config.error());
  auto model = scheduler::resolve_model_config(*config);
  if (!model) return fail(model.error());
  scheduler::placement_options options;
  options.bytes_per_param = o.bytes_per_param;
  options.kv_cache_tokens = o.kv_cache_tokens;
  auto placed = scheduler::plan_placement(*config, *model, options);
  if (!placed) return fail(placed.error());

  const auto mem = scheduler::model_memory_estimate(*model, options.bytes_per_param, options.include_mtp);
  const int64_t kv_tokens = scheduler::kv_cache_tokens_per_shard(*config, *model, options);
  const std::string model_name =
      config->model.preset.empty() ? config->model.path.string() : "preset " + config->model.preset;
  if (o.json) {
    const nlohmann::json out = {
        {"cluster", config->name},
        {"config", config->source},
        {"model", model_name},
        {"parameters", model::count_parameters(*model, options.include_mtp)},
        {"memory_model",
         {{"bytes_per_param", options.bytes_per_param},
          {"attention_bytes", mem.attention_bytes},
          {"router_bytes", mem.router_bytes},
          {"per_expert_bytes", mem.per_expert_bytes},
          {"shared_expert_bytes", mem.shared_expert_bytes},
          {"kv_cache_bytes_per_token", mem.kv_cache_bytes_per_token},
          {"kv_cache_tokens_per_shard", kv_tokens}}},
        {"placement", scheduler::to_json(*placed)}};
    fmt::print("{}\n", out.dump(2));
    return 0;
  }
  fmt::print("cluster {} ({}), model {}: {} parameters at {} bytes each\n", config->name, config->source,
             model_name, model::count_parameters(*model, options.include_mtp), options.bytes_per_param);
  fmt::print("memory model: attention {} + router {} + KV cache {} tokens x {} per shard; "
             "{} per routed expert; shared experts {}\n\n",
             runtime::format_bytes(mem.attention_bytes), runtime::format_bytes(mem.router_bytes), kv_tokens,
             runtime::format_bytes(mem.kv_cache_bytes_per_token), runtime::format_bytes(mem.per_expert_bytes),
             runtime::format_bytes(mem.shared_expert_bytes));
  fmt::print("{}", scheduler::render_table(*placed));
  return 0;
}

}  // namespace

void add_plan_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<plan_options>();
  auto* cmd = app.add_subcommand("plan", "Print where each actor of a cluster config would run");
  cmd->add_option("--config", o->config_file, "Actor config file (YAML, see docs/configuration.md)")
      ->required();
  cmd->add_flag("--json", o->json, "Print JSON instead of tables");
  cmd->add_option("--bytes-per-param", o->bytes_per_param,
                  "Bytes per weight and KV-cache value (4: float32 on the CPU, 2: bf16)")
      ->check(whole_number(1, 8));
  cmd->add_option("--kv-cache-tokens", o->kv_cache_tokens,
                  "KV-cache tokens per attention shard (default: from the batching limits)")
      ->check(whole_number(0));
  cmd->callback([o, &ctx] { ctx.exit_code = plan(*o); });
}

}  // namespace moe::cli
