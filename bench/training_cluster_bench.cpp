// Training through the actors (actors/trainer.hpp) on a preset's random weights: training
// tokens/s with 1 and with 2 data-parallel attention shards, in one run, on the same batches
// (random byte-level tokens). Prints one JSON object: per shard count the median step time,
// tokens/s, the step's CPU time, its GEMM seconds (kernels/cpu/gemm_profile: the wall time of
// every GEMM call, summed over the threads that ran them, so with two shards computing at once it
// can pass the step's wall time), the losses; and the 2-shard over 1-shard tokens/s ratio.
//
//   moe_bench_training_cluster [--preset small] [--batch 8] [--seq-len 128] [--steps 3] [--warmup 1]
//                              [--groups 4]
//
// Both runs start from the same weights (init_model writes the preset once, to a temporary
// directory removed at exit) and train the same batches, so their losses agree to rounding.
// The split of GEMM time into forward and backward is moe_bench_training's (single process).
#include <CLI/CLI.hpp>
#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "actors/trainer.hpp"
#include "kernels/cpu/gemm_profile.hpp"
#include "model/init_model.hpp"
#include "runtime/actor_system.hpp"

namespace kc = moe::kernels::cpu;
using clock_type = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double gemm_seconds() {
  double s = 0;
  for (const auto& r : kc::gemm_profile_snapshot()) s += r.seconds;
  return s;
}

struct run_result {
  std::vector<double> step_s, cpu_s, gemm_s, losses;
};

caf::expected<run_result> train(const std::filesystem::path& dir, int shards, int groups,
                                const std::vector<moe::actors::train_batch>& batches, int64_t warmup) {
  moe::runtime::actor_system_config::options o;
  o.load_middleman = false;
  moe::runtime::actor_system_config cfg{o};
  moe::actors::add_actor_message_types(cfg);
  caf::actor_system sys{cfg};
  auto model = moe::model::load_config(dir);
  if (!model) return model.error();
  auto cluster = moe::actors::local_cluster::start(sys, dir, moe::actors::even_layout(shards, groups, model->n_routed_experts));
  if (!cluster) return cluster.error();
  moe::actors::trainer_options to;
  to.shards = (*cluster)->shards();
  to.routers = (*cluster)->routers();
  to.groups = (*cluster)->groups();
  to.model = *model;
  std::vector<std::vector<int64_t>> experts;
  for (const auto& g : moe::actors::even_layout(shards, groups, model->n_routed_experts).groups) experts.push_back(g.experts);
  to.layout = moe::actors::uniform_layout(*model, experts);
  auto trainer = moe::actors::spawn_trainer(sys, to);
  run_result out;
  caf::scoped_actor self{sys};
  caf::error failure;
  for (size_t i = 0; i < batches.size(); ++i) {
    kc::gemm_profile_reset();
    kc::gemm_profile_enable(true);
    const double cpu0 = cpu_seconds();
    const auto t = clock_type::now();
    moe::actors::train_step_report report;
    self->request(trainer, caf::infinite, moe::actors::train_step_atom::value, batches[i])
        .receive([&](moe::actors::train_step_report& r) { report = std::move(r); },
                 [&](caf::error& e) { failure = std::move(e); });
    const double wall = std::chrono::duration<double>(clock_type::now() - t).count();
    kc::gemm_profile_enable(false);
    if (failure) break;
    std::fprintf(stderr, "%d shard(s), %s step %zu: %.3f s, loss %.4f\n", shards,
                 static_cast<int64_t>(i) < warmup ? "warmup" : "measured", i, wall, report.loss);
    if (static_cast<int64_t>(i) < warmup) continue;
    out.step_s.push_back(wall);
    out.cpu_s.push_back(cpu_seconds() - cpu0);
    out.gemm_s.push_back(gemm_seconds());
    out.losses.push_back(report.loss);
  }
  caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
  (*cluster)->stop();
  if (failure) return failure;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Training tokens/s through the actors with 1 and 2 attention shards (JSON)"};
  std::string preset = "small";
  int64_t batch = 8, seq_len = 128, steps = 3, warmup = 1;
  int groups = 4;
  uint64_t seed = 1;
  app.add_option("--preset", preset, "Model preset (moe init-model --preset)");
  app.add_option("--batch", batch, "Sequences per step (split over the shards)");
  app.add_option("--seq-len", seq_len, "Tokens per sequence");
  app.add_option("--steps", steps, "Measured steps per shard count");
  app.add_option("--warmup", warmup, "Unmeasured steps first");
  app.add_option("--groups", groups, "Expert groups");
  app.add_option("--seed", seed, "Weights and tokens");
  CLI11_PARSE(app, argc, argv);
  auto fail = [](const std::string& text) {
    std::fprintf(stderr, "moe_bench_training_cluster: %s\n", text.c_str());
    return 1;
  };
  auto cfg = moe::model::model_preset(preset);
  if (!cfg) return fail(moe::error_text(cfg.error()));
  const auto dir = std::filesystem::temp_directory_path() /
                   ("moe-bench-training-cluster-" + preset + "-" + std::to_string(::getpid()));
  struct remove_at_exit {
    std::filesystem::path p;
    ~remove_at_exit() { std::filesystem::remove_all(p); }
  } cleanup{dir};
  moe::model::init_options io;
  io.seed = seed;
  io.progress = false;
  if (auto files = moe::model::init_model(dir, *cfg, io); !files) return fail(moe::error_text(files.error()));

  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> byte(0, static_cast<int32_t>(std::min<int64_t>(256, cfg->vocab_size) - 1));
  std::vector<moe::actors::train_batch> batches(static_cast<size_t>(warmup + steps));
  for (size_t i = 0; i < batches.size(); ++i) {
    auto& b = batches[i];
    b.step = i + 1;
    b.hyper.lr = 1e-4;
    b.cu_seqlens = {0};
    for (int64_t s = 0; s < batch; ++s) {
      for (int64_t t = 0; t < seq_len; ++t) b.tokens.push_back(byte(rng));
      b.cu_seqlens.push_back(static_cast<int32_t>(b.tokens.size()));
    }
  }
  json report;
  report["benchmark"] = "training_through_actors";
  report["model"] = {{"preset", preset}, {"layers", cfg->num_hidden_layers}, {"hidden", cfg->hidden_size},
                     {"routed_experts", cfg->n_routed_experts}, {"experts_per_token", cfg->num_experts_per_tok}};
  report["batch"] = batch;
  report["seq_len"] = seq_len;
  report["steps"] = steps;
  report["warmup"] = warmup;
  report["expert_groups"] = groups;
  report["hardware_threads"] = std::thread::hardware_concurrency();
  const double tokens = static_cast<double>(batch * seq_len);
  std::map<int, double> tps;
  for (int shards : {1, 2}) {
    auto r = train(dir, shards, groups, batches, warmup);
    if (!r) return fail(moe::error_text(r.error()));
    double wall = 0, gemm = 0;
    for (size_t i = 0; i < r->step_s.size(); ++i) {
      wall += r->step_s[i];
      gemm += r->gemm_s[i];
    }
    tps[shards] = tokens / median(r->step_s);
    report["shards_" + std::to_string(shards)] = {{"step_seconds_median", median(r->step_s)},
                                                  {"step_seconds", r->step_s},
                                                  {"training_tokens_per_second", tps[shards]},
                                                  {"cpu_seconds_per_step_median", median(r->cpu_s)},
                                                  {"gemm_seconds_per_step_median", median(r->gemm_s)},
                                                  {"gemm_seconds_over_step_seconds", wall > 0 ? gemm / wall : 0.0},
                                                  {"losses", r->losses}};
  }
  report["two_over_one_shard_tokens_per_second"] = tps[2] / tps[1];
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
