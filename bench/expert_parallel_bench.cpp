// One MoE layer's routed experts across an NCCL world of this machine's GPUs
// (engine::expert_parallel_moe): what bounding its receive buffers costs. For each --tokens
// count a rank passes, the layer runs with receive buffers for the worst routing (the default,
// one chunk a call) and then with each --budgets fraction of that (expert_parallel_shape::
// recv_rows), on the same weights, tokens and routing; each figure is the median over --reps
// calls of the slowest rank's time, measured on the host around forward() and a stream sync
// (every call is collective and blocks on its two host syncs anyway), with its ratio to the
// whole exchange's time and bytes in the same run, the chunks the call ran, and whether every
// rank's output is the whole exchange's, bit for bit.
//
// Routing: each token's top_k distinct experts drawn uniformly (fixed seed), or with --skew s
// a share s of each token's choices among the first rank's experts (the load the scheduler's
// replication exists for: one rank then receives most rows, the busiest pair sets the chunks).
//
//   moe_bench_expert_parallel [--world N] [--experts 64] [--dim 2048] [--intermediate 1408]
//                             [--top-k 6] [--tokens 32,4096] [--budgets 0.5,0.25,0.125]
//                             [--skew 0] [--dtype bf16] [--reps 10] [--out FILE]
// Prints one JSON object (also to --out). Exits 2, with {"skipped": reason}, where the machine
// has fewer GPUs than --world (one H200: the world of one, whose one pair is itself).
#include <CLI/CLI.hpp>
#include <cuda_bf16.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/expert_parallel.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_comm.hpp"

using nlohmann::json;
namespace me = moe::engine;
using moe::kernels::dtype;

namespace {

struct options {
  int world = 1;
  int64_t experts = 64, dim = 2048, intermediate = 1408, top_k = 6;
  std::vector<int64_t> tokens{32, 4096};
  std::vector<double> budgets{0.5, 0.25, 0.125};
  double skew = 0.0;
  std::string dt = "bf16";
  int reps = 10;
  std::string out;
};

/// Host values as the layer's element type: small, of both signs, so products stay finite.
std::vector<char> as_elements(const std::vector<float>& v, dtype dt) {
  std::vector<char> bytes(v.size() * moe::kernels::dtype_bytes(dt));
  if (dt == dtype::f32) {
    std::memcpy(bytes.data(), v.data(), bytes.size());
  } else {
    auto* b = reinterpret_cast<__nv_bfloat16*>(bytes.data());
    for (size_t i = 0; i < v.size(); ++i) b[i] = __float2bfloat16(v[i]);
  }
  return bytes;
}

std::vector<float> random_values(size_t n, float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = u(gen);
  return v;
}

/// Each token's top_k distinct experts and weights; a share `skew` of the choices among
/// experts [0, first_rank_experts).
void route(int64_t tokens, const options& o, int64_t first_rank_experts, uint32_t seed,
           std::vector<int32_t>& idx, std::vector<float>& weight) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  idx.assign(static_cast<size_t>(tokens * o.top_k), 0);
  weight.assign(idx.size(), 1.0f / static_cast<float>(o.top_k));
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> chosen;
    while (static_cast<int64_t>(chosen.size()) < o.top_k) {
      const int64_t pool = coin(gen) < o.skew ? first_rank_experts : o.experts;
      const auto e = static_cast<int32_t>(std::uniform_int_distribution<int64_t>(0, pool - 1)(gen));
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    std::copy(chosen.begin(), chosen.end(), idx.begin() + t * o.top_k);
  }
}

caf::expected<moe::runtime::device_buffer> upload(const void* host, size_t bytes, cudaStream_t s) {
  auto b = moe::runtime::device_buffer::allocate(std::max<size_t>(bytes, 1));
  if (!b) return b.error();
  if (bytes > 0)
    if (auto err = moe::runtime::copy_async(b->data(), host, bytes, s)) return err;
  return b;
}

/// One rank's inputs for one token count, on its device.
struct rank_inputs {
  moe::runtime::device_buffer gate_up, down, x, idx, weight, out;
};

/// One rank's figures for one budget.
struct rank_run {
  std::string error;
  std::vector<double> ms;  // per call
  int64_t chunks = 0;
  int64_t recv_rows = 0;
  size_t device_bytes = 0;
  std::vector<char> out;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"one MoE layer's routed experts across an NCCL world: the cost of chunks"};
  app.add_option("--world", o.world, "ranks, one per GPU")->check(CLI::Range(1, 64));
  app.add_option("--experts", o.experts)->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_option("--dim", o.dim)->check(CLI::PositiveNumber);
  app.add_option("--intermediate", o.intermediate)->check(CLI::PositiveNumber);
  app.add_option("--top-k", o.top_k)->check(CLI::PositiveNumber);
  app.add_option("--tokens", o.tokens, "tokens each rank passes a call")->delimiter(',');
  app.add_option("--budgets", o.budgets, "receive buffers as fractions of the worst routing")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--skew", o.skew, "share of routing choices among the first rank's experts")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--dtype", o.dt)->check(CLI::IsMember({"bf16", "f32"}));
  app.add_option("--reps", o.reps)->check(CLI::Range(1, 10000));
  app.add_option("--out", o.out, "also write the JSON here");
  CLI11_PARSE(app, argc, argv);
  if (o.experts % o.world != 0 || o.top_k > o.experts) {
    std::fprintf(stderr, "%lld experts must split over %d ranks and hold top_k %lld\n",
                 static_cast<long long>(o.experts), o.world, static_cast<long long>(o.top_k));
    return 1;
  }
  for (const int64_t t : o.tokens)
    if (t < 1) {
      std::fprintf(stderr, "--tokens: %lld is not a positive count\n", static_cast<long long>(t));
      return 1;
    }
  json doc;
  // --out is rewritten after every token count, so a run cut short keeps what it measured.
  const auto save = [&] {
    if (!o.out.empty()) std::ofstream(o.out) << doc.dump(2) << "\n";
  };
  const auto write = [&] {
    save();
    std::printf("%s\n", doc.dump(2).c_str());
  };
  int found = 0;
  if (cudaGetDeviceCount(&found) != cudaSuccess) found = 0;
  if (found < o.world) {
    doc["skipped"] = "a world of " + std::to_string(o.world) + " needs as many GPUs; " +
                     std::to_string(found) + " found";
    write();
    return 2;
  }
  const dtype dt = o.dt == "f32" ? dtype::f32 : dtype::bf16;
  const size_t elem = moe::kernels::dtype_bytes(dt);
  std::vector<int> devices;
  for (int r = 0; r < o.world; ++r) devices.push_back(r);
  auto comms = moe::runtime::make_local_nccl_comms(devices);
  if (!comms) {
    std::fprintf(stderr, "NCCL: %s\n", moe::error_text(comms.error()).c_str());
    return 1;
  }
  const int64_t L = o.experts / o.world, D = o.dim, I = o.intermediate, K = o.top_k;
  doc["bench"] = "expert_parallel";
  doc["world"] = o.world;
  doc["shape"] = {{"experts", o.experts}, {"dim", D},      {"intermediate", I},
                  {"top_k", K},           {"dtype", o.dt}, {"skew", o.skew}};
  doc["reps"] = o.reps;
  doc["runs"] = json::array();

  for (const int64_t T : o.tokens) {
    const int64_t worst = o.world * T * K;
    std::vector<int64_t> recv_rows{0};  // the whole exchange first: every ratio's baseline
    for (const double f : o.budgets)
      recv_rows.push_back(
          std::max<int64_t>(o.world, static_cast<int64_t>(f * static_cast<double>(worst))));
    std::vector<std::vector<rank_run>> runs(recv_rows.size(),
                                            std::vector<rank_run>(static_cast<size_t>(o.world)));
    std::barrier sync(o.world);
    std::vector<std::thread> threads;
    for (int r = 0; r < o.world; ++r)
      threads.emplace_back([&, r] {
        // A rank that leaves early drops out of the barrier, so its peers do not wait there for
        // it (they fail in their next collective instead: the world is broken).
        const auto fail = [&](size_t b, const caf::error& err) {
          runs[b][static_cast<size_t>(r)].error = moe::error_text(err);
        };
        const auto leave = [&](size_t b, const caf::error& err) {
          fail(b, err);
          sync.arrive_and_drop();
        };
        cudaSetDevice(r);
        auto stream = moe::runtime::cuda_stream::create();
        if (!stream) return leave(0, stream.error());
        cudaStream_t s = stream->get();
        const auto seed = static_cast<uint32_t>(1000 * r + T);
        std::vector<int32_t> idx;
        std::vector<float> weight;
        route(T, o, L, seed, idx, weight);
        const auto gu =
            as_elements(random_values(static_cast<size_t>(L * 2 * I * D), 0.05f, seed + 1), dt);
        const auto dn =
            as_elements(random_values(static_cast<size_t>(L * D * I), 0.05f, seed + 2), dt);
        const auto x = as_elements(random_values(static_cast<size_t>(T * D), 1.0f, seed + 3), dt);
        auto d_gu = upload(gu.data(), gu.size(), s);
        auto d_dn = upload(dn.data(), dn.size(), s);
        auto d_x = upload(x.data(), x.size(), s);
        auto d_idx = upload(idx.data(), idx.size() * sizeof(int32_t), s);
        auto d_w = upload(weight.data(), weight.size() * sizeof(float), s);
        auto d_out = moe::runtime::device_buffer::allocate(static_cast<size_t>(T * D) * elem);
        for (auto* b : {&d_gu, &d_dn, &d_x, &d_idx, &d_w, &d_out})
          if (!*b) return leave(0, b->error());
        for (size_t b = 0; b < recv_rows.size(); ++b) {
          rank_run& run = runs[b][static_cast<size_t>(r)];
          me::expert_parallel_shape shape{o.experts, D, I, K, T, dt, recv_rows[b]};
          auto layer =
              me::expert_parallel_moe::create((*comms)[static_cast<size_t>(r)].get(), shape);
          // Every rank makes the same shape, so all fail here or none do: no call is left half
          // made.
          if (!layer) {
            fail(b, layer.error());
            continue;
          }
          run.recv_rows = (*layer)->recv_capacity();
          run.device_bytes = (*layer)->device_bytes();
          const me::expert_parallel_weights w{d_gu->data(), d_dn->data()};
          const auto call = [&]() -> caf::error {
            if (auto err = (*layer)->forward(
                    d_x->data(), static_cast<const int32_t*>(d_idx->data()),
                    static_cast<const float*>(d_w->data()), T, w, d_out->data(), s))
              return err;
            return moe::runtime::cuda_error(cudaStreamSynchronize(s), "forward");
          };
          caf::error err = call();  // warm-up
          for (int i = 0; !err && i < o.reps; ++i) {
            sync.arrive_and_wait();  // every rank starts each call together
            const auto t0 = std::chrono::steady_clock::now();
            err = call();
            run.ms.push_back(
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count());
          }
          // A failed collective leaves the world broken: nothing after it would be fair.
          if (err) return leave(b, err);
          run.chunks = (*layer)->last_chunks();
          run.out.resize(static_cast<size_t>(T * D) * elem);
          if (auto e = moe::runtime::cuda_error(
                  cudaMemcpy(run.out.data(), d_out->data(), run.out.size(), cudaMemcpyDeviceToHost),
                  "output to the host"))
            fail(b, e);
        }
      });
    for (auto& t : threads) t.join();

    json figures = {{"tokens_per_rank", T}, {"worst_recv_rows", worst}, {"budgets", json::array()}};
    double whole_ms = 0;
    size_t whole_bytes = 0;
    for (size_t b = 0; b < recv_rows.size(); ++b) {
      json f;
      f["fraction"] = b == 0 ? 1.0 : o.budgets[b - 1];
      std::string error;
      double slowest = 0;
      int64_t chunks = 0;
      bool same = true;
      std::vector<double> per_call(static_cast<size_t>(o.reps), 0.0);
      for (int r = 0; r < o.world; ++r) {
        const rank_run& run = runs[b][static_cast<size_t>(r)];
        if (!run.error.empty() && error.empty())
          error = "rank " + std::to_string(r) + ": " + run.error;
        for (size_t i = 0; i < run.ms.size() && i < per_call.size(); ++i)
          per_call[i] = std::max(per_call[i], run.ms[i]);
        chunks = std::max(chunks, run.chunks);
        same = same && run.out == runs[0][static_cast<size_t>(r)].out;
      }
      if (!error.empty()) {
        f["error"] = error;
        figures["budgets"].push_back(f);
        continue;
      }
      slowest = median(per_call);
      const rank_run& first = runs[b][0];
      f["recv_rows"] = first.recv_rows;
      f["chunks"] = chunks;
      f["ms"] = slowest;
      f["device_bytes"] = first.device_bytes;
      f["same_bits"] = same;
      if (b == 0) {
        whole_ms = slowest;
        whole_bytes = first.device_bytes;
      } else if (whole_ms > 0 && whole_bytes > 0) {
        f["time_ratio"] = slowest / whole_ms;
        f["bytes_ratio"] =
            static_cast<double>(first.device_bytes) / static_cast<double>(whole_bytes);
      }
      figures["budgets"].push_back(f);
    }
    doc["runs"].push_back(figures);
    save();
  }
  write();
  return 0;
}
