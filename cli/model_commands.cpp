// `moe run` and `moe init-model`: the reference engine and checkpoint generation from the shell.
// Output contracts (checked by tests and by comparisons against other implementations):
//   moe run ... prints the generated token ids, space-separated, on one line of stdout;
//   moe run ... --max-new-tokens 0 --dump-logits F writes float32 `logits` [1, T, vocab].
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>

#include "cli/command.hpp"
#include "cli/prompt_ids.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/model_errc.hpp"
#include "model/reference_engine.hpp"
#include "model/safetensors_writer.hpp"

namespace moe::cli {

namespace {

int fail(const std::string& command, const caf::error& err) {
  fmt::print(stderr, "moe {}: error: {}\n", command, error_text(err));
  return 1;
}

caf::expected<std::shared_ptr<const model::checkpoint>> open_model(const std::string& dir) {
  auto cfg = model::load_config(dir);
  if (!cfg) return cfg.error();
  auto ckpt = model::load_checkpoint(dir, *cfg);
  if (!ckpt) return ckpt.error();
  return std::make_shared<const model::checkpoint>(std::move(*ckpt));
}

struct run_options {
  std::string model_dir;
  generation_flags gen;
  std::string dump_logits;
};

int run_model(const run_options& o) {
  auto parsed = parse_token_ids(o.gen.prompt_ids, "--prompt-ids");
  if (!parsed) return fail("run", parsed.error());
  const std::vector<int32_t>& prompt = *parsed;
  auto ckpt = open_model(o.model_dir);
  if (!ckpt) return fail("run", ckpt.error());
  auto engine = model::reference_engine::create(*ckpt);
  if (!engine) return fail("run", engine.error());
  if (!o.dump_logits.empty()) {
    const model::sequence_input seq[] = {{1, prompt}};
    model::prefill_options po;
    po.all_logits = true;
    auto out = engine->prefill(seq, po);
    if (!out) return fail("run", out.error());
    engine->release(1);
    const int64_t V = (*ckpt)->config.vocab_size;
    model::tensor_to_write t;
    t.name = "logits";
    t.dtype = kernels::dtype::f32;
    t.shape = {1, static_cast<int64_t>(prompt.size()), V};
    t.bytes = std::as_bytes(std::span(out->logits));
    auto saved = model::save_safetensors(o.dump_logits, std::span(&t, 1));
    if (!saved) return fail("run", saved.error());
  }
  model::generation_request req;
  req.prompt = prompt;
  req.max_new_tokens = o.gen.max_new_tokens;
  if (o.gen.temperature) {
    req.sampling.temperature = *o.gen.temperature;
    req.sampling.top_p = o.gen.top_p;
    req.sampling.top_k = static_cast<size_t>(o.gen.top_k);
  } else if (o.gen.top_k > 0 || o.gen.top_p < 1.0f) {
    // top-k / top-p without a temperature sample at temperature 1, as Hugging Face does.
    req.sampling.temperature = 1.0f;
    req.sampling.top_p = o.gen.top_p;
    req.sampling.top_k = static_cast<size_t>(o.gen.top_k);
  }
  req.seed = o.gen.seed;
  if (!o.gen.stop_ids.empty()) {
    auto stop = parse_token_ids(o.gen.stop_ids, "--stop-ids");
    if (!stop) return fail("run", stop.error());
    req.stop_token_ids = *stop;
  }
  auto tokens = model::generate(*engine, std::span(&req, 1));
  if (!tokens) return fail("run", tokens.error());
  std::string line;
  for (size_t i = 0; i < (*tokens)[0].size(); ++i) {
    if (i) line += ' ';
    line += std::to_string((*tokens)[0][i]);
  }
  fmt::print("{}\n", line);
  return 0;
}

}  // namespace

void add_run_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<run_options>();
  auto* cmd = app.add_subcommand("run", "Generate tokens with the single-process reference engine");
  cmd->add_option("--model", o->model_dir, "Checkpoint directory (config.json + safetensors)")
      ->required();
  add_generation_flags(*cmd, o->gen);
  cmd->add_option("--dump-logits", o->dump_logits,
                  "Write the prompt's logits as float32 `logits` [1, T, vocab] to this file");
  cmd->callback([o, &ctx] { ctx.exit_code = run_model(*o); });
}

void add_init_model_command(CLI::App& app, command_context& ctx) {
  struct options {
    std::string preset;
    std::string out;
    uint64_t seed = 0;
    std::string dtype = "f32";
    bool config_only = false;
  };
  auto o = std::make_shared<options>();
  std::string presets;
  for (auto p : model::preset_names()) presets += (presets.empty() ? "" : ", ") + std::string(p);
  auto* cmd = app.add_subcommand("init-model", "Write a randomly initialised checkpoint");
  cmd->add_option("--preset", o->preset, "One of: " + presets)->required();
  cmd->add_option("--out", o->out, "Output directory")->required();
  cmd->add_option("--seed", o->seed, "Random seed");
  cmd->add_option("--dtype", o->dtype, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_flag("--config-only", o->config_only, "Write config.json alone, no weights");
  cmd->callback([o, &ctx] {
    auto cfg = model::model_preset(o->preset);
    if (!cfg) {
      ctx.exit_code = fail("init-model", cfg.error());
      return;
    }
    model::init_options io;
    io.seed = o->seed;
    io.dtype = o->dtype == "bf16" ? kernels::dtype::bf16 : kernels::dtype::f32;
    io.config_only = o->config_only;
    auto files = model::init_model(o->out, *cfg, io);
    if (!files) {
      ctx.exit_code = fail("init-model", files.error());
      return;
    }
    fmt::print("wrote {} ({} files)\n", o->out, files->size());
    ctx.exit_code = 0;
  });
}

}  // namespace moe::cli
