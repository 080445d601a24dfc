// The paged cache's bookkeeping (model/cache_blocks.hpp): reserve, slots, cache_full leaves
// nothing allocated, release returns blocks for reuse (most recently freed first); and a token
// budget as a cache (latent_cache_holding).
#include "model/cache_blocks.hpp"

#include <gtest/gtest.h>

#include "model/latent_cache.hpp"
#include "model/model_errc.hpp"

using moe::model::cache_block_allocator;

TEST(cache_block_allocator, reserves_whole_blocks_and_maps_positions_to_slots) {
  cache_block_allocator a(4, 8);
  EXPECT_EQ(a.num_free_blocks(), 4);
  ASSERT_FALSE(a.reserve(7, 9));  // two blocks
  EXPECT_EQ(a.capacity(7), 16);
  EXPECT_EQ(a.num_free_blocks(), 2);
  const auto& blocks = a.blocks(7);
  ASSERT_EQ(blocks.size(), 2u);
  EXPECT_EQ(a.slot(7, 0), blocks[0] * 8);
  EXPECT_EQ(a.slot(7, 8), blocks[1] * 8);
  EXPECT_EQ(a.slot(7, 15), blocks[1] * 8 + 7);
  ASSERT_FALSE(a.reserve(7, 16));  // already room
  EXPECT_EQ(a.num_free_blocks(), 2);
}

TEST(cache_block_allocator, a_full_cache_allocates_nothing_and_release_frees) {
  cache_block_allocator a(3, 4);
  ASSERT_FALSE(a.reserve(1, 8));
  const auto err = a.reserve(2, 8);
  ASSERT_TRUE(err);
  EXPECT_EQ(static_cast<moe::model::model_errc>(err.code()), moe::model::model_errc::cache_full);
  EXPECT_EQ(err.category(), caf::atom("model"));
  EXPECT_FALSE(a.contains(2));
  EXPECT_EQ(a.num_free_blocks(), 1);
  const int32_t last = a.blocks(1).back();
  a.release(1);
  a.release(99);  // unknown: ignored
  EXPECT_EQ(a.num_free_blocks(), 3);
  EXPECT_EQ(a.capacity(1), 0);
  ASSERT_FALSE(a.reserve(2, 1));
  EXPECT_EQ(a.blocks(2).front(), last);
}

TEST(latent_cache_holding, rounds_a_token_budget_up_to_whole_blocks_and_never_to_none) {
  using moe::model::latent_cache_holding;
  EXPECT_EQ(latent_cache_holding(32).num_blocks, 2);
  EXPECT_EQ(latent_cache_holding(33).num_blocks, 3);
  EXPECT_EQ(latent_cache_holding(33).block_size, 16);
  EXPECT_EQ(latent_cache_holding(1).num_blocks, 1);
  EXPECT_EQ(latent_cache_holding(0).num_blocks, 1);
  EXPECT_EQ(latent_cache_holding(-5).num_blocks, 1);
  const auto wide = latent_cache_holding(100, 64);
  EXPECT_EQ(wide.num_blocks, 2);
  EXPECT_EQ(wide.block_size, 64);
}
