// linear_backward (backward.hpp): two cuBLASLt products. Host code apart from the other
// backward kernels because the CPU emulator has no cuBLASLt; the rest of backward.hpp is in
// backward.cu.
#include "kernels/cuda/backward.hpp"

#include <algorithm>

namespace moe::kernels::cuda {
namespace {

bool dtypes_supported(const linear_backward_args& a) {
  if (a.ab_dt == dtype::bf16) return a.dx_dt == dtype::bf16 || a.dx_dt == dtype::f32;
  if (a.ab_dt == dtype::f32) return a.dx_dt == dtype::f32;
  return false;
}

}  // namespace

void linear_backward_descs(const linear_backward_args& a, gemm_desc& dx_desc,
                           gemm_desc& dweight_desc) noexcept {
  dx_desc = gemm_desc{};  // dx (rows, in) = dy (rows, out) . weight (out, in)
  if (a.dx != nullptr) {
    dx_desc.m = a.rows;
    dx_desc.n = a.in_features;
    dx_desc.k = a.out_features;
    dx_desc.a = a.dy;
    dx_desc.lda = a.out_features;
    dx_desc.b = a.weight;
    dx_desc.ldb = a.in_features;
    dx_desc.beta = a.accumulate ? 1.0f : 0.0f;
    dx_desc.c = a.dx;
    dx_desc.ldc = a.in_features;
  }
  dx_desc.ab_dt = a.ab_dt;
  dx_desc.c_dt = a.dx_dt;
  // Leading dimensions stay valid (>= 1) when a size is 0, so an empty product passes the checks.
  dx_desc.lda = std::max<int64_t>(dx_desc.lda, 1);
  dx_desc.ldb = std::max<int64_t>(dx_desc.ldb, 1);
  dx_desc.ldc = std::max<int64_t>(dx_desc.ldc, 1);

  dweight_desc = gemm_desc{};  // dweight (out, in) += dy^T (out, rows) . x (rows, in)
  if (a.dweight != nullptr) {
    dweight_desc.trans_a = transpose::yes;
    dweight_desc.m = a.out_features;
    dweight_desc.n = a.in_features;
    dweight_desc.k = a.rows;
    dweight_desc.a = a.dy;
    dweight_desc.lda = a.out_features;
    dweight_desc.b = a.x;
    dweight_desc.ldb = a.in_features;
    dweight_desc.beta = 1.0f;
    dweight_desc.c = a.dweight;
    dweight_desc.ldc = a.in_features;
  }
  dweight_desc.ab_dt = a.ab_dt;
  dweight_desc.c_dt = dtype::f32;
  dweight_desc.lda = std::max<int64_t>(dweight_desc.lda, 1);
  dweight_desc.ldb = std::max<int64_t>(dweight_desc.ldb, 1);
  dweight_desc.ldc = std::max<int64_t>(dweight_desc.ldc, 1);
}

kernel_status linear_backward_can_run(const linear_backward_args& a) noexcept {
  if (!dtypes_supported(a)) return kernel_status::unsupported_dtype;
  if (a.rows < 0 || a.in_features < 0 || a.out_features < 0) return kernel_status::unsupported_shape;
  gemm_desc dx_desc, dweight_desc;
  linear_backward_descs(a, dx_desc, dweight_desc);
  // gemm_can_run refuses k == 0 (an empty sum cuBLASLt does not compute): dx with
  // out_features == 0 would be 0 (or unchanged), which no caller of a real projection has.
  // dweight with rows == 0 is an empty sum added to dweight: nothing to do, and run skips it.
  if (auto s = gemm_can_run(dx_desc); s != kernel_status::ok) return s;
  if (a.rows > 0)
    if (auto s = gemm_can_run(dweight_desc); s != kernel_status::ok) return s;
  return kernel_status::ok;
}

kernel_status linear_backward_run(gemm_lt& lt, const linear_backward_args& a, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) noexcept {
  // Both products are checked before either is queued, so a refusal writes nothing.
  if (auto s = linear_backward_can_run(a); s != kernel_status::ok) return s;
  gemm_desc dx_desc, dweight_desc;
  linear_backward_descs(a, dx_desc, dweight_desc);
  if (dx_desc.m > 0 && dx_desc.n > 0)
    if (auto s = lt.run(dx_desc, workspace, workspace_bytes, stream); s != kernel_status::ok) return s;
  if (a.rows > 0 && dweight_desc.m > 0 && dweight_desc.n > 0)
    if (auto s = lt.run(dweight_desc, workspace, workspace_bytes, stream); s != kernel_status::ok)
      return s;
  return kernel_status::ok;
}

}  // namespace moe::kernels::cuda
