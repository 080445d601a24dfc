// GPU kernel figures, each against a baseline measured in the same run on the same card:
//  - bandwidth-bound kernels (RMSNorm, SwiGLU, FP8 expansion) as a share of the device-to-device
//    copy bandwidth (bytes each must read and write / time, over the copy's);
//  - cuBLASLt bf16 products at the model's shapes against a large square bf16 product (the
//    card's practical GEMM peak);
//  - an FP8 weight (expanded to bf16, then multiplied) against the same weight kept in bf16.
// Times are CUDA-event medians over --reps launches after warm-up. Prints one JSON object.
//
//   moe_bench_gpu_kernels [--reps 20] [--square 8192]
// Exits 2, with a JSON {"skipped": reason}, where no GPU exists.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/fp8_dequantize.hpp"
#include "kernels/cuda/gemm.hpp"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/sampling.hpp"
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
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
