#include "kernels/cpu/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace moe::kernels::cpu {

kernel_status rope_check_layout(const rope_apply_args& a, size_t dim) noexcept {
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  if (a.x == nullptr) return kernel_status::unsupported_shape;
  if (a.num_heads > 1 && a.head_stride < dim) return kernel_status::unsupported_shape;
  if (a.num_tokens > 1 && a.token_stride < (a.num_heads - 1) * a.head_stride + dim)
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

namespace {

// YaRN's correction dimension: the rotary dim whose wavelength fits `num_rotations` times into
// the original context.
double correction_dim(const rope_params& p, double num_rotations) noexcept {
  const double d = static_cast<double>(p.head_dim);
  return d * std::log(p.original_max_pos / (num_rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(p.theta));
}

// cos/sin halves (dim / 2) for one position, multiplied by the attention factor.
void cos_sin_at(const double* inv_freq, size_t half, double attention_factor, int64_t position,
                float* cos, float* sin) noexcept {
  const double pos = static_cast<double>(position);
  for (size_t i = 0; i < half; ++i) {
    const double angle = pos * inv_freq[i];
    cos[i] = static_cast<float>(std::cos(angle) * attention_factor);
    sin[i] = static_cast<float>(std::sin(angle) * attention_factor);
  }
}

// De-interleave (evens first, then odds), then x * cos + rotate_half(x) * sin:
//   out[i]        = x[2i]   * cos[i] - x[2i+1] * sin[i]
//   out[i + half] = x[2i+1] * cos[i] + x[2i]   * sin[i]
void rotate(float* x, size_t half, const float* cos, const float* sin) noexcept {
  float evens[rope_max_dim / 2];
  float odds[rope_max_dim / 2];
  for (size_t i = 0; i < half; ++i) {
    evens[i] = x[2 * i];
    odds[i] = x[2 * i + 1];
  }
  for (size_t i = 0; i < half; ++i) {
    x[i] = evens[i] * cos[i] - odds[i] * sin[i];
    x[i + half] = odds[i] * cos[i] + evens[i] * sin[i];
  }
}

void rotate_token(const rope_apply_args& a, size_t t, size_t half, const float* cos,
                  const float* sin) noexcept {
  for (size_t h = 0; h < a.num_heads; ++h)
    rotate(a.x + t * a.token_stride + h * a.head_stride, half, cos, sin);
}

template <class Position>
kernel_status apply_on_demand(const rope_params& p, const rope_apply_args& a,
                              const Position* positions) noexcept {
  if (auto s = rope_check(p); s != kernel_status::ok) return s;
  if (auto s = rope_check_layout(a, p.head_dim); s != kernel_status::ok) return s;
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  if (positions == nullptr) return kernel_status::unsupported_shape;
  for (size_t t = 0; t < a.num_tokens; ++t)
    if (positions[t] < 0) return kernel_status::unsupported_shape;
  const size_t half = p.head_dim / 2;
  double inv_freq[rope_max_dim / 2];
  (void)rope_inv_freq(p, inv_freq);
  const double attention_factor = rope_attention_factor(p);
  float cos[rope_max_dim / 2];
  float sin[rope_max_dim / 2];
  for (size_t t = 0; t < a.num_tokens; ++t) {
    cos_sin_at(inv_freq, half, attention_factor, static_cast<int64_t>(positions[t]), cos, sin);
    rotate_token(a, t, half, cos, sin);
  }
  return kernel_status::ok;
}

template <class Position>
kernel_status apply_from_table(const rope_params& p, const rope_apply_args& a,
                               const Position* positions, const float* cos, const float* sin,
                               size_t table_positions) noexcept {
  if (auto s = rope_check(p); s != kernel_status::ok) return s;
  if (auto s = rope_check_layout(a, p.head_dim); s != kernel_status::ok) return s;
  if (a.num_tokens == 0 || a.num_heads == 0) return kernel_status::ok;
  if (positions == nullptr || cos == nullptr || sin == nullptr)
    return kernel_status::unsupported_shape;
  for (size_t t = 0; t < a.num_tokens; ++t)
    if (positions[t] < 0 || static_cast<uint64_t>(positions[t]) >= table_positions)
      return kernel_status::unsupported_shape;
  const size_t half = p.head_dim / 2;
  for (size_t t = 0; t < a.num_tokens; ++t) {
    const size_t row = static_cast<size_t>(positions[t]) * half;
    rotate_token(a, t, half, cos + row, sin + row);
  }
  return kernel_status::ok;
}

}  // namespace

kernel_status rope_check(const rope_params& p) noexcept {
  if (p.head_dim == 0 || p.head_dim % 2 != 0 || p.head_dim > rope_max_dim)
    return kernel_status::unsupported_shape;
  // Negated comparisons so that NaN fails too.
  if (!(p.theta > 1.0)) return kernel_status::unsupported_shape;
  if (p.has_yarn && !(p.factor > 0.0 && p.original_max_pos > 0.0 && p.beta_fast > 0.0 &&
                      p.beta_slow > 0.0))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

double yarn_mscale(double scale, double m) noexcept {
  return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
}

double rope_attention_factor(const rope_params& p) noexcept {
  if (!p.has_yarn) return 1.0;
  if (p.mscale != 0.0 && p.mscale_all_dim != 0.0)
    return yarn_mscale(p.factor, p.mscale) / yarn_mscale(p.factor, p.mscale_all_dim);
  return yarn_mscale(p.factor, 1.0);
}

double rope_softmax_scale_multiplier(const rope_params& p) noexcept {
  if (!p.has_yarn || p.mscale_all_dim == 0.0) return 1.0;
  const double m = yarn_mscale(p.factor, p.mscale_all_dim);
  return m * m;
}

kernel_status rope_inv_freq(const rope_params& p, double* inv_freq) noexcept {
  if (auto s = rope_check(p); s != kernel_status::ok) return s;
  if (inv_freq == nullptr) return kernel_status::unsupported_shape;
  const size_t half = p.head_dim / 2;
  const double d = static_cast<double>(p.head_dim);
  for (size_t i = 0; i < half; ++i)
    inv_freq[i] = 1.0 / std::pow(p.theta, static_cast<double>(2 * i) / d);
  if (!p.has_yarn) return kernel_status::ok;
  // Dims below `low` keep their frequency (extrapolation), dims above `high` are divided by
  // the factor (interpolation), with a linear ramp between.
  const double low = std::max(std::floor(correction_dim(p, p.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(p, p.beta_slow)), d - 1.0);
  if (low == high) high += 0.001;  // avoids a division by zero in the ramp
  for (size_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    inv_freq[i] = inv_freq[i] / p.factor * ramp + inv_freq[i] * (1.0 - ramp);
  }
  return kernel_status::ok;
}

kernel_status rope_cos_sin_table(const rope_params& p, int64_t first_position,
                                 size_t num_positions, float* cos, float* sin) noexcept {
  if (auto s = rope_check(p); s != kernel_status::ok) return s;
  if (num_positions == 0) return kernel_status::ok;
  if (first_position < 0 || cos == nullptr || sin == nullptr)
    return kernel_status::unsupported_shape;
  const size_t half = p.head_dim / 2;
  double inv_freq[rope_max_dim / 2];
  (void)rope_inv_freq(p, inv_freq);
  const double attention_factor = rope_attention_factor(p);
  for (size_t i = 0; i < num_positions; ++i)
    cos_sin_at(inv_freq, half, attention_factor, first_position + static_cast<int64_t>(i),
               cos + i * half, sin + i * half);
  return kernel_status::ok;
}

kernel_status rope_apply(const rope_params& p, const rope_apply_args& a,
                         const int64_t* positions) noexcept {
  return apply_on_demand(p, a, positions);
}

kernel_status rope_apply(const rope_params& p, const rope_apply_args& a,
                         const int32_t* positions) noexcept {
  return apply_on_demand(p, a, positions);
}

kernel_status rope_apply_table(const rope_params& p, const rope_apply_args& a,
                               const int64_t* positions, const float* cos, const float* sin,
                               size_t table_positions) noexcept {
  return apply_from_table(p, a, positions, cos, sin, table_positions);
}

kernel_status rope_apply_table(const rope_params& p, const rope_apply_args& a,
                               const int32_t* positions, const float* cos, const float* sin,
                               size_t table_positions) noexcept {
  return apply_from_table(p, a, positions, cos, sin, table_positions);
}

}  // namespace moe::kernels::cpu
