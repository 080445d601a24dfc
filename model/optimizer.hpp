// The training optimizer: AdamW with decoupled weight decay (as torch.optim.AdamW computes it),
// gradient clipping by global norm, and the learning-rate schedule (linear warmup, cosine decay).
// Parameters are named spans of float32 values with their gradients; the optimizer keeps its
// moments per name, in double, so a parameter's state survives reordering and partial updates
// (an expert group updates only its own experts).
// Ownership: owns the moments; borrows the parameters and gradients for the duration of a call.
// Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace moe::model {

struct adamw_options {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

/// One parameter as the optimizer sees it: values updated in place, gradient read.
struct parameter_ref {
  std::string name;
  std::span<float> value;
  std::span<const float> grad;
};

class adamw {
 public:
  explicit adamw(adamw_options options = {}) : options_(options) {}

  /// One step at learning rate `lr` over `params` (every one, each once): per parameter
  /// p *= 1 - lr * weight_decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
  /// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with t this step's number (from 1).
  /// Errors (model_errc::bad_input, nothing updated): a gradient of another size than its value,
  /// a name given twice, a parameter whose size changed since an earlier step.
  [[nodiscard]] caf::error step(std::span<const parameter_ref> params, double lr);

  /// Steps taken so far.
  [[nodiscard]] int64_t steps() const noexcept { return steps_; }
  [[nodiscard]] const adamw_options& options() const noexcept { return options_; }

  /// The moments of one parameter (empty before its first step): for checkpoints and tests.
  struct moments {
    std::vector<double> m, v;
  };
  [[nodiscard]] const std::map<std::string, moments, std::less<>>& state() const noexcept { return state_; }
  /// Sets one parameter's moments (a replica that arrived with its state, e.g. an expert moved
  /// to another holder), replacing any it had.
  void set_moments(std::string name, moments m) { state_.insert_or_assign(std::move(name), std::move(m)); }
  /// Restores a saved state (a checkpoint's); the next step is number steps + 1.
  void restore(int64_t steps, std::map<std::string, moments, std::less<>> state) {
    steps_ = steps;
    state_ = std::move(state);
  }

 private:
  adamw_options options_;
  int64_t steps_ = 0;
  std::map<std::string, moments, std::less<>> state_;
};

/// sqrt(sum of every gradient element squared), in double.
[[nodiscard]] double global_grad_norm(std::span<const parameter_ref> params);

/// Scales every gradient by min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_), where norm
/// is global_grad_norm; `grads` are the same tensors as params' grads, writable. Returns the norm
/// before clipping. max_norm <= 0 disables clipping.
double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm);

/// Linear warmup over `warmup_steps` (from base/warmup to base), then cosine decay from base to
/// min_lr at total_steps; min_lr after. total_steps <= warmup_steps: base after the warmup, no
/// decay. step counts from 0.
[[nodiscard]] double learning_rate_at(int64_t step, double base_lr, int64_t warmup_steps, int64_t total_steps,
                                      double min_lr = 0.0);

}  // namespace moe::model
