// `moe serve` and `moe demo`: a serving cluster from a cluster config.
//   moe serve --config FILE [--join-nodes]
//                               runs until SIGINT/SIGTERM, then drains and stops. With
//                               --join-nodes the config's nodes are `moe node` processes (moe
//                               cluster up): this process joins them, places the model's actors
//                               there and keeps the controller, the job API and its /metrics.
//   moe serve --config FILE --engine gpu|reference [--engine-shards N] [--gpu-dtype D] [--fp8 M]
//             [--expert-parallel G [--expert-parallel-tokens T] [--expert-parallel-recv-rows R]]
//                               whole-model engine shards (the GPU engine, one per GPU, or the
//                               CPU reference engine) behind the same controller and job API;
//                               with --expert-parallel, each shard a group of G GPUs splitting
//                               the routed experts (engine/expert_parallel_step_engine.hpp).
//   moe demo [--config FILE] [--processes N]
//                               the embedded deploy/local.yaml with the embedded default model:
//                               submits prompts concurrently through the API and shows what
//                               happened (generations, placement, tokens per expert, metrics).
//                               --processes N: this process plus N-1 `moe node` processes.
#include <caf/all.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <httplib.h>
#include <prometheus/registry.h>

#include <csignal>
#include <map>
#include <sstream>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/rebalancer.hpp"
#include "actors/serving_cluster.hpp"
#include "cli/cluster_training.hpp"
#include "cli/command.hpp"
#include "cli/embedded_config.hpp"
#include "cli/flag_checks.hpp"
#include "cli/local_nodes.hpp"
#include "cli/model_loading.hpp"
#include "cli/node_support.hpp"
#include "client/job_client.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"
#include "model/model_errc.hpp"
#include "model/step_engine.hpp"
#include "model/tokenizer.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/devices.hpp"
#ifdef MOE_HAVE_ENGINE
#include "engine/expert_parallel_step_engine.hpp"
#include "engine/gpu_step_engine.hpp"
#endif

namespace moe::cli {

namespace {

int fail(const std::string& command, const caf::error& err) {
  fmt::print(stderr, "moe {}: error: {}\n", command, error_text(err));
  return 1;
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
  std::string secret_file;
  std::string host = "127.0.0.1";
  std::optional<uint16_t> api_port, metrics_port;
  bool join_nodes = false;
  double join_timeout_s = 60;
  std::string engine = "actors";  // actors | gpu | reference
  int engine_shards = 0;          // 0: one per GPU (gpu), 1 (reference)
  std::string gpu_dtype = "bf16";
  std::string fp8 = "off";
  int expert_parallel = 1;                // GPUs per engine shard, the experts split over them
  int64_t expert_parallel_tokens = 4096;  // tokens one of them runs per round
  int64_t expert_parallel_recv_rows = 0;  // rows each one's exchange receives at once; 0: worst
};

// --engine gpu|reference: how many whole-model shards, and the factory that makes each one's
// engine. The checkpoint is read once, on the first shard's call, and shared by all.
caf::error engine_shards_for(const serve_options& o, actors::serving_options& so) {
  if (o.expert_parallel_recv_rows != 0 && o.expert_parallel < 2)
    return model::make_error(model::model_errc::bad_input,
                             "--expert-parallel-recv-rows sizes the expert exchange of "
                             "--expert-parallel groups of 2 or more GPUs");
  if (o.expert_parallel_recv_rows != 0 && o.expert_parallel_recv_rows < o.expert_parallel)
    return model::make_error(
        model::model_errc::bad_input,
        "--expert-parallel-recv-rows " + std::to_string(o.expert_parallel_recv_rows) +
            ": at least a row for each of the group's " + std::to_string(o.expert_parallel) +
            " GPUs (or 0 for the worst routing)");
  if (o.engine == "actors") {
    if (o.engine_shards != 0 || o.gpu_dtype != "bf16" || o.fp8 != "off" || o.expert_parallel != 1)
      return model::make_error(
          model::model_errc::bad_input,
          "--engine-shards, --gpu-dtype, --fp8 and --expert-parallel choose whole-model engine "
          "shards: give --engine gpu or --engine reference with them");
    return {};
  }
  if (o.join_nodes)
    return model::make_error(
        model::model_errc::bad_input,
        "--engine " + o.engine + " serves in this process: not with --join-nodes");
  if (o.engine == "reference" &&
      (o.gpu_dtype != "bf16" || o.fp8 != "off" || o.expert_parallel != 1))
    return model::make_error(model::model_errc::bad_input,
                             "--gpu-dtype, --fp8 and --expert-parallel are for --engine gpu");
  struct shared_checkpoint {
    std::shared_ptr<const model::checkpoint> ckpt;
  };
  auto loaded = std::make_shared<shared_checkpoint>();
  auto load = [loaded, fp8 = o.fp8 != "off"](const std::filesystem::path& dir) -> caf::error {
    if (loaded->ckpt) return {};
    auto ckpt = open_model(dir, fp8);
    if (!ckpt) return ckpt.error();
    loaded->ckpt = std::make_shared<const model::checkpoint>(std::move(*ckpt));
    return {};
  };
  if (o.engine == "reference") {
    so.num_engine_shards = o.engine_shards == 0 ? 1 : o.engine_shards;
    so.make_engine = [loaded, load](int, const std::filesystem::path& dir,
                                    const model::latent_cache_options& cache)
        -> caf::expected<std::unique_ptr<model::step_engine>> {
      if (auto err = load(dir)) return err;
      model::engine_options eo;
      eo.cache = cache;
      auto e = model::reference_engine::create(loaded->ckpt, eo);
      if (!e) return e.error();
      return std::make_unique<model::reference_step_engine>(std::move(*e));
    };
    return {};
  }
#ifndef MOE_HAVE_ENGINE
  (void)load;
  return model::make_error(model::model_errc::bad_input,
                           "--engine gpu: this build has no CUDA backend (no GPU)");
#else
  const auto devices = runtime::discover_devices();
  const int found = static_cast<int>(devices.gpus.size());
  if (found == 0)
    return model::make_error(model::model_errc::bad_input,
                             "--engine gpu: no GPU: " + devices.no_gpu_reason);
  const int group = o.expert_parallel;  // GPUs per shard
  if (group > found)
    return model::make_error(model::model_errc::bad_input,
                             "--expert-parallel " + std::to_string(group) + ": " +
                                 std::to_string(found) + " GPU(s) found");
  if (o.engine_shards > found / group)
    return model::make_error(model::model_errc::bad_input,
                             "--engine-shards " + std::to_string(o.engine_shards) + ": " +
                                 std::to_string(group) + " GPU(s) per shard, and " +
                                 std::to_string(found) + " found");
  so.num_engine_shards = o.engine_shards == 0 ? found / group : o.engine_shards;
  if (group > 1) {
    if (o.fp8 != "off")
      return model::make_error(model::model_errc::bad_input,
                               "--expert-parallel takes bf16 or f32 experts: not with --fp8");
    // Shard i: GPUs [i G, (i + 1) G), each holding E / G experts of every MoE layer and its own
    // share of the shard's sequences, with the shard's cache budget split between them.
    so.make_engine =
        [loaded, load, group, tokens = o.expert_parallel_tokens,
         recv_rows = o.expert_parallel_recv_rows, base = gpu_engine_options_of(o.gpu_dtype, o.fp8)](
            int shard, const std::filesystem::path& dir, const model::latent_cache_options& cache)
        -> caf::expected<std::unique_ptr<model::step_engine>> {
      if (auto err = load(dir)) return err;
      engine::expert_parallel_group_options go;
      go.engine = base;
      go.engine.cache = cache;
      go.engine.cache.num_blocks = std::max<int64_t>(1, (cache.num_blocks + group - 1) / group);
      for (int r = 0; r < group; ++r) go.devices.push_back(shard * group + r);
      go.max_tokens_per_rank = tokens;
      go.recv_rows_per_rank = recv_rows;
      auto e = engine::expert_parallel_step_engine::create(loaded->ckpt, go);
      if (!e) return e.error();
      return std::unique_ptr<model::step_engine>(std::move(*e));
    };
    return {};
  }
  so.make_engine = [loaded, load, base = gpu_engine_options_of(o.gpu_dtype, o.fp8)](
                       int shard, const std::filesystem::path& dir,
                       const model::latent_cache_options& cache)
      -> caf::expected<std::unique_ptr<model::step_engine>> {
    if (auto err = load(dir)) return err;
    auto eo = base;
    eo.device = shard;
    eo.cache = cache;
    auto e = engine::gpu_engine::create(loaded->ckpt, eo);
    if (!e) return e.error();
    return std::make_unique<engine::gpu_step_engine>(std::move(*e), shard);
  };
  return {};
#endif
}

int run_serve(const serve_options& o) {
  const sigset_t stop_signals = block_stop_signals();
  auto cfg = load_cluster_with_secret(o.config, o.secret_file);
  if (!cfg) return fail("serve", cfg.error());
  auto sys_cfg = o.join_nodes ? make_networked_system_config(*cfg) : make_local_system_config();
  caf::actor_system sys{sys_cfg};
  actors::serving_options so;
  so.bind_host = o.host;
  so.api_port = o.api_port;
  so.metrics_port = o.metrics_port;
  so.join_nodes = o.join_nodes;
  so.join_timeout = std::chrono::milliseconds(static_cast<int64_t>(o.join_timeout_s * 1000));
  if (auto err = engine_shards_for(o, so)) return fail("serve", err);
  if (o.join_nodes)
    fmt::print("joining {} node process(es) of '{}' (at most {:.0f} s)\n", cfg->nodes.size(), cfg->name,
               o.join_timeout_s);
  std::fflush(stdout);
  auto cluster = actors::serving_cluster::start(sys, *cfg, so);
  if (!cluster) return fail("serve", cluster.error());
  if ((*cluster)->serves_engine_shards() && o.expert_parallel > 1)
    fmt::print("{} engine shard(s) of {} GPUs each, the routed experts split over them\n",
               (*cluster)->shards().size(), o.expert_parallel);
  else if ((*cluster)->serves_engine_shards())
    fmt::print("{} whole-model engine shard(s) ({}), no routers or expert groups\n",
               (*cluster)->shards().size(), o.engine);
  else
    fmt::print("{}\n", scheduler::render_table((*cluster)->placement()));
  fmt::print("serving '{}' (model {}): API on {}:{}, metrics at {}{}\n", cfg->name,
             (*cluster)->model_dir().string(), o.host, (*cluster)->api_port(),
             (*cluster)->metrics_url(), cfg->api_tls ? " (API over TLS)" : "");
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

// Sums moe_router_tokens_routed_total by (layer, expert) from a Prometheus text exposition
// (a node process's /metrics).
void add_routed_tokens(const std::string& exposition, int64_t num_experts,
                       std::map<int64_t, std::vector<double>>& out) {
  std::istringstream in(exposition);
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with("moe_router_tokens_routed_total{")) continue;
    auto label = [&](const std::string& name) -> int64_t {
      const auto at = line.find(name + "=\"");
      return at == std::string::npos ? -1 : std::stoll(line.substr(at + name.size() + 2));
    };
    const int64_t layer = label("layer"), expert = label("expert");
    auto& row = out[layer];
    row.resize(static_cast<size_t>(num_experts), 0.0);
    if (expert >= 0 && expert < num_experts) row[static_cast<size_t>(expert)] += std::stod(line.substr(line.rfind(' ') + 1));
  }
}

// Byte tokens as text for a terminal: printable ASCII as is, the rest escaped; ids past the byte
// range (which a byte-level model has but never trains) as <id>.
std::string shown(const std::vector<int32_t>& ids) {
  std::string out;
  for (auto id : ids) {
    if (id >= 32 && id < 127 && id != '"' && id != '\\') out += static_cast<char>(id);
    else if (id == '\n') out += "\\n";
    else if (id == '"' || id == '\\') out += std::string("\\") + static_cast<char>(id);
    else if (id >= 0 && id < 256) out += fmt::format("\\x{:02x}", id);
    else out += fmt::format("<{}>", id);
  }
  return out;
}

std::string scrape(const std::string& host, uint16_t port) {
  httplib::Client scraper(host, port);
  auto res = scraper.Get("/metrics");
  return res && res->status == 200 ? res->body : std::string();
}

// Greedy generations of `prompts` through the API, concurrently; empty on any error (printed).
std::vector<std::vector<int32_t>> generate_all(const actors::serving_cluster& c, const std::string& secret,
                                               const std::vector<std::vector<int32_t>>& prompts, int64_t max_new_tokens) {
  std::vector<std::vector<int32_t>> outputs(prompts.size());
  std::vector<caf::error> errors(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] {
      auto client = client::job_client::connect("127.0.0.1", c.api_port(), secret);
      if (!client) {
        errors[i] = client.error();
        return;
      }
      client::generation_request_spec spec;
      spec.prompt = prompts[i];
      spec.max_new_tokens = max_new_tokens;
      auto tokens = (*client)->generate(spec);
      if (tokens) outputs[i] = *tokens;
      else errors[i] = tokens.error();
    });
  }
  for (auto& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (!errors[i]) continue;
    fmt::print("  [{}] error: {}\n", i, error_text(errors[i]));
    return {};
  }
  return outputs;
}

caf::expected<actors::rebalance_report> ask_rebalance(caf::actor_system& sys, const actors::rebalancer_actor& r) {
  caf::scoped_actor self{sys};
  caf::expected<actors::rebalance_report> out{actors::rebalance_report{}};
  self->request(r, std::chrono::minutes(5), actors::rebalance_atom::value)
      .receive([&](actors::rebalance_report& rep) { out = std::move(rep); }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

// Skewed traffic (prompts of one repeated token send most rows to a few experts), a rebalance,
// the same traffic again with identical greedy tokens, and the balance the routers measure now.
bool demo_rebalance(actors::serving_cluster& c, const runtime::cluster_config& cfg) {
  fmt::print("\nonline expert rebalancing:\n");
  if (!c.rebalancer()) {
    fmt::print("  off for this cluster: {}\n", c.rebalance_unavailable());
    return true;
  }
  const std::vector<std::vector<int32_t>> hot = {{7, 7, 7, 7, 7, 7, 7, 7}, {7, 7, 7, 9, 7, 7, 7, 7},
                                                 {7, 7, 11, 7, 7, 7, 7}, {7, 7, 7, 7, 13, 7}};
  auto before = generate_all(c, cfg.secret, hot, 12);
  if (before.empty()) return false;
  auto& sys = c.system();
  auto moved = ask_rebalance(sys, c.rebalancer());
  if (!moved) {
    fmt::print("  rebalance failed: {}\n", error_text(moved.error()));
    return false;
  }
  const auto& r = *moved;
  fmt::print("  skewed traffic ({} greedy requests of a repeated token), then `moe rebalance`:\n", hot.size());
  fmt::print("    expert-group balance (max/mean load, mean over {} MoE layers): {:.3f} measured -> {:.3f} planned\n",
             r.layer_balance_before.size(), r.balance_before, r.balance_after);
  if (r.changed)
    fmt::print("    placement version {} -> {}: {} replicas loaded ({} bytes) in {:.3f} s while serving\n",
               r.version_before, r.version_after, r.replicas_moved, r.bytes_moved, r.duration_seconds);
  else
    fmt::print("    the placement was kept (already balanced)\n");
  auto after = generate_all(c, cfg.secret, hot, 12);
  if (after.empty()) return false;
  const bool same = after == before;
  fmt::print("    the same requests again: greedy tokens {}\n", same ? "identical" : "DIFFERENT (a bug)");
  auto measured = ask_rebalance(sys, c.rebalancer());
  if (measured)
    fmt::print("    balance the routers measured for those requests under version {}: {:.3f} (the plan was made "
               "from all traffic so far, the requests above included){}\n",
               measured->version_before, measured->balance_before,
               measured->changed ? "; a second rebalance moved again" : "");
  return same;
}

int run_demo(const std::string& config_file, int processes) {
  auto cfg = config_file.empty()
                 ? runtime::parse_cluster_config(embedded_local_config, "deploy/local.yaml (embedded)")
                 : runtime::load_cluster_config(config_file);
  if (!cfg) return fail("demo", cfg.error());
  if (processes < 1) return fail("demo", make_error(runtime::cluster_config_errc::bad_config, "--processes must be at least 1"));
  // --processes N: N-1 node processes hold the model's actors; this one is the coordinator.
  std::unique_ptr<local_nodes> nodes;
  if (processes > 1) {
    auto started = local_nodes::start(*cfg, processes - 1);
    if (!started) return fail("demo", started.error());
    nodes = std::move(*started);
    cfg = nodes->config();
    fmt::print("started {} node processes (logs in {})\n", processes - 1, nodes->run_dir().string());
    std::fflush(stdout);  // piped or redirected, the line would wait for the training's flush
  }
  // The demo's clients are its own threads on loopback, with no CA to check a certificate
  // against: its API stays plain TCP whatever api.tls says.
  cfg->api_tls.reset();
  auto sys_cfg = nodes ? make_networked_system_config(*cfg) : make_local_system_config();
  caf::actor_system sys{sys_cfg};
  actors::serving_options so;
  so.api_port = 0;  // ephemeral: the demo never collides with a running `moe serve`
  so.metrics_port = 0;
  so.join_nodes = nodes != nullptr;
  auto cluster = actors::serving_cluster::start(sys, *cfg, so);
  if (!cluster) {
    if (nodes) fmt::print(stderr, "{}", nodes->log_tails());
    return fail("demo", cluster.error());
  }
  auto& c = **cluster;
  const auto& m = c.model();
  fmt::print("cluster '{}': model {} ({} layers, hidden {}, {} routed experts, top-{} of {} groups, "
             "{} shared)\n\n",
             cfg->name, c.model_dir().string(), m.num_hidden_layers, m.hidden_size,
             m.n_routed_experts, m.num_experts_per_tok, m.n_group, m.n_shared_experts);
  fmt::print("placement:\n{}\n", scheduler::render_table(c.placement()));

  // The embedded model starts from random weights: train it first, through the same actors,
  // on a small text corpus, so that what it then serves is text rather than noise.
  auto tok = model::make_tokenizer(m.vocab_size);
  if (!tok) return fail("demo", tok.error());
  const std::string probe = "Licensed under the ";
  auto sample = [&](const char* when) {
    auto out = generate_all(c, cfg->secret, {(*tok)->encode(probe)}, 48);
    if (!out.empty()) fmt::print("{} training, greedy: \"{}\" -> \"{}\"\n", when, probe, shown(out[0]));
    return !out.empty();
  };
  if (!sample("before")) return 1;
  actors::training_job job;
  job.tokens = (*tok)->encode(embedded_demo_corpus);
  job.sequence_length = 64;
  job.batch_sequences = 8;
  job.steps = 120;
  job.warmup_steps = 10;
  job.hyper.lr = 3e-3;
  job.min_lr = 3e-4;
  fmt::print("\ntraining on {}: {} tokens ({}-level), {} steps of {} x {} tokens, through the cluster's actors\n",
             embedded_demo_corpus_name, job.tokens.size(), (*tok)->name(), job.steps, job.batch_sequences,
             job.sequence_length);
  std::fflush(stdout);
  auto trained = run_training_job(c, std::move(job));
  if (!trained) return fail("demo", trained.error());
  print_training_summary(*trained);
  if (!sample("after")) return 1;
  fmt::print("\n");

  // Several clients at once, each on its own thread with its own connection, as users would.
  const std::vector<std::string> texts = {"Licensed under the ", "The Work", "Redistribution of ",
                                          "You may ", "Contributor ", "the terms and "};
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& t : texts) prompts.push_back((*tok)->encode(t));
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
      spec.max_new_tokens = 24 + 4 * static_cast<int64_t>(i);
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
    fmt::print("  [{}] {} \"{}\" -> \"{}\"\n", i, i % 2 == 1 ? "sampled" : "greedy ", texts[i], shown(outputs[i]));
  }
  // The routers run where the attention shards do: in this process, or in the node processes.
  auto per_expert = routed_tokens(*c.registry(), m.n_routed_experts);
  if (nodes) {
    for (size_t i = 0; i < cfg->nodes.size(); ++i)
      add_routed_tokens(scrape("127.0.0.1", runtime::node_metrics_port(*cfg, i)), m.n_routed_experts, per_expert);
  }
  fmt::print("\ntokens routed per expert (moe_router_tokens_routed_total):\n");
  for (const auto& [layer, counts] : per_expert) {
    double total = 0, peak = 0;
    for (double v : counts) {
      total += v;
      peak = std::max(peak, v);
    }
    const double mean = total / static_cast<double>(counts.size());
    fmt::print("  layer {}: {}  (max/mean {:.2f})\n", layer, fmt::join(counts, " "),
               mean > 0 ? peak / mean : 0.0);
  }
  if (!demo_rebalance(c, *cfg)) ++failures;
  // Scrape our own endpoint once, as Prometheus would.
  const auto url = c.metrics_url();
  httplib::Client scraper("127.0.0.1", std::stoi(url.substr(url.rfind(':') + 1)));
  auto res = scraper.Get("/metrics");
  size_t series = 0;
  if (res && res->status == 200)
    for (size_t pos = 0; (pos = res->body.find("\nmoe_", pos)) != std::string::npos; ++pos) ++series;
  fmt::print("\nmetrics: {} ({} moe_* samples scraped just now)\n", url, series);
  if (nodes) {
    for (size_t i = 0; i < cfg->nodes.size(); ++i)
      fmt::print("node {} (a process of its own): metrics at http://127.0.0.1:{}/metrics\n", cfg->nodes[i].name,
                 runtime::node_metrics_port(*cfg, i));
  }
  c.stop();
  return failures == 0 ? 0 : 1;
}

}  // namespace

void add_serve_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<serve_options>();
  auto* cmd = app.add_subcommand("serve", "Run a cluster and its job API until SIGINT/SIGTERM");
  cmd->add_option("--config", o->config, "Cluster config (YAML, docs/configuration.md)")->required();
  cmd->add_option("--host", o->host, "Address the API and metrics endpoints bind");
  cmd->add_option("--api-port", o->api_port, "Override ports.api (0: ephemeral)")
      ->check(whole_number(0, 65535));
  cmd->add_option("--metrics-port", o->metrics_port, "Override ports.metrics (0: ephemeral)")
      ->check(whole_number(0, 65535));
  cmd->add_option("--secret-file", o->secret_file, "Read the cluster secret from this file (overrides cluster.secret)");
  cmd->add_flag("--join-nodes", o->join_nodes,
                "The config's nodes run as `moe node` processes (moe cluster up): join them and place the actors there");
  cmd->add_option("--join-timeout", o->join_timeout_s,
                  "--join-nodes: seconds to wait for every node (default 60)")
      ->check(timeout_seconds());
  cmd->add_option(
         "--engine", o->engine,
         "actors (the model cut into attention shards, routers and expert groups: the default), or "
         "whole-model engine shards: gpu (the GPU engine, one shard per GPU; CUDA builds) or "
         "reference (the CPU reference engine)")
      ->check(CLI::IsMember({"actors", "gpu", "reference"}));
  cmd->add_option(
         "--engine-shards", o->engine_shards,
         "--engine gpu|reference: how many shards (default: every GPU found; 1 for reference)")
      ->check(whole_number(1, 1024));
  cmd->add_option("--gpu-dtype", o->gpu_dtype, "--engine gpu: bf16 or f32")
      ->check(CLI::IsMember({"bf16", "f32"}));
  cmd->add_option("--fp8", o->fp8,
                  "--engine gpu: FP8 weights (a checkpoint without them is quantized first): off, "
                  "block_scaled "
                  "(FP8 products) or expand (bf16 products)")
      ->check(CLI::IsMember({"off", "block_scaled", "expand"}));
  cmd->add_option("--expert-parallel", o->expert_parallel,
                  "--engine gpu: GPUs per engine shard, each holding its share of every MoE "
                  "layer's routed experts and of the shard's sequences (default 1: whole-model "
                  "shards); the experts must split evenly; FP8 experts are not taken")
      ->check(whole_number(1, 1024));
  cmd->add_option(
         "--expert-parallel-tokens", o->expert_parallel_tokens,
         "--expert-parallel: tokens one GPU runs per round (a step's prompts together; the "
         "longest prompt served); sizes the expert exchange's buffers (default 4096)")
      ->check(whole_number(1, 1 << 20));
  cmd->add_option(
         "--expert-parallel-recv-rows", o->expert_parallel_recv_rows,
         "--expert-parallel: rows of hidden each GPU's expert exchange receives at once, at least "
         "G; a round whose routing needs more runs in chunks (default 0: room for the worst "
         "routing, G x tokens x top_k rows, one chunk always)")
      ->check(whole_number(0, INT32_MAX));
  cmd->callback([o, &ctx] { ctx.exit_code = run_serve(*o); });
}

void add_demo_command(CLI::App& app, command_context& ctx) {
  auto file = std::make_shared<std::string>();
  auto processes = std::make_shared<int>(1);
  auto* cmd = app.add_subcommand("demo", "Run the embedded default cluster and model end to end");
  cmd->add_option("--config", *file, "Cluster config (default: the embedded deploy/local.yaml)");
  cmd->add_option("--processes", *processes,
                  "Run as N processes: this one (controller, API) and N-1 `moe node` processes holding the model's "
                  "actors, the first node of the config split between them (default 1)");
  cmd->callback([file, processes, &ctx] { ctx.exit_code = run_demo(*file, *processes); });
}

}  // namespace moe::cli
