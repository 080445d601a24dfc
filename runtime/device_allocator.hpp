// A caching allocator for device memory: the GPU engine allocates activations, workspaces and
// caches many times per step, and cudaMalloc/cudaFree are slow and synchronise the device, so
// freed blocks are kept and handed out again instead.
//
// Memory comes from a device_memory_source (cudaMalloc on one device in production:
// cuda_memory.hpp's cuda_memory_source; a fake in tests), never managed memory.
// Rules:
//  - Sizes are rounded up: to 512 bytes below 1 MiB (small blocks), to 2 MiB from 1 MiB on, so
//    that a freed block fits the next request of the same shape.
//  - A block is reused only on the stream it was last used on: work queued on that stream before
//    the free runs before any work queued after the reuse (stream order), so no event or sync is
//    needed. Cross-stream reuse would need an event per block; a block wanted on another stream
//    comes from the source instead.
//  - Best fit among the stream's free blocks, but never a block more than twice the rounded
//    request (bounded waste; blocks are not split).
//  - When the source is out of memory, every cached block is given back and the allocation is
//    tried once more; then it fails with device_memory_errc::out_of_memory, naming the sizes.
//  - max_cached_bytes bounds what the cache keeps; a free beyond it goes back to the source.
//
// Ownership: a device_allocation owns its block (move-only) and returns it to the allocator in
// its destructor; the allocator must outlive every allocation it made (asserted). The allocator
// owns its free blocks and gives them back to the source in empty_cache() and its destructor.
// Thread safety: every member function may be called from any thread (one mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "base/error.hpp"

namespace moe::runtime {

enum class device_memory_errc : uint8_t {
  out_of_memory = 1,  ///< Transient: retry after memory is freed.
  failed,             ///< Permanent: the source failed otherwise (the text says how).
};

[[nodiscard]] caf::error make_error(device_memory_errc code, std::string text);

/// Where device memory comes from. Implementations report exhaustion as
/// device_memory_errc::out_of_memory so that the allocator knows to empty its cache and retry.
class device_memory_source {
 public:
  virtual ~device_memory_source() = default;
  [[nodiscard]] virtual caf::expected<void*> allocate(size_t size_bytes) = 0;
  virtual void release(void* p, size_t size_bytes) noexcept = 0;
};

/// Opaque stream identity (a cudaStream_t's value); 0 is the default stream.
using stream_key = uintptr_t;

struct device_allocator_stats {
  size_t bytes_in_use = 0;        ///< Rounded sizes of live allocations.
  size_t bytes_cached = 0;        ///< Free blocks held for reuse.
  size_t peak_bytes_in_use = 0;
  uint64_t num_allocations = 0;   ///< allocate() calls that succeeded.
  uint64_t num_cache_hits = 0;    ///< ...of which a cached block served.
  uint64_t num_source_allocations = 0;
  uint64_t num_source_releases = 0;
  uint64_t num_oom_retries = 0;   ///< Times the cache was emptied because the source ran out.
};

struct device_allocator_options {
  size_t max_cached_bytes = SIZE_MAX;
};

class caching_device_allocator;

/// A block of device memory of at least the requested size. Empty when default-constructed
/// or moved from.
class device_allocation {
 public:
  device_allocation() = default;
  device_allocation(device_allocation&& other) noexcept { *this = std::move(other); }
  device_allocation& operator=(device_allocation&& other) noexcept;
  device_allocation(const device_allocation&) = delete;
  device_allocation& operator=(const device_allocation&) = delete;
  ~device_allocation() { reset(); }

  [[nodiscard]] void* data() const noexcept { return ptr_; }
  /// The rounded size: at least what was asked for.
  [[nodiscard]] size_t size_bytes() const noexcept { return size_bytes_; }
  [[nodiscard]] stream_key stream() const noexcept { return stream_; }
  [[nodiscard]] explicit operator bool() const noexcept { return ptr_ != nullptr; }
  /// Returns the block to the allocator now.
  void reset() noexcept;

 private:
  friend class caching_device_allocator;
  device_allocation(caching_device_allocator* owner, void* p, size_t n, stream_key s) noexcept
      : owner_(owner), ptr_(p), size_bytes_(n), stream_(s) {}
  caching_device_allocator* owner_ = nullptr;
  void* ptr_ = nullptr;
  size_t size_bytes_ = 0;
  stream_key stream_ = 0;
};

class caching_device_allocator {
 public:
  explicit caching_device_allocator(std::unique_ptr<device_memory_source> source,
                                    device_allocator_options options = {});
  caching_device_allocator(const caching_device_allocator&) = delete;
  caching_device_allocator& operator=(const caching_device_allocator&) = delete;
  /// Gives every cached block back; asserts that no allocation is still alive.
  ~caching_device_allocator();

  /// A block of at least `size_bytes` (0 gives an empty allocation) for use on `stream`.
  [[nodiscard]] caf::expected<device_allocation> allocate(size_t size_bytes, stream_key stream = 0);
  /// Gives every cached (free) block back to the source.
  void empty_cache();
  [[nodiscard]] device_allocator_stats stats() const;

  /// The size a request is rounded up to.
  [[nodiscard]] static size_t round_size(size_t size_bytes) noexcept;

 private:
  friend class device_allocation;
  void give_back(void* p, size_t size_bytes, stream_key stream) noexcept;
  void release_all_cached_locked() noexcept;

  std::unique_ptr<device_memory_source> source_;
  device_allocator_options options_;
  mutable std::mutex mutex_;
  /// Free blocks by (stream, rounded size); several blocks may share a key.
  std::multimap<std::pair<stream_key, size_t>, void*> free_;
  device_allocator_stats stats_;
};

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::device_memory_errc, "devmem")
