// A handle to a float32 tensor in an actor message: the tensor's shape and, between processes,
// the data plane's transfer id (actors/tensor_transport.hpp); within one process, a shared
// pointer to the immutable buffer itself, handed over without a copy and never serialised.
#pragma once

#include <caf/meta/type_name.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace moe::actors {

/// A handle to a float32 tensor. `local` is set only while the tensor stays in its process.
struct tensor_ref {
  std::vector<int64_t> shape;
  uint64_t transfer_id = 0;
  std::shared_ptr<const std::vector<float>> local;

  [[nodiscard]] const float* data() const noexcept { return local ? local->data() : nullptr; }
  [[nodiscard]] int64_t num_elements() const noexcept {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  /// Wraps an owned buffer (moved, not copied).
  [[nodiscard]] static tensor_ref wrap(std::vector<float> values, std::vector<int64_t> shape) {
    tensor_ref t;
    t.shape = std::move(shape);
    t.local = std::make_shared<const std::vector<float>>(std::move(values));
    return t;
  }
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, tensor_ref& x) {
  return f(caf::meta::type_name("tensor_ref"), x.shape, x.transfer_id);
}

}  // namespace moe::actors
