#include "kernels/cpu/gemm_profile.hpp"

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <tuple>

namespace moe::kernels::cpu {
namespace {

std::atomic<bool> enabled{false};
std::mutex mu;
std::map<std::tuple<size_t, size_t, size_t>, gemm_shape_record>& records() {
  static std::map<std::tuple<size_t, size_t, size_t>, gemm_shape_record> r;
  return r;
}

}  // namespace

void gemm_profile_enable(bool on) noexcept { enabled.store(on, std::memory_order_relaxed); }
bool gemm_profile_enabled() noexcept { return enabled.load(std::memory_order_relaxed); }

void gemm_profile_reset() {
  std::lock_guard<std::mutex> lock(mu);
  records().clear();
}

std::vector<gemm_shape_record> gemm_profile_snapshot() {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<gemm_shape_record> out;
  for (const auto& [key, rec] : records()) out.push_back(rec);
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
  return out;
}

void gemm_profile_record(size_t m, size_t n, size_t k, double seconds) {
  std::lock_guard<std::mutex> lock(mu);
  auto& r = records()[{m, n, k}];
  r.m = m;
  r.n = n;
  r.k = k;
  r.calls += 1;
  r.flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  r.seconds += seconds;
}

}  // namespace moe::kernels::cpu
