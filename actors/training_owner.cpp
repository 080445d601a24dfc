#include "actors/training_owner.hpp"

#include <algorithm>
#include <cstring>

#include "model/model_errc.hpp"

namespace moe::actors {

std::vector<float> flatten_grads(std::span<const std::span<float>> grads) {
  size_t n = 0;
  for (const auto& g : grads) n += g.size();
  std::vector<float> out;
  out.reserve(n);
  for (const auto& g : grads) out.insert(out.end(), g.begin(), g.end());
  return out;
}

double grads_norm_sq(std::span<const std::span<float>> grads) {
  double sum = 0;
  for (const auto& g : grads)
    for (float x : g) sum += static_cast<double>(x) * x;
  return sum;
}

caf::error unflatten_grads(std::span<const float> flat, std::span<const std::span<float>> grads) {
  size_t n = 0;
  for (const auto& g : grads) n += g.size();
  if (n != flat.size())
    return model::make_error(model::model_errc::bad_input, "training: " + std::to_string(flat.size()) +
                                                               " summed gradient values for " + std::to_string(n) +
                                                               " parameters");
  for (const auto& g : grads) {
    std::copy_n(flat.begin(), g.size(), g.begin());
    flat = flat.subspan(g.size());
  }
  return {};
}

caf::error training_owner::apply(const train_update& u, std::span<const model::parameter_ref> params,
                                 std::span<const std::span<float>> grads) {
  const model::adamw_options o{u.beta1, u.beta2, u.eps, u.weight_decay};
  if (!optimizer_) {
    optimizer_.emplace(o);
  } else {
    const auto& held = optimizer_->options();
    if (held.beta1 != o.beta1 || held.beta2 != o.beta2 || held.eps != o.eps || held.weight_decay != o.weight_decay)
      return model::make_error(model::model_errc::bad_input,
                               "training: AdamW's betas, eps and weight decay cannot change between steps");
  }
  // As clip_grad_norm: a factor of 1 or more leaves the gradients alone.
  if (u.grad_scale < 1.0)
    for (const auto& g : grads)
      for (float& x : g) x = static_cast<float>(x * u.grad_scale);
  return optimizer_->step(params, u.lr);
}

bool training_owner::adopt(std::map<std::string, model::adamw::moments, std::less<>> moments) {
  if (!optimizer_) return false;
  for (auto& [name, m] : moments) optimizer_->set_moments(name, std::move(m));
  return true;
}

caf::error export_owner_state(const tensor_transport& transport, const caf::node_id& here, const caf::node_id& dest,
                              owner_state& s) {
  const runtime::tensor_frame_meta meta{protocol::frame_kind::parameters, 0, 0, 0};
  if (auto err = export_tensor(transport, here, dest, s.values, meta)) return err;
  return export_tensor(transport, here, dest, s.moments, meta);
}

owner_state training_owner::state(std::span<const state_entry> entries) const {
  owner_state out;
  std::vector<float> values;
  std::vector<float> moments;
  auto put_doubles = [&moments](const std::vector<double>& v) {
    const size_t at = moments.size();
    moments.resize(at + 2 * v.size());
    std::memcpy(moments.data() + at, v.data(), v.size() * sizeof(double));
  };
  for (const auto& e : entries) {
    out.names.push_back(e.name);
    out.shapes.push_back(e.shape);
    values.insert(values.end(), e.values.begin(), e.values.end());
    const model::adamw::moments* m = nullptr;
    if (optimizer_) {
      auto it = optimizer_->state().find(e.name);
      if (it != optimizer_->state().end()) m = &it->second;
    }
    out.has_moments.push_back(m != nullptr);
    if (m) {
      put_doubles(m->m);
      put_doubles(m->v);
    }
  }
  const auto n = static_cast<int64_t>(values.size()), k = static_cast<int64_t>(moments.size());
  out.values = tensor_ref::wrap(std::move(values), {n});
  out.moments = tensor_ref::wrap(std::move(moments), {k});
  out.optimizer_steps = optimizer_ ? optimizer_->steps() : 0;
  return out;
}

caf::error unpack_owner_state(const owner_state& s, model::checkpoint& weights,
                              std::map<std::string, model::adamw::moments, std::less<>>& moments) {
  auto bad = [](std::string text) { return model::make_error(model::model_errc::bad_input, "owner state: " + std::move(text)); };
  if (s.names.size() != s.shapes.size() || s.names.size() != s.has_moments.size() || !s.values.local ||
      !s.moments.local)
    return bad("names, shapes and moment flags differ in number, or a tensor is missing");
  const auto& values = *s.values.local;
  const auto& packed = *s.moments.local;
  size_t at = 0, mat = 0;
  for (size_t i = 0; i < s.names.size(); ++i) {
    int64_t n = 1;
    for (auto d : s.shapes[i]) n *= d;
    const auto count = static_cast<size_t>(n);
    if (n < 0 || at + count > values.size()) return bad("values end before " + s.names[i]);
    const bool fresh = !weights.find(s.names[i]);
    if (fresh)
      weights.tensors.emplace(s.names[i], model::host_tensor(s.shapes[i], std::vector<float>(values.begin() + at, values.begin() + at + count)));
    at += count;
    if (!s.has_moments[i]) continue;
    if (mat + 4 * count > packed.size()) return bad("moments end before " + s.names[i]);
    model::adamw::moments m;
    m.m.resize(count);
    m.v.resize(count);
    std::memcpy(m.m.data(), packed.data() + mat, count * sizeof(double));
    std::memcpy(m.v.data(), packed.data() + mat + 2 * count, count * sizeof(double));
    mat += 4 * count;
    if (fresh) moments.emplace(s.names[i], std::move(m));
  }
  if (at != values.size() || mat != packed.size()) return bad("more values or moments than the names describe");
  return {};
}

}  // namespace moe::actors
