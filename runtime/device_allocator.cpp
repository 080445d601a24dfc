#include "runtime/device_allocator.hpp"

#include <algorithm>
#include <string>

#include "base/assert.hpp"

namespace moe::runtime {

namespace {

constexpr size_t small_granularity = 512;
constexpr size_t large_threshold = size_t{1} << 20;
constexpr size_t large_granularity = size_t{2} << 20;

size_t round_up(size_t n, size_t to) noexcept {
  if (n > SIZE_MAX - (to - 1)) return 0;  // would wrap: the caller treats 0 as too large
  return (n + to - 1) / to * to;
}

}  // namespace

caf::error make_error(device_memory_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("devmem"), caf::make_message(std::move(text))};
}

device_allocation& device_allocation::operator=(device_allocation&& other) noexcept {
  if (this != &other) {
    reset();
    owner_ = std::exchange(other.owner_, nullptr);
    ptr_ = std::exchange(other.ptr_, nullptr);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
    stream_ = std::exchange(other.stream_, 0);
  }
  return *this;
}

void device_allocation::reset() noexcept {
  if (ptr_ && owner_) owner_->give_back(ptr_, size_bytes_, stream_);
  owner_ = nullptr;
  ptr_ = nullptr;
  size_bytes_ = 0;
  stream_ = 0;
}

caching_device_allocator::caching_device_allocator(std::unique_ptr<device_memory_source> source,
                                                   device_allocator_options options)
    : source_(std::move(source)), options_(options) {
  MOE_ASSERT(source_ != nullptr);
}

caching_device_allocator::~caching_device_allocator() {
  std::lock_guard lock{mutex_};
  // A live allocation would give its block back to a destroyed allocator.
  MOE_ASSERT(stats_.bytes_in_use == 0);
  release_all_cached_locked();
}

size_t caching_device_allocator::round_size(size_t size_bytes) noexcept {
  if (size_bytes == 0) return 0;
  return size_bytes < large_threshold ? round_up(size_bytes, small_granularity)
                                      : round_up(size_bytes, large_granularity);
}

caf::expected<device_allocation> caching_device_allocator::allocate(size_t size_bytes, stream_key stream) {
  if (size_bytes == 0) return device_allocation{};
  const size_t n = round_size(size_bytes);
  if (n == 0)
    return make_error(device_memory_errc::out_of_memory,
                      "device allocation of " + std::to_string(size_bytes) + " bytes: larger than any device");
  std::lock_guard lock{mutex_};
  auto note_allocation = [&](void* p, size_t block) {
    stats_.bytes_in_use += block;
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    ++stats_.num_allocations;
    return device_allocation{this, p, block, stream};
  };
  // Best fit on this stream, within twice the request.
  if (auto it = free_.lower_bound({stream, n});
      it != free_.end() && it->first.first == stream && it->first.second / 2 <= n) {
    const size_t block = it->first.second;
    void* p = it->second;
    free_.erase(it);
    stats_.bytes_cached -= block;
    ++stats_.num_cache_hits;
    return note_allocation(p, block);
  }
  auto p = source_->allocate(n);
  if (!p && p.error().category() == caf::atom("devmem") &&
      p.error().code() == static_cast<uint8_t>(device_memory_errc::out_of_memory) && !free_.empty()) {
    ++stats_.num_oom_retries;
    release_all_cached_locked();
    p = source_->allocate(n);
  }
  if (!p) {
    if (p.error().category() == caf::atom("devmem") &&
        p.error().code() == static_cast<uint8_t>(device_memory_errc::out_of_memory))
      return make_error(device_memory_errc::out_of_memory,
                        "device allocation of " + std::to_string(n) + " bytes failed with " +
                            std::to_string(stats_.bytes_in_use) + " bytes in use: " + error_text(p.error()));
    return std::move(p.error());
  }
  ++stats_.num_source_allocations;
  return note_allocation(*p, n);
}

void caching_device_allocator::give_back(void* p, size_t size_bytes, stream_key stream) noexcept {
  std::lock_guard lock{mutex_};
  MOE_ASSERT(stats_.bytes_in_use >= size_bytes);
  stats_.bytes_in_use -= size_bytes;
  if (stats_.bytes_cached + size_bytes > options_.max_cached_bytes) {
    source_->release(p, size_bytes);
    ++stats_.num_source_releases;
    return;
  }
  free_.emplace(std::make_pair(stream, size_bytes), p);
  stats_.bytes_cached += size_bytes;
}

void caching_device_allocator::empty_cache() {
  std::lock_guard lock{mutex_};
  release_all_cached_locked();
}

void caching_device_allocator::release_all_cached_locked() noexcept {
  for (auto& [key, p] : free_) {
    source_->release(p, key.second);
    ++stats_.num_source_releases;
  }
  free_.clear();
  stats_.bytes_cached = 0;
}

device_allocator_stats caching_device_allocator::stats() const {
  std::lock_guard lock{mutex_};
  return stats_;
}

}  // namespace moe::runtime
