#include "kernels/cpu/gemm.hpp"

#include <cblas.h>

#include <chrono>
#include <climits>

#include "kernels/cpu/gemm_profile.hpp"

namespace moe::kernels::cpu {
namespace {

bool fits_blas_int(size_t v) noexcept { return v <= static_cast<size_t>(INT_MAX); }

kernel_status check(const gemm_args& g) noexcept {
  if (!fits_blas_int(g.m) || !fits_blas_int(g.n) || !fits_blas_int(g.k) ||
      !fits_blas_int(g.lda) || !fits_blas_int(g.ldb) || !fits_blas_int(g.ldc))
    return kernel_status::unsupported_shape;
  if (g.m == 0 || g.n == 0) return kernel_status::ok;
  if (g.c == nullptr || g.ldc < g.n) return kernel_status::unsupported_shape;
  if (g.k == 0) return kernel_status::ok;
  const size_t a_cols = g.trans_a == transpose::yes ? g.m : g.k;
  const size_t b_cols = g.trans_b == transpose::yes ? g.k : g.n;
  if (g.a == nullptr || g.lda < a_cols) return kernel_status::unsupported_shape;
  if (g.b == nullptr || g.ldb < b_cols) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

// k == 0 leaves only the beta term. Done here because BLAS implementations disagree on whether
// lda >= 1 must hold when there is nothing to read.
void scale_c(const gemm_args& g, float* c) noexcept {
  for (size_t i = 0; i < g.m; ++i) {
    float* row = c + i * g.ldc;
    for (size_t j = 0; j < g.n; ++j) row[j] = g.beta == 0.0f ? 0.0f : g.beta * row[j];
  }
}

void run_one(const gemm_args& g, const float* a, const float* b, float* c) noexcept {
  if (g.k == 0) {
    scale_c(g, c);
    return;
  }
  const bool profiled = gemm_profile_enabled();
  const auto start = profiled ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  cblas_sgemm(CblasRowMajor, g.trans_a == transpose::yes ? CblasTrans : CblasNoTrans,
              g.trans_b == transpose::yes ? CblasTrans : CblasNoTrans, static_cast<int>(g.m),
              static_cast<int>(g.n), static_cast<int>(g.k), g.alpha, a, static_cast<int>(g.lda),
              b, static_cast<int>(g.ldb), g.beta, c, static_cast<int>(g.ldc));
  if (profiled) {
    gemm_profile_record(g.m, g.n, g.k,
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
}

}  // namespace

kernel_status gemm(const gemm_args& args) noexcept {
  if (auto s = check(args); s != kernel_status::ok) return s;
  if (args.m == 0 || args.n == 0) return kernel_status::ok;
  run_one(args, args.a, args.b, args.c);
  return kernel_status::ok;
}

kernel_status gemm_strided_batched(const gemm_args& args, size_t batch_count, size_t stride_a,
                                   size_t stride_b, size_t stride_c) noexcept {
  if (auto s = check(args); s != kernel_status::ok) return s;
  if (batch_count == 0 || args.m == 0 || args.n == 0) return kernel_status::ok;
  for (size_t i = 0; i < batch_count; ++i) {
    if (args.k == 0) {
      scale_c(args, args.c + i * stride_c);  // a and b may be null: no offsets from them
      continue;
    }
    run_one(args, args.a + i * stride_a, args.b + i * stride_b, args.c + i * stride_c);
  }
  return kernel_status::ok;
}

kernel_status linear(const float* x, const float* weight, float* y, size_t rows,
                     size_t in_features, size_t out_features, float beta) noexcept {
  gemm_args g;
  g.trans_b = transpose::yes;
  g.m = rows;
  g.n = out_features;
  g.k = in_features;
  g.a = x;
  g.lda = in_features;
  g.b = weight;
  g.ldb = in_features;
  g.beta = beta;
  g.c = y;
  g.ldc = out_features;
  return gemm(g);
}

}  // namespace moe::kernels::cpu
