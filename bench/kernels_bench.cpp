// Micro-benchmarks of the CPU kernels at DeepSeek-family shapes. Run with
// --benchmark_format=json for machine-readable output.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"

namespace kc = moe::kernels::cpu;

namespace {

std::vector<float> random_vector(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// y(rows, out) = x(rows, in) . W(out, in)^T
void bm_linear(benchmark::State& state) {
  const size_t rows = state.range(0), in = state.range(1), out = state.range(2);
  auto x = random_vector(rows * in, 1), w = random_vector(out * in, 2);
  std::vector<float> y(rows * out);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kc::linear(x.data(), w.data(), y.data(), rows, in, out));
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * rows * in * out,
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}
// small preset: hidden 512, moe_intermediate 256 (expert), q_lora 384; batch 1 and 32 tokens,
// and a 4096-token prefill.
BENCHMARK(bm_linear)->Args({1, 512, 512})->Args({32, 512, 512})->Args({4096, 512, 512})
    ->Args({32, 512, 32000})->Args({1024, 1024, 1024});

void bm_rmsnorm(benchmark::State& state) {
  const size_t rows = state.range(0), dim = state.range(1);
  auto x = random_vector(rows * dim, 3), w = random_vector(dim, 4);
  std::vector<float> y(rows * dim);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kc::rmsnorm(x.data(), w.data(), y.data(), rows, dim, 1e-6f));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * rows * dim * 8));
}
BENCHMARK(bm_rmsnorm)->Args({32, 512})->Args({4096, 7168});

}  // namespace

BENCHMARK_MAIN();
