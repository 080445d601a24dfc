// How a block finds its weights: by hub tensor name and expected shape, as float32 host memory.
//
// Blocks never own weights; whoever loaded them (a checkpoint, an expert group's replica set)
// does, and must outlive the blocks bound to it. Binding through a function keeps the blocks
// free of any particular storage, so an actor can bind a block to just the tensors it holds.
// Thread safety: a lookup is called only while binding, from the binding thread.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "base/error.hpp"

namespace moe::model {

/// Returns the float32 data of tensor `name`, which must have exactly `shape`;
/// otherwise a model_errc::missing_tensor / bad_tensor error naming the tensor.
using weight_lookup =
    std::function<caf::expected<const float*>(const std::string& name, std::span<const int64_t> shape)>;

}  // namespace moe::model

namespace moe::model {

struct checkpoint;

/// A lookup into a loaded checkpoint, which must outlive every block bound through it.
[[nodiscard]] weight_lookup lookup_in(const checkpoint& ckpt);

}  // namespace moe::model
