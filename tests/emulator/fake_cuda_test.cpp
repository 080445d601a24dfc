// The stand-ins the engine's emulated test links (fake_cudart.cpp, fake_cublaslt.cpp) do what
// that test relies on and could not tell apart from a fake that is too lenient: a capture
// records without running, a replay runs what was recorded (reading host buffers as they are
// then), a stream forked by an event joins the capture and must be joined back, a refused call
// invalidates the capture, copies past an allocation are refused, and the
// products follow cuBLASLt's column-major definition (transposes, leading dimensions, strided
// batches, bf16 rounding, beta == 0 not reading C).
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

struct stream_owner {
  cudaStream_t s = nullptr;
  stream_owner() { EXPECT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess); }
  ~stream_owner() { (void)cudaStreamDestroy(s); }
};

TEST(emulated_cuda_runtime, a_capture_records_and_a_replay_runs) {
  stream_owner st;
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 64), cudaSuccess);
  void* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(&pinned, 64, cudaHostAllocDefault), cudaSuccess);
  std::memset(pinned, 1, 64);
  ASSERT_EQ(cudaMemsetAsync(dev, 0, 64, st.s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(st.s), cudaSuccess);

  ASSERT_EQ(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  ASSERT_EQ(cudaStreamIsCapturing(st.s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusActive);
  ASSERT_EQ(cudaMemcpyAsync(dev, pinned, 64, cudaMemcpyHostToDevice, st.s), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(st.s, &graph), cudaSuccess);
  ASSERT_NE(graph, nullptr);
  std::vector<unsigned char> out(64, 7);
  ASSERT_EQ(cudaMemcpy(out.data(), dev, 64, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 0) << "the captured copy ran during the capture";

  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  std::memset(pinned, 5, 64);  // a replay reads the host buffer as it is at the replay
  ASSERT_EQ(cudaGraphLaunch(exec, st.s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(st.s), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dev, 64, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 5);
  EXPECT_EQ(out[63], 5);
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// A second stream forked from a capture by an event joins it: its work is recorded, not run,
// and replayed; the capture ends only once the origin waited for all of it.
TEST(emulated_cuda_runtime, a_forked_stream_joins_the_capture) {
  stream_owner main, side;
  cudaEvent_t fork = nullptr, join = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&join, cudaEventDisableTiming), cudaSuccess);
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 64), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(dev, 0, 64, main.s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(main.s), cudaSuccess);
  const auto capture_fork = [&](bool joined) {
    EXPECT_EQ(cudaStreamBeginCapture(main.s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    EXPECT_EQ(cudaEventRecord(fork, main.s), cudaSuccess);
    EXPECT_EQ(cudaStreamWaitEvent(side.s, fork, 0), cudaSuccess);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EXPECT_EQ(cudaStreamIsCapturing(side.s, &status), cudaSuccess);
    EXPECT_EQ(status, cudaStreamCaptureStatusActive);
    EXPECT_EQ(cudaMemsetAsync(dev, 3, 32, side.s), cudaSuccess);
    EXPECT_EQ(cudaEventRecord(join, side.s), cudaSuccess);
    if (joined) {
      EXPECT_EQ(cudaStreamWaitEvent(main.s, join, 0), cudaSuccess);
    }
    EXPECT_EQ(cudaMemsetAsync(static_cast<char*>(dev) + 32, 4, 32, main.s), cudaSuccess);
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(main.s, &graph);
    EXPECT_EQ(cudaStreamIsCapturing(side.s, &status), cudaSuccess);
    EXPECT_EQ(status, cudaStreamCaptureStatusNone) << "the side stream left the capture";
    return std::pair{end, graph};
  };

  auto [unjoined, none] = capture_fork(false);
  EXPECT_EQ(unjoined, cudaErrorStreamCaptureUnjoined);
  EXPECT_EQ(none, nullptr);
  (void)cudaGetLastError();

  auto [end, graph] = capture_fork(true);
  ASSERT_EQ(end, cudaSuccess);
  ASSERT_NE(graph, nullptr);
  std::vector<unsigned char> out(64, 7);
  ASSERT_EQ(cudaMemcpy(out.data(), dev, 64, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 0) << "the side stream's work ran during the capture";
  size_t nodes = 0;
  ASSERT_EQ(cudaGraphGetNodes(graph, nullptr, &nodes), cudaSuccess);
  EXPECT_EQ(nodes, 2u);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, main.s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(main.s), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dev, 64, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(out[0], 3);
  EXPECT_EQ(out[63], 4);
  // The side stream takes eager work again.
  EXPECT_EQ(cudaMemsetAsync(dev, 0, 64, side.s), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(side.s), cudaSuccess);
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(fork), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(join), cudaSuccess);
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(emulated_cuda_runtime, calls_a_capture_refuses_invalidate_it) {
  stream_owner st;
  ASSERT_EQ(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(st.s), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorStreamCaptureUnsupported);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  ASSERT_EQ(cudaStreamIsCapturing(st.s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusInvalidated);
  void* dev = nullptr;
  EXPECT_EQ(cudaMalloc(&dev, 16), cudaErrorStreamCaptureUnsupported);
  cudaGraph_t graph = reinterpret_cast<cudaGraph_t>(1);
  EXPECT_EQ(cudaStreamEndCapture(st.s, &graph), cudaErrorStreamCaptureInvalidated);
  EXPECT_EQ(graph, nullptr);
  ASSERT_EQ(cudaStreamIsCapturing(st.s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusNone);
  EXPECT_NE(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // cleared by the read
  // The stream takes eager work again.
  ASSERT_EQ(cudaMalloc(&dev, 16), cudaSuccess);
  EXPECT_EQ(cudaMemsetAsync(dev, 0, 16, st.s), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(st.s), cudaSuccess);
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
}

TEST(emulated_cuda_runtime, copies_past_an_allocation_and_bad_handles_are_refused) {
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 100), cudaSuccess);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(dev) % 256, 0u);
  std::vector<unsigned char> host(200, 0);
  EXPECT_EQ(cudaMemcpy(dev, host.data(), 101, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(host.data(), static_cast<char*>(dev) + 50, 51, cudaMemcpyDeviceToHost),
            cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(host.data(), dev, 100, cudaMemcpyHostToDevice), cudaErrorInvalidValue)
      << "the direction contradicts the pointers";
  ASSERT_EQ(cudaMemcpy(host.data(), dev, 100, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host[0], 0xff) << "fresh device memory is poisoned";
  EXPECT_EQ(cudaFree(static_cast<char*>(dev) + 1), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
  EXPECT_EQ(cudaFree(dev), cudaErrorInvalidValue) << "a double free";
  (void)cudaGetLastError();
}

// cuBLASLt's D = alpha op(A) op(B) + beta C, column-major, checked element by element.
struct lt_case {
  cublasOperation_t ta, tb;
  int m, n, k, batch;
  cudaDataType_t ab, cd;
  float beta;
};

float round_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

void run_case(const lt_case& c) {
  const int lda_rows = c.ta == CUBLAS_OP_N ? c.m : c.k, a_cols = c.ta == CUBLAS_OP_N ? c.k : c.m;
  const int ldb_rows = c.tb == CUBLAS_OP_N ? c.k : c.n, b_cols = c.tb == CUBLAS_OP_N ? c.n : c.k;
  const int lda = lda_rows + 3, ldb = ldb_rows + 1, ldc = c.m + 2;
  const int64_t sa = int64_t{lda} * a_cols + 8, sb = int64_t{ldb} * b_cols, sc = int64_t{ldc} * c.n;
  const size_t eab = c.ab == CUDA_R_16BF ? 2 : 4, ecd = c.cd == CUDA_R_16BF ? 2 : 4;
  auto value = [](int64_t i, int salt) { return static_cast<float>((i * 37 + salt * 11) % 17 - 8) / 8.0f; };
  auto fill = [&](std::vector<unsigned char>& buf, size_t es, int64_t count, int salt) {
    buf.resize(static_cast<size_t>(count) * es);
    for (int64_t i = 0; i < count; ++i) {
      const float v = value(i, salt);
      if (es == 2) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        const auto h = static_cast<uint16_t>(u >> 16);  // exact: v has few bits
        std::memcpy(buf.data() + i * 2, &h, 2);
      } else {
        std::memcpy(buf.data() + i * 4, &v, 4);
      }
    }
  };
  std::vector<unsigned char> a, b, cbuf;
  fill(a, eab, sa * c.batch, 1);
  fill(b, eab, sb * c.batch, 2);
  fill(cbuf, ecd, sc * c.batch, 3);
  void *da = nullptr, *db = nullptr, *dc = nullptr;
  ASSERT_EQ(cudaMalloc(&da, a.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&db, b.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dc, cbuf.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(da, a.data(), a.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(db, b.data(), b.size(), cudaMemcpyHostToDevice), cudaSuccess);
  if (c.beta != 0.0f) {
    ASSERT_EQ(cudaMemcpy(dc, cbuf.data(), cbuf.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }  // else C keeps its NaN poison, which beta == 0 must not read

  cublasLtHandle_t h = nullptr;
  ASSERT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulDesc_t desc = nullptr;
  ASSERT_EQ(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &c.ta, sizeof(c.ta)),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &c.tb, sizeof(c.tb)),
            CUBLAS_STATUS_SUCCESS);
  auto layout = [&](cudaDataType_t t, int rows, int cols, int ld, int64_t stride) {
    cublasLtMatrixLayout_t l = nullptr;
    EXPECT_EQ(cublasLtMatrixLayoutCreate(&l, t, rows, cols, ld), CUBLAS_STATUS_SUCCESS);
    const int32_t count = c.batch;
    EXPECT_EQ(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
              CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                               sizeof(stride)),
              CUBLAS_STATUS_SUCCESS);
    return l;
  };
  cublasLtMatrixLayout_t la = layout(c.ab, lda_rows, a_cols, lda, sa);
  cublasLtMatrixLayout_t lb = layout(c.ab, ldb_rows, b_cols, ldb, sb);
  cublasLtMatrixLayout_t lc = layout(c.cd, c.m, c.n, ldc, sc);
  cublasLtMatmulPreference_t pref = nullptr;
  ASSERT_EQ(cublasLtMatmulPreferenceCreate(&pref), CUBLAS_STATUS_SUCCESS);
  // The odd strides leave batches 2-byte aligned: the heuristic must be told (its default
  // promise, 256 bytes, is refused for such operands).
  const uint32_t alignment = 2;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    ASSERT_EQ(cublasLtMatmulPreferenceSetAttribute(pref, attr, &alignment, sizeof(alignment)),
              CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  ASSERT_EQ(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, &result, &found),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(found, 1);
  const float alpha = 0.5f;
  ASSERT_EQ(cublasLtMatmul(h, desc, &alpha, da, la, db, lb, &c.beta, dc, lc, dc, lc, &result.algo, nullptr, 0,
                           nullptr),
            CUBLAS_STATUS_SUCCESS);
  std::vector<unsigned char> got(cbuf.size());
  ASSERT_EQ(cudaMemcpy(got.data(), dc, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int bt = 0; bt < c.batch; ++bt)
    for (int j = 0; j < c.n; ++j)
      for (int i = 0; i < c.m; ++i) {
        float acc = 0.0f;
        for (int q = 0; q < c.k; ++q) {
          const int64_t ai = bt * sa + (c.ta == CUBLAS_OP_N ? i + int64_t{q} * lda : q + int64_t{i} * lda);
          const int64_t bi = bt * sb + (c.tb == CUBLAS_OP_N ? q + int64_t{j} * ldb : j + int64_t{q} * ldb);
          acc += value(ai, 1) * value(bi, 2);
        }
        const int64_t ci = bt * sc + i + int64_t{j} * ldc;
        float want = alpha * acc + (c.beta != 0.0f ? c.beta * value(ci, 3) : 0.0f);
        if (c.cd == CUDA_R_16BF) want = round_bf16(want);
        float v;
        if (ecd == 2) {
          uint16_t hv;
          std::memcpy(&hv, got.data() + ci * 2, 2);
          const uint32_t u = static_cast<uint32_t>(hv) << 16;
          std::memcpy(&v, &u, 4);
        } else {
          std::memcpy(&v, got.data() + ci * 4, 4);
        }
        ASSERT_NEAR(v, want, 1e-5f * (1.0f + std::fabs(want))) << "batch " << bt << " (" << i << ", " << j << ")";
      }
  for (auto* l : {la, lb, lc}) EXPECT_EQ(cublasLtMatrixLayoutDestroy(l), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulPreferenceDestroy(pref), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulDescDestroy(desc), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtDestroy(h), CUBLAS_STATUS_SUCCESS);
  for (void* p : {da, db, dc}) EXPECT_EQ(cudaFree(p), cudaSuccess);
}

TEST(emulated_cublaslt, follows_the_column_major_definition) {
  run_case({CUBLAS_OP_N, CUBLAS_OP_N, 5, 7, 3, 1, CUDA_R_32F, CUDA_R_32F, 0.0f});
  run_case({CUBLAS_OP_T, CUBLAS_OP_N, 4, 6, 9, 3, CUDA_R_32F, CUDA_R_32F, 1.0f});
  run_case({CUBLAS_OP_N, CUBLAS_OP_T, 3, 5, 8, 2, CUDA_R_16BF, CUDA_R_32F, 0.25f});
  run_case({CUBLAS_OP_T, CUBLAS_OP_T, 6, 2, 5, 2, CUDA_R_16BF, CUDA_R_16BF, 0.0f});
}

TEST(emulated_cublaslt, refuses_what_it_does_not_emulate) {
  cublasLtHandle_t h = nullptr;
  ASSERT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulDesc_t desc = nullptr;
  ASSERT_EQ(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  cublasLtMatrixLayout_t a = nullptr, c = nullptr;
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, 128, 128, 128), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, 128, 128, 128), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulPreference_t pref = nullptr;
  ASSERT_EQ(cublasLtMatmulPreferenceCreate(&pref), CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(h, desc, a, a, c, c, pref, 1, &result, &found),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(found, 0);
  // Dimensions that do not chain: op(A) 128x128 and B 64 rows.
  cublasLtMatrixLayout_t b = nullptr;
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, 64, 128, 64), CUBLAS_STATUS_SUCCESS);
  cublasLtMatrixLayout_t a16 = nullptr;
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&a16, CUDA_R_16BF, 128, 128, 128), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(h, desc, a16, b, c, c, pref, 1, &result, &found),
            CUBLAS_STATUS_INVALID_VALUE);
  for (auto* l : {a, b, c, a16}) EXPECT_EQ(cublasLtMatrixLayoutDestroy(l), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulPreferenceDestroy(pref), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulDescDestroy(desc), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtDestroy(h), CUBLAS_STATUS_SUCCESS);
}

}  // namespace
