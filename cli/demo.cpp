#include "cli/command.hpp"

namespace moe::cli {

void add_demo_command(CLI::App& app, command_context& ctx) {
  auto* cmd = app.add_subcommand("demo", "Run the embedded default model end to end");
  cmd->callback([&ctx] { ctx.exit_code = 0; });
}

}  // namespace moe::cli
