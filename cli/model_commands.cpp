// `moe run` and `moe init-model`: the reference engine (or, with --engine gpu, the GPU engine)
// and checkpoint generation from the shell.
// Output contracts (checked by tests and by comparisons against other implementations):
//   moe run ... prints the generated token ids, space-separated, on one line of stdout;
//   moe run ... --max-new-tokens 0 --dump-logits F writes float32 `logits` [1, T, vocab].
#include <climits>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "cli/model_loading.hpp"
#include "cli/prompt_ids.hpp"
#include "kernels/cpu/sampling.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/model_errc.hpp"
#include "model/reference_engine.hpp"
#include "model/safetensors_writer.hpp"
#ifdef MOE_HAVE_ENGINE
#include "engine/gpu_engine.hpp"
#endif

namespace moe::cli {

namespace {

int fail(const std::string& command, const caf::error& err) {
  fmt::print(stderr, "moe {}: error: {}\n", command, error_text(err));
  return 1;
}

struct run_options {
  std::string model_dir;
  generation_flags gen;
  std::string dump_logits;
  std::string engine = "reference";
  std::string gpu_dtype = "bf16";
  std::string fp8 = "off";
};

/// The prompt's logits, float32 `logits` [1, T, vocab], to `path`.
caf::error dump_logits(const std::string& path, const std::vector<float>& logits, size_t tokens,
                       int64_t vocab) {
  model::tensor_to_write t;
  t.name = "logits";
  t.dtype = kernels::dtype::f32;
  t.shape = {1, static_cast<int64_t>(tokens), vocab};
  t.bytes = std::as_bytes(std::span(logits));
  auto saved = model::save_safetensors(path, std::span(&t, 1));
  return saved ? caf::error{} : saved.error();
}

void print_tokens(const std::vector<int32_t>& tokens) {
  std::string line;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(tokens[i]);
  }
  fmt::print("{}\n", line);
}

/// The sampling the generation flags ask for: greedy without any; top-k / top-p without a
/// temperature sample at temperature 1, as Hugging Face does.
kernels::cpu::sampling_params sampling_of(const generation_flags& g) {
  kernels::cpu::sampling_params p{0.0f, 0, 1.0f};
  if (!g.temperature && g.top_k <= 0 && g.top_p >= 1.0f) return p;
  p.temperature = g.temperature ? *g.temperature : 1.0f;
  p.top_p = g.top_p;
  p.top_k = static_cast<size_t>(g.top_k);
  return p;
}

/// The latent cache one generation needs: the prompt, then max_new_tokens - 1 tokens fed back
/// (at least one step's room), in 16-token blocks, and one more. Refused up front where that is
/// past the model's positions: the reference engine's default cache would otherwise fill after
/// generating part of the answer, with an error about cache blocks, and a cache sized for an
/// absurd --max-new-tokens would not fit in memory.
caf::expected<model::latent_cache_options> cache_for(const model::model_config& c,
                                                     size_t prompt_tokens, int64_t max_new_tokens) {
  const auto prompt = static_cast<uint64_t>(prompt_tokens);
  const auto fed = static_cast<uint64_t>(std::max<int64_t>(max_new_tokens, 1)) - 1;
  const auto positions = static_cast<uint64_t>(std::max<int64_t>(c.max_position_embeddings, 0));
  if (prompt > positions || fed > positions - prompt)
    return model::make_error(
        model::model_errc::bad_input,
        fmt::format("--max-new-tokens {} with a {}-token prompt needs {} positions, more than the "
                    "model's {} (max_position_embeddings)",
                    max_new_tokens, prompt, prompt + fed, positions));
  model::latent_cache_options o;
  o.block_size = 16;
  o.num_blocks = static_cast<int64_t>((prompt + fed + 1 + 15) / 16 + 1);
  return o;
}

/// --engine gpu: the GPU engine, with the reference path's output contract and the same tokens
/// for the same logits (its sampler draws what cpu::sample draws, seed and offsets included;
/// the stop rule: a stop token ends the output and is kept).
int run_on_gpu(const run_options& o, const std::vector<int32_t>& prompt) {
#ifndef MOE_HAVE_ENGINE
  (void)prompt;
  return fail("run", model::make_error(model::model_errc::bad_input,
                                       "--engine gpu: this build has no CUDA backend (no GPU)"));
#else
  std::vector<int32_t> stops;
  if (!o.gen.stop_ids.empty()) {
    auto parsed = parse_token_ids(o.gen.stop_ids, "--stop-ids");
    if (!parsed) return fail("run", parsed.error());
    stops = *parsed;
  }
  // The cache is checked before the weights are read (and maybe quantized): a bad
  // --max-new-tokens fails at once.
  auto cfg = model::load_config(o.model_dir);
  if (!cfg) return fail("run", cfg.error());
  auto cache = cache_for(*cfg, prompt.size(), o.gen.max_new_tokens);
  if (!cache) return fail("run", cache.error());
  auto ckpt = open_model(o.model_dir, *cfg, o.fp8 != "off");
  if (!ckpt) return fail("run", ckpt.error());
  auto eo = gpu_engine_options_of(o.gpu_dtype, o.fp8);
  eo.cache = *cache;
  const int64_t vocab = ckpt->config.vocab_size;
  auto engine = engine::gpu_engine::create(std::make_shared<const model::checkpoint>(std::move(*ckpt)), eo);
  if (!engine) return fail("run", engine.error());
  // Each draw's offset is the number of tokens drawn before it, as model::generate counts.
  engine::gpu_row_sampling row;
  row.params = sampling_of(o.gen);
  row.seed = o.gen.seed;
  // One prefill serves both: with every position's logits when they are dumped (the first
  // token then drawn from the last row here, as the device would), else drawing it.
  const model::sequence_input seq[] = {{1, prompt}};
  engine::gpu_prefill_options po;
  po.all_logits = !o.dump_logits.empty();
  po.return_logits = po.all_logits;
  if (!po.all_logits) po.sampling = std::span(&row, 1);
  auto first = engine->prefill(seq, po);
  if (!first) return fail("run", first.error());
  if (po.all_logits)
    if (auto err = dump_logits(o.dump_logits, first->logits, prompt.size(), vocab))
      return fail("run", err);
  std::vector<int32_t> tokens;
  if (o.gen.max_new_tokens > 0) {
    int32_t token = first->tokens.back();
    if (po.all_logits) {
      kernels::cpu::sampler sampler(static_cast<size_t>(vocab));
      if (sampler.draw(first->logits.data() + (prompt.size() - 1) * static_cast<size_t>(vocab),
                       row.params, row.seed, 0, &token) != kernels::kernel_status::ok)
        return fail(
            "run", model::make_error(model::model_errc::bad_input, "sampling parameters rejected"));
    }
    tokens.push_back(token);
    engine::gpu_decode_options dopt;
    dopt.return_logits = false;
    dopt.sampling = std::span(&row, 1);
    while (static_cast<int64_t>(tokens.size()) < o.gen.max_new_tokens &&
           std::find(stops.begin(), stops.end(), tokens.back()) == stops.end()) {
      row.offset = tokens.size();
      const model::decode_input step[] = {{1, tokens.back()}};
      auto next = engine->decode(step, dopt);
      if (!next) return fail("run", next.error());
      tokens.push_back(next->tokens.at(0));
    }
  }
  print_tokens(tokens);
  return 0;
#endif
}

int run_model(const run_options& o) {
  auto parsed = parse_token_ids(o.gen.prompt_ids, "--prompt-ids");
  if (!parsed) return fail("run", parsed.error());
  const std::vector<int32_t>& prompt = *parsed;
  if (o.engine == "gpu") return run_on_gpu(o, prompt);
  if (o.fp8 != "off" || o.gpu_dtype != "bf16")
    return fail("run", model::make_error(model::model_errc::bad_input,
                                         "--fp8 and --gpu-dtype need --engine gpu"));
  auto opened = open_model(o.model_dir);
  if (!opened) return fail("run", opened.error());
  auto ckpt = std::make_shared<const model::checkpoint>(std::move(*opened));
  model::engine_options eo;
  auto cache = cache_for(ckpt->config, prompt.size(), o.gen.max_new_tokens);
  if (!cache) return fail("run", cache.error());
  eo.cache = *cache;
  auto engine = model::reference_engine::create(ckpt, eo);
  if (!engine) return fail("run", engine.error());
  if (!o.dump_logits.empty()) {
    const model::sequence_input seq[] = {{1, prompt}};
    model::prefill_options po;
    po.all_logits = true;
    auto out = engine->prefill(seq, po);
    if (!out) return fail("run", out.error());
    engine->release(1);
    if (auto err = dump_logits(o.dump_logits, out->logits, prompt.size(), ckpt->config.vocab_size))
      return fail("run", err);
  }
  model::generation_request req;
  req.prompt = prompt;
  req.max_new_tokens = o.gen.max_new_tokens;
  req.sampling = sampling_of(o.gen);
  req.seed = o.gen.seed;
  if (!o.gen.stop_ids.empty()) {
    auto stop = parse_token_ids(o.gen.stop_ids, "--stop-ids");
    if (!stop) return fail("run", stop.error());
    req.stop_token_ids = *stop;
  }
  auto tokens = model::generate(*engine, std::span(&req, 1));
  if (!tokens) return fail("run", tokens.error());
  print_tokens((*tokens)[0]);
  return 0;
}

}  // namespace

void add_run_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<run_options>();
  auto* cmd = app.add_subcommand(
      "run", "Generate tokens with the single-process reference engine, or the GPU engine");
  cmd->add_option("--model", o->model_dir, "Checkpoint directory (config.json + safetensors)")
      ->required();
  add_generation_flags(*cmd, o->gen);
  cmd->add_option("--dump-logits", o->dump_logits,
                  "Write the prompt's logits as float32 `logits` [1, T, vocab] to this file");
  cmd->add_option("--engine", o->engine, "reference (CPU, float32) or gpu (one GPU; CUDA builds)")
      ->check(CLI::IsMember({"reference", "gpu"}));
  cmd->add_option("--gpu-dtype", o->gpu_dtype, "The GPU engine's dtype: bf16 or f32")
      ->check(CLI::IsMember({"bf16", "f32"}));
  cmd->add_option("--fp8", o->fp8,
                  "GPU engine with FP8 weights (a checkpoint without them is quantized first): "
                  "off, block_scaled (FP8 products) or expand (bf16 products)")
      ->check(CLI::IsMember({"off", "block_scaled", "expand"}));
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
  cmd->add_option("--seed", o->seed, "Random seed")->check(seed_number());
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
