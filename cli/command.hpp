// How a `moe` subcommand plugs into the CLI: each file adds one subcommand to the app and
// stores its exit status in the shared context when it runs.
#pragma once

#include <CLI/CLI.hpp>

namespace moe::cli {

struct command_context {
  int exit_code = 0;
};

void add_version_command(CLI::App& app, command_context& ctx);
void add_demo_command(CLI::App& app, command_context& ctx);
void add_run_command(CLI::App& app, command_context& ctx);
void add_init_model_command(CLI::App& app, command_context& ctx);
void add_plan_command(CLI::App& app, command_context& ctx);
void add_plan_experts_command(CLI::App& app, command_context& ctx);
void add_submit_command(CLI::App& app, command_context& ctx);
void add_rebalance_command(CLI::App& app, command_context& ctx);
void add_train_command(CLI::App& app, command_context& ctx);
void add_serve_command(CLI::App& app, command_context& ctx);
void add_node_command(CLI::App& app, command_context& ctx);
void add_cluster_command(CLI::App& app, command_context& ctx);
void add_chaos_command(CLI::App& app, command_context& ctx);

}  // namespace moe::cli
