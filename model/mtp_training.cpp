#include "model/mtp_training.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "kernels/cpu/backward.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/model_errc.hpp"
#include "model/scratch.hpp"
#include "model/weights.hpp"

namespace moe::model {

namespace {

namespace kc = kernels::cpu;

caf::error check(kernels::kernel_status s, const char* what, int64_t depth) {
  if (s == kernels::kernel_status::ok) return {};
  return make_error(model_errc::kernel_failed, "mtp depth " + std::to_string(depth) + ": " + what +
                                                   ": " + std::string(kernels::to_string(s)));
}

bool rises_to(std::span<const int32_t> cu_seqlens, size_t num_tokens) {
  bool ok = cu_seqlens.size() >= 2 && cu_seqlens.front() == 0 &&
            cu_seqlens.back() == static_cast<int64_t>(num_tokens);
  for (size_t s = 1; ok && s < cu_seqlens.size(); ++s) ok = cu_seqlens[s] >= cu_seqlens[s - 1];
  return ok;
}

caf::error depth_error(const model_config& c, int64_t depth) {
  return make_error(model_errc::bad_input,
                    "mtp: depth " + std::to_string(depth) + " outside 1.." +
                        std::to_string(c.num_nextn_predict_layers) + " (num_nextn_predict_layers)");
}

using detail::ensure_size;

// Copies packed row r of `packed` to row rows[r] of `full` (T, D) and zeroes every other row.
void scatter_rows(const float* packed, std::span<const int32_t> rows, float* full, size_t T, size_t D) {
  std::fill(full, full + T * D, 0.0f);
  for (size_t r = 0; r < rows.size(); ++r)
    std::memcpy(full + static_cast<size_t>(rows[r]) * D, packed + r * D, D * sizeof(float));
}

// Packed row r <- row rows[r] of `full`, or zeros when `full` is null.
void gather_rows(const float* full, std::span<const int32_t> rows, float* packed, size_t D) {
  for (size_t r = 0; r < rows.size(); ++r) {
    if (full == nullptr) {
      std::fill(packed + r * D, packed + (r + 1) * D, 0.0f);
    } else {
      std::memcpy(packed + r * D, full + static_cast<size_t>(rows[r]) * D, D * sizeof(float));
    }
  }
}

}  // namespace

// --- gradients --------------------------------------------------------------------------------

mtp_grads mtp_grads::zeros(const model_config& c, int64_t depth) {
  const auto D = static_cast<size_t>(c.hidden_size);
  mtp_grads g;
  g.enorm.assign(D, 0.0f);
  g.hnorm.assign(D, 0.0f);
  g.eh_proj.assign(D * 2 * D, 0.0f);
  g.attention = attention_grads::for_config(c);
  g.mlp = mlp_half_grads::zeros(c, mtp_layer(c, depth));
  g.shared_head_norm.assign(D, 0.0f);
  return g;
}

void mtp_grads::zero() {
  std::ranges::fill(enorm, 0.0f);
  std::ranges::fill(hnorm, 0.0f);
  std::ranges::fill(eh_proj, 0.0f);
  attention.zero();
  mlp.zero();
  std::ranges::fill(shared_head_norm, 0.0f);
}

// --- rows -------------------------------------------------------------------------------------

caf::expected<mtp_token_rows> make_mtp_token_rows(std::span<const int32_t> ids,
                                                  std::span<const int32_t> cu_seqlens, int64_t depth) {
  if (depth < 1) return make_error(model_errc::bad_input, "mtp: depth " + std::to_string(depth) + " < 1");
  if (!rises_to(cu_seqlens, ids.size()))
    return make_error(model_errc::bad_input, "mtp: cu_seqlens must rise from 0 to the token count");
  mtp_token_rows out;
  out.next_tokens.assign(ids.size(), -1);
  out.targets.assign(ids.size(), -1);
  const auto k = static_cast<size_t>(depth);
  for (size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const auto begin = static_cast<size_t>(cu_seqlens[s]), end = static_cast<size_t>(cu_seqlens[s + 1]);
    for (size_t t = begin; t + k < end; ++t) {
      out.next_tokens[t] = ids[t + k];
      if (t + k + 1 < end) out.targets[t] = ids[t + k + 1];
    }
  }
  return out;
}

// --- module -----------------------------------------------------------------------------------

caf::expected<mtp_training_module> mtp_training_module::bind(const model_config& c, int64_t depth,
                                                             const weight_lookup& weights) {
  if (depth < 1 || depth > c.num_nextn_predict_layers) return depth_error(c, depth);
  const int64_t layer = mtp_layer(c, depth);
  mtp_training_module m;
  m.depth_ = depth;
  m.hidden_ = c.hidden_size;
  m.eps_ = static_cast<float>(c.rms_norm_eps);
  const int64_t vec[] = {c.hidden_size};
  const int64_t proj[] = {c.hidden_size, 2 * c.hidden_size};
  auto get = [&](std::string_view suffix, std::span<const int64_t> shape, const float*& out) -> caf::error {
    auto w = weights(layer_weight_name(layer, suffix), shape);
    if (!w) return w.error();
    out = *w;
    return {};
  };
  if (auto err = get("enorm.weight", vec, m.enorm_)) return err;
  if (auto err = get("hnorm.weight", vec, m.hnorm_)) return err;
  if (auto err = get("eh_proj.weight", proj, m.eh_proj_)) return err;
  auto attention = attention_training_block::bind(c, layer, weights);
  if (!attention) return attention.error();
  auto mlp = mlp_training_block::bind(c, layer, weights);
  if (!mlp) return mlp.error();
  if (auto err = get("shared_head.norm.weight", vec, m.head_norm_)) return err;
  m.attention_ = std::move(*attention);
  m.mlp_ = std::move(*mlp);
  return m;
}

caf::error mtp_training_module::forward(const float* h_prev, const float* next_emb, float* h_out,
                                        float* normed, size_t T, std::span<const int32_t> cu_seqlens,
                                        double balance_alpha) {
  num_tokens_.reset();
  if (!rises_to(cu_seqlens, T))
    return make_error(model_errc::bad_input, "mtp: cu_seqlens must rise from 0 to the token count");
  if (T > 0 && (h_prev == nullptr || next_emb == nullptr || h_out == nullptr || normed == nullptr))
    return make_error(model_errc::bad_input, "mtp: null activations");

  // The depth's rows: positions 0..n-1-depth of each sequence, packed in order.
  const auto k = static_cast<size_t>(depth_);
  rows_.clear();
  cu_seqlens_.assign(1, 0);
  for (size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    for (auto t = static_cast<size_t>(cu_seqlens[s]); t + k < static_cast<size_t>(cu_seqlens[s + 1]); ++t)
      rows_.push_back(static_cast<int32_t>(t));
    cu_seqlens_.push_back(static_cast<int32_t>(rows_.size()));
  }
  const size_t R = rows_.size(), D = hidden_;
  ensure_size(e_in_, R * D);
  ensure_size(h_in_, R * D);
  ensure_size(cat_, R * 2 * D);
  ensure_size(x_, R * D);
  ensure_size(mlp_in_, R * D);
  ensure_size(mlp_out_, R * D);
  ensure_size(normed_, R * D);
  ensure_size(de_, R * D);
  ensure_size(dh_, R * D);
  gather_rows(next_emb, rows_, e_in_.data(), D);
  gather_rows(h_prev, rows_, h_in_.data(), D);

  caf::error err;
  if (R > 0) {
    // enorm and hnorm into packed scratch, then interleaved per row: [e | h].
    if ((err = check(kc::rmsnorm(e_in_.data(), enorm_, de_.data(), R, D, eps_), "enorm", depth_))) return err;
    if ((err = check(kc::rmsnorm(h_in_.data(), hnorm_, dh_.data(), R, D, eps_), "hnorm", depth_))) return err;
    for (size_t r = 0; r < R; ++r) {
      std::memcpy(cat_.data() + r * 2 * D, de_.data() + r * D, D * sizeof(float));
      std::memcpy(cat_.data() + r * 2 * D + D, dh_.data() + r * D, D * sizeof(float));
    }
    if ((err = check(kc::linear(cat_.data(), eh_proj_, x_.data(), R, 2 * D, D), "eh_proj", depth_))) return err;
  }
  if ((err = attention_.forward(x_.data(), mlp_in_.data(), R, cu_seqlens_))) return err;
  if ((err = mlp_.forward(mlp_in_.data(), mlp_out_.data(), R, cu_seqlens_, balance_alpha))) return err;
  for (size_t i = 0; i < R * D; ++i) x_[i] += mlp_out_[i];
  if (R > 0 &&
      (err = check(kc::rmsnorm(x_.data(), head_norm_, normed_.data(), R, D, eps_), "shared_head.norm", depth_)))
    return err;
  scatter_rows(x_.data(), rows_, h_out, T, D);
  scatter_rows(normed_.data(), rows_, normed, T, D);
  num_tokens_ = T;
  return {};
}

bool mtp_training_module::grads_fit(const mtp_grads& g) const noexcept {
  const auto D = static_cast<size_t>(hidden_);
  return g.enorm.size() == D && g.hnorm.size() == D && g.eh_proj.size() == 2 * D * D &&
         g.shared_head_norm.size() == D;
}

caf::error mtp_training_module::backward(const float* dnormed, const float* dh_out, float* dh_prev,
                                         float* dnext_emb, mtp_grads& grads) {
  if (!num_tokens_)
    return make_error(model_errc::bad_input, "mtp depth " + std::to_string(depth_) +
                                                 ": backward without a successful forward");
  if (!grads_fit(grads))
    return make_error(model_errc::bad_input, "mtp depth " + std::to_string(depth_) +
                                                 ": gradients not sized for it (use mtp_grads::zeros)");
  const size_t T = *num_tokens_, R = rows_.size(), D = hidden_;
  if (T > 0 && (dh_prev == nullptr || dnext_emb == nullptr))
    return make_error(model_errc::bad_input, "mtp: null gradient outputs");

  // dx: dL/d(block output) = shared_head.norm's backward of dnormed, plus dh_out.
  ensure_size(dx_, R * D);
  ensure_size(dmlp_in_, R * D);
  ensure_size(dcat_, R * 2 * D);
  gather_rows(dnormed, rows_, dmlp_in_.data(), D);  // dmlp_in_ as scratch for dnormed
  gather_rows(dh_out, rows_, dx_.data(), D);
  caf::error err;
  if (R > 0 && (err = check(kc::rmsnorm_backward(x_.data(), head_norm_, dmlp_in_.data(), dx_.data(),
                                                 grads.shared_head_norm.data(), R, D, eps_,
                                                 /*accumulate=*/true),
                            "shared_head.norm backward", depth_)))
    return err;
  // x_out = x_mid + mlp(mlp_in): the residual passes dx on; the MLP adds through mlp_in.
  if ((err = mlp_.backward(dx_.data(), dmlp_in_.data(), grads.mlp))) return err;
  if ((err = attention_.backward(dx_.data(), dmlp_in_.data(), dx_.data(), grads.attention))) return err;
  if (R > 0) {
    if ((err = check(kc::linear_backward(cat_.data(), eh_proj_, dx_.data(), dcat_.data(), grads.eh_proj.data(),
                                         R, 2 * D, D),
                     "eh_proj backward", depth_)))
      return err;
    for (size_t r = 0; r < R; ++r) {
      std::memcpy(de_.data() + r * D, dcat_.data() + r * 2 * D, D * sizeof(float));
      std::memcpy(dh_.data() + r * D, dcat_.data() + r * 2 * D + D, D * sizeof(float));
    }
    if ((err = check(kc::rmsnorm_backward(e_in_.data(), enorm_, de_.data(), de_.data(), grads.enorm.data(), R,
                                          D, eps_),
                     "enorm backward", depth_)))
      return err;
    if ((err = check(kc::rmsnorm_backward(h_in_.data(), hnorm_, dh_.data(), dh_.data(), grads.hnorm.data(), R,
                                          D, eps_),
                     "hnorm backward", depth_)))
      return err;
  }
  scatter_rows(de_.data(), rows_, dnext_emb, T, D);
  scatter_rows(dh_.data(), rows_, dh_prev, T, D);
  return {};
}

// --- random weights ---------------------------------------------------------------------------

caf::error add_random_mtp_weights(checkpoint& ckpt, int64_t depth, uint64_t seed) {
  const auto& c = ckpt.config;
  if (depth < 1 || depth > c.num_nextn_predict_layers) return depth_error(c, depth);
  const int64_t layer = mtp_layer(c, depth);
  const float half_width = static_cast<float>(std::sqrt(3.0) * c.initializer_range);
  // One stream per (seed, depth): the values do not depend on other modules or their order.
  std::mt19937_64 rng(seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(depth)));
  std::uniform_real_distribution<float> uniform(-half_width, half_width);
  for (const auto& spec : expected_weights(c, /*include_mtp=*/true)) {
    if (!spec.mtp || spec.layer != layer || spec.optional) continue;
    host_tensor t(spec.shape);  // zeros: e_score_correction_bias
    if (spec.kind == weight_kind::norm) {
      std::ranges::fill(t.data(), 1.0f);
    } else if (spec.kind != weight_kind::router_bias) {
      for (auto& v : t.data()) v = uniform(rng);
    }
    ckpt.tensors.insert_or_assign(spec.name, std::move(t));
  }
  return {};
}

}  // namespace moe::model
