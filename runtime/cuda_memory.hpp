// RAII owners of CUDA handles: device buffers and streams. Only built with the CUDA backend.
//
// Ownership: each object owns its handle exclusively (move-only) and releases it in its
// destructor. Thread safety: none beyond CUDA's own; an owner is used by one thread at a time.
#pragma once

#ifdef MOE_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>

#include "base/error.hpp"

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

class cuda_stream {
 public:
  [[nodiscard]] static caf::expected<cuda_stream> create();
  [[nodiscard]] cudaStream_t get() const noexcept { return stream_.get(); }
  caf::error synchronize() const;

 private:
  std::unique_ptr<std::remove_pointer_t<cudaStream_t>, cuda_stream_deleter> stream_;
};

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::cuda_errc, "cuda")

#endif  // MOE_HAVE_CUDA
