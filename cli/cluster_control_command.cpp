// `moe cluster up|down|status --config FILE`: the node processes of a cluster, from one shell.
//   up      starts `moe node` for every node: local hosts as detached processes (setsid) with
//           their logs and pid files in the run dir, other hosts over `ssh HOST moe node ...`;
//           waits (bounded) until each gatekeeper answers status, prints a table.
//   status  joins each node with the cluster's credentials and prints its state; exit 0 when
//           every node is up, 3 otherwise.
//   down    asks each node to shut down (falls back to SIGTERM, then SIGKILL, through the pid
//           file; a remote node is stopped once its control port stops taking connections), then
//           removes the run dir.
// The run dir: --run-dir, else ${XDG_RUNTIME_DIR:-/tmp}/moe-<cluster name>/.
#include <fmt/format.h>
#include <signal.h>

#include <caf/all.hpp>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "actors/node_client.hpp"
#include "cli/chaos_socket.hpp"
#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "cli/local_processes.hpp"
#include "cli/node_support.hpp"

namespace moe::cli {

namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

constexpr int exit_not_all_up = 3;

struct cluster_options {
  std::string config;
  std::string secret_file;
  std::string run_dir;
  std::string node;  ///< Empty: every node.
  bool dry_run = false;
  double timeout_s = 30;          ///< up: per node, until its gatekeeper answers
  double call_timeout_s = 2;      ///< each connect / status / shutdown call
  std::string ssh = "ssh";
  std::string remote_moe = "moe";  ///< The command on remote hosts.
};

fs::path run_dir_of(const cluster_options& o, const runtime::cluster_config& cfg) {
  return cluster_run_dir(o.run_dir, cfg.name);
}

/// One row of the table.
struct node_row {
  std::string name, address, state, pid, uptime, note;
};

void print_table(const std::vector<node_row>& rows) {
  std::vector<node_row> all{{"NODE", "ADDRESS", "STATE", "PID", "UPTIME", "NOTE"}};
  all.insert(all.end(), rows.begin(), rows.end());
  size_t w[5] = {};
  for (const auto& r : all) {
    const std::string* c[5] = {&r.name, &r.address, &r.state, &r.pid, &r.uptime};
    for (size_t i = 0; i < 5; ++i) w[i] = std::max(w[i], c[i]->size());
  }
  for (const auto& r : all) {
    auto line = fmt::format("{:<{}}  {:<{}}  {:<{}}  {:<{}}  {:<{}}  {}", r.name, w[0], r.address, w[1], r.state,
                            w[2], r.pid, w[3], r.uptime, w[4], r.note);
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  }
  std::fflush(stdout);
}

std::string format_uptime(uint64_t ms) {
  if (ms < 60'000) return fmt::format("{:.1f}s", static_cast<double>(ms) / 1000.0);
  if (ms < 3'600'000) return fmt::format("{}m{:02}s", ms / 60'000, (ms / 1000) % 60);
  return fmt::format("{}h{:02}m", ms / 3'600'000, (ms / 60'000) % 60);
}

struct node_target {
  size_t index;
  const runtime::node_config* node;
  uint16_t port;
  bool local;
  fs::path pid_file, log_file;
};

caf::expected<std::vector<node_target>> targets_of(const cluster_options& o, const runtime::cluster_config& cfg,
                                                   const fs::path& run_dir) {
  std::vector<node_target> out;
  for (size_t i = 0; i < cfg.nodes.size(); ++i) {
    const auto& n = cfg.nodes[i];
    if (!o.node.empty() && n.name != o.node) continue;
    const uint16_t port = runtime::node_control_port(cfg, i);
    if (port == 0) {
      // An ephemeral port is fine for one `moe node`, but nobody else could find it.
      return actors::make_error(actors::node_errc::bad_request,
                                cfg.source + ": node " + n.name +
                                    ": `moe cluster` needs a fixed control port (ports.control or the node's "
                                    "control_port is 0)");
    }
    out.push_back({i, &n, port, is_local_host(n.host), run_dir / (n.name + ".pid"), run_dir / (n.name + ".log")});
  }
  if (out.empty()) return actors::make_error(actors::node_errc::bad_request, "no node named '" + o.node + "'");
  return out;
}

actors::node_credentials credentials(const runtime::cluster_config& cfg) {
  return {cfg.name, cfg.secret, "moe cluster (pid " + std::to_string(::getpid()) + ")"};
}

/// The node's state as `status` reports it, and its status when up.
std::pair<node_row, bool> probe(caf::actor_system& sys, const runtime::cluster_config& cfg, const node_target& t,
                                milliseconds timeout) {
  node_row row{t.node->name, t.node->host + ":" + std::to_string(t.port), "", "-", "-", ""};
  if (t.local) {
    if (auto pid = read_pid_file(t.pid_file)) row.pid = std::to_string(*pid);
  }
  auto gk = actors::connect_gatekeeper(sys, t.node->host, t.port, timeout);
  caf::expected<actors::node_status> st{caf::error{}};
  if (gk) st = actors::request_node_status(sys, *gk, credentials(cfg), timeout);
  const caf::error err = !gk ? gk.error() : (!st ? st.error() : caf::error{});
  if (!err) {
    row.state = "up";
    row.pid = std::to_string(st->info.pid);
    row.uptime = format_uptime(st->uptime_ms);
    row.note = fmt::format("{} heartbeats answered, {} refused", st->heartbeats_answered, st->refused_joins);
    return {row, true};
  }
  const bool refused = err.category() == caf::atom("node") &&
                       err.code() == static_cast<uint8_t>(actors::node_errc::refused);
  const bool timed_out = err.category() == caf::atom("node") &&
                         err.code() == static_cast<uint8_t>(actors::node_errc::timeout);
  // Nothing listening is "down"; something there that does not answer is "unreachable".
  row.state = refused ? "refused" : (timed_out ? "unreachable" : "down");
  row.note = error_text(err);
  return {row, false};
}

std::vector<std::string> node_argv(const cluster_options& o, const std::string& moe, const std::string& config,
                                   const std::string& name) {
  std::vector<std::string> argv{moe, "node", "--config", config, "--name", name};
  if (!o.secret_file.empty()) {
    argv.push_back("--secret-file");
    argv.push_back(fs::absolute(o.secret_file).string());
  }
  return argv;
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    const bool plain = !a.empty() && a.find_first_not_of(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-./:=@%+,") == std::string::npos;
    std::string quoted = "'";
    for (char c : a) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    out += (out.empty() ? "" : " ") + (plain ? a : quoted + "'");
  }
  return out;
}

int run_up(const cluster_options& o, const runtime::cluster_config& cfg) {
  const fs::path run_dir = run_dir_of(o, cfg);
  auto targets = targets_of(o, cfg, run_dir);
  if (!targets) {
    fmt::print(stderr, "moe cluster up: error: {}\n", error_text(targets.error()));
    return 1;
  }
  const std::string config = fs::absolute(o.config).string();
  std::error_code ec;
  if (!o.dry_run) {
    fs::create_directories(run_dir, ec);
    if (ec) {
      fmt::print(stderr, "moe cluster up: error: cannot create {}: {}\n", run_dir.string(), ec.message());
      return 1;
    }
    fs::permissions(run_dir, fs::perms::owner_all, fs::perm_options::replace, ec);
  }
  std::vector<std::pair<const node_target*, pid_t>> started;
  int failures = 0;
  for (const auto& t : *targets) {
    std::vector<std::string> argv;
    if (t.local) {
      argv = node_argv(o, self_executable(), config, t.node->name);
    } else {
      // The remote host must have moe on its PATH and the config at the same path; the ssh
      // process itself is what the pid file tracks (it lives as long as the remote node).
      argv = {o.ssh, "-n", "-o", "BatchMode=yes", t.node->host,
              shell_join(node_argv(o, o.remote_moe, config, t.node->name))};
    }
    if (o.dry_run) {
      fmt::print("{}: {} > {} 2>&1 &\n", t.node->name, shell_join(argv), t.log_file.string());
      continue;
    }
    if (auto pid = read_pid_file(t.pid_file); pid && process_running(*pid)) {
      fmt::print("{}: already running (pid {})\n", t.node->name, *pid);
      continue;
    }
    auto pid = spawn_detached(argv, t.log_file);
    if (!pid) {
      fmt::print(stderr, "moe cluster up: {}: {}\n", t.node->name, error_text(pid.error()));
      ++failures;
      continue;
    }
    if (auto err = write_pid_file(t.pid_file, *pid)) {
      fmt::print(stderr, "moe cluster up: {}: {}\n", t.node->name, error_text(err));
    }
    started.emplace_back(&t, *pid);
  }
  if (o.dry_run) return 0;

  auto sys_cfg = make_networked_system_config(cfg, 2);
  caf::actor_system sys{sys_cfg};
  const milliseconds call_timeout{static_cast<int64_t>(o.call_timeout_s * 1000)};
  std::vector<node_row> rows;
  for (const auto& t : *targets) {
    const auto deadline = std::chrono::steady_clock::now() + milliseconds(static_cast<int64_t>(o.timeout_s * 1000));
    auto it = std::find_if(started.begin(), started.end(), [&](const auto& s) { return s.first == &t; });
    std::pair<node_row, bool> result;
    for (;;) {
      result = probe(sys, cfg, t, call_timeout);
      // Refused will not change by waiting: the node runs with another secret.
      if (result.second || result.first.state == "refused") break;
      if (it != started.end() && !process_running(it->second)) {
        result.first.state = "exited";
        result.first.note = "see " + t.log_file.string() + ":\n" + tail_of_file(t.log_file, 5);
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        result.first.note = fmt::format("not up after {}s; {}", o.timeout_s, result.first.note);
        break;
      }
      std::this_thread::sleep_for(milliseconds(100));
    }
    if (!result.second) ++failures;
    rows.push_back(result.first);
  }
  print_table(rows);
  fmt::print("run dir: {}\n", run_dir.string());
  return failures == 0 ? 0 : 1;
}

int run_status(const cluster_options& o, const runtime::cluster_config& cfg) {
  auto targets = targets_of(o, cfg, run_dir_of(o, cfg));
  if (!targets) {
    fmt::print(stderr, "moe cluster status: error: {}\n", error_text(targets.error()));
    return 1;
  }
  auto sys_cfg = make_networked_system_config(cfg, 2);
  caf::actor_system sys{sys_cfg};
  const milliseconds call_timeout{static_cast<int64_t>(o.call_timeout_s * 1000)};
  std::vector<node_row> rows;
  bool all_up = true;
  for (const auto& t : *targets) {
    auto [row, up] = probe(sys, cfg, t, call_timeout);
    all_up = all_up && up;
    rows.push_back(std::move(row));
  }
  print_table(rows);
  return all_up ? 0 : exit_not_all_up;
}

int run_down(const cluster_options& o, const runtime::cluster_config& cfg) {
  const fs::path run_dir = run_dir_of(o, cfg);
  auto targets = targets_of(o, cfg, run_dir);
  if (!targets) {
    fmt::print(stderr, "moe cluster down: error: {}\n", error_text(targets.error()));
    return 1;
  }
  auto sys_cfg = make_networked_system_config(cfg, 2);
  caf::actor_system sys{sys_cfg};
  const milliseconds call_timeout{static_cast<int64_t>(o.call_timeout_s * 1000)};
  const milliseconds grace{static_cast<int64_t>(std::max(1.0, o.timeout_s / 3) * 1000)};
  int failures = 0;
  for (const auto& t : *targets) {
    // 0: no pid file (a remote node, or one `up` did not start).
    const pid_t pid = t.local ? read_pid_file(t.pid_file).value_or(0) : 0;
    std::string how = "not running";
    auto gk = actors::connect_gatekeeper(sys, t.node->host, t.port, call_timeout);
    caf::error asked = gk ? actors::request_node_shutdown(sys, *gk, credentials(cfg), call_timeout) : gk.error();
    if (!asked) how = "shut down on request";
    if (pid != 0 && process_running(pid)) {
      if (asked || !wait_for_exit(pid, grace)) {
        signal_process_group(pid, SIGTERM);
        how = "SIGTERM";
        if (!wait_for_exit(pid, grace)) {
          signal_process_group(pid, SIGKILL);
          how = "SIGKILL";
          if (!wait_for_exit(pid, grace)) {
            how = "still running after SIGKILL";
            ++failures;
          }
        }
      }
    } else if (pid == 0) {
      // A remote node has no pid here to watch: whether its control port still takes a
      // connection says whether it is still there (a node that took the request closes it on
      // its way out). A request that could not be made while the port answers (a busy node, a
      // slow handshake) is made again until the deadline.
      const host_port at{t.node->host, t.port};
      const auto answering = [&] { return static_cast<bool>(connect_tcp(at, call_timeout)); };
      const auto deadline = std::chrono::steady_clock::now() + grace;
      while (asked && answering() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(milliseconds(200));
        auto again = actors::connect_gatekeeper(sys, t.node->host, t.port, call_timeout);
        asked = again ? actors::request_node_shutdown(sys, *again, credentials(cfg), call_timeout)
                      : again.error();
      }
      if (!asked) {
        how = "shut down on request";
        const auto gone_by = std::chrono::steady_clock::now() + grace;
        while (answering() && std::chrono::steady_clock::now() < gone_by)
          std::this_thread::sleep_for(milliseconds(100));
        if (answering()) {
          how = fmt::format("still answering {}s after the shutdown request",
                            std::chrono::duration_cast<std::chrono::seconds>(grace).count());
          ++failures;
        }
      } else if (answering()) {
        how =
            "not stopped: it takes connections but not the shutdown request: " + error_text(asked);
        ++failures;
      }
    }
    fmt::print("{}: {}\n", t.node->name, how);
    std::error_code ec;
    fs::remove(t.pid_file, ec);
  }
  if (failures == 0 && o.node.empty() && !run_dir.empty()) {
    std::error_code ec;
    fs::remove_all(run_dir, ec);
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

void add_cluster_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<cluster_options>();
  auto* cmd = app.add_subcommand("cluster", "Start, inspect and stop the node processes of a cluster");
  cmd->require_subcommand(1);
  auto common = [o](CLI::App* sub) {
    sub->add_option("--config", o->config, "Cluster config (YAML, docs/configuration.md)")->required();
    sub->add_option("--secret-file", o->secret_file, "Read the cluster secret from this file");
    sub->add_option("--run-dir", o->run_dir, "Logs and pid files (default ${XDG_RUNTIME_DIR:-/tmp}/moe-CLUSTER)");
    sub->add_option("--node", o->node, "Only this node");
    sub->add_option("--call-timeout", o->call_timeout_s,
                    "Seconds for each call to a node (default 2)")
        ->check(timeout_seconds());
  };
  struct sub_command {
    const char* name;
    const char* help;
    int (*run)(const cluster_options&, const runtime::cluster_config&);
  };
  const sub_command subs[] = {
      {"up", "Start a node process per node (local: detached; remote: over ssh) and wait until each answers",
       run_up},
      {"status", "Join each node and print its state (exit 0: all up, 3: not all up)", run_status},
      {"down", "Stop every node (shutdown request, then SIGTERM, then SIGKILL) and remove the run dir", run_down},
  };
  for (const auto& s : subs) {
    auto* sub = cmd->add_subcommand(s.name, s.help);
    common(sub);
    if (std::string(s.name) == "up") {
      sub->add_flag("--dry-run", o->dry_run, "Print the commands that would run; start nothing");
      sub->add_option("--timeout", o->timeout_s,
                      "Seconds to wait for each node to answer (default 30)")
          ->check(timeout_seconds());
      sub->add_option("--ssh", o->ssh, "ssh command for remote nodes (default ssh)");
      sub->add_option("--remote-moe", o->remote_moe, "moe on remote hosts (default: moe from PATH)");
    }
    if (std::string(s.name) == "down") {
      sub->add_option("--timeout", o->timeout_s,
                      "Seconds for each node's stop, all steps together (default 30)")
          ->check(timeout_seconds());
    }
    sub->callback([o, run = s.run, name = std::string(s.name), &ctx] {
      auto cfg = load_cluster_with_secret(o->config, o->secret_file);
      if (!cfg) {
        fmt::print(stderr, "moe cluster {}: error: {}\n", name, error_text(cfg.error()));
        ctx.exit_code = 1;
        return;
      }
      ctx.exit_code = run(*o, *cfg);
    });
  }
}

}  // namespace moe::cli
