// `moe`: the single command of the project. Each subcommand lives in its own file.
#include <CLI/CLI.hpp>

#include "cli/command.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moe: an actor runtime that serves and trains DeepSeek-V3-class MoE models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", MOE_VERSION);
  moe::cli::command_context ctx;
  moe::cli::add_version_command(app, ctx);
  moe::cli::add_demo_command(app, ctx);
  moe::cli::add_run_command(app, ctx);
  moe::cli::add_init_model_command(app, ctx);
  moe::cli::add_plan_command(app, ctx);
  moe::cli::add_plan_experts_command(app, ctx);
  moe::cli::add_submit_command(app, ctx);
  moe::cli::add_rebalance_command(app, ctx);
  moe::cli::add_train_command(app, ctx);
  moe::cli::add_serve_command(app, ctx);
  moe::cli::add_node_command(app, ctx);
  moe::cli::add_cluster_command(app, ctx);
  moe::cli::add_chaos_command(app, ctx);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return ctx.exit_code;
}
