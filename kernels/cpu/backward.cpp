#include "kernels/cpu/backward.hpp"

#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cpu/gather.hpp"
#include "kernels/cpu/gemm.hpp"

namespace moe::kernels::cpu {
namespace {

bool fits_blas_int(size_t v) noexcept { return v <= static_cast<size_t>(INT_MAX); }

// 1 / sqrt(mean(x^2) + eps) of one row, in double. The forward rounds the mean and the rsqrt to
// float; their derivative is the derivative of the exact function, which this is.
double inv_rms(const float* x, size_t dim, float eps) noexcept {
  double sum_sq = 0.0;
  for (size_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  return 1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + static_cast<double>(eps));
}

// dweight's sum over rows is kept in double without allocating: columns are taken in blocks
// whose accumulators fit on the stack, at the price of one more pass over each row per block
// to recompute its inv_rms. One block covers DeepSeek-V3's q_a/kv_a norms (1536, 512); its
// hidden-size norms (7168) take four.
inline constexpr size_t rmsnorm_dweight_block = 2048;

void rmsnorm_dweight(const float* x, const float* dout, float* dweight, size_t rows, size_t dim,
                     float eps) noexcept {
  double acc[rmsnorm_dweight_block];
  for (size_t begin = 0; begin < dim; begin += rmsnorm_dweight_block) {
    const size_t width = std::min(rmsnorm_dweight_block, dim - begin);
    std::fill(acc, acc + width, 0.0);
    for (size_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      const float* dr = dout + r * dim;
      const double inv = inv_rms(xr, dim, eps);
      for (size_t j = 0; j < width; ++j)
        acc[j] += static_cast<double>(dr[begin + j]) * xr[begin + j] * inv;
    }
    for (size_t j = 0; j < width; ++j)
      dweight[begin + j] = static_cast<float>(dweight[begin + j] + acc[j]);
  }
}

// rope_apply maps an interleaved x to the de-interleaved
//   y[i]        = x[2i] * cos[i] - x[2i+1] * sin[i]
//   y[i + half] = x[2i+1] * cos[i] + x[2i] * sin[i]
// (cos and sin carry the attention factor, so this is a scaled rotation, not an orthogonal
// map). Its transpose takes dy (de-interleaved) to dx (interleaved):
//   dx[2i]   =  dy[i] * cos[i] + dy[i + half] * sin[i]
//   dx[2i+1] = -dy[i] * sin[i] + dy[i + half] * cos[i]
void rotate_back(float* g, size_t half, const float* cos, const float* sin) noexcept {
  float first[rope_max_dim / 2];
  float second[rope_max_dim / 2];
  std::copy(g, g + half, first);
  std::copy(g + half, g + 2 * half, second);
  for (size_t i = 0; i < half; ++i) {
    g[2 * i] = first[i] * cos[i] + second[i] * sin[i];
    g[2 * i + 1] = second[i] * cos[i] - first[i] * sin[i];
  }
}

template <class Position>
kernel_status rope_backward_impl(const rope_params& p, const rope_apply_args& a,
                                 const Position* positions) noexcept {
  if (auto s = rope_check(p); s != kernel_status::ok) return s;
  if (auto s = rope_check_layout(a, p.head_dim); s != kernel_status::ok) return s;
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  if (positions == nullptr) return kernel_status::unsupported_shape;
  for (size_t t = 0; t < a.num_tokens; ++t)
    if (positions[t] < 0) return kernel_status::unsupported_shape;
  const size_t half = p.head_dim / 2;
  float cos[rope_max_dim / 2];
  float sin[rope_max_dim / 2];
  for (size_t t = 0; t < a.num_tokens; ++t) {
    // A one-row table is bit-for-bit the cos/sin rope_apply computes on demand (same double
    // angle, same factor, same rounding), so the transpose is of exactly the forward's map.
    // It recomputes inv_freq per token: a few pow calls next to the cos/sin ones.
    (void)rope_cos_sin_table(p, static_cast<int64_t>(positions[t]), 1, cos, sin);
    for (size_t h = 0; h < a.num_heads; ++h)
      rotate_back(a.x + t * a.token_stride + h * a.head_stride, half, cos, sin);
  }
  return kernel_status::ok;
}

// The checks permute.cpp makes of its entries and positions, for the two backward passes.
bool entries_fit(size_t num_tokens, size_t top_k) noexcept {
  return top_k == 0 || num_tokens <= static_cast<size_t>(INT32_MAX) / top_k;
}

bool positions_fit(const int32_t* positions, size_t num_entries, size_t num_rows) noexcept {
  for (size_t j = 0; j < num_entries; ++j)
    if (positions[j] < -1 || (positions[j] >= 0 && static_cast<size_t>(positions[j]) >= num_rows))
      return false;
  return true;
}

}  // namespace

kernel_status linear_backward(const float* x, const float* weight, const float* dy, float* dx,
                              float* dweight, size_t rows, size_t in_features,
                              size_t out_features, bool accumulate) noexcept {
  if (!fits_blas_int(rows) || !fits_blas_int(in_features) || !fits_blas_int(out_features))
    return kernel_status::unsupported_shape;
  if (rows == 0 || in_features == 0) return kernel_status::ok;  // both outputs are empty sums
  // Every operand is checked before either product runs, so a bad call writes nothing.
  if (dy == nullptr) return kernel_status::unsupported_shape;
  if (dx != nullptr && weight == nullptr) return kernel_status::unsupported_shape;
  if (dweight != nullptr && x == nullptr) return kernel_status::unsupported_shape;

  if (dx != nullptr) {
    gemm_args g;  // dx (rows, in) = dy (rows, out) . weight (out, in)
    g.m = rows;
    g.n = in_features;
    g.k = out_features;
    g.a = dy;
    g.lda = out_features;
    g.b = weight;
    g.ldb = in_features;
    g.beta = accumulate ? 1.0f : 0.0f;
    g.c = dx;
    g.ldc = in_features;
    if (auto s = gemm(g); s != kernel_status::ok) return s;
  }
  if (dweight != nullptr && out_features > 0) {
    gemm_args g;  // dweight (out, in) += dy^T (out, rows) . x (rows, in)
    g.trans_a = transpose::yes;
    g.m = out_features;
    g.n = in_features;
    g.k = rows;
    g.a = dy;
    g.lda = out_features;
    g.b = x;
    g.ldb = in_features;
    g.beta = 1.0f;
    g.c = dweight;
    g.ldc = in_features;
    if (auto s = gemm(g); s != kernel_status::ok) return s;
  }
  return kernel_status::ok;
}

kernel_status rmsnorm_backward(const float* x, const float* weight, const float* dout, float* dx,
                               float* dweight, size_t rows, size_t dim, float eps,
                               bool accumulate) noexcept {
  if (dim == 0) return kernel_status::unsupported_shape;  // as the forward answers
  if (rows == 0) return kernel_status::ok;
  if (x == nullptr || weight == nullptr || dout == nullptr) return kernel_status::unsupported_shape;
  // dweight first: dx may alias dout or x, and dweight reads both.
  if (dweight != nullptr) rmsnorm_dweight(x, dout, dweight, rows, dim, eps);
  if (dx == nullptr) return kernel_status::ok;
  const double inv_dim = 1.0 / static_cast<double>(dim);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* dr = dout + r * dim;
    float* dxr = dx + r * dim;
    const double inv = inv_rms(xr, dim, eps);
    // g = dout * weight; dx = inv * (g - xhat * mean(g * xhat)), xhat = x * inv.
    double g_dot_x = 0.0;
    for (size_t i = 0; i < dim; ++i) g_dot_x += static_cast<double>(dr[i]) * weight[i] * xr[i];
    const double coef = inv * inv * g_dot_x * inv_dim;  // xhat * mean(g * xhat) = x * coef
    // Element i reads x[i] and dout[i] before writing dx[i]: in place over either is fine.
    for (size_t i = 0; i < dim; ++i) {
      const double g = static_cast<double>(dr[i]) * weight[i];
      const double d = inv * (g - static_cast<double>(xr[i]) * coef);
      dxr[i] = accumulate ? static_cast<float>(dxr[i] + d) : static_cast<float>(d);
    }
  }
  return kernel_status::ok;
}

kernel_status swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate,
                              float* dup, size_t rows, size_t dim) noexcept {
  if (rows == 0 || dim == 0) return kernel_status::ok;
  if (gate == nullptr || up == nullptr || dout == nullptr) return kernel_status::unsupported_shape;
  const size_t n = rows * dim;
  for (size_t i = 0; i < n; ++i) {
    // Read every input of element i before writing it: outputs may alias inputs.
    const float g = gate[i];
    const float u = up[i];
    const float d = dout[i];
    // exp(-g) overflows to inf for g < -88: s = 0, silu = -0, dsilu = 0 * (1 + g) = -0.
    const float s = 1.0f / (1.0f + std::exp(-g));
    const float silu = g * s;
    const float dsilu = s * (1.0f + g * (1.0f - s));
    if (dgate != nullptr) dgate[i] = d * u * dsilu;
    if (dup != nullptr) dup[i] = d * silu;
  }
  return kernel_status::ok;
}

kernel_status cross_entropy(const float* logits, const int32_t* targets, size_t rows, size_t vocab,
                            double* loss, float* dlogits) noexcept {
  if (loss == nullptr) return kernel_status::unsupported_shape;
  if (rows == 0) {
    *loss = 0.0;
    return kernel_status::ok;
  }
  if (vocab == 0 || logits == nullptr || targets == nullptr) return kernel_status::unsupported_shape;
  size_t counted = 0;
  for (size_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    if (static_cast<uint64_t>(targets[r]) >= vocab) return kernel_status::unsupported_shape;
    ++counted;
  }
  const double inv_counted = counted > 0 ? 1.0 / static_cast<double>(counted) : 0.0;
  double total = 0.0;
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = logits + r * vocab;
    float* dr = dlogits != nullptr ? dlogits + r * vocab : nullptr;
    if (targets[r] < 0) {
      if (dr != nullptr) std::fill(dr, dr + vocab, 0.0f);
      continue;
    }
    const size_t target = static_cast<size_t>(targets[r]);
    double max = xr[0];
    for (size_t i = 1; i < vocab; ++i) max = std::fmax(max, static_cast<double>(xr[i]));
    double sum = 0.0;
    for (size_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(xr[i]) - max);
    total += max + std::log(sum) - static_cast<double>(xr[target]);
    if (dr == nullptr) continue;
    const double scale = inv_counted / sum;
    for (size_t i = 0; i < vocab; ++i)
      dr[i] = static_cast<float>(std::exp(static_cast<double>(xr[i]) - max) * scale);
    dr[target] = static_cast<float>(std::exp(static_cast<double>(xr[target]) - max) * scale -
                                    inv_counted);
  }
  *loss = total * inv_counted;
  return kernel_status::ok;
}

kernel_status embedding_backward(const int32_t* ids, const float* dout, float* dtable, size_t rows,
                                 size_t vocab, size_t dim) noexcept {
  // The scatter-add checks every id before it writes anything.
  return scatter_add_rows(dout, dim, ids, /*weights=*/nullptr, rows, dtable, vocab);
}

kernel_status rope_backward(const rope_params& p, const rope_apply_args& a,
                            const int64_t* positions) noexcept {
  return rope_backward_impl(p, a, positions);
}

kernel_status rope_backward(const rope_params& p, const rope_apply_args& a,
                            const int32_t* positions) noexcept {
  return rope_backward_impl(p, a, positions);
}

kernel_status unpermute_backward(const float* y, size_t num_rows, const float* weight,
                                 const int32_t* positions, size_t num_tokens, size_t top_k,
                                 size_t dim, const float* dout, float* dy, float* dweight,
                                 bool accumulate) noexcept {
  if (!entries_fit(num_tokens, top_k)) return kernel_status::unsupported_shape;
  if (num_tokens == 0 || top_k == 0) return kernel_status::ok;
  if (positions == nullptr || dout == nullptr || (dweight != nullptr && y == nullptr))
    return kernel_status::unsupported_shape;
  if (dy == nullptr && dweight == nullptr) return kernel_status::ok;
  if (!positions_fit(positions, num_tokens * top_k, num_rows)) return kernel_status::unsupported_shape;
  for (size_t t = 0; t < num_tokens; ++t) {
    const float* d = dout + t * dim;
    for (size_t k = 0; k < top_k; ++k) {
      const size_t j = t * top_k + k;
      if (positions[j] < 0) {
        if (dweight != nullptr && !accumulate) dweight[j] = 0.0f;
        continue;
      }
      const size_t row = static_cast<size_t>(positions[j]);
      if (dy != nullptr) {
        const float w = weight != nullptr ? weight[j] : 1.0f;
        float* o = dy + row * dim;
        for (size_t i = 0; i < dim; ++i) o[i] = accumulate ? o[i] + w * d[i] : w * d[i];
      }
      if (dweight != nullptr) {
        const float* src = y + row * dim;
        double s = 0.0;
        for (size_t i = 0; i < dim; ++i) s += static_cast<double>(d[i]) * src[i];
        dweight[j] = accumulate ? static_cast<float>(dweight[j] + s) : static_cast<float>(s);
      }
    }
  }
  return kernel_status::ok;
}

kernel_status permute_rows_backward(const float* dpermuted, size_t num_rows,
                                    const int32_t* positions, size_t num_tokens, size_t top_k,
                                    size_t dim, float* dx, bool accumulate) noexcept {
  if (!entries_fit(num_tokens, top_k)) return kernel_status::unsupported_shape;
  if (num_tokens == 0 || dim == 0) return kernel_status::ok;
  if (dx == nullptr || (top_k > 0 && (dpermuted == nullptr || positions == nullptr)))
    return kernel_status::unsupported_shape;
  if (!positions_fit(positions, num_tokens * top_k, num_rows)) return kernel_status::unsupported_shape;
  for (size_t t = 0; t < num_tokens; ++t) {
    float* o = dx + t * dim;
    for (size_t i = 0; i < dim; ++i) {
      float s = 0.0f;
      for (size_t k = 0; k < top_k; ++k) {
        const int32_t p = positions[t * top_k + k];
        if (p >= 0) s += dpermuted[static_cast<size_t>(p) * dim + i];
      }
      o[i] = accumulate ? o[i] + s : s;
    }
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
