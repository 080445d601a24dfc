// Scratch buffers of model/'s blocks and engines: vectors that grow to the largest step seen and
// are then reused, so a block allocates only while its steps still grow. Internal to model/.
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <vector>

namespace moe::model::detail {

/// Grows a scratch buffer to at least n elements; never shrinks, so calls reuse it.
template <class T>
void ensure_size(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace moe::model::detail
