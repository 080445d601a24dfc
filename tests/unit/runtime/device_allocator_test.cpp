// The caching device allocator's rules (device_allocator.hpp), over a fake memory source that
// hands out host addresses and can run out: no GPU needed. cuda_memory_source itself is tested
// in gpu_test.cpp.
#include "runtime/device_allocator.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <thread>
#include <vector>

using namespace moe;
using namespace moe::runtime;

namespace {

constexpr size_t KiB = 1024;
constexpr size_t MiB = 1024 * 1024;

// Hands out distinct fake addresses (never dereferenced) up to `capacity` bytes, and records
// what is outstanding so the test can see every block come back.
struct fake_source_state {
  size_t capacity = SIZE_MAX;
  size_t outstanding = 0;
  std::map<void*, size_t> live;
  uintptr_t next = 0x1000;
  bool fail_otherwise = false;
  int allocations = 0;
  int releases = 0;
  std::mutex mutex;
};

class fake_source final : public device_memory_source {
 public:
  explicit fake_source(std::shared_ptr<fake_source_state> s) : s_(std::move(s)) {}
  caf::expected<void*> allocate(size_t n) override {
    std::lock_guard lock{s_->mutex};
    if (s_->fail_otherwise) return make_error(device_memory_errc::failed, "fake: driver gone");
    if (n > s_->capacity - s_->outstanding) return make_error(device_memory_errc::out_of_memory, "fake: full");
    auto* p = reinterpret_cast<void*>(s_->next);
    s_->next += n + 4096;
    s_->outstanding += n;
    s_->live.emplace(p, n);
    ++s_->allocations;
    return p;
  }
  void release(void* p, size_t n) noexcept override {
    std::lock_guard lock{s_->mutex};
    auto it = s_->live.find(p);
    ASSERT_NE(it, s_->live.end()) << "released a block the source never gave";
    EXPECT_EQ(it->second, n) << "released with another size than allocated";
    s_->outstanding -= it->second;
    s_->live.erase(it);
    ++s_->releases;
  }

 private:
  std::shared_ptr<fake_source_state> s_;
};

struct fixture {
  std::shared_ptr<fake_source_state> state = std::make_shared<fake_source_state>();
  std::unique_ptr<caching_device_allocator> alloc;
  explicit fixture(size_t capacity = SIZE_MAX, device_allocator_options o = {}) {
    state->capacity = capacity;
    alloc = std::make_unique<caching_device_allocator>(std::make_unique<fake_source>(state), o);
  }
};

bool is_oom(const caf::error& e) {
  return e.category() == caf::atom("devmem") && e.code() == static_cast<uint8_t>(device_memory_errc::out_of_memory);
}

}  // namespace

TEST(device_allocator, rounds_small_sizes_to_512_bytes_and_large_ones_to_2_mib) {
  EXPECT_EQ(caching_device_allocator::round_size(0), 0u);
  EXPECT_EQ(caching_device_allocator::round_size(1), 512u);
  EXPECT_EQ(caching_device_allocator::round_size(512), 512u);
  EXPECT_EQ(caching_device_allocator::round_size(513), 1024u);
  EXPECT_EQ(caching_device_allocator::round_size(MiB - 1), MiB);
  EXPECT_EQ(caching_device_allocator::round_size(MiB), 2 * MiB);
  EXPECT_EQ(caching_device_allocator::round_size(3 * MiB + 1), 4 * MiB);
  EXPECT_EQ(caching_device_allocator::round_size(SIZE_MAX), 0u) << "wraps: reported as too large";
}

TEST(device_allocator, a_freed_block_is_reused_on_its_stream_without_asking_the_source) {
  fixture f;
  void* first = nullptr;
  {
    auto a = f.alloc->allocate(3000, 7);
    ASSERT_TRUE(a) << error_text(a.error());
    EXPECT_EQ(a->size_bytes(), 3072u);
    EXPECT_EQ(a->stream(), 7u);
    first = a->data();
    EXPECT_EQ(f.alloc->stats().bytes_in_use, 3072u);
  }
  auto s = f.alloc->stats();
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_cached, 3072u);
  auto b = f.alloc->allocate(2900, 7);  // same size class
  ASSERT_TRUE(b);
  EXPECT_EQ(b->data(), first);
  s = f.alloc->stats();
  EXPECT_EQ(s.num_allocations, 2u);
  EXPECT_EQ(s.num_cache_hits, 1u);
  EXPECT_EQ(s.num_source_allocations, 1u);
  EXPECT_EQ(f.state->allocations, 1);
}

TEST(device_allocator, a_block_is_not_reused_on_another_stream) {
  fixture f;
  void* on7 = nullptr;
  {
    auto a = f.alloc->allocate(4096, 7);
    ASSERT_TRUE(a);
    on7 = a->data();
  }
  auto b = f.alloc->allocate(4096, 8);
  ASSERT_TRUE(b);
  EXPECT_NE(b->data(), on7) << "stream 8 could run before stream 7's last use of the block";
  EXPECT_EQ(f.alloc->stats().num_cache_hits, 0u);
  auto c = f.alloc->allocate(4096, 7);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->data(), on7);
}

TEST(device_allocator, best_fit_takes_the_smallest_block_that_fits_and_never_one_over_twice_the_size) {
  fixture f;
  void* p4k = nullptr;
  void* p8k = nullptr;
  {
    auto a = f.alloc->allocate(4 * KiB);
    auto b = f.alloc->allocate(8 * KiB);
    ASSERT_TRUE(a && b);
    p4k = a->data();
    p8k = b->data();
  }
  auto small = f.alloc->allocate(1 * KiB);  // 4 KiB is more than twice 1 KiB: not taken
  ASSERT_TRUE(small);
  EXPECT_NE(small->data(), p4k);
  EXPECT_NE(small->data(), p8k);
  auto mid = f.alloc->allocate(3 * KiB);  // fits 4 KiB (the smallest) and 8 KiB is over twice
  ASSERT_TRUE(mid);
  EXPECT_EQ(mid->data(), p4k);
  EXPECT_EQ(mid->size_bytes(), 4 * KiB) << "the block's own size, not the request's";
  auto big = f.alloc->allocate(5 * KiB);
  ASSERT_TRUE(big);
  EXPECT_EQ(big->data(), p8k);
  EXPECT_EQ(f.alloc->stats().bytes_in_use, 1 * KiB + 4 * KiB + 8 * KiB);
}

TEST(device_allocator, out_of_memory_empties_the_cache_and_retries_once) {
  fixture f(10 * MiB);
  { auto a = f.alloc->allocate(8 * MiB, 1); ASSERT_TRUE(a); }
  EXPECT_EQ(f.alloc->stats().bytes_cached, 8 * MiB);
  auto b = f.alloc->allocate(4 * MiB, 2);  // 8 + 4 > 10: the cached 8 MiB must go back first
  ASSERT_TRUE(b) << error_text(b.error());
  auto s = f.alloc->stats();
  EXPECT_EQ(s.num_oom_retries, 1u);
  EXPECT_EQ(s.bytes_cached, 0u);
  EXPECT_EQ(s.bytes_in_use, 4 * MiB);
  EXPECT_EQ(f.state->outstanding, 4 * MiB);
}

TEST(device_allocator, out_of_memory_with_nothing_cached_is_a_transient_error_naming_the_sizes) {
  fixture f(10 * MiB);
  auto a = f.alloc->allocate(6 * MiB);
  ASSERT_TRUE(a);
  auto b = f.alloc->allocate(6 * MiB);
  ASSERT_FALSE(b);
  EXPECT_TRUE(is_oom(b.error())) << error_text(b.error());
  EXPECT_NE(error_text(b.error()).find("6291456 bytes"), std::string::npos) << error_text(b.error());
  EXPECT_NE(error_text(b.error()).find("in use"), std::string::npos) << error_text(b.error());
  EXPECT_EQ(f.alloc->stats().num_oom_retries, 0u);
  auto huge = f.alloc->allocate(SIZE_MAX);
  ASSERT_FALSE(huge);
  EXPECT_TRUE(is_oom(huge.error())) << error_text(huge.error());
  // The failures changed nothing: the first block is intact and comes back.
  a->reset();
  EXPECT_EQ(f.alloc->stats().bytes_in_use, 0u);
  EXPECT_EQ(f.alloc->stats().bytes_cached, 6 * MiB);
}

TEST(device_allocator, another_source_failure_is_passed_on_without_emptying_the_cache) {
  fixture f;
  { auto a = f.alloc->allocate(KiB); ASSERT_TRUE(a); }
  f.state->fail_otherwise = true;
  auto b = f.alloc->allocate(MiB);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code(), static_cast<uint8_t>(device_memory_errc::failed));
  EXPECT_NE(error_text(b.error()).find("driver gone"), std::string::npos);
  EXPECT_EQ(f.alloc->stats().bytes_cached, KiB);
  // The cache still serves what it holds.
  auto c = f.alloc->allocate(KiB);
  EXPECT_TRUE(c);
}

TEST(device_allocator, the_cache_keeps_at_most_max_cached_bytes) {
  device_allocator_options o;
  o.max_cached_bytes = 3 * KiB;
  fixture f(SIZE_MAX, o);
  {
    auto a = f.alloc->allocate(2 * KiB);
    auto b = f.alloc->allocate(2 * KiB);
    ASSERT_TRUE(a && b);
  }
  auto s = f.alloc->stats();
  EXPECT_EQ(s.bytes_cached, 2 * KiB);
  EXPECT_EQ(s.num_source_releases, 1u);
  EXPECT_EQ(f.state->outstanding, 2 * KiB);
  f.alloc->empty_cache();
  EXPECT_EQ(f.alloc->stats().bytes_cached, 0u);
  EXPECT_EQ(f.state->outstanding, 0u);
}

TEST(device_allocator, allocations_move_reset_and_zero_bytes_is_empty) {
  fixture f;
  auto zero = f.alloc->allocate(0);
  ASSERT_TRUE(zero);
  EXPECT_FALSE(*zero);
  EXPECT_EQ(f.alloc->stats().num_allocations, 0u);

  auto a = f.alloc->allocate(KiB);
  ASSERT_TRUE(a);
  device_allocation moved = std::move(*a);
  EXPECT_FALSE(*a);
  EXPECT_TRUE(moved);
  EXPECT_EQ(f.alloc->stats().bytes_in_use, KiB);
  device_allocation other;
  other = std::move(moved);
  EXPECT_EQ(f.alloc->stats().bytes_in_use, KiB) << "a move is not a free";
  other.reset();
  EXPECT_FALSE(other);
  EXPECT_EQ(f.alloc->stats().bytes_in_use, 0u);
  EXPECT_EQ(f.alloc->stats().peak_bytes_in_use, KiB);
  other.reset();  // twice is harmless
  EXPECT_EQ(f.alloc->stats().bytes_cached, KiB);
}

TEST(device_allocator, destruction_gives_every_cached_block_back) {
  fixture f;
  {
    std::vector<device_allocation> v;
    for (size_t i = 1; i <= 5; ++i) {
      auto a = f.alloc->allocate(i * 100 * KiB, i % 2);
      ASSERT_TRUE(a);
      v.push_back(std::move(*a));
    }
  }
  EXPECT_EQ(f.state->live.size(), 5u);
  f.alloc.reset();
  EXPECT_TRUE(f.state->live.empty());
  EXPECT_EQ(f.state->outstanding, 0u);
}

TEST(device_allocator, concurrent_threads_lose_no_block) {
  fixture f(64 * MiB);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::uniform_int_distribution<size_t> size(1, 3 * MiB);
      std::vector<device_allocation> held;
      for (int i = 0; i < 2000; ++i) {
        if (held.size() < 4 && rng() % 2) {
          auto a = f.alloc->allocate(size(rng), static_cast<stream_key>(t % 2));
          // 4 threads x 4 blocks x 4 MiB fit: never out of memory.
          ASSERT_TRUE(a) << error_text(a.error());
          held.push_back(std::move(*a));
        } else if (!held.empty()) {
          held.erase(held.begin() + static_cast<long>(rng() % held.size()));
        }
      }
    });
  for (auto& t : threads) t.join();
  const auto s = f.alloc->stats();
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_cached, f.state->outstanding);
  EXPECT_GT(s.num_cache_hits, 0u);
  EXPECT_EQ(s.num_source_allocations - s.num_source_releases, f.state->live.size());
}
