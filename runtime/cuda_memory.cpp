#include "runtime/cuda_memory.hpp"

#ifdef MOE_HAVE_CUDA

namespace moe::runtime {

caf::error make_error(cuda_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("cuda"),
                    caf::make_message(std::move(text))};
}

caf::error cuda_error(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return {};
  cudaGetLastError();
  std::string text = std::string(what) + ": " + cudaGetErrorName(status) + " (" +
                     cudaGetErrorString(status) + ")";
  switch (status) {
    case cudaErrorMemoryAllocation: return make_error(cuda_errc::out_of_memory, std::move(text));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver: return make_error(cuda_errc::no_device, std::move(text));
    default: return make_error(cuda_errc::failed, std::move(text));
  }
}

caf::expected<device_buffer> device_buffer::allocate(size_t size_bytes) {
  device_buffer b;
  void* p = nullptr;
  if (auto err = cuda_error(cudaMalloc(&p, size_bytes), "cudaMalloc")) return err;
  b.ptr_.reset(p);
  b.size_bytes_ = size_bytes;
  return b;
}

caf::error device_buffer::copy_from_host(const void* src, size_t n, cudaStream_t s) {
  if (n > size_bytes_) return make_error(cuda_errc::failed, "copy_from_host: beyond the buffer");
  if (auto err = cuda_error(cudaMemcpyAsync(data(), src, n, cudaMemcpyHostToDevice, s),
                            "cudaMemcpyAsync(host to device)"))
    return err;
  return cuda_error(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

caf::error device_buffer::copy_to_host(void* dst, size_t n, cudaStream_t s) const {
  if (n > size_bytes_) return make_error(cuda_errc::failed, "copy_to_host: beyond the buffer");
  if (auto err = cuda_error(cudaMemcpyAsync(dst, data(), n, cudaMemcpyDeviceToHost, s),
                            "cudaMemcpyAsync(device to host)"))
    return err;
  return cuda_error(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

caf::expected<pinned_host_buffer> pinned_host_buffer::allocate(size_t size_bytes) {
  pinned_host_buffer b;
  void* p = nullptr;
  if (auto err = cuda_error(cudaHostAlloc(&p, size_bytes, cudaHostAllocDefault), "cudaHostAlloc")) return err;
  b.ptr_.reset(p);
  b.size_bytes_ = size_bytes;
  return b;
}

caf::error copy_async(void* dst, const void* src, size_t n, cudaStream_t s) {
  return cuda_error(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, s), "cudaMemcpyAsync");
}

caf::expected<void*> cuda_memory_source::allocate(size_t size_bytes) {
  auto as_devmem = [](caf::error e) {
    const auto code = e.category() == caf::atom("cuda") &&
                              e.code() == static_cast<uint8_t>(cuda_errc::out_of_memory)
                          ? device_memory_errc::out_of_memory
                          : device_memory_errc::failed;
    return make_error(code, error_text(e));
  };
  if (auto err = cuda_error(cudaSetDevice(device_), "cudaSetDevice")) return as_devmem(std::move(err));
  void* p = nullptr;
  if (auto err = cuda_error(cudaMalloc(&p, size_bytes), "cudaMalloc")) return as_devmem(std::move(err));
  return p;
}

void cuda_memory_source::release(void* p, size_t) noexcept {
  // cudaFree acts on the device the pointer belongs to, whatever the current device is.
  cudaFree(p);
}

caf::expected<cuda_event> cuda_event::create(bool timing) {
  cudaEvent_t e = nullptr;
  if (auto err = cuda_error(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming),
                            "cudaEventCreate"))
    return err;
  cuda_event out;
  out.event_.reset(e);
  return out;
}

caf::error cuda_event::record(cudaStream_t s) { return cuda_error(cudaEventRecord(get(), s), "cudaEventRecord"); }

caf::error cuda_event::make_wait(cudaStream_t s) const {
  return cuda_error(cudaStreamWaitEvent(s, get(), 0), "cudaStreamWaitEvent");
}

caf::error cuda_event::synchronize() const {
  return cuda_error(cudaEventSynchronize(get()), "cudaEventSynchronize");
}

caf::expected<float> cuda_event::elapsed_ms_since(const cuda_event& start) const {
  float ms = 0;
  if (auto err = cuda_error(cudaEventElapsedTime(&ms, start.get(), get()), "cudaEventElapsedTime")) return err;
  return ms;
}

caf::expected<cuda_stream> cuda_stream::create() {
  cudaStream_t s = nullptr;
  if (auto err = cuda_error(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                            "cudaStreamCreate"))
    return err;
  cuda_stream out;
  out.stream_.reset(s);
  return out;
}

caf::error cuda_stream::synchronize() const {
  return cuda_error(cudaStreamSynchronize(get()), "cudaStreamSynchronize");
}

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
