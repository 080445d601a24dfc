// `moe node --config FILE --name NODE`: one node process of a multi-process cluster. It serves
// the node agent, its gatekeeper on the node's control endpoint and /metrics until SIGINT,
// SIGTERM or a shutdown request through the gatekeeper (which raises SIGTERM at the process,
// so both take the same path).
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <fstream>

#include "actors/actor_types.hpp"
#include "actors/node_process.hpp"
#include "cli/command.hpp"
#include "cli/node_support.hpp"

namespace moe::cli {

caf::expected<runtime::cluster_config> load_cluster_with_secret(const std::string& config_file,
                                                                const std::string& secret_file) {
  auto cfg = runtime::load_cluster_config(config_file);
  if (!cfg || secret_file.empty()) return cfg;
  std::ifstream in(secret_file, std::ios::binary);
  std::string secret((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in && !in.eof()) {
    return runtime::make_error(runtime::cluster_config_errc::io_error, "cannot read secret file " + secret_file);
  }
  while (!secret.empty() && std::isspace(static_cast<unsigned char>(secret.back()))) secret.pop_back();
  if (secret.empty()) {
    return runtime::make_error(runtime::cluster_config_errc::bad_config,
                               "secret file " + secret_file + " is empty or unreadable");
  }
  cfg->secret = std::move(secret);
  return cfg;
}

runtime::actor_system_config make_networked_system_config(const runtime::cluster_config& cluster,
                                                          size_t num_worker_threads) {
  runtime::actor_system_config::options o;
  o.load_middleman = true;
  o.num_worker_threads = num_worker_threads;
  o.tls = cluster.tls;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  return cfg;
}

runtime::actor_system_config make_local_system_config() {
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  return cfg;
}

namespace {

struct node_options {
  std::string config;
  std::string name;
  std::string secret_file;
  std::string bind_host;
};

int run_node(const node_options& o) {
  // Blocked before any thread exists, so CAF's and the servers' threads inherit the mask and
  // only sigwait below sees SIGINT/SIGTERM.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto cfg = load_cluster_with_secret(o.config, o.secret_file);
  if (!cfg) {
    fmt::print(stderr, "moe node: error: {}\n", error_text(cfg.error()));
    return 1;
  }
  spdlog::set_pattern(fmt::format("%Y-%m-%dT%H:%M:%S.%e %l [node {}] %v", o.name));
  auto sys_cfg = make_networked_system_config(*cfg);
  caf::actor_system sys{sys_cfg};
  actors::node_process_options po;
  po.node = o.name;
  po.bind_host = o.bind_host;
  po.on_shutdown = [] { ::kill(::getpid(), SIGTERM); };
  auto node = actors::node_process::start(sys, *cfg, po);
  if (!node) {
    spdlog::error("cannot start: {}", error_text(node.error()));
    return 1;
  }
  const auto& info = (*node)->info();
  spdlog::info("up: cluster '{}', control {}:{}{}, metrics {}, pid {}", cfg->name, info.host, info.control_port,
               cfg->tls ? " (TLS)" : "", (*node)->metrics_url(), info.pid);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("{} received: stopping", sig == SIGINT ? "SIGINT" : "SIGTERM");
  (*node)->stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace

void add_node_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<node_options>();
  auto* cmd = app.add_subcommand("node", "Run one node of a multi-process cluster (agent, gatekeeper, /metrics)");
  cmd->add_option("--config", o->config, "Cluster config (YAML, docs/configuration.md)")->required();
  cmd->add_option("--name", o->name, "Which of the config's nodes this process is")->required();
  cmd->add_option("--secret-file", o->secret_file, "Read the cluster secret from this file (overrides cluster.secret)");
  cmd->add_option("--bind", o->bind_host, "Address to bind (default: the node's host; 0.0.0.0 in a pod)");
  cmd->callback([o, &ctx] { ctx.exit_code = run_node(*o); });
}

}  // namespace moe::cli
