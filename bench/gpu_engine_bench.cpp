// The GPU engine end to end on one card: the figures issue 8's benchmark asks for. Prefill of
// --prefill-batch sequences of --prefill-len tokens, and greedy decode at each --decode-batch
// after a --context-token prompt, on a random model (preset v2lite-8L in bf16 by default, built
// in memory by model::random_checkpoint: speed does not depend on the weights' values). Every
// step is timed on the host around the engine's call, which returns when its results are on
// the host (only the greedy tokens: return_logits off, as a greedy server runs), so the times
// include the metadata upload, every kernel and the download. Medians over --reps.
//
// Baselines in the same run: with --peer, the JSON of bench/peer/transformers_peer.py (same
// shapes, same card, run just before by scripts/gpu/device_checks.sh) is read and each figure
// is also given as a ratio to transformers'; the targets are stated beside them.
// Prints one JSON object (also to --out).
//
// Also, unless --check-tokens is 0, a check of the numbers on the model's real shapes (the GPU
// tests use tiny fixtures): a --check-tokens prompt and --check-steps greedy steps on the GPU
// engine and on the CPU reference engine (model::reference_engine, float32, OpenBLAS) over the
// same weights, both fed the reference's tokens; the JSON gives per step the largest logit
// difference, the largest logit, whether the greedy tokens agree, and the share of prompt
// tokens routed to the same experts at every MoE layer. It runs after the timings.
//
// Decode runs twice per batch on the same prompts: from CUDA graphs (the engine's
// decode_graphs; "decode") and kernel by kernel ("decode_eager"), with the graphs' speed-up;
// then once more with every row sampled ("decode_sampled": temperature 0.7, top-p 0.9 drawn by
// the device's sampler; "sampling_cost", the greedy step's speed over it).
// Then, unless --no-variants, the engine options still off until a card measures them, each on
// its own engine over the same weights with its ratio to the default engine: prefill with the
// routed experts on cuBLAS's grouped GEMM ("prefill_cublas_grouped_experts",
// gpu_engine_options::cublas_grouped_experts); the batches past skinny_rows (up to 64) with
// their projections on the grouped expert GEMM as one expert ("decode_grouped_dense",
// grouped_dense_rows); the batches within skinny_rows (their few-row projections on
// skinny_linear.hpp's kernel) with every projection on cuBLASLt instead
// ("decode_cublaslt_projections", the kernel's speed-up); every decode batch with the shared
// experts on the step's one stream ("decode_one_stream", overlap_shared_experts off: the
// overlap's speed-up); and last, unless --no-wgmma, prefill
// with the routed experts on Hopper's wgmma ("prefill_wgmma_experts", wgmma_experts). With
// --wgmma-experts the default engine itself has wgmma_experts (and that variant is not run).
// Then "measured_best": every option this run measured faster than the default, together on
// one engine, with the targets (what the defaults would give following this run).
// "kernels" says which kernels each engine's products ran on. A variant that fails is recorded
// as {"error": ...} in its place and the run goes on; --out is rewritten after every stage, so a
// run cut short keeps what it measured.
//
// With --fp8 (a list of gpu_engine_options::fp8_products: block_scaled, expand), the same
// weights are then quantized to FP8 (model::quantize_fp8: 128x128 blocks, as DeepSeek-V3's) and
// the prefill and decode figures measured again on an engine keeping them FP8, once per mode,
// each with its ratio to the bf16 engine's figures of the same run ("fp8").
//
//   moe_bench_gpu_engine [--preset v2lite-8L] [--peer peer.json] [--out engine.json] [--no-graphs]
//                        [--no-variants] [--no-wgmma] [--wgmma-experts]
//                        [--fp8 block_scaled,expand]
// Exits 2, with a JSON {"skipped": reason}, where there is no GPU.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <cstdio>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "engine/gpu_engine.hpp"
#include "model/init_model.hpp"
#include "model/reference_engine.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/devices.hpp"

using nlohmann::json;
using clock_type = std::chrono::steady_clock;
namespace me = moe::engine;

namespace {

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

[[noreturn]] void fail(const std::string& what, const caf::error& e) {
  std::fprintf(stderr, "moe_bench_gpu_engine: %s: %s\n", what.c_str(), moe::error_text(e).c_str());
  std::exit(1);
}

/// A stage's failure as its figures' place in the JSON: {"error": what and why}.
json error_json(const std::string& what, const caf::error& e) {
  return {{"error", what + ": " + moe::error_text(e)}};
}

bool failed(const json& figures) {
  return figures.is_object() && figures.contains("error");
}

struct settings {
  std::string preset = "v2lite-8L";
  int prefill_batch = 4;
  int prefill_len = 512;
  int context = 128;
  int decode_steps = 32;
  std::vector<int> decode_batches{1, 32};
  int reps = 5;
  int64_t block_size = 16;
  int check_tokens = 24;
  int check_steps = 8;
  bool graphs = true;
  bool variants = true;  // the A/B engines (options off by default, skinny_rows 0)
  bool wgmma = true;     // among them, the wgmma_experts engine
  bool wgmma_experts = false;  // the default engine with wgmma_experts (then no such variant)
  std::vector<std::string> fp8;
  std::string peer, out;
};

std::vector<int32_t> random_tokens(std::mt19937& rng, int64_t vocab, size_t n) {
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(n);
  for (auto& x : t) x = pick(rng);
  return t;
}

class runner {
 public:
  runner(me::gpu_engine& engine, const settings& s) : e_(engine), s_(s) {}

  json prefill() {
    const int64_t vocab = e_.config().vocab_size;
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < s_.prefill_batch; ++i)
      prompts.push_back(random_tokens(rng_, vocab, static_cast<size_t>(s_.prefill_len)));
    std::vector<moe::model::sequence_input> seqs;
    for (size_t i = 0; i < prompts.size(); ++i) seqs.push_back({next_id_++, prompts[i]});
    me::gpu_prefill_options o;
    o.return_logits = false;
    std::vector<double> times;
    for (int r = -2; r < s_.reps; ++r) {  // two warm-ups: plan caches, allocator, clocks
      const auto t = clock_type::now();
      auto got = e_.prefill(seqs, o);
      const double s = seconds_since(t);
      if (!got) return error_json("prefill", got.error());
      for (const auto& q : seqs) e_.release(q.id);
      if (r >= 0) times.push_back(s);
    }
    const double s = median(times);
    const double tokens = static_cast<double>(s_.prefill_batch) * s_.prefill_len;
    return {{"batch", s_.prefill_batch}, {"len", s_.prefill_len}, {"seconds", s},
            {"tokens_per_s", tokens / s}, {"times", times}};
  }

  /// Prefills `batch` prompts, then times decode_steps steps fed their own tokens, greedy or,
  /// with `sampling`, every row drawn with those parameters (its own seed, the offset counting
  /// its draws); each run (a warm-up, then max(1, reps / 2)) takes fresh prompts from a
  /// generator seeded by the batch, so the eager and the graph runs of a batch decode the same
  /// prompts. `tokens` gets the last run's generated tokens.
  json decode(int batch, bool use_graph, std::vector<int32_t>& tokens,
              const std::optional<moe::kernels::cpu::sampling_params>& sampling = std::nullopt) {
    const int64_t vocab = e_.config().vocab_size;
    std::mt19937 rng(static_cast<uint32_t>(batch));
    std::vector<double> times;
    const int runs = std::max(1, s_.reps / 2);
    const uint64_t captured_before = e_.decode_graph_stats().num_captured;
    for (int r = -1; r < runs; ++r) {
      std::vector<std::vector<int32_t>> prompts;
      std::vector<moe::model::sequence_input> seqs;
      for (int i = 0; i < batch; ++i)
        prompts.push_back(random_tokens(rng, vocab, static_cast<size_t>(s_.context)));
      for (size_t i = 0; i < prompts.size(); ++i) seqs.push_back({next_id_++, prompts[i]});
      std::vector<me::gpu_row_sampling> rows(sampling ? static_cast<size_t>(batch) : 0);
      for (size_t i = 0; i < rows.size(); ++i) rows[i] = {*sampling, 1000 + i, 0};
      me::gpu_prefill_options po;
      po.return_logits = false;
      po.sampling = rows;
      auto first = e_.prefill(seqs, po);
      if (!first) return error_json("prefill before decode", first.error());
      std::vector<moe::model::decode_input> step(static_cast<size_t>(batch));
      for (size_t i = 0; i < step.size(); ++i) step[i] = {seqs[i].id, first->tokens[i]};
      me::gpu_decode_options o;
      o.return_logits = false;
      o.use_graph = use_graph;
      o.sampling = rows;
      tokens.clear();
      const auto t = clock_type::now();
      for (int k = 0; k < s_.decode_steps; ++k) {
        for (auto& row : rows) ++row.offset;
        auto got = e_.decode(step, o);
        if (!got) return error_json("decode at batch " + std::to_string(batch), got.error());
        for (size_t i = 0; i < step.size(); ++i) step[i].token = got->tokens[i];
        tokens.insert(tokens.end(), got->tokens.begin(), got->tokens.end());
      }
      const double s = seconds_since(t);
      for (const auto& q : seqs) e_.release(q.id);
      if (r >= 0) times.push_back(s);
    }
    const double s = median(times);
    json out = {{"batch", batch},
                {"context", s_.context},
                {"steps", s_.decode_steps},
                {"graphs", use_graph},
                {"ms_per_token", 1e3 * s / s_.decode_steps},
                {"tokens_per_s", static_cast<double>(batch) * s_.decode_steps / s},
                {"times", times}};
    // The launches one step replays: the nodes of the graph this batch captured (last).
    if (const auto g = e_.decode_graph_stats(); use_graph && g.num_captured > captured_before)
      out["graph_nodes"] = g.last_graph_nodes;
    return out;
  }

 private:
  me::gpu_engine& e_;
  const settings& s_;
  std::mt19937 rng_{1234};
  uint64_t next_id_ = 1;
};

int32_t argmax(std::span<const float> row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

/// The GPU engine against the CPU reference on the same weights (see the header).
json check_against_reference(me::gpu_engine& gpu, std::shared_ptr<const moe::model::checkpoint> ckpt,
                             const settings& s) {
  auto ref = moe::model::reference_engine::create(std::move(ckpt));
  if (!ref) return {{"error", moe::error_text(ref.error())}};
  const auto vocab = static_cast<size_t>(gpu.config().vocab_size);
  std::mt19937 rng(99);
  const auto prompt = random_tokens(rng, static_cast<int64_t>(vocab), static_cast<size_t>(s.check_tokens));
  const uint64_t id = 1u << 30;
  const moe::model::sequence_input seq[] = {{id, prompt}};
  me::gpu_prefill_options go;
  go.capture_routing = true;
  moe::model::prefill_options ro;
  ro.capture_routing = true;
  auto g = gpu.prefill(seq, go);
  if (!g) return {{"error", "gpu prefill: " + moe::error_text(g.error())}};
  auto r = ref->prefill(seq, ro);
  if (!r) return {{"error", "reference prefill: " + moe::error_text(r.error())}};
  // Expert sets per (layer, token): the order of equal-score choices may differ.
  const auto k = static_cast<size_t>(gpu.config().num_experts_per_tok);
  size_t same = 0, total = 0;
  for (size_t l = 0; l < std::min(g->routing.size(), r->routing.size()); ++l)
    for (size_t t = 0; t < g->routing[l].size() / k && t < r->routing[l].size() / k; ++t) {
      std::vector<int32_t> a(g->routing[l].begin() + t * k, g->routing[l].begin() + (t + 1) * k);
      std::vector<int32_t> b(r->routing[l].begin() + t * k, r->routing[l].begin() + (t + 1) * k);
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      same += a == b ? 1 : 0;
      ++total;
    }
  json steps = json::array();
  auto compare = [&](std::span<const float> got, std::span<const float> want, int32_t gpu_token) {
    float diff = 0, largest = 0;
    for (size_t i = 0; i < vocab; ++i) {
      diff = std::max(diff, std::fabs(got[i] - want[i]));
      largest = std::max(largest, std::fabs(want[i]));
    }
    std::vector<float> sorted(want.begin(), want.end());
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    const int32_t want_token = argmax(want);
    steps.push_back({{"max_abs_diff", diff}, {"max_abs_logit", largest},
                     {"reference_top1_margin", sorted[0] - sorted[1]},
                     {"greedy_agrees", gpu_token == want_token}});
    return want_token;
  };
  int32_t token = compare(g->logits, r->logits, g->tokens[0]);
  for (int step = 0; step < s.check_steps; ++step) {
    const moe::model::decode_input d[] = {{id, token}};
    auto gd = gpu.decode(d);
    if (!gd) return {{"error", "gpu decode: " + moe::error_text(gd.error())}};
    auto rd = ref->decode(d);
    if (!rd) return {{"error", "reference decode: " + moe::error_text(rd.error())}};
    token = compare(gd->logits, *rd, gd->tokens[0]);
  }
  gpu.release(id);
  size_t agree = 0;
  float worst = 0;
  for (const auto& st : steps) {
    agree += st["greedy_agrees"].get<bool>() ? 1 : 0;
    worst = std::max(worst, st["max_abs_diff"].get<float>());
  }
  return {{"prompt_tokens", s.check_tokens}, {"decode_steps", s.check_steps},
          {"routing_same_share", total ? static_cast<double>(same) / static_cast<double>(total) : 0.0},
          {"greedy_agree", agree}, {"greedy_compared", steps.size()},
          {"max_abs_diff", worst}, {"steps", steps}};
}

/// Ratios to transformers' figures of the same shapes, where the peer measured them.
json against_peer(const json& ours, const json& peer) {
  json r = json::object();
  if (peer.contains("prefill") && ours.contains("prefill"))
    r["prefill_tokens_per_s"] = ours["prefill"]["tokens_per_s"].get<double>() /
                                peer["prefill"]["tokens_per_s"].get<double>();
  for (const auto& d : ours.value("decode", json::array()))
    for (const auto& p : peer.value("decode", json::array()))
      if (p.value("batch", -1) == d["batch"].get<int>())
        r["decode_b" + std::to_string(d["batch"].get<int>()) + "_tokens_per_s"] =
            d["tokens_per_s"].get<double>() / p["tokens_per_s"].get<double>();
  return r;
}

/// The targets, each with whether this run met it.
json targets(const json& ours) {
  json t = json::array();
  if (ours.contains("prefill")) {
    const double v = ours["prefill"]["tokens_per_s"];
    t.push_back({{"what", "prefill tokens/s >= 250000"}, {"value", v}, {"met", v >= 250000}});
  }
  for (const auto& d : ours.value("decode", json::array())) {
    if (d["batch"] == 1) {
      const double v = d["ms_per_token"];
      t.push_back({{"what", "decode batch 1 ms/token <= 1.5"}, {"value", v}, {"met", v <= 1.5}});
    } else if (d["batch"] == 32) {
      const double v = d["tokens_per_s"];
      t.push_back({{"what", "decode batch 32 tokens/s >= 10000"}, {"value", v}, {"met", v >= 10000}});
    }
  }
  return t;
}

/// The tokens/s of the decode entry for `batch` in a "decode" array, if it has one.
std::optional<double> tokens_per_s_at(const json& decodes, int batch) {
  for (const auto& d : decodes)
    if (!failed(d) && d.value("batch", -1) == batch) return d["tokens_per_s"].get<double>();
  return std::nullopt;
}

/// Which kernels ran an engine's products (gpu_engine::kernel_stats), so that a figure says
/// what it measured (wgmma needs an sm_90 card, cuBLAS may refuse a product).
json kernels_json(const me::gpu_engine& e) {
  const auto k = e.kernel_stats();
  return {{"experts_grouped_gemm", k.experts_grouped_gemm},
          {"experts_wgmma", k.experts_wgmma},
          {"experts_cublas", k.experts_cublas},
          {"dense_as_one_expert", k.dense_as_one_expert},
          {"fp8_block_scaled", k.fp8_block_scaled},
          {"fp8_expanded", k.fp8_expanded}};
}

/// An engine's prefill, its decode at every batch (graphs as the settings say) and which
/// kernels ran them, each figure with `ratio_key`: its speed over the same figure in `base`.
json figures_against(me::gpu_engine& engine, const settings& s, const json& base,
                     const char* ratio_key) {
  runner run(engine, s);
  json m = json::object();
  m["prefill"] = run.prefill();
  if (!failed(m["prefill"]))
    m["prefill"][ratio_key] =
        m["prefill"]["tokens_per_s"].get<double>() / base["prefill"]["tokens_per_s"].get<double>();
  m["decode"] = json::array();
  for (int b : s.decode_batches) {
    std::vector<int32_t> tokens;
    json d = run.decode(b, s.graphs, tokens);
    if (const auto reference = tokens_per_s_at(base["decode"], b); reference && !failed(d))
      d[ratio_key] = d["tokens_per_s"].get<double>() / *reference;
    m["decode"].push_back(d);
  }
  m["kernels"] = kernels_json(engine);
  return m;
}

/// The --fp8 runs: the weights quantized, then per mode an engine keeping them FP8, its prefill
/// and graph decode, and the ratios to the bf16 figures in `bf16`.
json fp8_runs(std::shared_ptr<moe::model::checkpoint> host, me::gpu_engine_options eo,
              const settings& s, const json& bf16) {
  json r = json::object();
  auto t = clock_type::now();
  if (auto err = moe::model::quantize_fp8(*host)) return error_json("quantize_fp8", err);
  r["quantize_seconds"] = seconds_since(t);
  const std::shared_ptr<const moe::model::checkpoint> ckpt = std::move(host);
  for (const std::string& mode : s.fp8) {
    eo.fp8 = mode == "expand" ? me::gpu_engine_options::fp8_products::expand
                              : me::gpu_engine_options::fp8_products::block_scaled;
    t = clock_type::now();
    auto engine = me::gpu_engine::create(ckpt, eo);
    if (!engine) {
      r[mode] = error_json("fp8 engine (" + mode + ")", engine.error());
      continue;
    }
    json m = {{"upload_seconds", seconds_since(t)}, {"weight_bytes", engine->weight_bytes()}};
    m["weight_bytes_vs_bf16"] = static_cast<double>(engine->weight_bytes()) /
                                bf16["weight_bytes"].get<double>();
    m.update(figures_against(*engine, s, bf16, "speedup_over_bf16"));
    r[mode] = m;
  }
  return r;
}

/// Every option the A/B runs above measured faster than the default, together on one engine:
/// the figures the defaults would give if each followed this run's measurements, with the
/// issue's targets and the ratios to the default engine. Prefill's routed experts take the
/// faster of cuBLAS's grouped GEMM and wgmma where it beat ours; a decode option changes where
/// every batch it was measured at agrees.
json measured_best(const json& out, const me::gpu_engine_options& eo,
                   std::shared_ptr<const moe::model::checkpoint> weights, const settings& s) {
  const auto ratio = [&](const char* key, const char* field) -> std::optional<double> {
    if (!out.contains(key) || failed(out[key]) || !out[key].contains(field)) return std::nullopt;
    return out[key][field].get<double>();
  };
  const auto every_batch = [&](const char* key, const char* field, bool (*wins)(double)) {
    if (!out.contains(key) || !out[key].is_array() || out[key].empty()) return false;
    for (const auto& d : out[key])
      if (failed(d) || !d.contains(field) || !wins(d[field].get<double>())) return false;
    return true;
  };
  me::gpu_engine_options best = eo;
  double prefill_gain = 1.0;
  if (const auto r = ratio("prefill_cublas_grouped_experts", "speedup_over_ours");
      r && *r > prefill_gain) {
    prefill_gain = *r;
    best.cublas_grouped_experts = true;
  }
  if (const auto r = ratio("prefill_wgmma_experts", "speedup_over_ours"); r && *r > prefill_gain) {
    best.cublas_grouped_experts = false;  // cuBLAS would take the products first
    best.wgmma_experts = true;
  }
  if (every_batch("decode_grouped_dense", "speedup_over_default", [](double v) { return v > 1; }))
    best.grouped_dense_rows = me::gpu_engine_options::max_grouped_dense_rows;
  if (every_batch("decode_cublaslt_projections", "skinny_speedup", [](double v) { return v < 1; }))
    best.skinny_rows = 0;
  if (every_batch("decode_one_stream", "overlap_speedup", [](double v) { return v < 1; }))
    best.overlap_shared_experts = false;
  json m = {{"options",
             {{"cublas_grouped_experts", best.cublas_grouped_experts},
              {"wgmma_experts", best.wgmma_experts},
              {"grouped_dense_rows", best.grouped_dense_rows},
              {"skinny_rows", best.skinny_rows},
              {"overlap_shared_experts", best.overlap_shared_experts}}}};
  if (best.cublas_grouped_experts == eo.cublas_grouped_experts &&
      best.wgmma_experts == eo.wgmma_experts && best.grouped_dense_rows == eo.grouped_dense_rows &&
      best.skinny_rows == eo.skinny_rows &&
      best.overlap_shared_experts == eo.overlap_shared_experts) {
    m["same_as_default"] = true;
    return m;
  }
  auto engine = me::gpu_engine::create(std::move(weights), best);
  if (!engine) {
    m["error"] = error_json("engine (measured best)", engine.error())["error"];
    return m;
  }
  m.update(figures_against(*engine, s, out, "speedup_over_default"));
  m["targets"] = targets(m);
  return m;
}

/// Writes the figures so far to `path` (if any): after every stage, so that a run cut short,
/// or one whose CUDA context a later stage broke, still leaves what it measured.
void save(const json& j, const std::string& path) {
  if (!path.empty()) std::ofstream(path) << j.dump(2) << "\n";
}

void emit(const json& j, const std::string& path) {
  std::printf("%s\n", j.dump(2).c_str());
  save(j, path);
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"GPU engine end to end: prefill and decode throughput, with ratios to transformers"};
  app.add_option("--preset", s.preset, "model preset (moe init-model --preset)");
  app.add_option("--prefill-batch", s.prefill_batch)->check(CLI::PositiveNumber);
  app.add_option("--prefill-len", s.prefill_len)->check(CLI::PositiveNumber);
  app.add_option("--context", s.context, "prompt tokens before decoding")->check(CLI::PositiveNumber);
  app.add_option("--decode-steps", s.decode_steps)->check(CLI::PositiveNumber);
  app.add_option("--decode-batch", s.decode_batches, "decode batch sizes")->delimiter(',');
  app.add_option("--reps", s.reps)->check(CLI::PositiveNumber);
  app.add_option("--check-tokens", s.check_tokens,
                 "prompt tokens of the check against the CPU reference (0: no check)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--check-steps", s.check_steps, "decode steps of that check")->check(CLI::NonNegativeNumber);
  app.add_flag("!--no-graphs", s.graphs, "decode eagerly only (no CUDA graphs)");
  app.add_flag("!--no-variants", s.variants,
               "skip the engines with other options (the A/B figures)");
  app.add_flag("!--no-wgmma", s.wgmma, "among those, skip the wgmma_experts engine");
  app.add_flag("--wgmma-experts", s.wgmma_experts,
               "the default engine with wgmma_experts (e.g. for a profile of that path)");
  app.add_option("--fp8", s.fp8, "also FP8 weights, with these products (block_scaled, expand)")
      ->delimiter(',')
      ->check(CLI::IsMember({"block_scaled", "expand"}));
  app.add_option("--peer", s.peer, "transformers_peer.py's JSON for the same shapes");
  app.add_option("--out", s.out, "also write the JSON here");
  CLI11_PARSE(app, argc, argv);

  json out = {{"bench", "gpu_engine"}, {"preset", s.preset}, {"dtype", "bf16"}};
  // Before building gigabytes of weights on the host.
  const auto devices = moe::runtime::discover_devices();
  if (devices.gpus.empty()) {
    out["skipped"] = "no GPU: " + devices.no_gpu_reason;
    emit(out, s.out);
    return 2;
  }
  out["device"] = {{"name", devices.gpus[0].name}, {"memory_bytes", devices.gpus[0].memory_bytes},
                   {"cuda_runtime", moe::runtime::cuda_version_string(devices.cuda_runtime_version)},
                   {"cuda_driver", moe::runtime::cuda_version_string(devices.cuda_driver_version)}};
  auto config = moe::model::model_preset(s.preset);
  if (!config) fail("preset", config.error());
  int max_batch = s.prefill_batch;
  int64_t tokens_cached = static_cast<int64_t>(s.prefill_batch) * s.prefill_len;
  for (int b : s.decode_batches) {
    max_batch = std::max(max_batch, b);
    tokens_cached = std::max<int64_t>(tokens_cached, int64_t{b} * (s.context + s.decode_steps + s.block_size));
  }

  auto t = clock_type::now();
  moe::model::init_options init;
  init.dtype = moe::kernels::dtype::bf16;
  auto ckpt = moe::model::random_checkpoint(*config, init);
  if (!ckpt) fail("random_checkpoint", ckpt.error());
  out["build_checkpoint_seconds"] = seconds_since(t);
  me::gpu_engine_options eo;
  eo.dtype = moe::kernels::dtype::bf16;
  eo.decode_graphs = s.graphs;
  eo.wgmma_experts = s.wgmma_experts;
  out["wgmma_experts"] = s.wgmma_experts;
  eo.cache.block_size = s.block_size;
  eo.cache.num_blocks = (tokens_cached + s.block_size - 1) / s.block_size + 2 * max_batch;
  t = clock_type::now();
  // The host copy (18 GB of float32 for v2lite-8L) stays only for the check and --fp8.
  auto shared = std::make_shared<moe::model::checkpoint>(std::move(*ckpt));
  auto engine = me::gpu_engine::create(shared, eo);
  if (!engine) {
    const caf::error& e = engine.error();
    if (e.category() == caf::atom("cuda") &&
        e.code() == static_cast<uint8_t>(moe::runtime::cuda_errc::no_device)) {
      out["skipped"] = moe::error_text(engine.error());
      emit(out, s.out);
      return 2;
    }
    fail("engine", engine.error());
  }
  out["upload_seconds"] = seconds_since(t);
  out["weight_bytes"] = engine->weight_bytes();
  out["cache_bytes"] = engine->cache_bytes();

  // The default engine's figures are the run's point: a failure there ends it (exit 1), with
  // what was measured before it in --out.
  auto require = [&](const json& figures) {
    if (!failed(figures)) return;
    out["error"] = figures["error"];
    save(out, s.out);
    std::fprintf(stderr, "moe_bench_gpu_engine: %s\n", figures["error"].get<std::string>().c_str());
    std::exit(1);
  };
  runner run(*engine, s);
  out["prefill"] = run.prefill();
  require(out["prefill"]);
  // "decode": the serving path (graphs unless --no-graphs); "decode_eager": every step
  // launched kernel by kernel at the graph's padded shape, on the same prompts, with how many of
  // its greedy tokens the graph run reproduced (all of them: the same kernels on the same
  // shapes).
  out["decode"] = json::array();
  out["decode_eager"] = json::array();
  for (int b : s.decode_batches) {
    std::vector<int32_t> eager_tokens, graph_tokens;
    json eager = run.decode(b, false, eager_tokens);
    require(eager);
    if (s.graphs) {
      json graphed = run.decode(b, true, graph_tokens);
      require(graphed);
      size_t same = 0;
      for (size_t i = 0; i < std::min(eager_tokens.size(), graph_tokens.size()); ++i)
        same += eager_tokens[i] == graph_tokens[i] ? 1 : 0;
      graphed["tokens_equal_to_eager"] = same;
      graphed["tokens_compared"] = eager_tokens.size();
      graphed["speedup_over_eager"] = graphed["tokens_per_s"].get<double>() / eager["tokens_per_s"].get<double>();
      out["decode"].push_back(graphed);
    } else {
      out["decode"].push_back(eager);
    }
    out["decode_eager"].push_back(eager);
  }
  // The serving path again with every row sampled (temperature 0.7, top-p 0.9: the device's
  // sampler instead of its argmax), and the cost of it on the whole step.
  out["decode_sampled"] = json::array();
  for (int b : s.decode_batches) {
    std::vector<int32_t> tokens;
    json d = run.decode(b, s.graphs, tokens, moe::kernels::cpu::sampling_params{0.7f, 0, 0.9f});
    if (const auto base = tokens_per_s_at(out["decode"], b); base && !failed(d))
      d["sampling_cost"] = *base / d["tokens_per_s"].get<double>();
    out["decode_sampled"].push_back(d);
  }
  out["kernels"] = kernels_json(*engine);
  if (s.graphs) {
    const auto g = engine->decode_graph_stats();
    out["decode_graph_stats"] = {{"captured", g.num_captured},
                                 {"replays", g.num_replays},
                                 {"fallbacks", g.num_fallbacks},
                                 {"evicted", g.num_evicted},
                                 {"held", g.num_graphs},
                                 {"device_bytes", g.device_bytes},
                                 {"host_bytes", g.host_bytes},
                                 {"last_graph_nodes", g.last_graph_nodes},
                                 {"last_fallback_reason", g.last_fallback_reason}};
  }
  out["targets"] = targets(out);
  if (!s.peer.empty()) {
    std::ifstream in(s.peer);
    const json peer = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (peer.is_discarded() || peer.contains("skipped")) {
      out["vs_transformers"] = {{"missing", "no peer figures in " + s.peer}};
    } else {
      out["transformers"] = peer;
      out["vs_transformers"] = against_peer(out, peer);
    }
  }
  if (s.check_tokens > 0) {
    t = clock_type::now();
    out["check_against_reference"] = check_against_reference(*engine, shared, s);
    out["check_against_reference"]["seconds"] = seconds_since(t);
  }
  save(out, s.out);

  // The A/B engines over the same weights, each figure with its ratio to the default engine's.
  // A variant that fails is recorded as {"error": ...} and the run goes on (a broken CUDA
  // context then fails the later stages too, each recorded); the file is rewritten after each.
  // The wgmma engine runs last of them: its kernel is the newest (--no-wgmma leaves it out).
  const double prefill_base = out["prefill"]["tokens_per_s"].get<double>();
  auto prefill_variant = [&](const char* key, const char* what, auto set_option) {
    auto options = eo;
    set_option(options);
    auto variant = me::gpu_engine::create(shared, options);
    if (!variant) {
      out[key] = error_json(std::string{"engine ("} + what + ")", variant.error());
    } else {
      runner variant_run(*variant, s);
      json p = variant_run.prefill();
      if (!failed(p)) {
        p["speedup_over_ours"] = p["tokens_per_s"].get<double>() / prefill_base;
        p["kernels"] = kernels_json(*variant);
      }
      out[key] = p;
    }
    save(out, s.out);
  };
  // The decode figures of `batches` on an engine with set_option applied, each given its ratio
  // to the default engine's figure of the same batch by ratio(figures, default tokens/s).
  auto decode_variant = [&](const char* key, const char* what, const std::vector<int>& batches,
                            auto set_option, auto ratio) {
    if (batches.empty()) return;
    auto options = eo;
    set_option(options);
    auto variant = me::gpu_engine::create(shared, options);
    out[key] = json::array();
    if (!variant) {
      out[key].push_back(error_json(std::string{"engine ("} + what + ")", variant.error()));
    } else {
      runner variant_run(*variant, s);
      for (int b : batches) {
        std::vector<int32_t> tokens;
        json d = variant_run.decode(b, s.graphs, tokens);
        if (const auto base = tokens_per_s_at(out["decode"], b); base && !failed(d))
          ratio(d, *base);
        out[key].push_back(d);
      }
    }
    save(out, s.out);
  };
  if (s.variants) {
    // Prefill with the routed experts on cuBLAS's grouped GEMM (a prefill of hundreds of rows
    // takes no other new path).
    prefill_variant("prefill_cublas_grouped_experts", "cublas_grouped_experts",
                    [](me::gpu_engine_options& o) { o.cublas_grouped_experts = true; });
    // The batches past skinny_rows with their projections on the grouped GEMM as one expert.
    std::vector<int> grouped_batches, skinny_batches;
    for (int b : s.decode_batches) {
      if (b > eo.skinny_rows && b <= me::gpu_engine_options::max_grouped_dense_rows)
        grouped_batches.push_back(b);
      if (b <= eo.skinny_rows) skinny_batches.push_back(b);
    }
    decode_variant(
        "decode_grouped_dense", "grouped_dense_rows", grouped_batches,
        [](me::gpu_engine_options& o) {
          o.grouped_dense_rows = me::gpu_engine_options::max_grouped_dense_rows;
        },
        [](json& d, double base) {
          d["speedup_over_default"] = d["tokens_per_s"].get<double>() / base;
        });
    // The batches within skinny_rows with every projection on cuBLASLt (skinny_rows 0): the
    // few-row kernel's effect on the step.
    decode_variant(
        "decode_cublaslt_projections", "skinny_rows 0", skinny_batches,
        [](me::gpu_engine_options& o) { o.skinny_rows = 0; },
        [](json& d, double base) { d["skinny_speedup"] = base / d["tokens_per_s"].get<double>(); });
    // Every decode batch with the shared experts on the step's one stream: the overlap's effect.
    decode_variant(
        "decode_one_stream", "overlap_shared_experts false", s.decode_batches,
        [](me::gpu_engine_options& o) { o.overlap_shared_experts = false; },
        [](json& d, double base) {
          d["overlap_speedup"] = base / d["tokens_per_s"].get<double>();
        });
    if (s.wgmma && !s.wgmma_experts)
      prefill_variant("prefill_wgmma_experts", "wgmma_experts",
                      [](me::gpu_engine_options& o) { o.wgmma_experts = true; });
    out["measured_best"] = measured_best(out, eo, shared, s);
    save(out, s.out);
  }
  if (!s.fp8.empty()) {
    { const me::gpu_engine released = std::move(*engine); }  // its device memory back first
    out["fp8"] = fp8_runs(std::move(shared), eo, s, out);
  }
  emit(out, s.out);
  return 0;
}
