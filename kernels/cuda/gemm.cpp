#include "kernels/cuda/gemm.hpp"

#include <cublasLt.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "kernels/cuda/device_arch.hpp"
#include "kernels/cuda/fp8_dequantize.hpp"

namespace moe::kernels::cuda {
namespace {

cublasLtHandle_t as_handle(void* p) { return static_cast<cublasLtHandle_t>(p); }

struct matmul_desc_deleter {
  void operator()(cublasLtMatmulDesc_t d) const noexcept { cublasLtMatmulDescDestroy(d); }
};
struct layout_deleter {
  void operator()(cublasLtMatrixLayout_t l) const noexcept { cublasLtMatrixLayoutDestroy(l); }
};
struct preference_deleter {
  void operator()(cublasLtMatmulPreference_t p) const noexcept { cublasLtMatmulPreferenceDestroy(p); }
};
using matmul_desc_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, matmul_desc_deleter>;
using layout_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, layout_deleter>;
using preference_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, preference_deleter>;

bool supported_types(dtype ab, dtype c) {
  if (ab == dtype::bf16) return c == dtype::bf16 || c == dtype::f32;
  if (ab == dtype::f32) return c == dtype::f32;
  return false;
}

cudaDataType_t cuda_type(dtype t) { return t == dtype::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

// The stored shape of a row-major operand seen column-major: a row-major (r, c) matrix with
// leading dimension ld is a column-major (c, r) one with the same ld.
layout_ptr make_layout(dtype t, int64_t rm_rows, int64_t rm_cols, int64_t ld, int64_t batch, int64_t stride,
                       bool& ok) {
  cublasLtMatrixLayout_t l = nullptr;
  ok = cublasLtMatrixLayoutCreate(&l, cuda_type(t), static_cast<uint64_t>(rm_cols), static_cast<uint64_t>(rm_rows),
                                  ld) == CUBLAS_STATUS_SUCCESS;
  layout_ptr out{l};
  if (ok && batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    ok = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)) ==
             CUBLAS_STATUS_SUCCESS &&
         cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)) ==
             CUBLAS_STATUS_SUCCESS;
  }
  return out;
}

// cuBLASLt assumes every operand is 256-byte aligned unless the preference says otherwise, and
// an algorithm chosen under that assumption may fault on a less aligned pointer. Plans are
// cached per shape, so the alignment each call's pointers actually have (the largest power of
// two up to 256 dividing the address of every matrix of the batch) is part of the key and goes
// into the preference.
uint32_t alignment_of(const void* p, int64_t batch_count, int64_t stride_elements, size_t element_bytes) noexcept {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256u;
  if (batch_count > 1) bits |= static_cast<uint64_t>(stride_elements) * element_bytes;
  return static_cast<uint32_t>(bits & (~bits + 1));  // the lowest set bit
}

bool set_alignments(cublasLtMatmulPreference_t pref, uint32_t a, uint32_t b, uint32_t c) noexcept {
  auto set = [&](cublasLtMatmulPreferenceAttributes_t attr, uint32_t v) {
    return cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)) == CUBLAS_STATUS_SUCCESS;
  };
  return set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a) && set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b) &&
         set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c) && set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c);
}

}  // namespace

struct gemm_lt::plan {
  matmul_desc_ptr desc;
  layout_ptr a_layout;  // cuBLASLt's A: our B
  layout_ptr b_layout;  // cuBLASLt's B: our A
  layout_ptr c_layout;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;   // false: cuBLASLt has no algorithm for this shape (remembered too)
  kernel_status refusal = kernel_status::unsupported_shape;  // the answer when !found
};

namespace {

// cuBLASLt's best algorithm for p's layouts within the workspace and the operands' alignments
// (cuBLASLt's A, B, C/D): sets p.algo and p.found when it has one. nullopt when the preference
// could not be made (a launch failure); otherwise the heuristic's own status, which each caller
// reads its own way (an FP8 scale mode cuBLASLt lacks is a refusal, not a failure).
std::optional<cublasStatus_t> choose_algorithm(void* handle, cublasLtMatmulDesc_t desc, gemm_lt::plan& p,
                                               size_t workspace_bytes, uint32_t align_a,
                                               uint32_t align_b, uint32_t align_c) noexcept {
  cublasLtMatmulPreference_t pref_raw = nullptr;
  if (cublasLtMatmulPreferenceCreate(&pref_raw) != CUBLAS_STATUS_SUCCESS) return std::nullopt;
  preference_ptr pref{pref_raw};
  const uint64_t ws = workspace_bytes;
  if (cublasLtMatmulPreferenceSetAttribute(pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)) !=
          CUBLAS_STATUS_SUCCESS ||
      !set_alignments(pref_raw, align_a, align_b, align_c))
    return std::nullopt;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(as_handle(handle), desc, p.a_layout.get(), p.b_layout.get(),
                                                           p.c_layout.get(), p.c_layout.get(), pref_raw, 1, &result,
                                                           &found);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    p.algo = result.algo;
    p.found = true;
  }
  return st;
}

}  // namespace

void cublaslt_deleter::operator()(void* handle) const noexcept { cublasLtDestroy(as_handle(handle)); }

gemm_lt::gemm_lt() = default;
gemm_lt::gemm_lt(gemm_lt&&) noexcept = default;
gemm_lt& gemm_lt::operator=(gemm_lt&&) noexcept = default;
gemm_lt::~gemm_lt() = default;

gemm_desc linear_desc(const void* x, const void* weight, void* y, int64_t rows, int64_t in_features,
                      int64_t out_features, dtype ab_dt, dtype c_dt, float beta) noexcept {
  gemm_desc d;
  d.trans_b = transpose::yes;
  d.m = rows;
  d.n = out_features;
  d.k = in_features;
  d.a = x;
  d.lda = in_features;
  d.b = weight;
  d.ldb = in_features;
  d.beta = beta;
  d.c = y;
  d.ldc = out_features;
  d.ab_dt = ab_dt;
  d.c_dt = c_dt;
  return d;
}

kernel_status gemm_can_run(const gemm_desc& d) noexcept {
  if (!supported_types(d.ab_dt, d.c_dt)) return kernel_status::unsupported_dtype;
  if (d.m < 0 || d.n < 0 || d.k < 0 || d.batch_count < 1) return kernel_status::unsupported_shape;
  const bool ta = d.trans_a == transpose::yes, tb = d.trans_b == transpose::yes;
  if (d.lda < (ta ? d.m : d.k) || d.ldb < (tb ? d.k : d.n) || d.ldc < d.n) return kernel_status::unsupported_shape;
  if (d.lda < 1 || d.ldb < 1 || d.ldc < 1) return kernel_status::unsupported_shape;
  if (d.stride_a < 0 || d.stride_b < 0 || d.stride_c < 0) return kernel_status::unsupported_shape;
  // cuBLASLt takes 32-bit-ish sizes in places (batch count is int32).
  if (d.batch_count > 0x7fffffff) return kernel_status::unsupported_shape;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  // An empty sum (k == 0) is beta * C, which cuBLASLt does not promise to compute.
  if (d.k == 0 || !d.a || !d.b || !d.c) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status gemm_lt::create(gemm_lt& out) noexcept {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return kernel_status::no_device;
  }
  cublasLtHandle_t h = nullptr;
  if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) return kernel_status::launch_failed;
  out.handle_.reset(h);
  out.plans_.clear();
  return kernel_status::ok;
}

size_t gemm_lt::num_plans() const noexcept { return plans_.size() + fp8_plans_.size(); }

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// m * k, n * k and m * n elements must be addressable.
bool products_fit(int64_t m, int64_t n, int64_t k) {
  constexpr int64_t max = std::numeric_limits<int64_t>::max();
  return (k == 0 || (m <= max / k && n <= max / k)) && (n == 0 || m <= max / n);
}

template <typename T>
bool set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  return cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)) == CUBLAS_STATUS_SUCCESS;
}

// The VEC128/BLK128x128 modes exist on compute capability 9.0 only (Blackwell's block scaling is
// the MX formats); elsewhere a missing algorithm is the architecture's, not the shape's.
kernel_status fp8_refusal() {
  return detail::current_device_is_sm90() ? kernel_status::unsupported_shape
                                          : kernel_status::unsupported_arch;
}

}  // namespace

kernel_status fp8_linear_can_run(const fp8_linear_desc& d) noexcept {
  if (d.m < 0 || d.n < 0 || d.k < 0 || !products_fit(d.m, d.n, d.k)) return kernel_status::unsupported_shape;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  if (d.k == 0 || d.k % 128 != 0 || d.n % 128 != 0 || d.m % 32 != 0) return kernel_status::unsupported_shape;
  if (!d.x_q || !d.x_scale || !d.w_q || !d.w_scale || !d.y) return kernel_status::unsupported_shape;
  if (!aligned16(d.x_q) || !aligned16(d.x_scale) || !aligned16(d.w_q) || !aligned16(d.w_scale) || !aligned16(d.y))
    return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status fp8_linear_fallback_can_run(const fp8_linear_fallback_desc& d) noexcept {
  if (d.m < 0 || d.n < 0 || d.k < 0 || !products_fit(d.m, d.n, d.k)) return kernel_status::unsupported_shape;
  if (d.block_rows < 1 || d.block_cols < 1 || d.scale_ld < 0) return kernel_status::unsupported_shape;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  if (d.k == 0 || !d.x || !d.w_q || !d.w_scale || !d.w_scratch || !d.y) return kernel_status::unsupported_shape;
  if (d.scale_ld != 0 && d.scale_ld < (d.k + d.block_cols - 1) / d.block_cols) return kernel_status::unsupported_shape;
  return kernel_status::ok;
}

kernel_status gemm_lt::run_fp8_linear(const fp8_linear_desc& d, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) noexcept {
  if (auto s = fp8_linear_can_run(d); s != kernel_status::ok) return s;
  if (!handle_) return kernel_status::no_device;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  if (!workspace) workspace_bytes = 0;
  const uint32_t align_w = alignment_of(d.w_q, 1, 0, 1);
  const uint32_t align_x = alignment_of(d.x_q, 1, 0, 1);
  const uint32_t align_y = alignment_of(d.y, 1, 0, 2);
  const fp8_plan_key key{d.m, d.n, d.k, workspace_bytes, align_w, align_x, align_y};
  auto it = fp8_plans_.find(key);
  if (it == fp8_plans_.end()) {
    auto p = std::make_unique<plan>();
    cublasLtMatmulDesc_t desc = nullptr;
    if (cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS)
      return kernel_status::launch_failed;
    p->desc.reset(desc);
    // Column-major, y^T (n, m) = W (n, k) . x^T (k, m): cuBLASLt's A is our weight, stored (k, n)
    // column-major and transposed, its B our activation, (k, m) as stored: the "TN" form, the only
    // one FP8 tensor-core products take. So the weight gets the 128x128 blocks and the
    // activation the 1x128 vectors.
    const cublasOperation_t op_a = CUBLAS_OP_T, op_b = CUBLAS_OP_N;
    const int32_t mode_a = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const int32_t mode_b = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    if (!set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, op_a) ||
        !set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, op_b))
      return kernel_status::launch_failed;
    // An unknown mode (an older cuBLASLt) is a refusal, not a failure: the fallback still runs.
    // The scale pointers are set now because the heuristic wants them; run sets them per call.
    if (!set_attribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode_a) ||
        !set_attribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode_b) ||
        !set_attribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(d.w_scale)) ||
        !set_attribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(d.x_scale))) {
      const kernel_status refusal = fp8_refusal();
      p->refusal = refusal;
      fp8_plans_.emplace(key, std::move(p));
      return refusal;
    }
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    const bool made = cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, static_cast<uint64_t>(d.k),
                                                 static_cast<uint64_t>(d.n), d.k) == CUBLAS_STATUS_SUCCESS;
    p->a_layout.reset(a);
    const bool made_b = cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, static_cast<uint64_t>(d.k),
                                                   static_cast<uint64_t>(d.m), d.k) == CUBLAS_STATUS_SUCCESS;
    p->b_layout.reset(b);
    const bool made_c = cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, static_cast<uint64_t>(d.n),
                                                   static_cast<uint64_t>(d.m), d.n) == CUBLAS_STATUS_SUCCESS;
    p->c_layout.reset(c);
    if (!made || !made_b || !made_c) return kernel_status::launch_failed;
    // Any heuristic error is a refusal here (cuBLASLt answers INVALID_VALUE as well as
    // NOT_SUPPORTED for scale modes it lacks): the fallback is always there.
    if (!choose_algorithm(handle_.get(), desc, *p, workspace_bytes, align_w, align_x, align_y))
      return kernel_status::launch_failed;
    if (!p->found) p->refusal = fp8_refusal();
    it = fp8_plans_.emplace(key, std::move(p)).first;
  }
  const plan& p = *it->second;
  if (!p.found) return p.refusal;
  // The plan is shared by every weight of this shape: point it at this call's scales.
  if (!set_attribute(p.desc.get(), CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(d.w_scale)) ||
      !set_attribute(p.desc.get(), CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(d.x_scale)))
    return kernel_status::launch_failed;
  const float alpha = 1.0f, beta = 0.0f;
  const auto st = cublasLtMatmul(as_handle(handle_.get()), p.desc.get(), &alpha, d.w_q, p.a_layout.get(), d.x_q,
                                 p.b_layout.get(), &beta, d.y, p.c_layout.get(), d.y, p.c_layout.get(), &p.algo,
                                 workspace, workspace_bytes, stream);
  return st == CUBLAS_STATUS_SUCCESS ? kernel_status::ok : kernel_status::launch_failed;
}

kernel_status gemm_lt::run_fp8_linear_fallback(const fp8_linear_fallback_desc& d, void* workspace,
                                               size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = fp8_linear_fallback_can_run(d); s != kernel_status::ok) return s;
  if (!handle_) return kernel_status::no_device;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  fp8_dequantize_args e;
  e.q = d.w_q;
  e.scale = d.w_scale;
  e.out = d.w_scratch;
  e.rows = d.n;
  e.cols = d.k;
  e.block_rows = d.block_rows;
  e.block_cols = d.block_cols;
  e.out_dt = dtype::bf16;
  e.scale_ld = d.scale_ld != 0 ? d.scale_ld : fp8_weight_scale_ld(d.k);
  if (auto s = fp8_dequantize_run(e, stream); s != kernel_status::ok) return s;
  return run(linear_desc(d.x, d.w_scratch, d.y, d.m, d.k, d.n, dtype::bf16, dtype::bf16, d.beta),
             workspace, workspace_bytes, stream);
}

kernel_status gemm_lt::run(const gemm_desc& d, void* workspace, size_t workspace_bytes, cudaStream_t stream) noexcept {
  if (auto s = gemm_can_run(d); s != kernel_status::ok) return s;
  if (!handle_) return kernel_status::no_device;
  if (d.m == 0 || d.n == 0) return kernel_status::ok;
  if (!workspace) workspace_bytes = 0;
  const bool ta = d.trans_a == transpose::yes, tb = d.trans_b == transpose::yes;
  const bool beta_zero = d.beta == 0.0f;
  // cuBLASLt's first operand is our B, its second our A (see below).
  const uint32_t align_first = alignment_of(d.b, d.batch_count, d.stride_b, dtype_bytes(d.ab_dt));
  const uint32_t align_second = alignment_of(d.a, d.batch_count, d.stride_a, dtype_bytes(d.ab_dt));
  const uint32_t align_c = alignment_of(d.c, d.batch_count, d.stride_c, dtype_bytes(d.c_dt));
  const plan_key key{static_cast<int>(d.ab_dt), static_cast<int>(d.c_dt), d.m, d.n, d.k, d.lda, d.ldb, d.ldc,
                     ta, tb, d.batch_count, d.stride_a, d.stride_b, d.stride_c, workspace_bytes, beta_zero,
                     align_first, align_second, align_c};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    auto p = std::make_unique<plan>();
    cublasLtMatmulDesc_t desc = nullptr;
    if (cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS)
      return kernel_status::launch_failed;
    p->desc.reset(desc);
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLASLt's first operand
    // is our B, its second our A, each transposed exactly when ours is.
    const cublasOperation_t op_first = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)) !=
            CUBLAS_STATUS_SUCCESS)
      return kernel_status::launch_failed;
    bool ok_a = false, ok_b = false, ok_c = false;
    // Stored row-major shapes: B is (k, n), or (n, k) when transposed; A (m, k), or (k, m).
    p->a_layout = make_layout(d.ab_dt, tb ? d.n : d.k, tb ? d.k : d.n, d.ldb, d.batch_count, d.stride_b, ok_a);
    p->b_layout = make_layout(d.ab_dt, ta ? d.k : d.m, ta ? d.m : d.k, d.lda, d.batch_count, d.stride_a, ok_b);
    p->c_layout = make_layout(d.c_dt, d.m, d.n, d.ldc, d.batch_count, d.stride_c, ok_c);
    if (!ok_a || !ok_b || !ok_c) return kernel_status::launch_failed;
    const auto st = choose_algorithm(handle_.get(), desc, *p, workspace_bytes, align_first, align_second, align_c);
    if (!st || (!p->found && *st != CUBLAS_STATUS_SUCCESS && *st != CUBLAS_STATUS_NOT_SUPPORTED))
      return kernel_status::launch_failed;
    it = plans_.emplace(key, std::move(p)).first;
  }
  const plan& p = *it->second;
  if (!p.found) return kernel_status::unsupported_shape;
  const float alpha = d.alpha, beta = d.beta;
  const auto st = cublasLtMatmul(as_handle(handle_.get()), p.desc.get(), &alpha, d.b, p.a_layout.get(), d.a,
                                 p.b_layout.get(), &beta, d.c, p.c_layout.get(), d.c, p.c_layout.get(), &p.algo,
                                 workspace, workspace_bytes, stream);
  return st == CUBLAS_STATUS_SUCCESS ? kernel_status::ok : kernel_status::launch_failed;
}

}  // namespace moe::kernels::cuda
