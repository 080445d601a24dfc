// What the CUDA kernel tests share: whether a GPU is there (and why not), a test-local owner of
// one cudaMalloc allocation (and uploads in a storage dtype), bf16 on the host (round to nearest
// even, as the kernels store), the tolerance checks the file headers derive, and fake pointers
// for can_run tests.
// Test code only; plain C++ (no nvcc), so that the tests build with the host compiler.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/device_arch.hpp"
#include "kernels/dtype.hpp"

namespace moe::kernels::cuda_testing {

// ---------------------------------------------------------------------------------------------
// Device availability, buffers, bf16 on the host.

inline const std::string& cuda_unavailable_reason() {
  static const std::string reason = [] {
    int count = 0;
    if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess)
      return std::string{cudaGetErrorString(e)};
    return count == 0 ? std::string{"cudaGetDeviceCount found no device"} : std::string{};
  }();
  return reason;
}

#define MOE_KERNELS_SKIP_WITHOUT_GPU()                                   \
  do {                                                                   \
    if (const auto& reason = ::moe::kernels::cuda_testing::cuda_unavailable_reason(); !reason.empty()) \
      GTEST_SKIP() << "no GPU: " << reason;                              \
  } while (false)

// Hopper's wgmma kernels: skip (with the reason) without a GPU or on a card other than 9.0.
#define MOE_KERNELS_SKIP_WITHOUT_SM90()                                                        \
  do {                                                                                         \
    MOE_KERNELS_SKIP_WITHOUT_GPU();                                                            \
    const auto cc_ = ::moe::kernels::cuda::detail::current_compute_capability();               \
    ASSERT_TRUE(cc_.has_value()) << "the device's compute capability could not be read";       \
    if (cc_->major != 9 || cc_->minor != 0)                                                    \
      GTEST_SKIP() << "wgmma runs on compute capability 9.0 only, this card is " << cc_->major \
                   << "." << cc_->minor;                                                       \
  } while (false)

// Owns one cudaMalloc allocation.
class device_buffer {
 public:
  explicit device_buffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  [[nodiscard]] void* get() const { return ptr_; }
  template <class T>
  [[nodiscard]] T* as() const {
    return static_cast<T*>(ptr_);
  }
  [[nodiscard]] size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <class T>
[[nodiscard]] bool upload(device_buffer& d, const std::vector<T>& v) {
  return v.size() * sizeof(T) <= d.bytes() &&
         (v.empty() || cudaMemcpy(d.get(), v.data(), v.size() * sizeof(T),
                                  cudaMemcpyHostToDevice) == cudaSuccess);
}

template <class T>
[[nodiscard]] bool download(const device_buffer& d, std::vector<T>& v) {
  return v.size() * sizeof(T) <= d.bytes() &&
         (v.empty() || cudaMemcpy(v.data(), d.get(), v.size() * sizeof(T),
                                  cudaMemcpyDeviceToHost) == cudaSuccess);
}

/// The first n values of `d` (empty and a test failure if the copy fails).
template <class T>
[[nodiscard]] std::vector<T> fetch(const device_buffer& d, size_t n) {
  std::vector<T> v(n);
  if (!download(d, v)) {
    ADD_FAILURE() << "cudaMemcpy from the device failed";
    return {};
  }
  return v;
}

// Round to nearest even, as __float2bfloat16_rn does; NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t b = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_bf16(v[i]);
  return out;
}

inline std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_bf16(v[i]);
  return out;
}

// The values rounded to bf16 and widened back: what a bf16 kernel reads.
inline std::vector<float> bf16_rounded(const std::vector<float>& v) {
  return from_bf16(to_bf16(v));
}

// What a kernel storing `dt` reads: v itself, or v rounded to bf16.
inline std::vector<float> stored(std::vector<float> v, dtype dt) {
  return dt == dtype::bf16 ? bf16_rounded(v) : v;
}

// v in `dt` on the device (at least one element, so a pointer always exists).
inline std::unique_ptr<device_buffer> to_device(const std::vector<float>& v, dtype dt) {
  auto d = std::make_unique<device_buffer>(std::max<size_t>(v.size(), 1) * dtype_bytes(dt));
  EXPECT_TRUE(dt == dtype::bf16 ? upload(*d, to_bf16(v)) : upload(*d, v));
  return d;
}

template <class T>
std::unique_ptr<device_buffer> to_device(const std::vector<T>& v) {
  auto d = std::make_unique<device_buffer>(std::max<size_t>(v.size(), 1) * sizeof(T));
  EXPECT_TRUE(upload(*d, v));
  return d;
}

// How many bf16 values lie between a and b (0 when equal; both NaN count as equal).
inline int64_t bf16_ulps_apart(uint16_t a, uint16_t b) {
  const auto ordered = [](uint16_t h) -> int64_t {
    return (h & 0x8000u) ? -static_cast<int64_t>(h & 0x7fffu) : static_cast<int64_t>(h);
  };
  if (std::isnan(from_bf16(a)) || std::isnan(from_bf16(b)))
    return std::isnan(from_bf16(a)) && std::isnan(from_bf16(b)) ? 0 : INT64_MAX;
  return std::llabs(ordered(a) - ordered(b));
}

inline ::testing::AssertionResult f32_close(float got, float want, double scale) {
  if (std::isnan(want) && std::isnan(got)) return ::testing::AssertionSuccess();
  const double tol = 1e-6 * scale + 1e-37;
  if (std::fabs(double{got} - double{want}) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << got << ", want " << want << " (tolerance " << tol << ")";
}

inline ::testing::AssertionResult bf16_within_one_ulp(uint16_t got, float want) {
  if (bf16_ulps_apart(got, to_bf16(want)) <= 1) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << from_bf16(got) << ", want " << want
                                       << " (rounded " << from_bf16(to_bf16(want)) << ")";
}

// Row offsets (counts.size() + 1, from 0) of consecutive groups of counts[e] rows: a grouped
// product's expert offsets.
inline std::vector<int32_t> offsets_of(const std::vector<int32_t>& counts) {
  std::vector<int32_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

inline std::vector<int32_t> random_ints(size_t n, int32_t lo, int32_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(lo, hi);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A host address that can_run may hold but never dereferences.
inline int fake_storage[4];
inline void* fake_ptr() {
  return fake_storage;
}
template <class T>
T* fake() {
  return reinterpret_cast<T*>(fake_storage);
}

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Sampling.

// How many tokens cpu::sample's top-p (top-p alone) keeps from this row: the shortest prefix of
// its ranking (NaN last, weighing nothing) whose mass reaches top_p of the row's; 0 when the
// best logit is not finite (the sampler then takes the argmax). The device sampler sorts up to
// cuda::sample_max_candidates of them and finds a wider nucleus by its mass.
inline size_t top_p_nucleus_size(const float* row, size_t vocab, float temperature, float top_p) {
  std::vector<float> v(row, row + vocab);
  std::sort(v.begin(), v.end(), [](float x, float y) {
    if (std::isnan(x) != std::isnan(y)) return std::isnan(y);
    return !std::isnan(x) && x > y;
  });
  if (!std::isfinite(v[0])) return 0;
  const auto weight = [&](float l) {
    return std::isnan(l) ? 0.0 : std::exp((static_cast<double>(l) - v[0]) / temperature);
  };
  double total = 0.0, cum = 0.0;
  for (const float l : v) total += weight(l);
  for (size_t i = 0; i < vocab; ++i) {
    cum += weight(v[i]);
    if (cum >= static_cast<double>(top_p) * total) return i + 1;
  }
  return vocab;
}

}  // namespace moe::kernels::cuda_testing
