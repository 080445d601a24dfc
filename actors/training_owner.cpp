#include "actors/training_owner.hpp"

#include <algorithm>
#include <cstring>
#include <set>
#include <string_view>

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

namespace {

// Where one parameter sits in an owner_state's flat tensors.
struct entry_span {
  size_t name = 0;  // index into names
  size_t at = 0, count = 0;
  std::optional<size_t> moments_at;  // into the packed moments (4 floats per value: m then v)
};

// Every entry's place, checked against the tensors' sizes.
caf::expected<std::vector<entry_span>> locate(const owner_state& s) {
  auto bad = [](std::string text) { return model::make_error(model::model_errc::bad_input, "owner state: " + std::move(text)); };
  if (s.names.size() != s.shapes.size() || s.names.size() != s.has_moments.size() || !s.values.local ||
      !s.moments.local)
    return bad("names, shapes and moment flags differ in number, or a tensor is missing");
  std::vector<entry_span> out;
  size_t at = 0, mat = 0;
  const size_t values = s.values.local->size(), packed = s.moments.local->size();
  for (size_t i = 0; i < s.names.size(); ++i) {
    int64_t n = 1;
    for (auto d : s.shapes[i]) {
      if (d < 0 || (d > 0 && n > (int64_t{1} << 40) / d)) return bad("the shape of " + s.names[i] + " is out of range");
      n *= d;
    }
    entry_span e{i, at, static_cast<size_t>(n), std::nullopt};
    if (at + e.count > values) return bad("values end before " + s.names[i]);
    at += e.count;
    if (s.has_moments[i]) {
      if (mat + 4 * e.count > packed) return bad("moments end before " + s.names[i]);
      e.moments_at = mat;
      mat += 4 * e.count;
    }
    out.push_back(e);
  }
  if (at != values || mat != packed) return bad("more values or moments than the names describe");
  return out;
}

model::adamw::moments moments_at(const owner_state& s, const entry_span& e) {
  model::adamw::moments m;
  m.m.resize(e.count);
  m.v.resize(e.count);
  const float* packed = s.moments.local->data() + *e.moments_at;
  std::memcpy(m.m.data(), packed, e.count * sizeof(double));
  std::memcpy(m.v.data(), packed + 2 * e.count, e.count * sizeof(double));
  return m;
}

}  // namespace

caf::expected<owner_state> merge_owner_states(const std::vector<owner_state>& states) {
  owner_state out;
  std::vector<float> values, moments;
  std::set<std::string, std::less<>> seen;
  for (const auto& s : states) {
    auto spans = locate(s);
    if (!spans) return std::move(spans.error());
    for (const auto& e : *spans) {
      if (!seen.insert(s.names[e.name]).second) continue;
      out.names.push_back(s.names[e.name]);
      out.shapes.push_back(s.shapes[e.name]);
      out.has_moments.push_back(e.moments_at.has_value());
      const float* v = s.values.local->data() + e.at;
      values.insert(values.end(), v, v + e.count);
      if (e.moments_at) {
        const float* m = s.moments.local->data() + *e.moments_at;
        moments.insert(moments.end(), m, m + 4 * e.count);
      }
    }
  }
  out.optimizer_steps = states.empty() ? 0 : states.front().optimizer_steps;
  const auto n = static_cast<int64_t>(values.size()), k = static_cast<int64_t>(moments.size());
  out.values = tensor_ref::wrap(std::move(values), {n});
  out.moments = tensor_ref::wrap(std::move(moments), {k});
  return out;
}

caf::error training_owner::restore(const owner_state& snapshot, std::span<const restore_target> targets,
                                   const model::adamw_options& options) {
  auto spans = locate(snapshot);
  if (!spans) return std::move(spans.error());
  std::map<std::string_view, const entry_span*> by_name;
  for (const auto& e : *spans) by_name.emplace(snapshot.names[e.name], &e);
  std::vector<const entry_span*> found;
  for (const auto& t : targets) {
    auto it = by_name.find(t.name);
    if (it == by_name.end())
      return model::make_error(model::model_errc::bad_input, "training rollback: the snapshot has no " + t.name);
    if (it->second->count != t.values.size())
      return model::make_error(model::model_errc::bad_input,
                               "training rollback: the snapshot holds " + std::to_string(it->second->count) +
                                   " values of " + t.name + ", not " + std::to_string(t.values.size()));
    found.push_back(it->second);
  }
  std::map<std::string, model::adamw::moments, std::less<>> moments;
  for (size_t i = 0; i < targets.size(); ++i) {
    const float* v = snapshot.values.local->data() + found[i]->at;
    std::copy_n(v, found[i]->count, targets[i].values.begin());
    if (found[i]->moments_at) moments.emplace(targets[i].name, moments_at(snapshot, *found[i]));
  }
  if (snapshot.optimizer_steps == 0 && moments.empty()) {
    optimizer_.reset();
  } else {
    optimizer_.emplace(options);
    optimizer_->restore(snapshot.optimizer_steps, std::move(moments));
  }
  return {};
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
