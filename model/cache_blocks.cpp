#include "model/cache_blocks.hpp"

#include <string>

#include "base/assert.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

cache_block_allocator::cache_block_allocator(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  MOE_ASSERT(num_blocks > 0 && block_size > 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

caf::error cache_block_allocator::reserve(uint64_t seq, int64_t num_tokens) {
  auto& owned = owned_[seq];
  const int64_t needed = blocks_for(num_tokens, block_size_) - static_cast<int64_t>(owned.size());
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

int64_t cache_block_allocator::capacity(uint64_t seq) const noexcept {
  auto it = owned_.find(seq);
  return it == owned_.end() ? 0 : static_cast<int64_t>(it->second.size()) * block_size_;
}

int64_t cache_block_allocator::slot(uint64_t seq, int64_t pos) const {
  const auto& owned = owned_.at(seq);
  MOE_ASSERT(pos >= 0 && pos / block_size_ < static_cast<int64_t>(owned.size()));
  return static_cast<int64_t>(owned[static_cast<size_t>(pos / block_size_)]) * block_size_ +
         pos % block_size_;
}

const std::vector<int32_t>& cache_block_allocator::blocks(uint64_t seq) const {
  return owned_.at(seq);
}

void cache_block_allocator::release(uint64_t seq) {
  auto it = owned_.find(seq);
  if (it == owned_.end()) return;
  for (auto b : it->second) free_.push_back(b);
  owned_.erase(it);
}

}  // namespace moe::model
