// The bookkeeping of a paged KV cache, without the cache itself: which fixed-size blocks each
// sequence owns, and where (slot = block_id * block_size + offset) each of its tokens lives.
// latent_cache (host pools) and the GPU engine's device cache (engine/gpu_engine.hpp) both page
// their storage through it, so a block table means the same thing on either side.
//
// Ownership: owns only the ids. Thread safety: confined to the owner of the cache.
// Invariant: every block id in [0, num_blocks) is either free or owned by exactly one sequence.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "base/error.hpp"

namespace moe::model {

class cache_block_allocator {
 public:
  /// num_blocks > 0 and block_size > 0 (asserted).
  cache_block_allocator(int64_t num_blocks, int64_t block_size);

  /// Blocks of `block_size` tokens that `num_tokens` tokens take (the rule reserve follows), for
  /// callers that plan over several allocators.
  [[nodiscard]] static constexpr int64_t blocks_for(int64_t num_tokens,
                                                    int64_t block_size) noexcept {
    return (num_tokens + block_size - 1) / block_size;
  }

  /// Makes room for `seq` to hold `num_tokens` tokens (allocating blocks as needed).
  /// model_errc::cache_full (transient: retry when other sequences finish) when not enough
  /// free blocks remain; nothing is allocated then.
  [[nodiscard]] caf::error reserve(uint64_t seq, int64_t num_tokens);
  /// Tokens `seq` has room for, 0 for an unknown sequence.
  [[nodiscard]] int64_t capacity(uint64_t seq) const noexcept;
  /// The slot of token `pos` of `seq` (block_id * block_size + offset); requires pos < capacity.
  [[nodiscard]] int64_t slot(uint64_t seq, int64_t pos) const;
  /// The block ids of `seq`, in order; requires contains(seq).
  [[nodiscard]] const std::vector<int32_t>& blocks(uint64_t seq) const;
  /// Frees every block of `seq`; unknown sequences are ignored.
  void release(uint64_t seq);

  [[nodiscard]] int64_t num_blocks() const noexcept { return num_blocks_; }
  [[nodiscard]] int64_t block_size() const noexcept { return block_size_; }
  [[nodiscard]] int64_t num_free_blocks() const noexcept {
    return static_cast<int64_t>(free_.size());
  }
  [[nodiscard]] bool contains(uint64_t seq) const noexcept { return owned_.count(seq) != 0; }

 private:
  int64_t num_blocks_ = 0;
  int64_t block_size_ = 0;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<uint64_t, std::vector<int32_t>> owned_;
};

}  // namespace moe::model
