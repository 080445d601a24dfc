#include "model/mlp_block.hpp"

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

caf::expected<mlp_block> mlp_block::bind(const std::string& prefix, int64_t hidden,
                                         int64_t intermediate, const weight_lookup& weights) {
  mlp_block m;
  m.hidden_ = hidden;
  m.intermediate_ = intermediate;
  const int64_t in_shape[] = {intermediate, hidden};
  const int64_t out_shape[] = {hidden, intermediate};
  auto g = weights(prefix + "gate_proj.weight", in_shape);
  if (!g) return g.error();
  auto u = weights(prefix + "up_proj.weight", in_shape);
  if (!u) return u.error();
  auto d = weights(prefix + "down_proj.weight", out_shape);
  if (!d) return d.error();
  m.gate_ = *g;
  m.up_ = *u;
  m.down_ = *d;
  return m;
}

caf::error mlp_block::forward(const float* x, size_t rows, float* y, float beta,
                              mlp_scratch& s) const {
  if (rows == 0) return {};
  const size_t D = hidden_, I = intermediate_;
  if (s.gate.size() < rows * I) s.gate.resize(rows * I);
  if (s.up.size() < rows * I) s.up.resize(rows * I);
  using kernels::kernel_status;
  namespace kc = kernels::cpu;
  if (kc::linear(x, gate_, s.gate.data(), rows, D, I) != kernel_status::ok ||
      kc::linear(x, up_, s.up.data(), rows, D, I) != kernel_status::ok ||
      kc::swiglu(s.gate.data(), s.up.data(), s.gate.data(), rows, I) != kernel_status::ok ||
      kc::linear(s.gate.data(), down_, y, rows, I, D, beta) != kernel_status::ok) {
    return make_error(model_errc::kernel_failed, "mlp: a kernel rejected its arguments");
  }
  return {};
}

}  // namespace moe::model
