#include "model/optimizer.hpp"

#include <cmath>
#include <numbers>
#include <set>

#include "model/model_errc.hpp"

namespace moe::model {

caf::error adamw::step(std::span<const parameter_ref> params, double lr) {
  std::set<std::string_view> seen;
  for (const auto& p : params) {
    if (p.grad.size() != p.value.size())
      return make_error(model_errc::bad_input, "adamw: " + p.name + " has " + std::to_string(p.value.size()) +
                                                   " values but " + std::to_string(p.grad.size()) + " gradients");
    if (!seen.insert(p.name).second) return make_error(model_errc::bad_input, "adamw: " + p.name + " given twice");
    auto it = state_.find(p.name);
    if (it != state_.end() && !it->second.m.empty() && it->second.m.size() != p.value.size())
      return make_error(model_errc::bad_input, "adamw: " + p.name + " changed size since the last step");
  }
  ++steps_;
  const auto& o = options_;
  const double t = static_cast<double>(steps_);
  const double bias1 = 1.0 - std::pow(o.beta1, t);
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(o.beta2, t));
  const double step_size = lr / bias1;
  const double decay = 1.0 - lr * o.weight_decay;
  for (const auto& p : params) {
    auto& s = state_[p.name];
    if (s.m.empty()) {
      s.m.assign(p.value.size(), 0.0);
      s.v.assign(p.value.size(), 0.0);
    }
    for (size_t i = 0; i < p.value.size(); ++i) {
      const double g = p.grad[i];
      double value = static_cast<double>(p.value[i]) * decay;
      s.m[i] = o.beta1 * s.m[i] + (1.0 - o.beta1) * g;
      s.v[i] = o.beta2 * s.v[i] + (1.0 - o.beta2) * g * g;
      value -= step_size * s.m[i] / (std::sqrt(s.v[i]) / bias2_sqrt + o.eps);
      p.value[i] = static_cast<float>(value);
    }
  }
  return {};
}

double global_grad_norm(std::span<const parameter_ref> params) {
  double sum = 0;
  for (const auto& p : params)
    for (float g : p.grad) sum += static_cast<double>(g) * g;
  return std::sqrt(sum);
}

double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm) {
  double sum = 0;
  for (const auto& g : grads)
    for (float x : g) sum += static_cast<double>(x) * x;
  const double norm = std::sqrt(sum);
  if (max_norm <= 0) return norm;
  const double scale = max_norm / (norm + 1e-6);
  if (scale >= 1.0) return norm;
  for (const auto& g : grads)
    for (float& x : g) x = static_cast<float>(x * scale);
  return norm;
}

double learning_rate_at(int64_t step, double base_lr, int64_t warmup_steps, int64_t total_steps, double min_lr) {
  if (warmup_steps > 0 && step < warmup_steps)
    return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (total_steps <= warmup_steps) return base_lr;  // no decay asked for
  if (step >= total_steps) return min_lr;
  const double progress = static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
  return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace moe::model
