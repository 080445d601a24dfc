// RAII owners of CUDA handles: device buffers, pinned host buffers, streams and events, and the
// cudaMalloc source of the caching allocator (device_allocator.hpp). Only built with the CUDA
// backend.
//
// Ownership: each object owns its handle exclusively (move-only) and releases it in its
// destructor. Thread safety: none beyond CUDA's own; an owner is used by one thread at a time
// (cuda_memory_source excepted: CUDA's allocation calls are thread-safe).
#pragma once

#ifdef MOE_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>

#include "base/error.hpp"
#include "runtime/device_allocator.hpp"

namespace moe::runtime {

enum class cuda_errc : uint8_t {
  no_device = 1,  ///< Permanent for this process: no driver or no GPU.
  out_of_memory,  ///< Transient: retry after memory is freed.
  failed,         ///< Permanent: any other CUDA error (the text names it).
};

[[nodiscard]] caf::error make_error(cuda_errc code, std::string text);
/// Turns a CUDA status into an error naming `what`; cudaSuccess gives an empty error.
[[nodiscard]] caf::error cuda_error(cudaError_t status, const char* what);

struct cuda_free_deleter {
  void operator()(void* p) const noexcept { cudaFree(p); }
};
struct cuda_stream_deleter {
  void operator()(cudaStream_t s) const noexcept { cudaStreamDestroy(s); }
};
struct cuda_host_deleter {
  void operator()(void* p) const noexcept { cudaFreeHost(p); }
};
struct cuda_event_deleter {
  void operator()(cudaEvent_t e) const noexcept { cudaEventDestroy(e); }
};

/// Untyped device allocation of `size_bytes()` bytes.
class device_buffer {
 public:
  device_buffer() = default;
  [[nodiscard]] static caf::expected<device_buffer> allocate(size_t size_bytes);

  [[nodiscard]] void* data() const noexcept { return ptr_.get(); }
  [[nodiscard]] size_t size_bytes() const noexcept { return size_bytes_; }

  caf::error copy_from_host(const void* src, size_t n, cudaStream_t s = nullptr);
  caf::error copy_to_host(void* dst, size_t n, cudaStream_t s = nullptr) const;

 private:
  std::unique_ptr<void, cuda_free_deleter> ptr_;
  size_t size_bytes_ = 0;
};

/// Page-locked host memory (cudaHostAlloc): the only host memory that an asynchronous copy
/// really overlaps with kernels (a pageable buffer makes cudaMemcpyAsync stage and block).
class pinned_host_buffer {
 public:
  pinned_host_buffer() = default;
  [[nodiscard]] static caf::expected<pinned_host_buffer> allocate(size_t size_bytes);

  [[nodiscard]] void* data() const noexcept { return ptr_.get(); }
  [[nodiscard]] size_t size_bytes() const noexcept { return size_bytes_; }

 private:
  std::unique_ptr<void, cuda_host_deleter> ptr_;
  size_t size_bytes_ = 0;
};

/// Queues a copy of n bytes on `s` (cudaMemcpyDefault: the direction comes from the pointers).
/// Returns when it is queued; synchronise the stream (or an event after it) before reading dst
/// on the host or reusing a pageable src.
caf::error copy_async(void* dst, const void* src, size_t n, cudaStream_t s);

/// cudaMalloc on one device: the production source of caching_device_allocator. cudaMalloc's
/// out-of-memory becomes device_memory_errc::out_of_memory (the allocator then empties its cache
/// and retries); any other failure device_memory_errc::failed, with CUDA's text.
class cuda_memory_source final : public device_memory_source {
 public:
  explicit cuda_memory_source(int device) noexcept : device_(device) {}
  [[nodiscard]] caf::expected<void*> allocate(size_t size_bytes) override;
  void release(void* p, size_t size_bytes) noexcept override;

 private:
  int device_;
};

class cuda_stream {
 public:
  [[nodiscard]] static caf::expected<cuda_stream> create();
  [[nodiscard]] cudaStream_t get() const noexcept { return stream_.get(); }
  caf::error synchronize() const;

 private:
  std::unique_ptr<std::remove_pointer_t<cudaStream_t>, cuda_stream_deleter> stream_;
};

/// A CUDA event: ordering between streams (a stream waits for it) and GPU-side timing.
class cuda_event {
 public:
  /// `timing`: whether elapsed_ms may be asked of it (timing events cost a little more).
  [[nodiscard]] static caf::expected<cuda_event> create(bool timing = false);
  [[nodiscard]] cudaEvent_t get() const noexcept { return event_.get(); }
  caf::error record(cudaStream_t s);
  /// Makes `s` wait for the work recorded before this event (no host block).
  caf::error make_wait(cudaStream_t s) const;
  caf::error synchronize() const;
  /// Milliseconds between `start`'s record and this one's; both must be timing events and done.
  [[nodiscard]] caf::expected<float> elapsed_ms_since(const cuda_event& start) const;

 private:
  std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, cuda_event_deleter> event_;
};

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::cuda_errc, "cuda")

#endif  // MOE_HAVE_CUDA
