// The compressed, paged latent KV cache of an attention shard: for every layer, per token, only
// the normed kv_lora_rank latent and the rotary key (kernels/cpu/mla_attention.hpp has the
// entry layout). Blocks of `block_size` tokens are shared by all layers: a sequence owns a list
// of block ids, and block b of layer l is pool(l) + b * block_size * (R + dr).
//
// Which blocks a sequence owns is cache_block_allocator's bookkeeping (cache_blocks.hpp).
// Ownership: owns the pools. Thread safety: confined to the attention shard that owns it.
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/mla_attention.hpp"
#include "model/cache_blocks.hpp"

namespace moe::model {

struct latent_cache_options {
  int64_t num_blocks = 256;
  int64_t block_size = 16;
};

/// The smallest cache of `block_size`-token blocks (block_size > 0) with room for `tokens`
/// tokens, and at least one block: how a shard turns its token budget
/// (scheduler::kv_cache_tokens_per_shard) into a cache.
[[nodiscard]] constexpr latent_cache_options latent_cache_holding(int64_t tokens,
                                                                  int64_t block_size = 16) {
  const int64_t blocks = tokens > 0 ? (tokens + block_size - 1) / block_size : 0;
  return {blocks > 0 ? blocks : 1, block_size};
}

class latent_cache {
 public:
  latent_cache(int64_t num_layers, int64_t latent_dim, int64_t rope_dim,
               const latent_cache_options& options);

  [[nodiscard]] const kernels::cpu::mla_cache_layout& layout() const noexcept { return layout_; }
  [[nodiscard]] float* pool(int64_t layer) noexcept { return pools_[layer].data(); }
  [[nodiscard]] const float* pool(int64_t layer) const noexcept { return pools_[layer].data(); }

  /// Makes room for `seq` to hold `num_tokens` tokens in all (allocating blocks as needed).
  /// model_errc::cache_full (transient: retry when other sequences finish) when not enough
  /// free blocks remain; nothing is allocated then.
  [[nodiscard]] caf::error reserve(uint64_t seq, int64_t num_tokens) {
    return blocks_.reserve(seq, num_tokens);
  }
  /// Tokens `seq` has room for, 0 for an unknown sequence.
  [[nodiscard]] int64_t capacity(uint64_t seq) const noexcept { return blocks_.capacity(seq); }
  /// The slot of token `pos` of `seq` (block_id * block_size + offset); requires pos < capacity.
  [[nodiscard]] int64_t slot(uint64_t seq, int64_t pos) const { return blocks_.slot(seq, pos); }
  /// The block ids of `seq`, in order.
  [[nodiscard]] const std::vector<int32_t>& blocks(uint64_t seq) const {
    return blocks_.blocks(seq);
  }
  /// Frees every block of `seq`; unknown sequences are ignored.
  void release(uint64_t seq) { blocks_.release(seq); }

  [[nodiscard]] int64_t num_free_blocks() const noexcept { return blocks_.num_free_blocks(); }
  [[nodiscard]] int64_t block_size() const noexcept { return blocks_.block_size(); }
  [[nodiscard]] bool contains(uint64_t seq) const noexcept { return blocks_.contains(seq); }

 private:
  kernels::cpu::mla_cache_layout layout_;
  std::vector<std::vector<float>> pools_;
  cache_block_allocator blocks_;
};

}  // namespace moe::model
