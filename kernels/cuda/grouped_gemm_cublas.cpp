#include "kernels/cuda/grouped_gemm_cublas.hpp"

#include <cublas_v2.h>
#include <vector>

namespace moe::kernels::cuda {

struct cublas_grouped_gemm::problems {
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha, beta;

  void clear() {
    for (auto* v : {&m, &n, &k, &lda, &ldb, &ldc, &group_size}) v->clear();
    trans_a.clear();
    trans_b.clear();
    alpha.clear();
    beta.clear();
  }
};

void cublas_deleter::operator()(void* handle) const noexcept {
  if (handle != nullptr) (void)cublasDestroy(static_cast<cublasHandle_t>(handle));
}

cublas_grouped_gemm::cublas_grouped_gemm() = default;
cublas_grouped_gemm::cublas_grouped_gemm(cublas_grouped_gemm&&) noexcept = default;
cublas_grouped_gemm& cublas_grouped_gemm::operator=(cublas_grouped_gemm&&) noexcept = default;
cublas_grouped_gemm::~cublas_grouped_gemm() = default;

kernel_status cublas_grouped_gemm::create(cublas_grouped_gemm& out) noexcept {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    return kernel_status::no_device;
  }
  cublasHandle_t h = nullptr;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return kernel_status::launch_failed;
  out.handle_.reset(h);
  out.problems_ = std::make_unique<problems>();
  return kernel_status::ok;
}

kernel_status cublas_grouped_can_run(const cublas_grouped_args& a) noexcept {
  if (a.dt != dtype::bf16 && a.dt != dtype::f32) return kernel_status::unsupported_dtype;
  if (a.num_rows < 0 || a.num_experts < 0 || a.n < 0 || a.k < 0 || a.num_rows > INT32_MAX ||
      a.n > INT32_MAX || a.k > INT32_MAX)
    return kernel_status::unsupported_shape;
  if (a.offsets == nullptr || a.host_pointers == nullptr || a.device_pointers == nullptr)
    return kernel_status::unsupported_shape;
  if (a.offsets[0] != 0) return kernel_status::unsupported_shape;
  bool any_rows = false;
  for (int64_t e = 0; e < a.num_experts; ++e) {
    if (a.offsets[e + 1] < a.offsets[e] || a.offsets[e + 1] > a.num_rows)
      return kernel_status::unsupported_shape;
    any_rows = any_rows || a.offsets[e + 1] > a.offsets[e];
  }
  if (any_rows && a.n > 0 && (a.x == nullptr || a.weights == nullptr || a.y == nullptr || a.k == 0))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status cublas_grouped_gemm::run(const cublas_grouped_args& a, cudaStream_t stream) noexcept {
  if (auto s = cublas_grouped_can_run(a); s != kernel_status::ok) return s;
  if (!handle_) return kernel_status::no_device;
  auto* h = static_cast<cublasHandle_t>(handle_.get());
  problems& p = *problems_;
  p.clear();
  const auto bytes = static_cast<int64_t>(dtype_bytes(a.dt));
  const int64_t E = a.num_experts;
  // The address arrays, A (weights), then B (x), then C (y), each E long with the used prefix.
  const void** a_ptr = a.host_pointers;
  const void** b_ptr = a.host_pointers + E;
  const void** c_ptr = a.host_pointers + 2 * E;
  int groups = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int32_t rows = a.offsets[e + 1] - a.offsets[e];
    if (rows == 0) continue;
    p.trans_a.push_back(CUBLAS_OP_T);
    p.trans_b.push_back(CUBLAS_OP_N);
    p.m.push_back(static_cast<int>(a.n));
    p.n.push_back(rows);
    p.k.push_back(static_cast<int>(a.k));
    p.lda.push_back(static_cast<int>(a.k));
    p.ldb.push_back(static_cast<int>(a.k));
    p.ldc.push_back(static_cast<int>(a.n));
    p.group_size.push_back(1);
    p.alpha.push_back(1.0f);
    p.beta.push_back(0.0f);
    a_ptr[groups] = static_cast<const char*>(a.weights) + e * a.n * a.k * bytes;
    b_ptr[groups] = static_cast<const char*>(a.x) + int64_t{a.offsets[e]} * a.k * bytes;
    c_ptr[groups] = static_cast<const char*>(a.y) + int64_t{a.offsets[e]} * a.n * bytes;
    ++groups;
  }
  if (groups == 0 || a.n == 0) return kernel_status::ok;
  // Each array is copied whole-E apart, so the device arrays keep the same layout.
  if (cudaMemcpyAsync(a.device_pointers, a.host_pointers,
                      3 * static_cast<size_t>(E) * sizeof(void*), cudaMemcpyHostToDevice,
                      stream) != cudaSuccess)
    return kernel_status::launch_failed;
  if (cublasSetStream(h, stream) != CUBLAS_STATUS_SUCCESS) return kernel_status::launch_failed;
  const cudaDataType_t t = a.dt == dtype::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      h, p.trans_a.data(), p.trans_b.data(), p.m.data(), p.n.data(), p.k.data(), p.alpha.data(),
      a.device_pointers, t, p.lda.data(), a.device_pointers + E, t, p.ldb.data(), p.beta.data(),
      a.device_pointers + 2 * E, t, p.ldc.data(), groups, p.group_size.data(), CUBLAS_COMPUTE_32F);
  if (st == CUBLAS_STATUS_SUCCESS) return kernel_status::ok;
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE)
    return kernel_status::unsupported_shape;
  return kernel_status::launch_failed;
}

}  // namespace moe::kernels::cuda
