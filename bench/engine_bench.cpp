// Reference-engine throughput on CPU: prefill and decode tokens/s at several batch sizes, the
// share of time spent in GEMM, and the GEMM GFLOP/s reached on the model's shapes against
// OpenBLAS's own best on square GEMMs, measured in the same run. Prints one JSON object.
//
//   moe_bench_engine --model DIR           (a checkpoint; default: writes preset `small` to
//                                           --work-dir the first time)
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/gemm_profile.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/reference_engine.hpp"

namespace kc = moe::kernels::cpu;
using clock_type = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

double gemm_seconds(const std::vector<kc::gemm_shape_record>& recs) {
  double s = 0;
  for (const auto& r : recs) s += r.seconds;
  return s;
}

double gemm_flops(const std::vector<kc::gemm_shape_record>& recs) {
  double f = 0;
  for (const auto& r : recs) f += r.flops;
  return f;
}

// OpenBLAS's best sgemm rate on square problems: the ceiling the model's GEMMs are held to.
json square_gemm_peak() {
  json out = json::array();
  double best = 0;
  for (size_t n : {512, 1024, 2048}) {
    std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
    const int reps = n <= 512 ? 20 : (n <= 1024 ? 5 : 2);
    bool ok = kc::linear(a.data(), b.data(), c.data(), n, n, n) == moe::kernels::kernel_status::ok;
    auto t = clock_type::now();  // after one warm-up product
    for (int r = 0; r < reps; ++r)
      ok = ok && kc::linear(a.data(), b.data(), c.data(), n, n, n) == moe::kernels::kernel_status::ok;
    if (!ok) continue;
    const double gflops = 2.0 * n * n * n * reps / seconds_since(t) / 1e9;
    best = std::max(best, gflops);
    out.push_back({{"n", n}, {"gflops", gflops}});
  }
  return {{"shapes", out}, {"best_gflops", best}};
}

struct phase_result {
  double seconds = 0, tokens = 0, gemm_seconds = 0, gemm_flops = 0;
  std::vector<kc::gemm_shape_record> shapes;
};

json to_json(const phase_result& p) {
  json shapes = json::array();
  for (size_t i = 0; i < std::min<size_t>(p.shapes.size(), 6); ++i) {
    const auto& r = p.shapes[i];
    shapes.push_back({{"m", r.m}, {"n", r.n}, {"k", r.k}, {"calls", r.calls},
                      {"gflops", r.flops / r.seconds / 1e9},
                      {"share_of_gemm_time", r.seconds / p.gemm_seconds}});
  }
  return {{"seconds", p.seconds},
          {"tokens", p.tokens},
          {"tokens_per_second", p.tokens / p.seconds},
          {"gemm_share", p.gemm_seconds / p.seconds},
          {"gemm_gflops", p.gemm_flops / p.gemm_seconds / 1e9},
          {"top_gemm_shapes", shapes}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Reference engine benchmark (JSON on stdout)"};
  std::string model_dir, work_dir = "bench-models";
  std::vector<int64_t> batches = {1, 32};
  int64_t prompt_len = 128, decode_steps = 16;
  app.add_option("--model", model_dir, "Checkpoint directory (default: preset small in --work-dir)");
  app.add_option("--work-dir", work_dir, "Where the default model is written");
  app.add_option("--batch", batches, "Batch sizes")->delimiter(',');
  app.add_option("--prompt-len", prompt_len, "Prompt tokens per sequence");
  app.add_option("--decode-steps", decode_steps, "Decode steps per batch");
  CLI11_PARSE(app, argc, argv);

  if (model_dir.empty()) {
    model_dir = (std::filesystem::path(work_dir) / "small").string();
    if (!std::filesystem::exists(std::filesystem::path(model_dir) / "config.json")) {
      std::fprintf(stderr, "writing preset 'small' to %s\n", model_dir.c_str());
      auto cfg = moe::model::model_preset("small");
      if (!cfg || !moe::model::init_model(model_dir, *cfg)) {
        std::fprintf(stderr, "cannot write the small preset\n");
        return 1;
      }
    }
  }
  auto cfg = moe::model::load_config(model_dir);
  if (!cfg) {
    std::fprintf(stderr, "%s\n", moe::error_text(cfg.error()).c_str());
    return 1;
  }
  moe::model::load_options lo;
  lo.mtp = moe::model::mtp_policy::skip;
  auto ckpt = moe::model::load_checkpoint(model_dir, *cfg, lo);
  if (!ckpt) {
    std::fprintf(stderr, "%s\n", moe::error_text(ckpt.error()).c_str());
    return 1;
  }
  auto shared = std::make_shared<const moe::model::checkpoint>(std::move(*ckpt));
  int64_t params = 0;
  for (const auto& [name, t] : shared->tensors) params += t.num_elements();

  json report;
  report["benchmark"] = "reference_engine";
  report["model"] = {{"dir", model_dir}, {"parameters", params},
                     {"layers", cfg->num_hidden_layers}, {"hidden", cfg->hidden_size},
                     {"routed_experts", cfg->n_routed_experts},
                     {"experts_per_token", cfg->num_experts_per_tok}};
  report["prompt_len"] = prompt_len;
  report["decode_steps"] = decode_steps;
  report["openblas_square_gemm"] = square_gemm_peak();
  const double peak = report["openblas_square_gemm"]["best_gflops"];

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg->vocab_size - 1));
  json runs = json::array();
  for (int64_t batch : batches) {
    moe::model::engine_options eo;
    eo.cache.block_size = 16;
    eo.cache.num_blocks = batch * ((prompt_len + decode_steps) / 16 + 2);
    auto engine = moe::model::reference_engine::create(shared, eo);
    if (!engine) {
      std::fprintf(stderr, "%s\n", moe::error_text(engine.error()).c_str());
      return 1;
    }
    std::vector<std::vector<int32_t>> prompts(batch, std::vector<int32_t>(prompt_len));
    for (auto& p : prompts)
      for (auto& t : p) t = token(rng);
    std::vector<moe::model::sequence_input> seqs;
    for (int64_t b = 0; b < batch; ++b) seqs.push_back({static_cast<uint64_t>(b), prompts[b]});

    kc::gemm_profile_reset();
    kc::gemm_profile_enable(true);
    auto t = clock_type::now();
    auto pre = engine->prefill(seqs);
    phase_result prefill;
    prefill.seconds = seconds_since(t);
    prefill.tokens = static_cast<double>(batch * prompt_len);
    prefill.shapes = kc::gemm_profile_snapshot();
    prefill.gemm_seconds = gemm_seconds(prefill.shapes);
    prefill.gemm_flops = gemm_flops(prefill.shapes);
    if (!pre) {
      std::fprintf(stderr, "%s\n", moe::error_text(pre.error()).c_str());
      return 1;
    }
    kc::gemm_profile_reset();
    phase_result decode;
    std::vector<moe::model::decode_input> step(batch);
    t = clock_type::now();
    for (int64_t s = 0; s < decode_steps; ++s) {
      for (int64_t b = 0; b < batch; ++b) step[b] = {static_cast<uint64_t>(b), token(rng)};
      auto out = engine->decode(step);
      if (!out) {
        std::fprintf(stderr, "%s\n", moe::error_text(out.error()).c_str());
        return 1;
      }
    }
    decode.seconds = seconds_since(t);
    decode.tokens = static_cast<double>(batch * decode_steps);
    decode.shapes = kc::gemm_profile_snapshot();
    decode.gemm_seconds = gemm_seconds(decode.shapes);
    decode.gemm_flops = gemm_flops(decode.shapes);
    kc::gemm_profile_enable(false);
    json run = {{"batch", batch}, {"prefill", to_json(prefill)}, {"decode", to_json(decode)}};
    run["prefill"]["gemm_gflops_vs_openblas_best"] =
        prefill.gemm_flops / prefill.gemm_seconds / 1e9 / peak;
    run["decode"]["gemm_gflops_vs_openblas_best"] =
        decode.gemm_flops / decode.gemm_seconds / 1e9 / peak;
    run["decode"]["ms_per_step"] = 1e3 * decode.seconds / static_cast<double>(decode_steps);
    runs.push_back(run);
  }
  report["runs"] = runs;
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
