// `moe demo`: the embedded default model end to end. Until the actor runtime lands it runs the
// single-process reference engine; each later capability grows what it shows.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <filesystem>

#include "cli/command.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/reference_engine.hpp"

namespace moe::cli {

namespace {

std::filesystem::path default_model_dir() {
  if (const char* d = std::getenv("MOE_DEMO_MODEL_DIR")) return d;
  if (const char* c = std::getenv("XDG_CACHE_HOME")) return std::filesystem::path(c) / "moe-runtime/tiny";
  if (const char* h = std::getenv("HOME")) return std::filesystem::path(h) / ".cache/moe-runtime/tiny";
  return std::filesystem::temp_directory_path() / "moe-runtime/tiny";
}

int fail(const caf::error& err) {
  fmt::print(stderr, "moe demo: error: {}\n", error_text(err));
  return 1;
}

int run_demo(const std::filesystem::path& dir) {
  if (!std::filesystem::exists(dir / "config.json")) {
    fmt::print("moe demo: writing the embedded default model (preset 'tiny', seed 0) to {}\n",
               dir.string());
    auto cfg = model::model_preset("tiny");
    if (!cfg) return fail(cfg.error());
    if (auto files = model::init_model(dir, *cfg); !files) return fail(files.error());
  }
  auto cfg = model::load_config(dir);
  if (!cfg) return fail(cfg.error());
  auto ckpt = model::load_checkpoint(dir, *cfg);
  if (!ckpt) return fail(ckpt.error());
  auto shared = std::make_shared<const model::checkpoint>(std::move(*ckpt));
  auto engine = model::reference_engine::create(shared);
  if (!engine) return fail(engine.error());
  const auto& c = shared->config;
  fmt::print("model: {} layers, hidden {}, {} heads, {} routed experts (top-{} in {} of {} groups), "
             "{} shared, vocab {}\n",
             c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.n_routed_experts,
             c.num_experts_per_tok, c.topk_group, c.n_group, c.n_shared_experts, c.vocab_size);

  // Prompts of different lengths, generated together: prefill as one batch, then one decode
  // batch until each is done.
  const std::vector<std::vector<int32_t>> prompts = {
      {5, 17, 42}, {100, 200, 300, 400, 500, 7, 8}, {1}, {64, 65, 66, 67, 68, 69, 70, 71, 72, 73}};
  std::vector<model::generation_request> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    model::generation_request r;
    r.prompt = prompts[i];
    r.max_new_tokens = 8 + 4 * static_cast<int64_t>(i);
    if (i % 2 == 1) {  // half greedy, half sampled
      r.sampling = {0.8f, 40, 0.95f};
      r.seed = 1000 + i;
    }
    reqs.push_back(r);
  }
  auto out = model::generate(*engine, reqs);
  if (!out) return fail(out.error());
  fmt::print("\ngenerations (reference engine, {} prompts batched):\n", reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    fmt::print("  [{}] {} prompt {} -> {}\n", i,
               reqs[i].sampling.temperature == 0 ? "greedy " : "sampled",
               fmt::join(reqs[i].prompt, " "), fmt::join((*out)[i], " "));
  }
  fmt::print("\ntokens per expert:\n");
  const auto& counts = engine->expert_token_counts();
  for (size_t l = 0; l < counts.size(); ++l) {
    if (counts[l].empty()) {
      fmt::print("  layer {}: dense\n", l);
      continue;
    }
    uint64_t total = 0, peak = 0;
    for (auto n : counts[l]) {
      total += n;
      peak = std::max(peak, n);
    }
    const double mean = static_cast<double>(total) / static_cast<double>(counts[l].size());
    fmt::print("  layer {}: {}  (max/mean {:.2f})\n", l, fmt::join(counts[l], " "),
               mean > 0 ? static_cast<double>(peak) / mean : 0.0);
  }
  fmt::print("\nplacement: one process, reference engine (the actor runtime places actors here "
             "once it exists)\n");
  return 0;
}

}  // namespace

void add_demo_command(CLI::App& app, command_context& ctx) {
  auto dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("demo", "Run the embedded default model end to end");
  cmd->add_option("--model-dir", *dir,
                  "Where the embedded default model is written and read "
                  "(default: $MOE_DEMO_MODEL_DIR, else ~/.cache/moe-runtime/tiny)");
  cmd->callback([dir, &ctx] {
    ctx.exit_code = run_demo(dir->empty() ? default_model_dir() : std::filesystem::path(*dir));
  });
}

}  // namespace moe::cli
