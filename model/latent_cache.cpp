#include "model/latent_cache.hpp"

#include "base/assert.hpp"

namespace moe::model {

latent_cache::latent_cache(int64_t num_layers, int64_t latent_dim, int64_t rope_dim,
                           const latent_cache_options& options)
    : blocks_(options.num_blocks, options.block_size) {
  MOE_ASSERT(num_layers > 0 && latent_dim > 0 && rope_dim > 0);
  layout_.num_blocks = static_cast<size_t>(options.num_blocks);
  layout_.block_size = static_cast<size_t>(options.block_size);
  layout_.latent_dim = static_cast<size_t>(latent_dim);
  layout_.rope_dim = static_cast<size_t>(rope_dim);
  const size_t pool_floats = layout_.num_blocks * layout_.block_size * (layout_.latent_dim +
                                                                        layout_.rope_dim);
  pools_.assign(static_cast<size_t>(num_layers), std::vector<float>(pool_floats, 0.0f));
}

}  // namespace moe::model
