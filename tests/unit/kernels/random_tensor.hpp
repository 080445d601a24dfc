// Deterministic random inputs for the CPU kernel tests: the same seed gives the same data on
// every run, so a failure reproduces.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace moe::kernels::cpu::testing {

inline std::vector<float> random_floats(size_t n, uint64_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

}  // namespace moe::kernels::cpu::testing
