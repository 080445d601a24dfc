// GPU kernel figures, each against a baseline measured in the same run on the same card:
//  - bandwidth-bound kernels (RMSNorm, SwiGLU, FP8 expansion) as a share of the device-to-device
//    copy bandwidth (bytes each must read and write / time, over the copy's);
//  - MLA decode likewise (the paged cache bytes it must read), MLA prefill in TFLOP/s;
//  - cuBLASLt bf16 products at the model's shapes against a large square bf16 product (the
//    card's practical GEMM peak);
//  - an FP8 weight (expanded to bf16, then multiplied) against the same weight kept in bf16;
//  - the block-scaled FP8 product (cuBLASLt, both operands FP8) against the bf16 product of the
//    same shape, and the activation quantization it needs against the copy bandwidth. Where
//    cuBLASLt refuses the FP8 product, its entry says so ("fp8_refused") instead of a time;
//  - the few-row decode projections (skinny_linear.hpp) against cuBLASLt on the same shapes, per
//    shape and summed over a decode step (the absorbed attention's two batched per-head products
//    included), with bf16 and FP8 weights; past 8 rows (16, 32, 64) the small-weight products
//    the engine keeps on that kernel (the absorbed ones, the router); and at 32 rows cuBLASLt
//    against the grouped expert GEMM run as one expert;
//  - the grouped expert GEMM against one dense cuBLASLt product of the same FLOPs and against
//    cuBLAS's grouped GEMM; on an sm_90 card also its wgmma kernel, fed by TMA and by cp.async,
//    and that kernel, and the WMMA one, with the SwiGLU fused against the product followed by
//    swiglu_run.
// Times are CUDA-event medians over --reps launches after warm-up. Prints one JSON object.
//
//   moe_bench_gpu_kernels [--reps 20] [--square 8192]
// Exits 2, with a JSON {"skipped": reason}, where no GPU exists.
#include <CLI/CLI.hpp>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cublas_v2.h>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/fp8_dequantize.hpp"
#include "kernels/cuda/fp8_quantize.hpp"
#include "kernels/cuda/gather.hpp"
#include "kernels/cuda/gemm.hpp"
#include "kernels/cuda/grouped_gemm.hpp"
#include "kernels/cuda/mla_decode.hpp"
#include "kernels/cuda/mla_prefill.hpp"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/sampling.hpp"
#include "kernels/cuda/skinny_linear.hpp"
#include "kernels/cuda/swiglu.hpp"

namespace kc = moe::kernels::cuda;
using moe::kernels::dtype;
using moe::kernels::kernel_status;
using nlohmann::json;

namespace {

struct device_mem {
  void* p = nullptr;
  explicit device_mem(size_t n) {
    if (cudaMalloc(&p, n) != cudaSuccess) {
      std::fprintf(stderr, "cudaMalloc(%zu) failed\n", n);
      std::exit(1);
    }
    cudaMemset(p, 0, n);
  }
  ~device_mem() { cudaFree(p); }
  device_mem(const device_mem&) = delete;
  device_mem& operator=(const device_mem&) = delete;
};

// Enough copies of a weight of `bytes` to pass 256 MiB, handed out in turn: no launch finds its
// weight in the 50 MB L2, as a decode step, which reads each weight once, does not.
struct rotated_weight {
  explicit rotated_weight(size_t bytes_)
      : bytes(bytes_),
        copies(std::max<size_t>(1, ((size_t{256} << 20) + bytes_ - 1) / bytes_)),
        mem(copies * bytes_) {}
  void* next() { return static_cast<char*>(mem.p) + (turn++ % copies) * bytes; }
  size_t bytes, copies;
  device_mem mem;
  size_t turn = 0;
};

// Fills with small bf16/f32-representable values so products stay finite.
void fill_bf16(void* p, size_t n) {
  std::vector<__nv_bfloat16> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = __float2bfloat16(static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
  cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice);
}

// Median milliseconds of `reps` runs of `f`, each timed by its own pair of events.
double median_ms(int reps, const std::function<void()>& f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  cudaDeviceSynchronize();
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void check(kernel_status s, const char* what) {
  if (s != kernel_status::ok) {
    std::fprintf(stderr, "%s: %s\n", what, std::string(moe::kernels::to_string(s)).c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"GPU kernel figures against same-run baselines (JSON)"};
  int reps = 20;
  int64_t square = 8192;
  app.add_option("--reps", reps, "timed launches per figure (median)")->check(CLI::Range(1, 10000));
  app.add_option("--square", square, "side of the square bf16 GEMM taken as the card's peak")->check(CLI::Range(256, 32768));
  CLI11_PARSE(app, argc, argv);

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s\n", json{{"skipped", "no GPU"}}.dump().c_str());
    return 2;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  json out;
  out["device"] = prop.name;
  out["reps"] = reps;

  // Baseline 1: device-to-device copy, 1 GiB each way.
  const size_t copy_bytes = size_t{1} << 30;
  double copy_gbs = 0;
  {
    device_mem src(copy_bytes), dst(copy_bytes);
    const double ms = median_ms(reps, [&] { cudaMemcpyAsync(dst.p, src.p, copy_bytes, cudaMemcpyDeviceToDevice); });
    copy_gbs = 2.0 * copy_bytes / (ms * 1e6);
    out["copy"] = {{"bytes", copy_bytes}, {"ms", ms}, {"read_write_GBps", copy_gbs}};
  }
  auto bandwidth_entry = [&](const char* name, double bytes, double ms) {
    const double gbs = bytes / (ms * 1e6);
    out["bandwidth"][name] = {{"ms", ms}, {"GBps", gbs}, {"vs_copy", gbs / copy_gbs}};
  };

  // RMSNorm fused with the residual add, bf16, 4096 x 7168 (DeepSeek-V3's hidden size): reads x
  // and the residual, writes the residual and the output.
  {
    const int64_t rows = 4096, dim = 7168;
    device_mem x(rows * dim * 2), res(rows * dim * 2), y(rows * dim * 2), w(dim * 4);
    fill_bf16(x.p, rows * dim);
    kc::rmsnorm_args a;
    a.x = x.p;
    a.residual = res.p;
    a.weight = static_cast<const float*>(w.p);
    a.out = y.p;
    a.rows = rows;
    a.dim = dim;
    a.dt = dtype::bf16;
    const double ms = median_ms(reps, [&] { check(kc::rmsnorm_run(a, nullptr), "rmsnorm"); });
    bandwidth_entry("rmsnorm_residual_bf16_4096x7168", 4.0 * rows * dim * 2, ms);
  }

  // SwiGLU on the fused gate|up projection of 4096 tokens, DeepSeek-V3's dense MLP width 18432:
  // reads two values, writes one per output element.
  {
    const int64_t rows = 4096, dim = 18432;
    device_mem gu(rows * dim * 4), y(rows * dim * 2);
    fill_bf16(gu.p, rows * dim * 2);
    kc::swiglu_args a;
    a.gate_up = gu.p;
    a.out = y.p;
    a.rows = rows;
    a.dim = dim;
    a.dt = dtype::bf16;
    const double ms = median_ms(reps, [&] { check(kc::swiglu_run(a, nullptr), "swiglu"); });
    bandwidth_entry("swiglu_fused_bf16_4096x18432", 3.0 * rows * dim * 2, ms);
  }

  // Greedy sampling over a 129280-entry vocabulary (DeepSeek-V3), 32 rows of float32 logits.
  {
    const int64_t rows = 32, vocab = 129280;
    device_mem logits(rows * vocab * 4), tokens(rows * 4);
    kc::sample_greedy_args a;
    a.logits = logits.p;
    a.tokens = static_cast<int32_t*>(tokens.p);
    a.rows = rows;
    a.vocab = vocab;
    a.dt = dtype::f32;
    const double ms = median_ms(reps, [&] { check(kc::sample_greedy_run(a, nullptr), "sample_greedy"); });
    bandwidth_entry("sample_greedy_f32_32x129280", 4.0 * rows * vocab, ms);

    // The same rows drawn by sample_run (logits of a trained model's spread, N(0, 3)), each
    // kind of parameters on every row: its time and its ratio to the greedy kernel's above.
    std::vector<float> host(static_cast<size_t>(rows * vocab));
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (float& v : host) v = normal(rng);
    cudaMemcpy(logits.p, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
    device_mem params(rows * sizeof(kc::sample_row));
    kc::sample_args sa;
    sa.logits = static_cast<const float*>(logits.p);
    sa.params = static_cast<const kc::sample_row*>(params.p);
    sa.tokens = static_cast<int32_t*>(tokens.p);
    sa.rows = rows;
    sa.vocab = vocab;
    json sampled = json::object();
    const struct {
      const char* name;
      float temperature;
      int32_t top_k;
      float top_p;
    } kinds[] = {{"greedy", 0.0f, 0, 1.0f},
                 {"temperature_0.8", 0.8f, 0, 1.0f},
                 {"top_k_50_top_p_0.9", 0.8f, 50, 0.9f},
                 {"top_p_0.9", 0.8f, 0, 0.9f}};
    for (const auto& k : kinds) {
      std::vector<kc::sample_row> rows_params(static_cast<size_t>(rows));
      for (size_t r = 0; r < rows_params.size(); ++r)
        rows_params[r] = {k.temperature, k.top_k, k.top_p, 0, 11 + r, 0};
      cudaMemcpy(params.p, rows_params.data(), rows_params.size() * sizeof(kc::sample_row),
                 cudaMemcpyHostToDevice);
      const double sms = median_ms(reps, [&] { check(kc::sample_run(sa, nullptr), "sample"); });
      std::vector<int32_t> drawn(static_cast<size_t>(rows));
      cudaMemcpy(drawn.data(), tokens.p, drawn.size() * 4, cudaMemcpyDeviceToHost);
      sampled[k.name] = {
          {"us", sms * 1e3},
          {"vs_greedy_kernel", sms / ms},
          {"rows_left_to_host", std::count(drawn.begin(), drawn.end(), kc::sample_on_host)}};
    }
    out["sample_f32_32x129280"] = sampled;
  }

  // MLA decode at v2lite-8L's shapes (16 heads, latent 512, rotary 64, bf16 paged cache in blocks
  // of 64), batch 1 and 32, 4096 cached tokens each, the blocks scattered over the pool: the
  // kernel must read every cached entry once per (sequence, 16 heads), so its figure is the
  // cache bytes over the time; q, the output and the split partials (L2-resident) are not
  // counted. "splits" is how many parts each sequence was cut into. Also at 160 tokens, the
  // engine's short contexts, where the figure that matters is the launch's latency ("us").
  for (int64_t tokens : {int64_t{4096}, int64_t{160}})
  for (int64_t batch : {1, 32}) {
    const int64_t heads = 16, latent = 512, rope = 64, nope = 128, block = 64;
    const int64_t blocks_per_seq = (tokens + block - 1) / block, num_blocks = batch * blocks_per_seq;
    const int64_t entry = latent + rope;
    device_mem pool(num_blocks * block * entry * 2), q_latent(batch * heads * latent * 2),
        q(batch * heads * (nope + rope) * 2), out_latent(batch * heads * latent * 2),
        table(num_blocks * 4), lens(batch * 4);
    fill_bf16(pool.p, num_blocks * block * entry);
    fill_bf16(q_latent.p, batch * heads * latent);
    fill_bf16(q.p, batch * heads * (nope + rope));
    std::vector<int32_t> ids(num_blocks), seq_lens(batch, static_cast<int32_t>(tokens));
    for (int64_t i = 0; i < num_blocks; ++i) ids[i] = static_cast<int32_t>((i * 7919) % num_blocks);  // scattered
    cudaMemcpy(table.p, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(lens.p, seq_lens.data(), seq_lens.size() * 4, cudaMemcpyHostToDevice);
    kc::mla_decode_args a;
    a.layout = {static_cast<size_t>(num_blocks), static_cast<size_t>(block), static_cast<size_t>(latent),
                static_cast<size_t>(rope)};
    a.pool = pool.p;
    a.q_latent = q_latent.p;
    a.q_pe = static_cast<const char*>(q.p) + nope * 2;
    a.q_pe_token_stride = heads * (nope + rope);
    a.q_pe_head_stride = nope + rope;
    a.block_table = static_cast<const int32_t*>(table.p);
    a.max_blocks_per_seq = blocks_per_seq;
    a.seq_lens = static_cast<const int32_t*>(lens.p);
    a.out_latent = out_latent.p;
    a.batch = batch;
    a.num_heads = heads;
    a.softmax_scale = 1.0f / 13.856406f;  // (128 + 64)^-0.5
    a.max_seq_len = tokens;
    a.dt = dtype::bf16;
    const size_t workspace_bytes = kc::mla_decode_workspace_bytes(a);
    device_mem workspace(std::max<size_t>(workspace_bytes, 256));
    const double ms = median_ms(reps, [&] {
      check(kc::mla_decode_run(a, workspace.p, workspace_bytes, nullptr), "mla_decode");
    });
    const std::string name =
        "mla_decode_bf16_h16_r512_b" + std::to_string(batch) + "_" + std::to_string(tokens);
    bandwidth_entry(name.c_str(), 2.0 * batch * tokens * entry, ms);
    out["bandwidth"][name]["splits"] = kc::mla_decode_make_plan(a).num_splits;
    out["bandwidth"][name]["us"] = ms * 1e3;
    // The same with one-tile splits (min_split_tokens 32): more, shorter blocks.
    a.min_split_tokens = 32;
    const size_t short_bytes = kc::mla_decode_workspace_bytes(a);
    device_mem short_workspace(std::max<size_t>(short_bytes, 256));
    const double short_ms = median_ms(reps, [&] {
      check(kc::mla_decode_run(a, short_workspace.p, short_bytes, nullptr), "mla_decode");
    });
    out["bandwidth"][name]["min_split_32"] = {{"splits", kc::mla_decode_make_plan(a).num_splits},
                                              {"us", short_ms * 1e3},
                                              {"speedup_over_default", ms / short_ms}};
  }

  // MLA prefill (causal, decompressed keys and values) over 4 packed sequences of 512 tokens,
  // 16 heads, DeepSeek's widths (q/k 128 + 64, v 128), bf16, k_nope and v strided inside one
  // kv buffer as kv_b_proj leaves them. FLOPs count the visible (query, key) pairs only:
  // 2 (dn + dr) for the score and 2 dv for the value sum each, per head.
  {
    const int64_t seqs = 4, len = 512, heads = 16, dn = 128, dr = 64, dv = 128, t = seqs * len;
    device_mem q(t * heads * (dn + dr) * 2), kv(t * heads * (dn + dv) * 2), k_pe(t * dr * 2),
        o(t * heads * dv * 2), cu(4 * (seqs + 1));
    fill_bf16(q.p, t * heads * (dn + dr));
    fill_bf16(kv.p, t * heads * (dn + dv));
    fill_bf16(k_pe.p, t * dr);
    std::vector<int32_t> offsets(seqs + 1);
    for (int64_t s = 0; s <= seqs; ++s) offsets[s] = static_cast<int32_t>(s * len);
    cudaMemcpy(cu.p, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice);
    kc::mla_prefill_args a;
    a.q = q.p;
    a.k_nope = kv.p;
    a.k_nope_token_stride = heads * (dn + dv);
    a.k_nope_head_stride = dn + dv;
    a.k_pe = k_pe.p;
    a.v = static_cast<const char*>(kv.p) + dn * 2;
    a.v_token_stride = heads * (dn + dv);
    a.v_head_stride = dn + dv;
    a.out = o.p;
    a.cu_seqlens_q = static_cast<const int32_t*>(cu.p);
    a.num_seqs = seqs;
    a.num_q_tokens = t;
    a.max_seqlen_q = len;
    a.num_heads = heads;
    a.nope_dim = dn;
    a.rope_dim = dr;
    a.v_dim = dv;
    a.softmax_scale = 1.0f / 13.856406f;
    a.dt = dtype::bf16;
    const double ms = median_ms(reps, [&] { check(kc::mla_prefill_run(a, nullptr), "mla_prefill"); });
    const double flops = 2.0 * (dn + dr + dv) * heads * seqs * (len * (len + 1) / 2);
    out["mla_prefill_bf16"] = {{"seqs", seqs}, {"tokens_per_seq", len}, {"heads", heads}, {"ms", ms},
                               {"TFLOPs", flops / (ms * 1e9)}};
  }

  // Routing (DeepSeek-V3: 256 experts, 8 groups, 4 kept, top-8) and the permutation by expert,
  // at decode (32 tokens) and prefill (4096 tokens) batches: latency, not bandwidth.
  {
    json routing = json::array();
    for (int64_t tokens : {32, 4096}) {
      const int64_t experts = 256, top_k = 8;
      device_mem logits(tokens * experts * 4), idx(tokens * top_k * 4), w(tokens * top_k * 4);
      device_mem offsets((experts + 1) * 4), pos(tokens * top_k * 4), inv(tokens * top_k * 4);
      std::vector<float> h(static_cast<size_t>(tokens * experts));
      for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>((i * 2654435761u) % 10007) / 10007.0f - 0.5f;
      cudaMemcpy(logits.p, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
      kc::moe_gate_args g;
      g.params.num_experts = experts;
      g.params.num_groups = 8;
      g.params.topk_group = 4;
      g.params.top_k = top_k;
      g.params.routed_scaling_factor = 2.5f;
      g.logits = static_cast<const float*>(logits.p);
      g.topk_idx = static_cast<int32_t*>(idx.p);
      g.topk_weight = static_cast<float*>(w.p);
      g.num_tokens = tokens;
      const double gate_ms = median_ms(reps, [&] { check(kc::moe_gate_run(g, nullptr), "moe_gate"); });
      kc::permute_plan_args p;
      p.topk_idx = static_cast<const int32_t*>(idx.p);
      p.num_tokens = tokens;
      p.top_k = top_k;
      p.num_experts = experts;
      p.expert_offsets = static_cast<int32_t*>(offsets.p);
      p.positions = static_cast<int32_t*>(pos.p);
      p.inverse = static_cast<int32_t*>(inv.p);
      const double plan_ms = median_ms(reps, [&] { check(kc::permute_plan_run(p, nullptr), "permute_plan"); });
      const int64_t dim = 7168;
      device_mem x(tokens * dim * 2), permuted(tokens * top_k * dim * 2), y(tokens * dim * 2);
      kc::permute_rows_args r;
      r.x = x.p;
      r.positions = static_cast<const int32_t*>(pos.p);
      r.permuted = permuted.p;
      r.num_tokens = tokens;
      r.top_k = top_k;
      r.dim = dim;
      r.num_rows = tokens * top_k;
      r.dt = dtype::bf16;
      const double rows_ms = median_ms(reps, [&] { check(kc::permute_rows_run(r, nullptr), "permute_rows"); });
      kc::unpermute_args u;
      u.y = permuted.p;
      u.weight = static_cast<const float*>(w.p);
      u.positions = static_cast<const int32_t*>(pos.p);
      u.out = y.p;
      u.num_tokens = tokens;
      u.top_k = top_k;
      u.dim = dim;
      u.num_rows = tokens * top_k;
      u.dt = dtype::bf16;
      const double combine_ms = median_ms(reps, [&] { check(kc::unpermute_run(u, nullptr), "unpermute"); });
      // Each moves top_k copies of every token's row (bf16) plus the token rows once.
      const double moved = 2.0 * tokens * dim * (top_k + 1);
      routing.push_back({{"tokens", tokens}, {"experts", experts}, {"top_k", top_k}, {"gate_ms", gate_ms},
                         {"permute_plan_ms", plan_ms}, {"permute_rows_ms", rows_ms},
                         {"permute_rows_vs_copy", moved / (rows_ms * 1e6) / copy_gbs}, {"combine_ms", combine_ms},
                         {"combine_vs_copy", moved / (combine_ms * 1e6) / copy_gbs}});
    }
    out["routing"] = routing;
  }

  // FP8 expansion of a 7168 x 18432 weight (DeepSeek-V3's dense MLP) to bf16: reads 1 byte,
  // writes 2 per element.
  {
    const int64_t rows = 18432, cols = 7168;
    device_mem q(rows * cols), s((rows / 128) * (cols / 128) * 4), y(rows * cols * 2);
    kc::fp8_dequantize_args a{static_cast<const uint8_t*>(q.p), static_cast<const float*>(s.p), y.p, rows, cols,
                              128, 128, dtype::bf16};
    const double ms = median_ms(reps, [&] { check(kc::fp8_dequantize_run(a, nullptr), "fp8_dequantize"); });
    bandwidth_entry("fp8_expand_to_bf16_18432x7168", 3.0 * rows * cols, ms);
  }

  // Per-token-group FP8 quantization of bf16 activations: reads 2 bytes, writes 1 plus a float
  // scale per 128 elements. A DeepSeek-V3 prefill chunk (16384 x 7168) and v2lite's 2048 x 2048.
  for (auto [rows, k] : {std::pair<int64_t, int64_t>{16384, 7168}, {2048, 2048}}) {
    device_mem x(rows * k * 2), q(rows * k), s(rows * (k / 128) * 4);
    fill_bf16(x.p, rows * k);
    kc::fp8_quantize_args a;
    a.x = x.p;
    a.q = static_cast<uint8_t*>(q.p);
    a.scale = static_cast<float*>(s.p);
    a.rows = rows;
    a.k = k;
    a.x_dt = dtype::bf16;
    const double ms = median_ms(reps, [&] { check(kc::fp8_quantize_run(a, nullptr), "fp8_quantize"); });
    const std::string name = "fp8_quantize_bf16_" + std::to_string(rows) + "x" + std::to_string(k);
    bandwidth_entry(name.c_str(), (3.0 + 4.0 / 128) * rows * k, ms);
  }

  // GEMMs through cuBLASLt.
  kc::gemm_lt lt;
  check(kc::gemm_lt::create(lt), "gemm_lt::create");
  device_mem workspace(kc::gemm_workspace_bytes);
  auto gemm_ms = [&](int64_t m, int64_t n, int64_t k, void* a, void* b, void* c) {
    const auto d = kc::linear_desc(a, b, c, m, k, n, dtype::bf16, dtype::bf16);
    return median_ms(reps, [&] { check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "gemm"); });
  };
  double peak_tflops = 0;
  {
    device_mem a(square * square * 2), b(square * square * 2), c(square * square * 2);
    fill_bf16(a.p, square * square);
    fill_bf16(b.p, square * square);
    const double ms = gemm_ms(square, square, square, a.p, b.p, c.p);
    peak_tflops = 2.0 * square * square * square / (ms * 1e9);
    out["gemm_bf16"]["square"] = {{"m", square}, {"ms", ms}, {"TFLOPs", peak_tflops}};
  }
  // The v2lite-8L shapes (hidden 2048, dense MLP 10944, expert 1408, vocab 102400) at decode
  // batch 1 and 32 and a 2048-token prefill.
  json shapes = json::array();
  for (int64_t rows : {1, 32, 2048})
    for (auto [n, k] : {std::pair<int64_t, int64_t>{10944 * 2, 2048}, {2048, 10944}, {1408 * 2, 2048}, {102400, 2048}}) {
      device_mem a(rows * k * 2), b(n * k * 2), c(rows * n * 2);
      fill_bf16(a.p, rows * k);
      fill_bf16(b.p, n * k);
      const double ms = gemm_ms(rows, n, k, a.p, b.p, c.p);
      const double tflops = 2.0 * rows * n * k / (ms * 1e9);
      // Small batches are bound by reading the weight: report its bandwidth too.
      const double gbs = (2.0 * n * k + 2.0 * rows * (k + n)) / (ms * 1e6);
      shapes.push_back({{"m", rows}, {"n", n}, {"k", k}, {"ms", ms}, {"TFLOPs", tflops},
                        {"vs_square", tflops / peak_tflops}, {"GBps", gbs}, {"vs_copy", gbs / copy_gbs}});
    }
  out["gemm_bf16"]["model_shapes"] = shapes;

  // FP8 weight against bf16 weight: the expansion plus the product, against the product alone.
  {
    json fp8 = json::array();
    const int64_t n = 10944 * 2, k = 2048;
    device_mem q(n * k), s(((n + 127) / 128) * ((k + 127) / 128) * 4), wb(n * k * 2);
    kc::fp8_dequantize_args e{static_cast<const uint8_t*>(q.p), static_cast<const float*>(s.p), wb.p, n, k, 128, 128,
                              dtype::bf16};
    for (int64_t rows : {1, 32, 2048}) {
      device_mem a(rows * k * 2), c(rows * n * 2);
      const auto d = kc::linear_desc(a.p, wb.p, c.p, rows, k, n, dtype::bf16, dtype::bf16);
      const double bf16_ms = median_ms(reps, [&] { check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "gemm"); });
      const double fp8_ms = median_ms(reps, [&] {
        check(kc::fp8_dequantize_run(e, nullptr), "fp8_dequantize");
        check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "gemm");
      });
      fp8.push_back({{"m", rows}, {"n", n}, {"k", k}, {"bf16_ms", bf16_ms}, {"fp8_expand_then_bf16_ms", fp8_ms},
                     {"fp8_over_bf16_time", fp8_ms / bf16_ms}});
    }
    out["fp8_vs_bf16"] = fp8;
  }

  // Block-scaled FP8 (cuBLASLt VEC128 activations x BLK128x128 weights, bf16 out) against the
  // bf16 product of the same shape, at v2lite-8L's projections: q_proj (3072 x 2048), o_proj
  // (2048 x 2048), an expert's gate or up (1408 x 2048) and down (2048 x 1408). The activation's
  // quantization is timed apart (one per activation, shared by the products that read it).
  {
    json block_scaled = json::array();
    struct shape {
      const char* name;
      int64_t n, k;
    };
    for (int64_t rows : {1, 32, 2048})
      for (const shape& sh : {shape{"q_proj", 3072, 2048}, shape{"o_proj", 2048, 2048}, shape{"expert_gate_up", 1408, 2048},
                              shape{"expert_down", 2048, 1408}}) {
        // The FP8 product runs on rows padded to 32 (gemm.hpp); FLOPs count the real rows only.
        const int64_t n = sh.n, k = sh.k, scale_rows = (n + 127) / 128, scale_ld = kc::fp8_weight_scale_ld(k);
        const int64_t padded = kc::fp8_linear_rows(rows);
        device_mem xb(rows * k * 2), wb(n * k * 2), y(padded * n * 2), xq(padded * k), xs(padded * (k / 128) * 4),
            wq(n * k), ws(scale_rows * scale_ld * 4);
        fill_bf16(xb.p, rows * k);
        fill_bf16(wb.p, n * k);
        cudaMemset(wq.p, 0x30, n * k);  // every weight 0.5: finite, the values do not change the time
        std::vector<float> ones(scale_rows * scale_ld, 1.0f);
        cudaMemcpy(ws.p, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice);
        const double flops = 2.0 * rows * n * k;
        const double bf16_ms = gemm_ms(rows, n, k, xb.p, wb.p, y.p);
        json e = {{"name", sh.name}, {"m", rows}, {"fp8_rows", padded}, {"n", n}, {"k", k}, {"bf16_ms", bf16_ms},
                  {"bf16_TFLOPs", flops / (bf16_ms * 1e9)}};
        kc::fp8_quantize_args qa;
        qa.x = xb.p;
        qa.q = static_cast<uint8_t*>(xq.p);
        qa.scale = static_cast<float*>(xs.p);
        qa.rows = rows;
        qa.k = k;
        qa.scale_ld = padded;
        check(kc::fp8_quantize_run(qa, nullptr), "fp8_quantize");
        kc::fp8_linear_desc d;
        d.x_q = static_cast<const uint8_t*>(xq.p);
        d.x_scale = static_cast<const float*>(xs.p);
        d.w_q = static_cast<const uint8_t*>(wq.p);
        d.w_scale = static_cast<const float*>(ws.p);
        d.y = y.p;
        d.m = padded;
        d.n = n;
        d.k = k;
        const kernel_status first = lt.run_fp8_linear(d, workspace.p, kc::gemm_workspace_bytes, nullptr);
        if (first != kernel_status::ok) {
          e["fp8_refused"] = std::string(moe::kernels::to_string(first));
        } else {
          const double fp8_ms = median_ms(reps, [&] {
            check(lt.run_fp8_linear(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "fp8_linear");
          });
          const double quantize_ms = median_ms(reps, [&] { check(kc::fp8_quantize_run(qa, nullptr), "fp8_quantize"); });
          e["fp8_ms"] = fp8_ms;
          e["fp8_TFLOPs"] = flops / (fp8_ms * 1e9);
          e["fp8_over_bf16_time"] = fp8_ms / bf16_ms;
          e["quantize_ms"] = quantize_ms;
          e["fp8_with_quantize_over_bf16_time"] = (fp8_ms + quantize_ms) / bf16_ms;
        }
        block_scaled.push_back(e);
      }
    out["fp8_block_scaled_vs_bf16"] = block_scaled;
  }

  // The grouped expert GEMM (all 64 experts of a v2lite-8L layer in one launch, gate|up: k = 2048,
  // n = 2 * 1408) at decode (32 tokens x top-6) and prefill (4096 x 6) rows spread unevenly over
  // the experts (some get none), against one dense cuBLASLt bf16 product of the same FLOPs,
  // (rows, k) x (k, n): what one launch over 64 ragged products costs over one big product.
  // Decode is bound by reading the weights of the experts in use: their bandwidth is reported too.
  {
    json grouped = json::array();
    cublasHandle_t blas = nullptr;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasCreate failed\n");
      return 1;
    }
    const int64_t experts = 64, n = 2 * 1408, k = 2048, top_k = 6;
    device_mem w(experts * n * k * 2), offsets_d((experts + 1) * 4);
    fill_bf16(w.p, experts * n * k);
    for (int64_t tokens : {32, 4096}) {
      const int64_t rows = tokens * top_k;
      // Expert e's share is (37 e) mod 11 (0..10): uneven, a few experts idle.
      std::vector<int64_t> share(experts);
      for (int64_t e = 0; e < experts; ++e) share[e] = (37 * e) % 11;
      int64_t total_share = 0;
      for (int64_t s : share) total_share += s;
      std::vector<int32_t> offsets(experts + 1, 0);
      int64_t assigned = 0, used_experts = 0;
      for (int64_t e = 0; e < experts; ++e) {
        int64_t c = rows * share[e] / total_share;
        if (e == experts - 1) c = rows - assigned;  // the rounding remainder
        assigned += c;
        used_experts += c > 0 ? 1 : 0;
        offsets[e + 1] = static_cast<int32_t>(assigned);
      }
      cudaMemcpy(offsets_d.p, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice);
      device_mem x(rows * k * 2), y(rows * n * 2);
      fill_bf16(x.p, rows * k);
      kc::grouped_gemm_args g{x.p, static_cast<const int32_t*>(offsets_d.p), w.p, y.p, rows, experts, n, k,
                              dtype::bf16, dtype::bf16};
      const double grouped_ms = median_ms(reps, [&] { check(kc::grouped_gemm_run(g, nullptr), "grouped_gemm"); });
      const double dense_ms = gemm_ms(rows, n, k, x.p, w.p, y.p);  // expert 0's weight, all rows
      const double flops = 2.0 * rows * n * k;
      const double weight_gbs = (2.0 * used_experts * n * k + 2.0 * rows * (k + n)) / (grouped_ms * 1e6);
      json entry = {{"tokens", tokens},
                    {"rows", rows},
                    {"experts", experts},
                    {"experts_in_use", used_experts},
                    {"n", n},
                    {"k", k},
                    {"grouped_ms", grouped_ms},
                    {"grouped_TFLOPs", flops / (grouped_ms * 1e9)},
                    {"dense_cublaslt_ms", dense_ms},
                    {"dense_TFLOPs", flops / (dense_ms * 1e9)},
                    {"grouped_over_dense_time", grouped_ms / dense_ms},
                    {"grouped_weight_GBps", weight_gbs},
                    {"grouped_weight_vs_copy", weight_gbs / copy_gbs}};
      // A product with the SwiGLU fused (the gate|up product's activation, (rows, n / 2), in
      // place of its (rows, n) result) against the product and swiglu_run after it: {fused,
      // unfused} ms. Our WMMA kernel's is what a bf16 engine runs for the routed experts.
      device_mem act(rows * (n / 2) * 2);
      const auto swiglu_timings = [&](const kc::grouped_gemm_args& product) {
        kc::grouped_gemm_args fused = product;
        fused.fuse_swiglu = true;
        fused.y = act.p;
        kc::swiglu_args s;
        s.gate_up = product.y;
        s.out = act.p;
        s.rows = rows;
        s.dim = n / 2;
        s.dt = dtype::bf16;
        const double fused_ms = median_ms(reps, [&] {
          check(kc::grouped_gemm_run(fused, nullptr), "grouped_gemm fused swiglu");
        });
        const double unfused_ms = median_ms(reps, [&] {
          check(kc::grouped_gemm_run(product, nullptr), "grouped_gemm");
          check(kc::swiglu_run(s, nullptr), "swiglu");
        });
        return std::pair{fused_ms, unfused_ms};
      };
      {
        const auto [fused_ms, unfused_ms] = swiglu_timings(g);
        entry["fused_swiglu_ms"] = fused_ms;
        entry["then_swiglu_ms"] = unfused_ms;
        entry["wmma_fused_swiglu_speedup"] = unfused_ms / fused_ms;
      }
      // The same kernel on Hopper's wgmma (grouped_gemm_args::wgmma: the wide tiling only, so
      // the prefill rows, on an sm_90 card), the same problems: fed by TMA (the default, "wgmma")
      // and by cp.async ("wgmma_cp_async"), with which kernel each call reported.
      kc::grouped_gemm_args hopper = g;
      hopper.wgmma = true;
      if (kc::grouped_gemm_uses_wgmma(hopper)) {
        auto launched = kc::grouped_gemm_kernel::none;
        const double wgmma_ms = median_ms(reps, [&] {
          check(kc::grouped_gemm_run(hopper, nullptr, &launched), "grouped_gemm wgmma");
        });
        entry["wgmma_ms"] = wgmma_ms;
        entry["wgmma_TFLOPs"] = flops / (wgmma_ms * 1e9);
        entry["wgmma_by_tma"] = launched == kc::grouped_gemm_kernel::wgmma_tma;
        entry["wgmma_over_dense_time"] = wgmma_ms / dense_ms;
        entry["grouped_over_wgmma_time"] = grouped_ms / wgmma_ms;
        kc::grouped_gemm_args copies = hopper;
        copies.tma = false;
        const double cp_async_ms = median_ms(reps, [&] {
          check(kc::grouped_gemm_run(copies, nullptr), "grouped_gemm wgmma cp.async");
        });
        entry["wgmma_cp_async_ms"] = cp_async_ms;
        entry["wgmma_cp_async_TFLOPs"] = flops / (cp_async_ms * 1e9);
        entry["tma_speedup_over_cp_async"] = cp_async_ms / wgmma_ms;
        const auto [fused_ms, unfused_ms] = swiglu_timings(hopper);
        entry["wgmma_fused_swiglu_ms"] = fused_ms;
        entry["wgmma_then_swiglu_ms"] = unfused_ms;
        entry["fused_swiglu_speedup"] = unfused_ms / fused_ms;
      }
      // The vendor's grouped product on the same problems: cuBLAS's cublasGemmGroupedBatchedEx
      // (one problem per expert in use, sizes from the host, as a prefill could have them after
      // one copy of the counts). Column-major: y_e^T (n x rows_e) = W_e (k x n)^T . x_e^T.
      std::vector<int> m_a, n_a, k_a, lda, ldb, ldc, group_size;
      std::vector<cublasOperation_t> ta, tb;
      std::vector<float> alpha, beta;
      std::vector<const void*> a_ptr, b_ptr;
      std::vector<void*> c_ptr;
      for (int64_t e = 0; e < experts; ++e) {
        const int32_t c = offsets[e + 1] - offsets[e];
        if (c == 0) continue;
        ta.push_back(CUBLAS_OP_T);
        tb.push_back(CUBLAS_OP_N);
        m_a.push_back(static_cast<int>(n));
        n_a.push_back(c);
        k_a.push_back(static_cast<int>(k));
        lda.push_back(static_cast<int>(k));
        ldb.push_back(static_cast<int>(k));
        ldc.push_back(static_cast<int>(n));
        group_size.push_back(1);
        alpha.push_back(1.0f);
        beta.push_back(0.0f);
        a_ptr.push_back(static_cast<const char*>(w.p) + e * n * k * 2);
        b_ptr.push_back(static_cast<const char*>(x.p) + int64_t{offsets[e]} * k * 2);
        c_ptr.push_back(static_cast<char*>(y.p) + int64_t{offsets[e]} * n * 2);
      }
      const auto groups = static_cast<int>(ta.size());
      device_mem a_dev(groups * sizeof(void*)), b_dev(groups * sizeof(void*)),
          c_dev(groups * sizeof(void*));
      cudaMemcpy(a_dev.p, a_ptr.data(), groups * sizeof(void*), cudaMemcpyHostToDevice);
      cudaMemcpy(b_dev.p, b_ptr.data(), groups * sizeof(void*), cudaMemcpyHostToDevice);
      cudaMemcpy(c_dev.p, c_ptr.data(), groups * sizeof(void*), cudaMemcpyHostToDevice);
      cublasStatus_t blas_status = CUBLAS_STATUS_SUCCESS;
      const double blas_ms = median_ms(reps, [&] {
        blas_status = cublasGemmGroupedBatchedEx(
            blas, ta.data(), tb.data(), m_a.data(), n_a.data(), k_a.data(), alpha.data(),
            static_cast<const void* const*>(a_dev.p), CUDA_R_16BF, lda.data(),
            static_cast<const void* const*>(b_dev.p), CUDA_R_16BF, ldb.data(), beta.data(),
            static_cast<void* const*>(c_dev.p), CUDA_R_16BF, ldc.data(), groups, group_size.data(),
            CUBLAS_COMPUTE_32F);
      });
      if (blas_status == CUBLAS_STATUS_SUCCESS) {
        entry["cublas_grouped_ms"] = blas_ms;
        entry["cublas_grouped_TFLOPs"] = flops / (blas_ms * 1e9);
        entry["grouped_over_cublas_grouped_time"] = grouped_ms / blas_ms;
      } else {
        entry["cublas_grouped_refused"] = static_cast<int>(blas_status);
      }
      grouped.push_back(entry);
    }
    out["grouped_gemm_bf16"] = grouped;
    cublasDestroy(blas);
  }

  // The few-row projections of decode (kernels/cuda/skinny_linear.hpp) against cuBLASLt on the
  // same shapes: every projection of a v2lite-8L decode step outside the routed experts, at
  // 1, 2, 4 and 8 rows. Each weight is one of enough copies to pass 256 MiB, used in turn, so
  // that no launch finds its weight in the 50 MB L2 (a decode step reads each weight once).
  // "step_us" weighs each shape by how often a step runs it (7 MoE layers, 1 dense layer, the
  // head): what the engine's skinny_rows threshold should follow. FP8 weights (8-byte loads,
  // bf16 expansion in registers) at the same shapes against the bf16 weight on the same kernel.
  {
    struct proj {
      const char* name;
      int64_t n, k, per_step;
      bool f32;  // the router (f32 everything) and the head (f32 out)
    };
    const proj projs[] = {
        {"q_proj+kv_a_proj", 16 * 192 + 512 + 64, 2048, 7 + 1, false},
        {"o_proj", 2048, 2048, 8, false},
        {"router", 64, 2048, 7, true},
        {"shared_gate_up", 2 * 2 * 1408, 2048, 7, false},
        {"shared_down", 2048, 2 * 1408, 7, false},
        {"dense_gate_up", 2 * 10944, 2048, 1, false},
        {"dense_down", 2048, 10944, 1, false},
        {"lm_head", 102400, 2048, 1, false},
    };
    // The absorbed attention's per-head products (16 heads, one strided batch each, kv_b_proj
    // read in place): q_nope . W_UK ((k, n) rows on the skinny kernel) and out_latent . W_UV^T,
    // at `rows` rows, into `entries` and a step's sums (8 layers).
    const auto absorbed = [&](int64_t rows, json& entries, double& lt_step_us,
                              double& skinny_step_us) {
      const int64_t H = 16, dn = 128, dv = 128, R = 512, qk = 192;
      const size_t w_bytes = static_cast<size_t>(H * (dn + dv) * R) * 2;
      rotated_weight w(w_bytes);
      fill_bf16(w.mem.p, w.copies * w_bytes / 2);
      device_mem q(rows * H * qk * 2), latent(rows * H * R * 2), attn(rows * H * dv * 2);
      fill_bf16(q.p, rows * H * qk);
      fill_bf16(latent.p, rows * H * R);
      for (const bool absorb_q : {true, false}) {
        kc::gemm_desc g;
        g.m = rows;
        g.batch_count = H;
        g.stride_b = (dn + dv) * R;
        g.ldb = R;
        if (absorb_q) {
          g.n = R, g.k = dn, g.a = q.p, g.lda = H * qk, g.stride_a = qk;
          g.c = latent.p, g.ldc = H * R, g.stride_c = R;
        } else {
          g.trans_b = kc::transpose::yes;
          g.n = dv, g.k = R, g.a = latent.p, g.lda = H * R, g.stride_a = R;
          g.c = attn.p, g.ldc = H * dv, g.stride_c = dv;
        }
        const int64_t w_offset = absorb_q ? 0 : dn * R;
        const double lt_ms = median_ms(reps, [&] {
          g.b = static_cast<const uint16_t*>(w.next()) + w_offset;
          check(lt.run(g, workspace.p, kc::gemm_workspace_bytes, nullptr), "absorbed gemm");
        });
        kc::skinny_linear_args a = *kc::skinny_linear_of(g);
        const double skinny_ms = median_ms(reps, [&] {
          a.w = static_cast<const uint16_t*>(w.next()) + w_offset;
          check(kc::skinny_linear_run(a, nullptr), "skinny_linear batched");
        });
        const double read = static_cast<double>(H * (absorb_q ? dn : dv) * R * 2);
        entries.push_back({{"name", absorb_q ? "absorb_q_16_heads" : "absorb_out_16_heads"},
                           {"cublaslt_us", lt_ms * 1e3},
                           {"skinny_us", skinny_ms * 1e3},
                           {"cublaslt_over_skinny", lt_ms / skinny_ms},
                           {"skinny_vs_copy", read / (skinny_ms * 1e6) / copy_gbs}});
        lt_step_us += 8 * lt_ms * 1e3;  // every layer, both absorbed products
        skinny_step_us += 8 * skinny_ms * 1e3;
      }
    };
    json skinny = json::object();
    for (int64_t rows : {1, 2, 4, 8}) {
      json entries = json::array();
      double lt_step_us = 0, skinny_step_us = 0;
      for (const auto& p : projs) {
        const bool router = p.f32 && p.n == 64;
        const dtype ab = router ? dtype::f32 : dtype::bf16;
        const dtype c = p.f32 ? dtype::f32 : dtype::bf16;
        const size_t w_bytes = static_cast<size_t>(p.n * p.k) * moe::kernels::dtype_bytes(ab);
        rotated_weight w(w_bytes);
        device_mem x(rows * p.k * 4), y(rows * p.n * 4);
        if (ab == dtype::bf16) {
          fill_bf16(w.mem.p, w.copies * w_bytes / 2);
          fill_bf16(x.p, rows * p.k);
        }
        const double lt_ms = median_ms(reps, [&] {
          const auto d = kc::linear_desc(x.p, w.next(), y.p, rows, p.k, p.n, ab, c);
          check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "gemm");
        });
        auto a = kc::skinny_linear_desc(x.p, nullptr, y.p, rows, p.k, p.n, ab, c);
        const double skinny_ms = median_ms(reps, [&] {
          a.w = w.next();
          check(kc::skinny_linear_run(a, nullptr), "skinny_linear");
        });
        const double gbs = static_cast<double>(w_bytes) / (skinny_ms * 1e6);
        json e = {{"name", p.name},
                  {"n", p.n},
                  {"k", p.k},
                  {"cublaslt_us", lt_ms * 1e3},
                  {"skinny_us", skinny_ms * 1e3},
                  {"cublaslt_over_skinny", lt_ms / skinny_ms},
                  {"skinny_weight_GBps", gbs},
                  {"skinny_vs_copy", gbs / copy_gbs},
                  {"cublaslt_vs_copy", static_cast<double>(w_bytes) / (lt_ms * 1e6) / copy_gbs}};
        if (ab == dtype::bf16) {
          // The same shape with FP8 weights (128 x 128 blocks) on the skinny kernel.
          rotated_weight q(static_cast<size_t>(p.n * p.k));
          const int64_t scale_ld = kc::fp8_weight_scale_ld(p.k);
          const size_t s_floats = static_cast<size_t>((p.n + 127) / 128 * scale_ld);
          device_mem sc(s_floats * 4);
          kc::skinny_linear_args f = a;
          f.w_dt = dtype::f8_e4m3;
          f.w_scale = static_cast<const float*>(sc.p);
          f.scale_ld = scale_ld;
          const double fp8_ms = median_ms(reps, [&] {
            f.w = q.next();
            check(kc::skinny_linear_run(f, nullptr), "skinny_linear fp8");
          });
          e["skinny_fp8_us"] = fp8_ms * 1e3;
          e["skinny_fp8_over_bf16_time"] = fp8_ms / skinny_ms;
        }
        lt_step_us += static_cast<double>(p.per_step) * lt_ms * 1e3;
        skinny_step_us += static_cast<double>(p.per_step) * skinny_ms * 1e3;
        entries.push_back(e);
      }
      absorbed(rows, entries, lt_step_us, skinny_step_us);
      skinny[std::to_string(rows)] = {{"shapes", entries},
                                      {"cublaslt_step_us", lt_step_us},
                                      {"skinny_step_us", skinny_step_us},
                                      {"cublaslt_over_skinny_step", lt_step_us / skinny_step_us}};
    }
    out["skinny_linear_vs_cublaslt"] = skinny;

    // Past 8 rows the engine keeps the products of small weights on the skinny kernel (passes of
    // 8 rows, the later ones reading the weight from L2) up to 64 rows: the absorbed products as
    // above, and the router (bf16 input widened in the kernel, float32 weight and logits)
    // against the conversion of its input and cuBLASLt's float32 product.
    json small = json::object();
    for (int64_t rows : {16, 32, 64}) {
      json entries = json::array();
      double lt_step_us = 0, skinny_step_us = 0;
      absorbed(rows, entries, lt_step_us, skinny_step_us);
      const int64_t n = 64, k = 2048;
      rotated_weight w(static_cast<size_t>(n * k) * 4);
      device_mem x16(rows * k * 2), x32(rows * k * 4), y(rows * n * 4);
      fill_bf16(x16.p, rows * k);
      kc::convert_args cv;
      cv.in = x16.p;
      cv.out = x32.p;
      cv.count = rows * k;
      cv.in_dt = dtype::bf16;
      cv.out_dt = dtype::f32;
      const double lt_ms = median_ms(reps, [&] {
        check(kc::convert_run(cv, nullptr), "convert");
        const auto d = kc::linear_desc(x32.p, w.next(), y.p, rows, k, n, dtype::f32, dtype::f32);
        check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "router gemm");
      });
      auto a = kc::skinny_linear_desc(x16.p, nullptr, y.p, rows, k, n, dtype::bf16, dtype::f32);
      a.w_dt = dtype::f32;
      const double skinny_ms = median_ms(reps, [&] {
        a.w = w.next();
        check(kc::skinny_linear_run(a, nullptr), "skinny_linear router");
      });
      entries.push_back({{"name", "router"},
                         {"convert_cublaslt_us", lt_ms * 1e3},
                         {"skinny_us", skinny_ms * 1e3},
                         {"cublaslt_over_skinny", lt_ms / skinny_ms}});
      lt_step_us += 7 * lt_ms * 1e3;
      skinny_step_us += 7 * skinny_ms * 1e3;
      small[std::to_string(rows)] = {{"shapes", entries},
                                     {"cublaslt_step_us", lt_step_us},
                                     {"skinny_step_us", skinny_step_us},
                                     {"cublaslt_over_skinny_step", lt_step_us / skinny_step_us}};
    }
    out["skinny_small_weights_vs_cublaslt"] = small;

    // Batch 32 is past the skinny kernel: its products stay on cuBLASLt, whose tiles stream
    // ~10 MB weights at a fifth of copy bandwidth there (the first H200 run). The grouped
    // expert GEMM's decode tiling (0.87 of copy over 64 experts at 32 tokens) run as one expert
    // is the in-house alternative: both at 32 rows on the same rotated weights.
    json dense32 = json::array();
    const int64_t rows = 32;
    device_mem offsets_d(2 * 4);
    const int32_t offsets[2] = {0, static_cast<int32_t>(rows)};
    cudaMemcpy(offsets_d.p, offsets, sizeof offsets, cudaMemcpyHostToDevice);
    for (const auto& p : projs) {
      if (p.f32) continue;
      const size_t w_bytes = static_cast<size_t>(p.n * p.k) * 2;
      rotated_weight w(w_bytes);
      device_mem x(rows * p.k * 2), y(rows * p.n * 2);
      fill_bf16(w.mem.p, w.copies * w_bytes / 2);
      fill_bf16(x.p, rows * p.k);
      const double lt_ms = median_ms(reps, [&] {
        const auto d =
            kc::linear_desc(x.p, w.next(), y.p, rows, p.k, p.n, dtype::bf16, dtype::bf16);
        check(lt.run(d, workspace.p, kc::gemm_workspace_bytes, nullptr), "gemm");
      });
      kc::grouped_gemm_args g{x.p,         static_cast<const int32_t*>(offsets_d.p),
                              nullptr,     y.p,
                              rows,        1,
                              p.n,         p.k,
                              dtype::bf16, dtype::bf16};
      const double grouped_ms = median_ms(reps, [&] {
        g.weights = w.next();
        check(kc::grouped_gemm_run(g, nullptr), "grouped_gemm");
      });
      const auto vs_copy = [&](double ms) {
        return static_cast<double>(w_bytes) / (ms * 1e6) / copy_gbs;
      };
      dense32.push_back({{"name", p.name},
                         {"n", p.n},
                         {"k", p.k},
                         {"cublaslt_us", lt_ms * 1e3},
                         {"grouped_one_expert_us", grouped_ms * 1e3},
                         {"cublaslt_over_grouped", lt_ms / grouped_ms},
                         {"cublaslt_vs_copy", vs_copy(lt_ms)},
                         {"grouped_vs_copy", vs_copy(grouped_ms)}});
    }
    out["dense_32_rows_cublaslt_vs_grouped"] = dense32;
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
