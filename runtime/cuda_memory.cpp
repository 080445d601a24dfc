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
