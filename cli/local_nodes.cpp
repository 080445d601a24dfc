#include "cli/local_nodes.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <random>

#include "cli/local_processes.hpp"

namespace moe::cli {

namespace {

namespace fs = std::filesystem;

std::string random_secret() {
  std::random_device rd;
  return fmt::format("{:016x}{:016x}", (uint64_t{rd()} << 32) | rd(), (uint64_t{rd()} << 32) | rd());
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

constexpr std::string_view run_dir_prefix = "moe-demo-";
constexpr std::string_view owner_file = "demo.pid";

}  // namespace

size_t remove_stale_run_dirs(const fs::path& parent) {
  std::error_code ec;
  fs::directory_iterator it(parent, ec);
  if (ec) return 0;
  size_t removed = 0;
  for (const auto& entry : it) {
    const auto name = entry.path().filename().string();
    if (!name.starts_with(run_dir_prefix)) continue;
    struct stat st{};
    if (::lstat(entry.path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid()) continue;
    // A dir without a readable pid is being created by a demo starting now (or predates the pid
    // file): left alone.
    const auto pid = read_pid_file(entry.path() / owner_file);
    if (!pid || process_running(*pid)) continue;
    fs::remove_all(entry.path(), ec);
    if (!ec) ++removed;
  }
  return removed;
}

std::string split_config_yaml(const runtime::cluster_config& base, int count, const std::vector<uint16_t>& ports,
                              const std::string& secret) {
  const auto& first = base.nodes.front();
  const auto share = [count](int64_t v) { return std::max<int64_t>(v > 0 ? 1 : 0, v / count); };
  std::string y = fmt::format("cluster:\n  name: {}\n  secret: {}\n  heartbeat_interval_ms: {}\n  failure_timeout_ms: {}\n",
                              quoted(base.name + "-processes"), quoted(secret), base.heartbeat_interval_ms,
                              base.failure_timeout_ms);
  y += "nodes:\n";
  for (int i = 0; i < count; ++i) {
    y += fmt::format("  - name: n{}\n    host: 127.0.0.1\n    control_port: {}\n    metrics_port: {}\n    devices: {{gpus: {}, cpu_slots: {}}}\n",
                     i, ports[2 * static_cast<size_t>(i)], ports[2 * static_cast<size_t>(i) + 1], share(first.gpus),
                     share(first.cpu_slots));
    if (first.cpu_slots > 0) y += fmt::format("    memory: {}\n", first.memory_bytes / static_cast<uint64_t>(count));
    if (first.gpus > 0) y += fmt::format("    gpu_memory: {}\n", first.gpu_memory_bytes);
  }
  if (!base.model.preset.empty()) {
    y += fmt::format("model:\n  preset: {}\n", base.model.preset);
    if (base.model.seed) y += fmt::format("  seed: {}\n", *base.model.seed);
  } else {
    y += fmt::format("model:\n  path: {}\n", quoted(fs::absolute(base.model.path).string()));
  }
  y += fmt::format("attention_shards: {}\nexpert_groups:\n  count: {}\n", base.attention_shards, base.expert_groups.count);
  if (!base.expert_groups.experts.empty()) {
    y += "  experts:\n";
    for (const auto& g : base.expert_groups.experts) {
      std::string list;
      for (auto e : g) list += (list.empty() ? "" : ", ") + std::to_string(e);
      y += "    - [" + list + "]\n";
    }
  }
  y += fmt::format("redundant_expert_slots: {}\n", base.redundant_expert_slots);
  const auto& b = base.batching;
  y += fmt::format("batching:\n  max_running_requests: {}\n  max_batch_tokens: {}\n  max_queue: {}\n  max_new_tokens_limit: {}\n",
                   b.max_running_requests, b.max_batch_tokens, b.max_queue, b.max_new_tokens_limit);
  y += fmt::format("ports:\n  control: {}\n  api: {}\n  metrics: {}\n", ports[0], base.ports.api, base.ports.metrics);
  return y;
}

caf::expected<std::unique_ptr<local_nodes>> local_nodes::start(const runtime::cluster_config& base, int count) {
  if (count < 1 || base.nodes.empty())
    return make_error(process_errc::spawn_failed, "a local multi-process cluster needs at least one node");
  auto n = std::unique_ptr<local_nodes>(new local_nodes());
  const auto parent = fs::temp_directory_path();
  (void)remove_stale_run_dirs(parent);
  std::string tmpl = (parent / (std::string(run_dir_prefix) + "XXXXXX")).string();
  if (::mkdtemp(tmpl.data()) == nullptr)
    return make_error(process_errc::io_error, "cannot create a run directory under " + parent.string());
  n->dir_ = tmpl;  // mode 0700: the config below holds the secret
  if (auto err = write_pid_file(n->dir_ / owner_file, ::getpid())) return err;
  auto ports = free_loopback_ports(2 * static_cast<size_t>(count));
  if (!ports) return ports.error();
  const auto file = n->dir_ / "cluster.yaml";
  {
    std::ofstream out(file);
    out << split_config_yaml(base, count, *ports, random_secret());
    if (!out) return make_error(process_errc::io_error, "cannot write " + file.string());
  }
  auto cfg = runtime::load_cluster_config(file);
  if (!cfg) return cfg.error();
  n->config_ = std::move(*cfg);
  for (const auto& node : n->config_.nodes) {
    // The nodes end with this thread (the demo's main thread) even where no destructor runs:
    // a demo killed, or ended by SIGPIPE or Ctrl-C, left every node running.
    auto pid =
        spawn_detached({self_executable(), "node", "--config", file.string(), "--name", node.name},
                       n->dir_ / (node.name + ".log"), on_spawner_exit::terminate);
    if (!pid) return pid.error();
    n->pids_.push_back(*pid);
  }
  return n;
}

std::string local_nodes::log_tails() const {
  std::string out;
  for (const auto& node : config_.nodes)
    out += fmt::format("node {} ({}):\n{}", node.name, (dir_ / (node.name + ".log")).string(),
                       tail_of_file(dir_ / (node.name + ".log"), 8));
  return out;
}

local_nodes::~local_nodes() {
  for (auto pid : pids_) signal_process_group(pid, SIGTERM);
  for (auto pid : pids_) {
    if (!wait_for_exit(pid, std::chrono::seconds(10))) {
      signal_process_group(pid, SIGKILL);
      (void)wait_for_exit(pid, std::chrono::seconds(5));
    }
  }
  std::error_code ec;
  if (!dir_.empty()) fs::remove_all(dir_, ec);
}

}  // namespace moe::cli
