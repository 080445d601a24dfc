// `moe serve` and `moe demo`: a serving cluster in this process from a cluster config.
//   moe serve --config FILE     runs until SIGINT/SIGTERM, then drains and stops.
//   moe demo [--config FILE]    the embedded deploy/local.yaml with the embedded default model:
//                               submits prompts concurrently through the API and shows what
//                               happened (generations, placement, tokens per expert, metrics).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <httplib.h>
#include <prometheus/registry.h>

#include <caf/all.hpp>
#include <csignal>
#include <map>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/serving_cluster.hpp"
#include "cli/command.hpp"
#include "cli/embedded_config.hpp"
#include "client/job_client.hpp"
#include "runtime/actor_system.hpp"

namespace moe::cli {

namespace {

int fail(const std::string& command, const caf::error& err) {
  fmt::print(stderr, "moe {}: error: {}\n", command, error_text(err));
  return 1;
}

runtime::actor_system_config make_system_config() {
  runtime::actor_system_config::options o;
  o.load_middleman = false;  // one process: no remote actors yet
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  return cfg;
}

// SIGINT/SIGTERM are blocked in every thread (CAF's and the servers' threads inherit the mask
// from here) and collected by sigwait, so a signal never interrupts a worker mid-step.
sigset_t block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

struct serve_options {
  std::string config;
  std::string host = "127.0.0.1";
  std::optional<uint16_t> api_port, metrics_port;
};

int run_serve(const serve_options& o) {
  const sigset_t stop_signals = block_stop_signals();
  auto cfg = runtime::load_cluster_config(o.config);
  if (!cfg) return fail("serve", cfg.error());
  auto sys_cfg = make_system_config();
  caf::actor_system sys{sys_cfg};
  actors::serving_options so;
  so.bind_host = o.host;
  so.api_port = o.api_port;
  so.metrics_port = o.metrics_port;
  auto cluster = actors::serving_cluster::start(sys, *cfg, so);
  if (!cluster) return fail("serve", cluster.error());
  fmt::print("{}\n", scheduler::render_table((*cluster)->placement()));
  fmt::print("serving '{}' (model {}): API on {}:{}, metrics at {}\n", cfg->name,
             (*cluster)->model_dir().string(), o.host, (*cluster)->api_port(),
             (*cluster)->metrics_url());
  fmt::print("SIGINT or SIGTERM stops it (in-flight jobs are finished or cancelled)\n");
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop_signals, &sig);
  fmt::print("moe serve: {} received, draining\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  (*cluster)->stop();
  fmt::print("moe serve: stopped\n");
  return 0;
}

// Sums moe_router_tokens_routed_total by (layer, expert) from the registry.
std::map<int64_t, std::vector<double>> routed_tokens(prometheus::Registry& registry,
                                                     int64_t num_experts) {
  std::map<int64_t, std::vector<double>> out;
  for (const auto& family : registry.Collect()) {
    if (family.name != "moe_router_tokens_routed_total") continue;
    for (const auto& m : family.metric) {
      int64_t layer = -1, expert = -1;
      for (const auto& l : m.label) {
        if (l.name == "layer") layer = std::stoll(l.value);
        if (l.name == "expert") expert = std::stoll(l.value);
      }
      auto& row = out[layer];
      row.resize(static_cast<size_t>(num_experts), 0.0);
      if (expert >= 0 && expert < num_experts) row[static_cast<size_t>(expert)] += m.counter.value;
    }
  }
  return out;
}

int run_demo(const std::string& config_file) {
  auto cfg = config_file.empty()
                 ? runtime::parse_cluster_config(embedded_local_config, "deploy/local.yaml (embedded)")
                 : runtime::load_cluster_config(config_file);
  if (!cfg) return fail("demo", cfg.error());
  auto sys_cfg = make_system_config();
  caf::actor_system sys{sys_cfg};
  actors::serving_options so;
  so.api_port = 0;  // ephemeral: the demo never collides with a running `moe serve`
  so.metrics_port = 0;
  auto cluster = actors::serving_cluster::start(sys, *cfg, so);
  if (!cluster) return fail("demo", cluster.error());
  auto& c = **cluster;
  const auto& m = c.model();
  fmt::print("cluster '{}': model {} ({} layers, hidden {}, {} routed experts, top-{} of {} groups, "
             "{} shared)\n\n",
             cfg->name, c.model_dir().string(), m.num_hidden_layers, m.hidden_size,
             m.n_routed_experts, m.num_experts_per_tok, m.n_group, m.n_shared_experts);
  fmt::print("placement:\n{}\n", scheduler::render_table(c.placement()));

  // Several clients at once, each on its own thread with its own connection, as users would.
  const std::vector<std::vector<int32_t>> prompts = {
      {5, 17, 42}, {100, 200, 300, 400, 500, 7, 8}, {1}, {64, 65, 66, 67, 68, 69, 70, 71, 72, 73},
      {300, 301}, {9, 99, 199, 299}};
  std::vector<std::vector<int32_t>> outputs(prompts.size());
  std::vector<caf::error> errors(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] {
      auto client = client::job_client::connect("127.0.0.1", c.api_port(), cfg->secret);
      if (!client) {
        errors[i] = client.error();
        return;
      }
      client::generation_request_spec spec;
      spec.prompt = prompts[i];
      spec.max_new_tokens = 8 + 2 * static_cast<int64_t>(i);
      if (i % 2 == 1) {
        spec.temperature = 0.8f;
        spec.top_k = 40;
        spec.top_p = 0.95f;
        spec.seed = 1000 + i;
      }
      auto tokens = (*client)->generate(spec);
      if (tokens) outputs[i] = *tokens;
      else errors[i] = tokens.error();
    });
  }
  for (auto& t : clients) t.join();
  fmt::print("generations ({} requests submitted concurrently through the API on port {}):\n",
             prompts.size(), c.api_port());
  int failures = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (errors[i]) {
      ++failures;
      fmt::print("  [{}] error: {}\n", i, error_text(errors[i]));
      continue;
    }
    fmt::print("  [{}] {} prompt {} -> {}\n", i, i % 2 == 1 ? "sampled" : "greedy ",
               fmt::join(prompts[i], " "), fmt::join(outputs[i], " "));
  }
  fmt::print("\ntokens routed per expert (moe_router_tokens_routed_total):\n");
  for (const auto& [layer, counts] : routed_tokens(*c.registry(), m.n_routed_experts)) {
    double total = 0, peak = 0;
    for (double v : counts) {
      total += v;
      peak = std::max(peak, v);
    }
    const double mean = total / static_cast<double>(counts.size());
    fmt::print("  layer {}: {}  (max/mean {:.2f})\n", layer, fmt::join(counts, " "),
               mean > 0 ? peak / mean : 0.0);
  }
  // Scrape our own endpoint once, as Prometheus would.
  const auto url = c.metrics_url();
  httplib::Client scraper("127.0.0.1", std::stoi(url.substr(url.rfind(':') + 1)));
  auto res = scraper.Get("/metrics");
  size_t series = 0;
  if (res && res->status == 200)
    for (size_t pos = 0; (pos = res->body.find("\nmoe_", pos)) != std::string::npos; ++pos) ++series;
  fmt::print("\nmetrics: {} ({} moe_* samples scraped just now)\n", url, series);
  c.stop();
  return failures == 0 ? 0 : 1;
}

}  // namespace

void add_serve_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<serve_options>();
  auto* cmd = app.add_subcommand("serve", "Run a cluster and its job API until SIGINT/SIGTERM");
  cmd->add_option("--config", o->config, "Cluster config (YAML, docs/configuration.md)")->required();
  cmd->add_option("--host", o->host, "Address the API and metrics endpoints bind");
  cmd->add_option("--api-port", o->api_port, "Override ports.api (0: ephemeral)");
  cmd->add_option("--metrics-port", o->metrics_port, "Override ports.metrics (0: ephemeral)");
  cmd->callback([o, &ctx] { ctx.exit_code = run_serve(*o); });
}

void add_demo_command(CLI::App& app, command_context& ctx) {
  auto file = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("demo", "Run the embedded default cluster and model end to end");
  cmd->add_option("--config", *file, "Cluster config (default: the embedded deploy/local.yaml)");
  cmd->callback([file, &ctx] { ctx.exit_code = run_demo(*file); });
}

}  // namespace moe::cli
