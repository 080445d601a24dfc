#include "model/latent_cache.hpp"

#include "base/assert.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

latent_cache::latent_cache(int64_t num_layers, int64_t latent_dim, int64_t rope_dim,
                           const latent_cache_options& options) {
  MOE_ASSERT(num_layers > 0 && latent_dim > 0 && rope_dim > 0);
  MOE_ASSERT(options.num_blocks > 0 && options.block_size > 0);
  layout_.num_blocks = static_cast<size_t>(options.num_blocks);
  layout_.block_size = static_cast<size_t>(options.block_size);
  layout_.latent_dim = static_cast<size_t>(latent_dim);
  layout_.rope_dim = static_cast<size_t>(rope_dim);
  const size_t pool_floats = layout_.num_blocks * layout_.block_size * (layout_.latent_dim +
                                                                        layout_.rope_dim);
  pools_.assign(static_cast<size_t>(num_layers), std::vector<float>(pool_floats, 0.0f));
  free_.reserve(layout_.num_blocks);
  for (int64_t b = options.num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

caf::error latent_cache::reserve(uint64_t seq, int64_t num_tokens) {
  auto& owned = owned_[seq];
  const int64_t bs = block_size();
  const int64_t needed = (num_tokens + bs - 1) / bs - static_cast<int64_t>(owned.size());
  if (needed <= 0) return {};
  if (needed > num_free_blocks()) {
    if (owned.empty()) owned_.erase(seq);
    return make_error(model_errc::cache_full,
                      "latent cache: " + std::to_string(needed) + " more blocks needed, " +
                          std::to_string(num_free_blocks()) + " free");
  }
  for (int64_t i = 0; i < needed; ++i) {
    owned.push_back(free_.back());
    free_.pop_back();
  }
  return {};
}

int64_t latent_cache::capacity(uint64_t seq) const noexcept {
  auto it = owned_.find(seq);
  return it == owned_.end() ? 0 : static_cast<int64_t>(it->second.size()) * block_size();
}

int64_t latent_cache::slot(uint64_t seq, int64_t pos) const {
  const auto& owned = owned_.at(seq);
  const int64_t bs = block_size();
  MOE_ASSERT(pos >= 0 && pos / bs < static_cast<int64_t>(owned.size()));
  return static_cast<int64_t>(owned[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
}

const std::vector<int32_t>& latent_cache::blocks(uint64_t seq) const { return owned_.at(seq); }

void latent_cache::release(uint64_t seq) {
  auto it = owned_.find(seq);
  if (it == owned_.end()) return;
  for (auto b : it->second) free_.push_back(b);
  owned_.erase(it);
}

}  // namespace moe::model
