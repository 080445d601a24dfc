// A stand-in for cuBLASLt on the host: the functions kernels/cuda/gemm.cpp calls, compiled
// against CUDA's own cublasLt.h, computing D = alpha * op(A) op(B) + beta * C in column-major
// order as cuBLASLt defines it. Products are queued on the caller's stream through the stand-in
// runtime (fake_cudart.hpp), so a capturing stream records them for its graph.
//
// What it takes: CUBLAS_COMPUTE_32F with CUDA_R_32F scales (alpha and beta host pointers, read
// when the product is queued, as cuBLASLt reads host scalars); A and B both bf16 or both f32, C
// and D alike, bf16 in with bf16 or f32 out, f32 throughout; column order; transposes of A and
// B; leading dimensions; strided batches (count and stride from each layout). Sums are float32
// over k in order (a bf16 product is exact in float32), alpha and beta applied in float32, the
// result rounded once to D's type (bf16: to nearest even). beta == 0 does not read C.
// Also the block-scaled FP8 product gemm_lt::run_fp8_linear asks for (Hopper's modes): A and B
// CUDA_R_8F_E4M3, A transposed with BLK128x128_32F scales (ceil(rows of D / 128) rows of
// ceil(k / 128) floats padded to a multiple of 4), B not transposed with VEC128_32F scales (one
// per column of D and 128 of k, k-group-major), C and D bf16, one batch, k a multiple of 128;
// each 128-long block of a sum is summed in float32 in k order, then scaled by its two scales
// and added, in k order. A card with CUDA older than 12.9, or another card, refuses these modes:
// set MOE_EMU_FAKE_CUBLASLT_NO_FP8=1 to refuse them here too.
// Anything else (other FP8 forms, epilogues, device pointer modes, other orders) is
// CUBLAS_STATUS_NOT_SUPPORTED from the heuristic, which callers take as "no algorithm".
// Checked as cuBLASLt would, or where a card would fault: dimensions that do not chain
// (CUBLAS_STATUS_INVALID_VALUE), leading dimensions below the rows, operands reaching past their
// device allocation, and operand addresses less aligned than 16 bytes while the preference
// promised more (cuBLASLt's default promise is 256: an algorithm it picks may then fault).
// Thread safety: as cuBLASLt's handle, one thread at a time per handle.
// Also cuBLAS's grouped GEMM (below), the one cuBLAS (not Lt) call of ours.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>

#include "model/dequantize.hpp"
#include "tests/emulator/fake_cudart.hpp"

struct cublasLtContext {};

namespace {

constexpr uint64_t algo_magic = 0x656d756c61746564ull;  // "emulated"

struct fake_desc {
  int32_t compute = CUBLAS_COMPUTE_32F;
  int32_t scale = CUDA_R_32F;
  int32_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;
  int32_t trans_a = CUBLAS_OP_N;
  int32_t trans_b = CUBLAS_OP_N;
  int32_t trans_c = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  int32_t a_scale_mode = -1, b_scale_mode = -1;  // -1: not set
  const void* a_scale = nullptr;
  const void* b_scale = nullptr;
  int unsupported_attribute = -1;  // the first attribute set that is not emulated
};

struct fake_layout {
  uint32_t type = CUDA_R_32F;
  int32_t order = CUBLASLT_ORDER_COL;
  uint64_t rows = 0;
  uint64_t cols = 0;
  int64_t ld = 0;
  int32_t batch = 1;
  int64_t stride = 0;
  int unsupported_attribute = -1;
};

struct fake_preference {
  uint64_t max_workspace = 0;
  uint32_t min_alignment[4] = {256, 256, 256, 256};  // A, B, C, D
};

std::set<const void*>& live() {
  static std::set<const void*> s;
  return s;
}

template <class Fake, class Handle>
Fake* from(Handle h) {
  return live().count(h) != 0 ? reinterpret_cast<Fake*>(h) : nullptr;
}

template <class Handle, class Fake>
Handle make(Handle* out) {
  auto* f = new Fake;
  *out = reinterpret_cast<Handle>(f);
  live().insert(*out);
  return *out;
}

template <class Fake, class Handle>
cublasStatus_t destroy(Handle h) {
  if (h == nullptr) return CUBLAS_STATUS_SUCCESS;
  Fake* f = from<Fake>(h);
  if (f == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  live().erase(h);
  delete f;
  return CUBLAS_STATUS_SUCCESS;
}

template <class T>
bool read(const void* buf, size_t size, T& out) {
  if (buf == nullptr || size != sizeof(T)) return false;
  std::memcpy(&out, buf, sizeof(T));
  return true;
}

size_t type_bytes(uint32_t t) {
  return t == CUDA_R_8F_E4M3 ? 1 : t == CUDA_R_16BF ? 2 : 4;
}

bool fp8_disabled() {
  const char* v = std::getenv("MOE_EMU_FAKE_CUBLASLT_NO_FP8");
  return v != nullptr && v[0] == '1';
}

float load(const unsigned char* base, uint32_t type, int64_t index) {
  if (type == CUDA_R_8F_E4M3) return moe::model::e4m3_to_float(base[index]);
  if (type == CUDA_R_16BF) {
    uint16_t h;
    std::memcpy(&h, base + index * 2, 2);
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  float f;
  std::memcpy(&f, base + index * 4, 4);
  return f;
}

void store(unsigned char* base, uint32_t type, int64_t index, float v) {
  if (type == CUDA_R_16BF) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    uint16_t h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      h = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      h = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    std::memcpy(base + index * 2, &h, 2);
    return;
  }
  std::memcpy(base + index * 4, &v, 4);
}

/// One product's shape, checked.
struct problem {
  fake_desc desc;
  fake_layout a, b, c, d;
  int64_t m = 0, n = 0, k = 0, batch = 1;
};

cublasStatus_t unsupported(const char* what) {
  std::fprintf(stderr, "emu (fake cuBLASLt): not emulated: %s\n", what);
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

cublasStatus_t check(cublasLtHandle_t handle, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                     problem& p) {
  if (from<cublasLtContext>(handle) == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const fake_desc* fd = from<fake_desc>(op);
  const fake_layout *fa = from<fake_layout>(a), *fb = from<fake_layout>(b),
                    *fc = from<fake_layout>(c), *fdd = from<fake_layout>(d);
  if (fd == nullptr || fa == nullptr || fb == nullptr || fc == nullptr || fdd == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  p.desc = *fd;
  p.a = *fa;
  p.b = *fb;
  p.c = *fc;
  p.d = *fdd;
  if (fd->unsupported_attribute >= 0) return unsupported("a matmul descriptor attribute");
  for (const fake_layout* l : {fa, fb, fc, fdd}) {
    if (l->unsupported_attribute >= 0) return unsupported("a matrix layout attribute");
    if (l->order != CUBLASLT_ORDER_COL) return unsupported("an order other than column-major");
  }
  if (fd->compute != CUBLAS_COMPUTE_32F || fd->scale != CUDA_R_32F)
    return unsupported("a compute type other than CUBLAS_COMPUTE_32F with float scales");
  if (fd->pointer_mode != CUBLASLT_POINTER_MODE_HOST || fd->epilogue != CUBLASLT_EPILOGUE_DEFAULT ||
      fd->trans_c != CUBLAS_OP_N)
    return unsupported("a pointer mode, epilogue or transpose of C");
  if (fa->type != fb->type || fc->type != fdd->type) return unsupported("mixed A/B or C/D types");
  const bool block_scaled = fd->a_scale_mode >= 0 || fd->b_scale_mode >= 0;
  if (block_scaled || fa->type == CUDA_R_8F_E4M3) {
    if (fp8_disabled()) return unsupported("FP8 (MOE_EMU_FAKE_CUBLASLT_NO_FP8)");
    if (fa->type != CUDA_R_8F_E4M3 || fc->type != CUDA_R_16BF ||
        fd->a_scale_mode != CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F ||
        fd->b_scale_mode != CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F || fd->trans_a != CUBLAS_OP_T ||
        fd->trans_b != CUBLAS_OP_N || fa->batch != 1 || fa->rows % 128 != 0)
      return unsupported("FP8 other than e4m3 TN with BLK128x128 x VEC128 scales to bf16, k % 128 == 0");
  } else {
    const bool types_ok = (fa->type == CUDA_R_16BF && (fc->type == CUDA_R_16BF || fc->type == CUDA_R_32F)) ||
                          (fa->type == CUDA_R_32F && fc->type == CUDA_R_32F);
    if (!types_ok) return unsupported("these data types (bf16 -> bf16/f32 and f32 -> f32 only)");
  }
  for (int32_t t : {fd->trans_a, fd->trans_b})
    if (t != CUBLAS_OP_N && t != CUBLAS_OP_T) return unsupported("a conjugate transpose");
  p.m = static_cast<int64_t>(fdd->rows);
  p.n = static_cast<int64_t>(fdd->cols);
  const bool ta = fd->trans_a == CUBLAS_OP_T, tb = fd->trans_b == CUBLAS_OP_T;
  const int64_t a_m = static_cast<int64_t>(ta ? fa->cols : fa->rows);
  p.k = static_cast<int64_t>(ta ? fa->rows : fa->cols);
  const int64_t b_k = static_cast<int64_t>(tb ? fb->cols : fb->rows);
  const int64_t b_n = static_cast<int64_t>(tb ? fb->rows : fb->cols);
  if (a_m != p.m || b_k != p.k || b_n != p.n || fc->rows != fdd->rows || fc->cols != fdd->cols) {
    std::fprintf(stderr,
                 "emu (fake cuBLASLt): shapes do not chain: op(A) %lldx%lld, op(B) %lldx%lld, C %llux%llu, "
                 "D %lldx%lld\n",
                 static_cast<long long>(a_m), static_cast<long long>(p.k), static_cast<long long>(b_k),
                 static_cast<long long>(b_n), static_cast<unsigned long long>(fc->rows),
                 static_cast<unsigned long long>(fc->cols), static_cast<long long>(p.m),
                 static_cast<long long>(p.n));
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  for (const fake_layout* l : {fa, fb, fc, fdd})
    if (l->ld < 1 || static_cast<uint64_t>(l->ld) < l->rows) {
      std::fprintf(stderr, "emu (fake cuBLASLt): leading dimension %lld below %llu rows\n",
                   static_cast<long long>(l->ld), static_cast<unsigned long long>(l->rows));
      return CUBLAS_STATUS_INVALID_VALUE;
    }
  if (fa->batch != fb->batch || fa->batch != fc->batch || fa->batch != fdd->batch || fa->batch < 1)
    return CUBLAS_STATUS_INVALID_VALUE;
  p.batch = fa->batch;
  return CUBLAS_STATUS_SUCCESS;
}

/// Bytes from an operand's address to the end of its last element over every batch.
size_t extent_bytes(const fake_layout& l, int64_t batch) {
  if (l.rows == 0 || l.cols == 0) return 0;
  const int64_t last = (batch - 1) * l.stride + static_cast<int64_t>(l.cols - 1) * l.ld +
                       static_cast<int64_t>(l.rows - 1);
  return static_cast<size_t>(last + 1) * type_bytes(l.type);
}

bool operand_ok(const char* name, const void* ptr, const fake_layout& l, int64_t batch,
                uint32_t promised_alignment) {
  if (ptr == nullptr) {
    std::fprintf(stderr, "emu (fake cuBLASLt): %s is null\n", name);
    return false;
  }
  const size_t bytes = extent_bytes(l, batch);
  if (!emu::is_device_range(ptr, bytes)) {
    std::fprintf(stderr, "emu (fake cuBLASLt): %s (%zu bytes from %p) is not inside one device allocation\n",
                 name, bytes, ptr);
    return false;
  }
  // Every batch's matrix starts at ptr + b * stride elements.
  const size_t es = type_bytes(l.type);
  for (int64_t b = 0; b < batch; ++b) {
    const auto address = reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(b * l.stride) * es;
    const uint32_t need = promised_alignment < 16 ? promised_alignment : 16;
    if (need > 0 && address % need != 0) {
      std::fprintf(stderr,
                   "emu (fake cuBLASLt): %s of batch %lld is only %zu-byte aligned, while the heuristic was "
                   "promised %u (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*): the algorithm it chose may fault\n",
                   name, static_cast<long long>(b), static_cast<size_t>(address & (~address + 1)),
                   promised_alignment);
      return false;
    }
  }
  return true;
}

/// The block-scaled FP8 product on the host: D (m, n) = A^T B with A (k, m) and B (k, n).
void compute_fp8(const problem& p, float alpha, float beta, const void* a_ptr, const void* b_ptr,
                 const void* c_ptr, void* d_ptr) {
  const auto* A = static_cast<const unsigned char*>(a_ptr);
  const auto* B = static_cast<const unsigned char*>(b_ptr);
  const auto* C = static_cast<const unsigned char*>(c_ptr);
  auto* D = static_cast<unsigned char*>(d_ptr);
  const auto* sa = static_cast<const float*>(p.desc.a_scale);
  const auto* sb = static_cast<const float*>(p.desc.b_scale);
  const int64_t groups = p.k / 128, a_ld = (groups + 3) / 4 * 4;
  for (int64_t j = 0; j < p.n; ++j)
    for (int64_t i = 0; i < p.m; ++i) {
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float block = 0.0f;
        for (int64_t q = g * 128; q < (g + 1) * 128; ++q)
          block += load(A, p.a.type, q + i * p.a.ld) * load(B, p.b.type, q + j * p.b.ld);
        acc += block * sa[(i / 128) * a_ld + g] * sb[g * p.n + j];
      }
      float v = alpha * acc;
      if (beta != 0.0f) v += beta * load(C, p.c.type, i + j * p.c.ld);
      store(D, p.d.type, i + j * p.d.ld, v);
    }
}

/// The whole product on the host.
void compute(const problem& p, float alpha, float beta, const void* a_ptr, const void* b_ptr,
             const void* c_ptr, void* d_ptr) {
  if (p.a.type == CUDA_R_8F_E4M3) return compute_fp8(p, alpha, beta, a_ptr, b_ptr, c_ptr, d_ptr);
  const auto* A = static_cast<const unsigned char*>(a_ptr);
  const auto* B = static_cast<const unsigned char*>(b_ptr);
  const auto* C = static_cast<const unsigned char*>(c_ptr);
  auto* D = static_cast<unsigned char*>(d_ptr);
  const bool ta = p.desc.trans_a == CUBLAS_OP_T, tb = p.desc.trans_b == CUBLAS_OP_T;
  const auto m = static_cast<size_t>(p.m), n = static_cast<size_t>(p.n), k = static_cast<size_t>(p.k);
  std::vector<float> opa(m * k), opb(n * k);  // op(A) by rows, op(B) by columns: k contiguous
  for (int64_t batch = 0; batch < p.batch; ++batch) {
    const int64_t oa = batch * p.a.stride, ob = batch * p.b.stride;
    const int64_t oc = batch * p.c.stride, od = batch * p.d.stride;
    for (size_t i = 0; i < m; ++i)
      for (size_t q = 0; q < k; ++q)  // op(A)(i, q)
        opa[i * k + q] = load(A, p.a.type,
                              oa + static_cast<int64_t>(ta ? q + i * p.a.ld : i + q * p.a.ld));
    for (size_t j = 0; j < n; ++j)
      for (size_t q = 0; q < k; ++q)  // op(B)(q, j)
        opb[j * k + q] = load(B, p.b.type,
                              ob + static_cast<int64_t>(tb ? j + q * p.b.ld : q + j * p.b.ld));
    for (size_t j = 0; j < n; ++j) {
      for (size_t i = 0; i < m; ++i) {
        const float* x = &opa[i * k];
        const float* y = &opb[j * k];
        float acc = 0.0f;
        for (size_t q = 0; q < k; ++q) acc += x[q] * y[q];
        float v = alpha * acc;
        if (beta != 0.0f) v += beta * load(C, p.c.type, oc + static_cast<int64_t>(i + j * p.c.ld));
        store(D, p.d.type, od + static_cast<int64_t>(i + j * p.d.ld), v);
      }
    }
  }
}

}  // namespace

extern "C" {

cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* lightHandle) {
  if (lightHandle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *lightHandle = new cublasLtContext;
  live().insert(*lightHandle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t lightHandle) {
  return destroy<cublasLtContext>(lightHandle);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* matmulDesc,
                                                     cublasComputeType_t computeType,
                                                     cudaDataType_t scaleType) {
  if (matmulDesc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  fake_desc* d = from<fake_desc>(make<cublasLtMatmulDesc_t, fake_desc>(matmulDesc));
  d->compute = computeType;
  d->scale = scaleType;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t matmulDesc) {
  return destroy<fake_desc>(matmulDesc);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t matmulDesc,
                                                           cublasLtMatmulDescAttributes_t attr,
                                                           const void* buf, size_t sizeInBytes) {
  fake_desc* d = from<fake_desc>(matmulDesc);
  if (d == nullptr || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  bool ok = true;
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: ok = read(buf, sizeInBytes, d->compute); break;
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: ok = read(buf, sizeInBytes, d->scale); break;
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: ok = read(buf, sizeInBytes, d->pointer_mode); break;
    case CUBLASLT_MATMUL_DESC_TRANSA: ok = read(buf, sizeInBytes, d->trans_a); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: ok = read(buf, sizeInBytes, d->trans_b); break;
    case CUBLASLT_MATMUL_DESC_TRANSC: ok = read(buf, sizeInBytes, d->trans_c); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: ok = read(buf, sizeInBytes, d->epilogue); break;
    case CUBLASLT_MATMUL_DESC_A_SCALE_MODE: ok = read(buf, sizeInBytes, d->a_scale_mode); break;
    case CUBLASLT_MATMUL_DESC_B_SCALE_MODE: ok = read(buf, sizeInBytes, d->b_scale_mode); break;
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER: ok = read(buf, sizeInBytes, d->a_scale); break;
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER: ok = read(buf, sizeInBytes, d->b_scale); break;
    default:  // kept, and refused by the heuristic: FP8 scales and modes among others
      if (d->unsupported_attribute < 0) d->unsupported_attribute = static_cast<int>(attr);
      break;
  }
  return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* matLayout, cudaDataType type,
                                                       uint64_t rows, uint64_t cols, int64_t ld) {
  if (matLayout == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  fake_layout* l = from<fake_layout>(make<cublasLtMatrixLayout_t, fake_layout>(matLayout));
  l->type = static_cast<uint32_t>(type);
  l->rows = rows;
  l->cols = cols;
  l->ld = ld;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t matLayout) {
  return destroy<fake_layout>(matLayout);
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t matLayout,
                                                             cublasLtMatrixLayoutAttribute_t attr,
                                                             const void* buf, size_t sizeInBytes) {
  fake_layout* l = from<fake_layout>(matLayout);
  if (l == nullptr || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  bool ok = true;
  switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE: ok = read(buf, sizeInBytes, l->type); break;
    case CUBLASLT_MATRIX_LAYOUT_ORDER: ok = read(buf, sizeInBytes, l->order); break;
    case CUBLASLT_MATRIX_LAYOUT_ROWS: ok = read(buf, sizeInBytes, l->rows); break;
    case CUBLASLT_MATRIX_LAYOUT_COLS: ok = read(buf, sizeInBytes, l->cols); break;
    case CUBLASLT_MATRIX_LAYOUT_LD: ok = read(buf, sizeInBytes, l->ld); break;
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: ok = read(buf, sizeInBytes, l->batch); break;
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: ok = read(buf, sizeInBytes, l->stride); break;
    default:
      if (l->unsupported_attribute < 0) l->unsupported_attribute = static_cast<int>(attr);
      break;
  }
  return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  make<cublasLtMatmulPreference_t, fake_preference>(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  return destroy<fake_preference>(pref);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t sizeInBytes) {
  fake_preference* p = from<fake_preference>(pref);
  if (p == nullptr || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      return read(buf, sizeInBytes, p->max_workspace) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: {
      const int i = attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES   ? 0
                    : attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES ? 1
                    : attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES ? 2
                                                                         : 3;
      return read(buf, sizeInBytes, p->min_alignment[i]) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    }
    default: return CUBLAS_STATUS_SUCCESS;  // search preferences: one algorithm either way
  }
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t lightHandle,
                                                           cublasLtMatmulDesc_t operationDesc,
                                                           cublasLtMatrixLayout_t Adesc,
                                                           cublasLtMatrixLayout_t Bdesc,
                                                           cublasLtMatrixLayout_t Cdesc,
                                                           cublasLtMatrixLayout_t Ddesc,
                                                           cublasLtMatmulPreference_t preference,
                                                           int requestedAlgoCount,
                                                           cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                                           int* returnAlgoCount) {
  if (requestedAlgoCount <= 0 || heuristicResultsArray == nullptr || returnAlgoCount == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  *returnAlgoCount = 0;
  const fake_preference* pref = from<fake_preference>(preference);
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  problem p;
  if (auto st = check(lightHandle, operationDesc, Adesc, Bdesc, Cdesc, Ddesc, p); st != CUBLAS_STATUS_SUCCESS)
    return st;
  cublasLtMatmulHeuristicResult_t& r = heuristicResultsArray[0];
  r = {};
  r.algo.data[0] = algo_magic;
  for (int i = 0; i < 4; ++i) r.algo.data[1 + i] = pref->min_alignment[i];
  r.workspaceSize = 0;
  r.state = CUBLAS_STATUS_SUCCESS;
  r.wavesCount = 1.0f;
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc,
                                           const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                                           const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                                           const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                                           cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo,
                                           void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream) {
  (void)workspace;
  (void)workspaceSizeInBytes;
  problem p;
  if (auto st = check(lightHandle, computeDesc, Adesc, Bdesc, Cdesc, Ddesc, p); st != CUBLAS_STATUS_SUCCESS)
    return st;
  if (alpha == nullptr || beta == nullptr || algo == nullptr || algo->data[0] != algo_magic)
    return CUBLAS_STATUS_INVALID_VALUE;
  float a = 0.0f, b = 0.0f;
  std::memcpy(&a, alpha, sizeof(float));
  std::memcpy(&b, beta, sizeof(float));
  if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  if (C == D && (p.c.ld != p.d.ld || p.c.stride != p.d.stride || p.c.type != p.d.type)) {
    std::fprintf(stderr, "emu (fake cuBLASLt): in place (C == D) with different layouts\n");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const auto promised = [&](int i) { return static_cast<uint32_t>(algo->data[1 + i]); };
  if (p.k > 0 && (!operand_ok("A", A, p.a, p.batch, promised(0)) || !operand_ok("B", B, p.b, p.batch, promised(1))))
    return CUBLAS_STATUS_INVALID_VALUE;
  if ((b != 0.0f && !operand_ok("C", C, p.c, p.batch, promised(2))) ||
      !operand_ok("D", D, p.d, p.batch, promised(3)))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (p.a.type == CUDA_R_8F_E4M3 && p.m > 0 && p.n > 0) {
    const int64_t groups = p.k / 128;
    const size_t a_bytes = static_cast<size_t>((p.m + 127) / 128 * ((groups + 3) / 4 * 4)) * 4;
    const size_t b_bytes = static_cast<size_t>(groups * p.n) * 4;
    if (p.desc.a_scale == nullptr || p.desc.b_scale == nullptr ||
        !emu::is_device_range(p.desc.a_scale, a_bytes) || !emu::is_device_range(p.desc.b_scale, b_bytes)) {
      std::fprintf(stderr, "emu (fake cuBLASLt): FP8 block scales missing or not inside one device allocation\n");
      return CUBLAS_STATUS_INVALID_VALUE;
    }
  }
  const cudaError_t e = emu::submit(stream, [p, a, b, A, B, C, D] { compute(p, a, b, A, B, C, D); });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"

// cuBLAS (not Lt): the handle calls and cublasGemmGroupedBatchedEx, which
// kernels/cuda/grouped_gemm_cublas.cpp uses. Each problem is a column-major product as above
// (float32 sums over k in order, alpha and beta in float32, one rounding to C's type), with A,
// B, C and the compute type as that file asks (all bf16 or all f32, CUBLAS_COMPUTE_32F, host
// scalars). The sizes are read when the call is made, as cuBLAS reads its host arrays; the
// device arrays of operand addresses when the queued work runs, as a kernel reads them (the
// copy that fills them is queued before). An operand outside every device allocation aborts the
// run with a message, as a fault would end one on a card. MOE_EMU_FAKE_CUBLAS_REFUSE_GROUPED=1
// makes it answer CUBLAS_STATUS_NOT_SUPPORTED (the callers' fallback tests set it).
struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace {

struct grouped_problem {
  cublasOperation_t ta, tb;
  int m, n, k, lda, ldb, ldc;
  float alpha, beta;
  int count;
};

void grouped_compute(const std::vector<grouped_problem>& ps, uint32_t type,
                     const void* const* a_arr, const void* const* b_arr, void* const* c_arr) {
  const size_t es = type_bytes(type);
  int64_t index = 0;
  for (const grouped_problem& p : ps)
    for (int g = 0; g < p.count; ++g, ++index) {
      const auto* A = static_cast<const unsigned char*>(a_arr[index]);
      const auto* B = static_cast<const unsigned char*>(b_arr[index]);
      auto* C = static_cast<unsigned char*>(c_arr[index]);
      const int64_t a_cols = p.ta == CUBLAS_OP_N ? p.k : p.m,
                    b_cols = p.tb == CUBLAS_OP_N ? p.n : p.k;
      const bool ok = emu::is_device_range(A, static_cast<size_t>(int64_t{p.lda} * a_cols) * es) &&
                      emu::is_device_range(B, static_cast<size_t>(int64_t{p.ldb} * b_cols) * es) &&
                      emu::is_device_range(C, static_cast<size_t>(int64_t{p.ldc} * p.n) * es);
      if (!ok) {
        std::fprintf(
            stderr,
            "emu (fake cuBLAS): grouped problem %lld reaches outside its device allocation\n",
            static_cast<long long>(index));
        std::abort();
      }
      for (int j = 0; j < p.n; ++j)
        for (int i = 0; i < p.m; ++i) {
          float sum = 0.0f;
          for (int l = 0; l < p.k; ++l) {
            const int64_t ai =
                p.ta == CUBLAS_OP_N ? i + int64_t{l} * p.lda : l + int64_t{i} * p.lda;
            const int64_t bi =
                p.tb == CUBLAS_OP_N ? l + int64_t{j} * p.ldb : j + int64_t{l} * p.ldb;
            sum += load(A, type, ai) * load(B, type, bi);
          }
          const int64_t ci = i + int64_t{j} * p.ldc;
          const float v =
              p.beta != 0.0f ? p.alpha * sum + p.beta * load(C, type, ci) : p.alpha * sum;
          store(C, type, ci, v);
        }
    }
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[],
    const cublasOperation_t transb_array[], const int m_array[], const int n_array[],
    const int k_array[], const void* alpha_array, const void* const Aarray[], cudaDataType_t Atype,
    const int lda_array[], const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
    const void* beta_array, void* const Carray[], cudaDataType_t Ctype, const int ldc_array[],
    int group_count, const int group_size[], cublasComputeType_t computeType) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (Atype != Btype || Atype != Ctype || (Atype != CUDA_R_16BF && Atype != CUDA_R_32F) ||
      computeType != CUBLAS_COMPUTE_32F)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  // Tests of the callers' fallback: refuse as cuBLAS refuses problems it has no kernel for.
  if (const char* v = std::getenv("MOE_EMU_FAKE_CUBLAS_REFUSE_GROUPED");
      v != nullptr && v[0] == '1')
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  std::vector<grouped_problem> ps;
  const auto* alpha = static_cast<const float*>(alpha_array);
  const auto* beta = static_cast<const float*>(beta_array);
  for (int g = 0; g < group_count; ++g) {
    const grouped_problem p{transa_array[g], transb_array[g], m_array[g],   n_array[g],
                            k_array[g],      lda_array[g],    ldb_array[g], ldc_array[g],
                            alpha[g],        beta[g],         group_size[g]};
    const int a_rows = p.ta == CUBLAS_OP_N ? p.m : p.k, b_rows = p.tb == CUBLAS_OP_N ? p.k : p.n;
    if (p.m < 0 || p.n < 0 || p.k < 0 || p.count < 0 || p.lda < std::max(1, a_rows) ||
        p.ldb < std::max(1, b_rows) || p.ldc < std::max(1, p.m))
      return CUBLAS_STATUS_INVALID_VALUE;
    ps.push_back(p);
  }
  const cudaError_t e = emu::submit(handle->stream, [ps, Atype, Aarray, Barray, Carray] {
    grouped_compute(ps, Atype, Aarray, Barray, Carray);
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"
