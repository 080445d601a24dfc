// The CPU reference training step: model::training_model's forward_backward followed by one
// AdamW step, on a preset's random weights and random byte-level token batches. Prints one JSON
// object: tokens per step, the median step time, training tokens/s, where the step's time goes
// (forward GEMMs, backward GEMMs, everything else in forward_backward, AdamW), and, as the
// baseline measured in the same run, model::reference_engine's prefill of the same tokens with
// the same weights ("a training step costs N prefills").
//
//   moe_bench_training [--preset small] [--batch 4] [--seq-len 128] [--steps 5] [--warmup 1]
//
// The weights: init_model writes the preset to a temporary directory (removed at exit), which is
// loaded without the MTP module; the step trains the main model only (mtp_depth 0), so training
// and prefill run the same layers. Training and the engine share that one checkpoint, so each
// prefill sees the weights the following step starts from.
//
// Forward vs backward GEMM time. gemm_profile accumulates time per GEMM shape (m, n, k) only: it
// cannot tell a forward product from a backward one (an expert's down_proj dX product has the
// shape of its gate_proj forward product), and training_model has no forward-only call. So per
// measured batch, before its step:
//  - the engine prefills the batch with all_logits (LM head over every position, as training's
//    loss needs) with the profile on: its GEMMs are the training forward's (expanded kv_b_proj,
//    no MLA absorption in prefill; the same routing, as the weights are the same), which the run
//    checks: every (m, n, k) of that prefill must appear in the step's profile with at least as
//    many calls ("forward_gemm_shapes_contained");
//  - the step's forward_backward runs with the profile on: all of its GEMM time.
// forward GEMM seconds := that prefill's GEMM seconds; backward GEMM seconds := the step's GEMM
// seconds minus them. Shares are of the summed step seconds over the measured steps.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <thread>
#include <tuple>

#include "kernels/cpu/gemm_profile.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/optimizer.hpp"
#include "model/reference_engine.hpp"
#include "model/training_model.hpp"

namespace kc = moe::kernels::cpu;
using clock_type = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double sum(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s;
}

/// Takes the profile gathered since the last reset: total GEMM seconds, and calls per shape.
struct gemm_totals {
  double seconds = 0;
  std::map<std::tuple<size_t, size_t, size_t>, uint64_t> calls;
};

gemm_totals take_gemm_profile() {
  gemm_totals t;
  for (const auto& r : kc::gemm_profile_snapshot()) {
    t.seconds += r.seconds;
    t.calls[{r.m, r.n, r.k}] = r.calls;
  }
  kc::gemm_profile_reset();
  return t;
}

/// Every shape of `part` appears in `whole` with at least as many calls.
bool contained_in(const gemm_totals& part, const gemm_totals& whole) {
  for (const auto& [shape, calls] : part.calls) {
    auto it = whole.calls.find(shape);
    if (it == whole.calls.end() || it->second < calls) return false;
  }
  return true;
}

/// A directory removed, with what is in it, when this goes out of scope.
class scratch_dir {
 public:
  explicit scratch_dir(std::filesystem::path p) : path_(std::move(p)) {}
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

int fail(const std::string& what) {
  std::fprintf(stderr, "%s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CPU reference training step benchmark (JSON on stdout)"};
  std::string preset = "small";
  int64_t batch = 4, seq_len = 128, steps = 5, warmup = 1;
  uint64_t seed = 0;
  double lr = 1e-3;
  app.add_option("--preset", preset, "Model preset, random weights (default small)");
  app.add_option("--batch", batch, "Sequences per step (default 4)");
  app.add_option("--seq-len", seq_len, "Tokens per sequence (default 128)");
  app.add_option("--steps", steps, "Measured steps (default 5)");
  app.add_option("--warmup", warmup, "Unmeasured steps first (default 1)");
  app.add_option("--seed", seed, "Seed of the weights and of the token batches (default 0)");
  app.add_option("--lr", lr, "AdamW learning rate (default 1e-3)");
  CLI11_PARSE(app, argc, argv);
  if (batch < 1 || seq_len < 2 || steps < 1 || warmup < 0)
    return fail("--batch >= 1, --seq-len >= 2, --steps >= 1 and --warmup >= 0");

  auto cfg = moe::model::model_preset(preset);
  if (!cfg) return fail(moe::error_text(cfg.error()));
  if (seq_len > cfg->max_position_embeddings) return fail("--seq-len exceeds the preset's max_position_embeddings");

  // Weights: the preset written by init_model (as `moe init-model` does) and loaded back.
  const auto setup_start = clock_type::now();
  scratch_dir dir(std::filesystem::temp_directory_path() /
                  ("moe-bench-training-" + preset + "-" + std::to_string(::getpid())));
  moe::model::init_options io;
  io.seed = seed;
  io.progress = false;
  if (auto files = moe::model::init_model(dir.path(), *cfg, io); !files) return fail(moe::error_text(files.error()));
  moe::model::load_options lo;
  lo.mtp = moe::model::mtp_policy::skip;
  lo.progress = false;
  auto ckpt = moe::model::load_checkpoint(dir.path(), *cfg, lo);
  if (!ckpt) return fail(moe::error_text(ckpt.error()));
  auto weights = std::make_shared<moe::model::checkpoint>(std::move(*ckpt));
  auto model = moe::model::training_model::bind(weights);
  if (!model) return fail(moe::error_text(model.error()));
  moe::model::engine_options eo;
  eo.cache.block_size = 16;
  eo.cache.num_blocks = batch * (seq_len / 16 + 2);
  auto engine = moe::model::reference_engine::create(weights, eo);
  if (!engine) return fail(moe::error_text(engine.error()));
  moe::model::adamw optimizer;
  int64_t trainable = 0;
  for (const auto& p : model->parameters()) trainable += static_cast<int64_t>(p.value.size());
  const double setup_seconds = seconds_since(setup_start);

  // Byte-level tokens: ids in [0, 256), as a byte tokenizer produces.
  std::mt19937_64 rng(seed);
  const auto max_id = static_cast<int32_t>(std::min<int64_t>(256, cfg->vocab_size) - 1);
  std::uniform_int_distribution<int32_t> byte(0, max_id);
  std::vector<std::vector<int32_t>> seqs(batch, std::vector<int32_t>(seq_len));
  std::vector<moe::model::sequence_input> inputs;
  for (int64_t b = 0; b < batch; ++b) inputs.push_back({static_cast<uint64_t>(b), seqs[b]});

  auto run_prefill = [&](bool all_logits) -> caf::error {
    moe::model::prefill_options po;
    po.all_logits = all_logits;
    auto out = engine->prefill(inputs, po);
    for (const auto& s : inputs) engine->release(s.id);
    return out ? caf::error{} : out.error();
  };

  std::vector<double> step_s, zero_s, fb_s, opt_s, prefill_s, forward_s, gemm_s, forward_gemm_s, losses;
  bool shapes_contained = true;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    for (auto& s : seqs)
      for (auto& t : s) t = byte(rng);
    const bool measured = i >= warmup;

    // Baseline: serving's prefill of the batch (last position's logits per sequence).
    auto t = clock_type::now();
    if (auto err = run_prefill(false)) return fail(moe::error_text(err));
    const double prefill = seconds_since(t);
    // The training forward's GEMMs: prefill with logits at every position, profiled.
    kc::gemm_profile_reset();
    kc::gemm_profile_enable(true);
    t = clock_type::now();
    if (auto err = run_prefill(true)) return fail(moe::error_text(err));
    const double forward = seconds_since(t);
    const gemm_totals forward_gemm = take_gemm_profile();

    // The step: zero_grads, forward_backward (profiled), AdamW.
    const auto step_start = clock_type::now();
    model->zero_grads();
    const double zero = seconds_since(step_start);
    t = clock_type::now();
    auto loss = model->forward_backward(seqs);
    const double fb = seconds_since(t);
    const gemm_totals step_gemm = take_gemm_profile();
    kc::gemm_profile_enable(false);
    if (!loss) return fail(moe::error_text(loss.error()));
    t = clock_type::now();
    if (auto err = optimizer.step(model->parameters(), lr)) return fail(moe::error_text(err));
    const double opt = seconds_since(t);
    const double step = seconds_since(step_start);
    std::fprintf(stderr, "%s step %lld: %.3f s, loss %.4f\n", measured ? "measured" : "warmup",
                 static_cast<long long>(i), step, *loss);
    if (!measured) continue;
    shapes_contained = shapes_contained && contained_in(forward_gemm, step_gemm);
    step_s.push_back(step);
    zero_s.push_back(zero);
    fb_s.push_back(fb);
    opt_s.push_back(opt);
    prefill_s.push_back(prefill);
    forward_s.push_back(forward);
    gemm_s.push_back(step_gemm.seconds);
    forward_gemm_s.push_back(forward_gemm.seconds);
    losses.push_back(*loss);
  }

  const double tokens = static_cast<double>(batch * seq_len);
  const double step_median = median(step_s);
  const double train_tps = tokens / step_median;
  const double prefill_tps = tokens / median(prefill_s);
  const double all_steps = sum(step_s);
  const double gemm_total = sum(gemm_s), forward_gemm = sum(forward_gemm_s);
  const double backward_gemm = gemm_total - forward_gemm;

  json report;
  report["benchmark"] = "training_step";
  report["model"] = {{"preset", preset},
                     {"trainable_parameters", trainable},
                     {"layers", cfg->num_hidden_layers},
                     {"hidden", cfg->hidden_size},
                     {"vocab", cfg->vocab_size},
                     {"routed_experts", cfg->n_routed_experts},
                     {"experts_per_token", cfg->num_experts_per_tok},
                     {"mtp_depth_trained", 0}};
  report["batch"] = batch;
  report["seq_len"] = seq_len;
  report["steps"] = steps;
  report["warmup"] = warmup;
  report["seed"] = seed;
  report["hardware_threads"] = std::thread::hardware_concurrency();
  report["setup_seconds"] = setup_seconds;
  report["tokens_per_step"] = batch * seq_len;
  report["predicted_tokens_per_step"] = batch * (seq_len - 1);
  report["step_seconds_median"] = step_median;
  report["step_seconds"] = step_s;
  report["training_tokens_per_second"] = train_tps;
  report["loss_first"] = losses.front();
  report["loss_last"] = losses.back();
  report["breakdown"] = {
      {"zero_grads_seconds_median", median(zero_s)},
      {"forward_backward_seconds_median", median(fb_s)},
      {"adamw_seconds_median", median(opt_s)},
      {"gemm_share_of_step", gemm_total / all_steps},
      {"forward_gemm_share_of_step", forward_gemm / all_steps},
      {"backward_gemm_share_of_step", backward_gemm / all_steps},
      {"backward_to_forward_gemm_seconds", backward_gemm / forward_gemm},
      {"non_gemm_forward_backward_share_of_step", (sum(fb_s) - gemm_total) / all_steps},
      {"adamw_share_of_step", sum(opt_s) / all_steps},
      {"forward_gemm_shapes_contained", shapes_contained},
      {"method",
       "gemm_profile times GEMMs per (m,n,k) only, and training_model has no forward-only call: "
       "GEMM seconds of forward_backward are profiled; forward GEMM seconds are those of a "
       "reference_engine prefill with all_logits of the same batch and weights, whose GEMMs "
       "(checked: shapes and call counts contained in the step's) are the training forward's; "
       "backward = step GEMM - forward GEMM; shares are of summed measured step seconds"}};
  report["baseline"] = {
      {"what", "reference_engine prefill of the same batch, same weights (last-position logits)"},
      {"prefill_seconds_median", median(prefill_s)},
      {"prefill_tokens_per_second", prefill_tps},
      {"training_over_prefill_tokens_per_second", train_tps / prefill_tps},
      {"step_costs_x_prefill", prefill_tps / train_tps},
      {"prefill_all_logits_seconds_median", median(forward_s)},
      {"step_costs_x_prefill_all_logits", step_median / median(forward_s)}};
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
