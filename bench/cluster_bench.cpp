// A serving cluster run as several processes against the same cluster run in one process, in one
// run: prefill time, time to first token and decode tokens/s at several batch sizes, on the
// same checkpoint and the same cluster config (two nodes n0 and n1, each with half of the CPU
// slots; 1 attention shard, 4 expert groups). Single-process: both nodes' agents in this
// process (serving_options::join_nodes = false). Multi-process: this process is the coordinator
// (controller) and joins two `moe node` processes, which hold the model's actors; activations
// travel between the processes over UCX. Jobs go straight to each cluster's controller, as in
// bench/actors_bench.cpp. Measurements are interleaved (single, multi, single, multi, ...) and
// the median of --repeats is reported. Greedy outputs of both must be identical, token for
// token, in every run: the bench fails (exit 1) when they are not.
//
// The node processes run in their own process groups with PR_SET_PDEATHSIG = SIGKILL; they are
// stopped (SIGTERM to the group, SIGKILL after a grace period) and reaped on every exit path of
// this process, SIGINT/SIGTERM/SIGHUP included.
//
// Prints one JSON object; per batch: single / multi figures, ratio_multi_over_single and
// overhead_percent (decode: 100 * (1 - multi / single tokens/s); ttft: 100 * (multi / single - 1)).
//
//   moe_bench_cluster [--preset small] [--batches 1,32] [--prompt-len 64] [--new-tokens 17]
//                     [--repeats 3] [--warmup 1] [--moe PATH/TO/moe]
#include <caf/all.hpp>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "actors/actor_types.hpp"
#include "cli/local_processes.hpp"
#include "actors/controller.hpp"
#include "actors/serving_cluster.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/cluster_config.hpp"

#ifndef MOE_BINARY_PATH
#define MOE_BINARY_PATH "moe"
#endif

using clock_type = std::chrono::steady_clock;
using nlohmann::json;
namespace fs = std::filesystem;
namespace ma = moe::actors;

namespace {

double since(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct bench_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- node processes -------------------------------------------------------------------------

// The node processes' group ids, for the signal handler (async-signal-safe reads only).
constexpr int max_nodes = 16;
std::atomic<pid_t> node_groups[max_nodes];

// The run dir and the files in it, for the signal handler to remove (written before the nodes
// start, read only there).
constexpr int max_run_files = 2 * max_nodes + 2;
char run_dir_path[PATH_MAX];
char run_files[max_run_files][PATH_MAX];
std::atomic<int> num_run_files{0};

void note_run_file(const fs::path& p) {
  const int i = num_run_files.load();
  if (i >= max_run_files || p.native().size() >= PATH_MAX) return;
  std::memcpy(run_files[i], p.c_str(), p.native().size() + 1);
  num_run_files.store(i + 1);
}

extern "C" void kill_nodes_and_exit(int sig) {
  for (auto& g : node_groups) {
    const pid_t p = g.load();
    if (p > 0) ::kill(-p, SIGKILL);
  }
  for (auto& g : node_groups) {
    const pid_t p = g.load();
    if (p > 0) ::waitpid(p, nullptr, 0);
  }
  const int n = num_run_files.load();
  for (int i = 0; i < n; ++i) ::unlink(run_files[i]);
  if (run_dir_path[0] != '\0') ::rmdir(run_dir_path);
  ::_exit(128 + sig);
}

// Owns the run dir and the `moe node` processes. Destruction stops and reaps every node and
// removes the run dir (kept when keep_dir is set, for the logs).
class node_processes {
 public:
  explicit node_processes(std::string moe_binary) : moe_(std::move(moe_binary)) {
    std::string tmpl = (fs::temp_directory_path() / "moe-bench-cluster-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw bench_failure("cannot create a run directory: " + tmpl);
    dir_ = tmpl;
    if (tmpl.size() < PATH_MAX) std::memcpy(run_dir_path, tmpl.c_str(), tmpl.size() + 1);
  }
  node_processes(const node_processes&) = delete;
  node_processes& operator=(const node_processes&) = delete;

  ~node_processes() {
    for (auto pid : pids_) ::kill(-pid, SIGTERM);
    for (auto pid : pids_) {
      if (!wait_for(pid, std::chrono::seconds(10))) {
        ::kill(-pid, SIGKILL);
        (void)wait_for(pid, std::chrono::seconds(10));
      }
      ::kill(-pid, SIGKILL);  // anything the node left behind in its group
      for (auto& g : node_groups) {
        pid_t expected = pid;
        g.compare_exchange_strong(expected, 0);
      }
    }
    run_dir_path[0] = '\0';
    num_run_files.store(0);
    std::error_code ec;
    if (keep_dir) std::fprintf(stderr, "moe_bench_cluster: node logs kept in %s\n", dir_.c_str());
    else fs::remove_all(dir_, ec);
  }

  [[nodiscard]] const fs::path& dir() const noexcept { return dir_; }

  // fork + exec `moe node --config FILE --name NAME`, in a process group of its own, killed by
  // the kernel if this process dies, output to NAME.log in the run dir.
  void spawn(const fs::path& config_file, const std::string& name) {
    if (pids_.size() >= max_nodes) throw bench_failure("too many node processes");
    std::vector<std::string> argv = {moe_, "node", "--config", config_file.string(), "--name", name};
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    const auto log = dir_ / (name + ".log");
    note_run_file(log);
    const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) throw bench_failure("cannot open " + log.string() + ": " + std::strerror(errno));
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::close(log_fd);
      if (null_fd >= 0) ::close(null_fd);
      throw bench_failure(std::string("fork: ") + std::strerror(errno));
    }
    if (pid == 0) {  // async-signal-safe calls only from here on
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) _exit(126);  // the parent died before prctl
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
      ::dup2(log_fd, STDOUT_FILENO);
      ::dup2(log_fd, STDERR_FILENO);
      ::execv(args[0], args.data());
      _exit(127);
    }
    ::setpgid(pid, pid);  // also from the parent: no window in which a kill(-pid) misses it
    ::close(log_fd);
    if (null_fd >= 0) ::close(null_fd);
    pids_.push_back(pid);
    names_.push_back(name);
    for (auto& g : node_groups) {
      pid_t expected = 0;
      if (g.compare_exchange_strong(expected, pid)) break;
    }
  }

  // The end of every node's log, and whether each is still running.
  [[nodiscard]] std::string report() const {
    std::string out;
    for (size_t i = 0; i < pids_.size(); ++i) {
      int status = 0;
      const bool gone = ::waitpid(pids_[i], &status, WNOHANG) == pids_[i];
      out += "node " + names_[i] + " (pid " + std::to_string(pids_[i]) + (gone ? ", exited" : ", running") +
             "), " + (dir_ / (names_[i] + ".log")).string() + ":\n" + moe::cli::tail_of_file(dir_ / (names_[i] + ".log"), 12);
    }
    return out;
  }

  bool keep_dir = false;

 private:
  static bool wait_for(pid_t pid, std::chrono::milliseconds timeout) {
    const auto deadline = clock_type::now() + timeout;
    for (;;) {
      const pid_t r = ::waitpid(pid, nullptr, WNOHANG);
      if (r == pid || (r < 0 && errno == ECHILD)) return true;
      if (clock_type::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  std::string moe_;
  fs::path dir_;
  std::vector<pid_t> pids_;
  std::vector<std::string> names_;
};

std::vector<uint16_t> free_ports(size_t count) {
  auto p = moe::cli::free_loopback_ports(count);
  if (!p) throw bench_failure(moe::error_text(p.error()));
  return std::move(*p);
}

std::string random_secret() {
  std::random_device rd;
  char buf[33];
  std::snprintf(buf, sizeof buf, "%08x%08x%08x%08x", rd(), rd(), rd(), rd());
  return buf;
}

// ---- measurement ----------------------------------------------------------------------------

struct figures {
  double prefill_seconds = 0;  // submission of the batch to the last request's first token
  double ttft_seconds = 0;     // mean over requests
  double decode_tokens_per_second = 0;
  double decode_seconds = 0;
};

// Submits every prompt to the cluster's controller at once (greedy), waits for them all and
// returns the figures; `outputs` receives each prompt's generated tokens.
figures run_batch(caf::actor_system& sys, const ma::serving_cluster& cluster,
                  const std::vector<std::vector<int32_t>>& prompts, int64_t new_tokens,
                  std::vector<std::vector<int32_t>>& outputs, const char* label) {
  caf::scoped_actor self{sys};
  std::map<uint64_t, size_t> index;  // job id -> prompt
  std::map<uint64_t, clock_type::time_point> first;
  outputs.assign(prompts.size(), {});
  size_t finished = 0;
  const auto t0 = clock_type::now();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ma::generation_job j;
    j.prompt = prompts[i];
    j.max_new_tokens = new_tokens;  // sampling: default (temperature 0, greedy)
    std::string failure;
    self->request(cluster.controller(), std::chrono::seconds(60), ma::submit_atom::value, j, caf::actor{self})
        .receive([&](uint64_t id) { index[id] = i; },
                 [&](const caf::error& e) { failure = moe::error_text(e); });
    if (!failure.empty()) throw bench_failure(std::string(label) + ": submit: " + failure);
  }
  clock_type::time_point last_first, end;
  // Failures are noted in the handler and thrown after the receive, outside CAF's code.
  std::string failure;
  auto handle = [&](const ma::job_event& ev, clock_type::time_point now) {
    auto it = index.find(ev.job);
    if (it == index.end()) {
      failure = "event for unknown job " + std::to_string(ev.job);
      return;
    }
    auto& out = outputs[it->second];
    if (!ev.tokens.empty() && !first.count(ev.job)) {
      first[ev.job] = now;
      last_first = std::max(last_first, now);
    }
    out.insert(out.end(), ev.tokens.begin(), ev.tokens.end());
    if (ev.finished) {
      if (ev.state != ma::job_state::finished)
        failure = "job " + std::to_string(ev.job) + " ended " + ma::to_string(ev.state) + " (" +
                  ev.finish_reason + "): " + ev.error;
      ++finished;
      end = now;
    }
  };
  bool timed_out = false;
  while (finished < prompts.size() && !timed_out && failure.empty()) {
    self->receive([&](ma::job_event_atom, const ma::job_event& ev) { handle(ev, clock_type::now()); },
                  caf::after(std::chrono::seconds(300)) >> [&] { timed_out = true; });
  }
  if (!failure.empty()) throw bench_failure(std::string(label) + ": " + failure);
  if (timed_out)
    throw bench_failure(std::string(label) + ": no job event for 300 s (" + std::to_string(finished) + "/" +
                        std::to_string(prompts.size()) + " finished)");
  for (size_t i = 0; i < prompts.size(); ++i)
    if (outputs[i].size() != static_cast<size_t>(new_tokens))
      throw bench_failure(std::string(label) + ": request " + std::to_string(i) + " produced " +
                          std::to_string(outputs[i].size()) + " tokens, expected " + std::to_string(new_tokens));
  double ttft = 0;
  for (const auto& [id, t] : first) ttft += since(t0, t);
  figures f;
  f.prefill_seconds = since(t0, last_first);
  f.ttft_seconds = ttft / static_cast<double>(first.size());
  f.decode_seconds = since(last_first, end);
  f.decode_tokens_per_second =
      static_cast<double>(prompts.size() * static_cast<size_t>(new_tokens - 1)) / f.decode_seconds;
  return f;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

json summarize(const std::vector<figures>& runs) {
  std::vector<double> pre, ttft, tps, dec;
  json samples = json::array();
  for (const auto& f : runs) {
    pre.push_back(f.prefill_seconds);
    ttft.push_back(f.ttft_seconds);
    tps.push_back(f.decode_tokens_per_second);
    dec.push_back(f.decode_seconds);
    samples.push_back(f.decode_tokens_per_second);
  }
  return {{"prefill_seconds", median(pre)},
          {"ttft_seconds", median(ttft)},
          {"decode_seconds", median(dec)},
          {"decode_tokens_per_second", median(tps)},
          {"decode_tokens_per_second_samples", samples}};
}

std::string join_tokens(const std::vector<int32_t>& v) {
  std::string s;
  for (auto t : v) s += (s.empty() ? "" : " ") + std::to_string(t);
  return s;
}

// Every run of a batch, single- or multi-process, must produce the tokens of the first one.
void check_identical(const std::vector<std::vector<int32_t>>& expected, const std::vector<std::vector<int32_t>>& got,
                     int64_t batch, const std::string& run) {
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] != got[i])
      throw bench_failure("greedy outputs differ (batch " + std::to_string(batch) + ", request " + std::to_string(i) +
                          "): first single-process run: " + join_tokens(expected[i]) + "; " + run + ": " +
                          join_tokens(got[i]));
  }
}

json describe_placement(const ma::serving_cluster& c) {
  json groups = json::array();
  for (const auto& g : c.placement().expert_groups) groups.push_back(g.device.to_string());
  json attention = json::array();
  for (const auto& a : c.placement().attention) attention.push_back(a.device.to_string());
  return {{"attention_and_router", attention}, {"expert_groups", groups}};
}

// Logging of the libraries (spdlog's default logger, UCX) goes to stdout: fd 1 is pointed at
// stderr for the whole run and the JSON is written to the original stdout, which holds nothing else.
int json_fd = STDOUT_FILENO;

void route_logs_to_stderr() {
  std::fflush(stdout);
  json_fd = ::dup(STDOUT_FILENO);
  if (json_fd < 0 || ::dup2(STDERR_FILENO, STDOUT_FILENO) < 0) json_fd = STDOUT_FILENO;
}

void print_json(const std::string& text) {
  std::fflush(stdout);
  for (size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(json_fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw bench_failure("cannot write the JSON report");
    done += static_cast<size_t>(n);
  }
}

struct options {
  std::string preset = "small";
  std::vector<int64_t> batches = {1, 32};
  int64_t prompt_len = 64, new_tokens = 17;
  int repeats = 3, warmup = 1;
  int64_t groups = 4, cpu_slots_per_node = 2;
  std::string moe = MOE_BINARY_PATH;
  double join_timeout_s = 60;
};

int run(const options& o) {
  if (o.new_tokens < 2) throw bench_failure("--new-tokens must be at least 2");
  if (o.repeats < 1 || o.batches.empty()) throw bench_failure("need at least one repeat and one batch size");
  if (::access(o.moe.c_str(), X_OK) != 0)
    throw bench_failure("moe binary not executable: " + o.moe + " (pass --moe PATH)");
  const int64_t max_batch = *std::max_element(o.batches.begin(), o.batches.end());

  // Declared first: destroyed last, after the clusters and the actor system are gone.
  node_processes nodes(o.moe);

  // One config for both runs: two nodes on loopback with fresh ports, the model preset, one
  // attention shard, `groups` expert groups (even split). Batching sized so that a whole batch
  // is prefilled in one step and runs at once, and the KV cache holds it.
  const std::string secret = random_secret();
  std::string yaml = "cluster:\n  name: bench-cluster\n  secret: \"" + secret + "\"\n";
  yaml += "nodes:\n";
  const auto ports = free_ports(4);
  for (int i = 0; i < 2; ++i) {
    yaml += "  - name: n" + std::to_string(i) +
            "\n    host: 127.0.0.1\n    control_port: " + std::to_string(ports[2 * i]) +
            "\n    metrics_port: " + std::to_string(ports[2 * i + 1]) +
            "\n    devices: {cpu_slots: " + std::to_string(o.cpu_slots_per_node) +
            "}\n    memory: 8GiB\n";
  }
  yaml += "model:\n  preset: " + o.preset + "\n  seed: 0\n";
  yaml += "attention_shards: 1\nexpert_groups:\n  count: " + std::to_string(o.groups) + "\n";
  yaml += "redundant_expert_slots: 0\n";
  yaml += "batching:\n  max_running_requests: " + std::to_string(std::max<int64_t>(max_batch, 1)) +
          "\n  max_batch_tokens: " + std::to_string(std::max<int64_t>(4096, max_batch * o.prompt_len)) +
          "\n  max_queue: " + std::to_string(std::max<int64_t>(256, max_batch)) +
          "\n  max_new_tokens_limit: " + std::to_string(o.prompt_len + o.new_tokens + 16) + "\n";
  yaml += "ports:\n  control: 0\n  api: 0\n  metrics: 0\n";
  const auto config_file = nodes.dir() / "cluster.yaml";
  note_run_file(config_file);
  {
    std::ofstream out(config_file);
    out << yaml;
    if (!out) throw bench_failure("cannot write " + config_file.string());
  }
  auto cfg = moe::runtime::load_cluster_config(config_file);
  if (!cfg) throw bench_failure("config: " + moe::error_text(cfg.error()));
  auto model_dir = ma::resolve_model_dir(*cfg, ma::default_model_cache());  // writes the preset once
  if (!model_dir) throw bench_failure("model: " + moe::error_text(model_dir.error()));

  for (const auto& n : cfg->nodes) nodes.spawn(config_file, n.name);

  moe::runtime::actor_system_config::options so;
  so.load_middleman = true;  // scheduler_policy: "sharing" (the default)
  moe::runtime::actor_system_config sys_cfg{so};
  ma::add_actor_message_types(sys_cfg);
  caf::actor_system sys{sys_cfg};

  std::unique_ptr<ma::serving_cluster> single, multi;
  json report;
  try {
    ma::serving_options local;
    local.api_port = 0;
    local.metrics_port = 0;
    auto s = ma::serving_cluster::start(sys, *cfg, local);
    if (!s) throw bench_failure("single-process cluster: " + moe::error_text(s.error()));
    single = std::move(*s);

    ma::serving_options joined = local;
    joined.join_nodes = true;
    joined.join_timeout = std::chrono::milliseconds(static_cast<int64_t>(o.join_timeout_s * 1000));
    auto m = ma::serving_cluster::start(sys, *cfg, joined);
    if (!m) throw bench_failure("multi-process cluster: " + moe::error_text(m.error()));
    multi = std::move(*m);

    std::mt19937 rng(11);
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(single->model().vocab_size - 1));
    json runs = json::array();
    for (int64_t batch : o.batches) {
      std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch),
                                                std::vector<int32_t>(static_cast<size_t>(o.prompt_len)));
      for (auto& p : prompts)
        for (auto& t : p) t = token(rng);
      std::vector<std::vector<int32_t>> expected, out;
      int compared = 0;
      auto measure = [&](ma::serving_cluster& c, bool is_multi, const std::string& run) {
        const auto f = run_batch(sys, c, prompts, o.new_tokens, out, is_multi ? "multi-process" : "single-process");
        if (expected.empty()) expected = out;
        else check_identical(expected, out, batch, run);
        ++compared;
        return f;
      };
      for (int w = 0; w < o.warmup; ++w) {
        (void)measure(*single, false, "single-process warm-up " + std::to_string(w));
        (void)measure(*multi, true, "multi-process warm-up " + std::to_string(w));
      }
      std::vector<figures> fs_single, fs_multi;
      for (int r = 0; r < o.repeats; ++r) {
        fs_single.push_back(measure(*single, false, "single-process repeat " + std::to_string(r)));
        fs_multi.push_back(measure(*multi, true, "multi-process repeat " + std::to_string(r)));
      }
      const json js = summarize(fs_single), jm = summarize(fs_multi);
      const double tps_ratio = jm["decode_tokens_per_second"].get<double>() /
                               js["decode_tokens_per_second"].get<double>();
      const double ttft_ratio = jm["ttft_seconds"].get<double>() / js["ttft_seconds"].get<double>();
      const double prefill_ratio = jm["prefill_seconds"].get<double>() / js["prefill_seconds"].get<double>();
      runs.push_back({{"batch", batch},
                      {"single_process", js},
                      {"multi_process", jm},
                      {"ratio_multi_over_single",
                       {{"decode_tokens_per_second", tps_ratio},
                        {"ttft_seconds", ttft_ratio},
                        {"prefill_seconds", prefill_ratio}}},
                      {"overhead_percent",
                       {{"decode", 100.0 * (1.0 - tps_ratio)}, {"ttft", 100.0 * (ttft_ratio - 1.0)}}},
                      {"greedy_outputs_identical", true},
                      {"runs_compared", compared}});
    }
    report = {{"benchmark", "multi_process_vs_single_process"},
              {"preset", o.preset},
              {"model", single->model_dir().string()},
              {"moe_binary", o.moe},
              {"node_processes", cfg->nodes.size()},
              {"cpu_slots_per_node", o.cpu_slots_per_node},
              {"attention_shards", 1},
              {"expert_groups", o.groups},
              {"placement", describe_placement(*multi)},
              {"caf_scheduler_policy", so.scheduler_policy},
              {"prompt_len", o.prompt_len},
              {"new_tokens", o.new_tokens},
              {"repeats", o.repeats},
              {"warmup", o.warmup},
              {"statistic", "median"},
              {"runs", runs}};
  } catch (...) {
    std::fprintf(stderr, "%s", nodes.report().c_str());
    nodes.keep_dir = true;
    if (multi) multi->stop();
    if (single) single->stop();
    throw;
  }
  multi->stop();
  single->stop();
  print_json(report.dump(2) + "\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Multi-process vs single-process serving cluster (JSON on stdout)"};
  options o;
  app.add_option("--preset", o.preset, "Model preset (tiny, small, v2lite-8L), written once to the model cache");
  app.add_option("--batches", o.batches, "Batch sizes")->delimiter(',');
  app.add_option("--prompt-len", o.prompt_len, "Prompt tokens per request");
  app.add_option("--new-tokens", o.new_tokens, "Tokens generated per request (>= 2)");
  app.add_option("--repeats", o.repeats, "Measurements per batch size and mode (median reported)");
  app.add_option("--warmup", o.warmup, "Unmeasured runs per batch size and mode first");
  app.add_option("--groups", o.groups, "Expert groups");
  app.add_option("--cpu-slots", o.cpu_slots_per_node, "CPU slots of each of the two nodes");
  app.add_option("--moe", o.moe, "The moe binary the node processes run");
  app.add_option("--join-timeout", o.join_timeout_s, "Seconds to wait for the node processes to be up");
  CLI11_PARSE(app, argc, argv);

  struct sigaction sa{};
  sa.sa_handler = kill_nodes_and_exit;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  route_logs_to_stderr();
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_bench_cluster: FAILED: %s\n", e.what());
    return 1;
  }
}
