// The SwiGLU MLP every DeepSeek FFN is made of: dense layers, shared experts and each routed
// expert compute down(silu(gate(x)) * up(x)).
// Ownership: borrows its weights. Thread safety: forward() uses caller-provided scratch, so
// one bound mlp may serve several threads that each bring their own scratch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

struct mlp_scratch {
  std::vector<float> gate, up;
};

class mlp_block {
 public:
  /// Binds `<prefix>gate_proj.weight` (inter, hidden), `up_proj` (inter, hidden) and
  /// `down_proj` (hidden, inter).
  [[nodiscard]] static caf::expected<mlp_block> bind(const std::string& prefix, int64_t hidden,
                                                     int64_t intermediate,
                                                     const weight_lookup& weights);

  /// y (rows, hidden) = beta * y + down(silu(gate(x)) * up(x)), x: (rows, hidden).
  [[nodiscard]] caf::error forward(const float* x, size_t rows, float* y, float beta,
                                   mlp_scratch& scratch) const;

  [[nodiscard]] int64_t hidden() const noexcept { return hidden_; }
  [[nodiscard]] int64_t intermediate() const noexcept { return intermediate_; }

 private:
  const float* gate_ = nullptr;
  const float* up_ = nullptr;
  const float* down_ = nullptr;
  int64_t hidden_ = 0, intermediate_ = 0;
};

}  // namespace moe::model
