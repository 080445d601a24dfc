// Backward passes of the CUDA kernels: the device twins of the training reference
// kernels/cpu/backward.hpp, which defines every formula and convention (read it first):
// gradients of weights accumulate (+=, always float32); gradients of inputs are written, or
// added with `accumulate`; an output documented "may be null" skips that output. Activations
// and their gradients are stored in `dt` (f32 or bf16); arithmetic and accumulation are float32.
//
// Reproducibility: no kernel here uses float atomics. Every reduction (rmsnorm's dweight over
// rows, the cross-entropy mean, the embedding's sum over repeated ids, the combine's dot
// products) runs in an order fixed by the shapes alone, so a call gives the same bits on every
// run of the same device and build.
//
// Device data the host cannot check (positions, ids, targets) are the caller's guarantee, as in
// permute.hpp and rope.hpp; where the CPU reference would refuse the whole call, the device
// kernel skips the offending entry (nothing out of bounds is read or written) and says below
// what that entry contributes.
//
// Framework-free: raw device pointers, shapes and a stream. linear_backward alone goes through
// cuBLASLt (gemm.hpp's gemm_lt) and is defined in linear_backward.cpp, outside what the CPU
// emulator builds; mla_prefill_backward, the attention core's, is defined in
// mla_prefill_backward.cu (its reference is kernels/cpu/mla_attention.hpp's).
// Thread safety: launches are asynchronous on `stream`; the caller owns every buffer (and the
// workspace) and keeps it alive until the stream has passed the kernels. A workspace serves one
// call at a time.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/gemm.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/dtype.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cuda {

// ---------------------------------------------------------------------------------------------
// RMSNorm: forward out = x * rsqrt(mean(x^2) + eps) * weight, per row (rmsnorm.hpp).

/// dx (rows, dim) of `dt`, written or += with accumulate; may be null; may be x or dout (each
/// element is read and written by one thread, after every reduction that reads it).
/// dweight (dim) float32 += the sum over rows, reduced in two stages without atomics: row chunks
/// of a fixed size write partial sums to the workspace, then each column adds its chunks in
/// order. may be null.
struct rmsnorm_backward_args {
  const void* x = nullptr;        ///< (rows, dim) of `dt`
  const float* weight = nullptr;  ///< (dim) float32
  const void* dout = nullptr;     ///< (rows, dim) of `dt`
  void* dx = nullptr;             ///< (rows, dim) of `dt`; may be null
  float* dweight = nullptr;       ///< (dim) float32, +=; may be null
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
  bool accumulate = false;  ///< dx += rather than =
  dtype dt = dtype::f32;    ///< f32 or bf16
};

/// Float32 scratch: 2 per row (the row's inverse rms and its dx coefficient) plus
/// ceil(rows / 64) * dim partial sums; 256-byte multiple. 0 when rows == 0.
[[nodiscard]] size_t rmsnorm_backward_workspace_bytes(const rmsnorm_backward_args& a) noexcept;
/// ok, unsupported_dtype, or unsupported_shape for dim <= 0, negative rows, rows * dim past
/// int64 or rows past INT32_MAX, or a null x, weight or dout (when rows > 0).
[[nodiscard]] kernel_status rmsnorm_backward_can_run(const rmsnorm_backward_args& a) noexcept;
/// unsupported_shape also when the workspace is null or smaller than the size above.
[[nodiscard]] kernel_status rmsnorm_backward_run(const rmsnorm_backward_args& a, void* workspace,
                                                 size_t workspace_bytes,
                                                 cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// SwiGLU: forward out = silu(gate) * up, elementwise (swiglu.hpp's two-input form).

/// dgate = dout * up * dsilu(gate), dup = dout * silu(gate), both written; either may be null;
/// each may be gate, up or dout (elementwise, one thread per element), not the other output.
struct swiglu_backward_args {
  const void* gate = nullptr;  ///< (rows, dim) of `dt`
  const void* up = nullptr;    ///< (rows, dim) of `dt`
  const void* dout = nullptr;  ///< (rows, dim) of `dt`
  void* dgate = nullptr;       ///< (rows, dim) of `dt`; may be null
  void* dup = nullptr;         ///< (rows, dim) of `dt`; may be null
  int64_t rows = 0;
  int64_t dim = 0;
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, rows * dim past int64, a null
/// gate, up or dout (when rows * dim > 0), or dgate == dup (non-null).
[[nodiscard]] kernel_status swiglu_backward_can_run(const swiglu_backward_args& a) noexcept;
[[nodiscard]] kernel_status swiglu_backward_run(const swiglu_backward_args& a,
                                                cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// Cross-entropy: loss = mean over counted rows of logsumexp(row) - row[target].

/// A target < 0 is ignored (not counted, zero dlogits row), as cpu::cross_entropy. A target >=
/// vocab (device data; the CPU refuses the call) is not counted either, its dlogits row is zero,
/// and the loss is NaN: a bad label must not train silently.
/// loss: one float32 on the device, written (0 when no row counts). Row losses are kept in the
/// workspace and summed by one block in a fixed order.
/// dlogits (rows, vocab) of `dt`: (softmax(row) - onehot(target)) / counted, written; may be
/// null; must not overlap logits (a row is read three times while it is written).
struct cross_entropy_args {
  const void* logits = nullptr;      ///< (rows, vocab) of `dt`
  const int32_t* targets = nullptr;  ///< (rows) int32, device
  float* loss = nullptr;             ///< (1) float32, device
  void* dlogits = nullptr;           ///< (rows, vocab) of `dt`; may be null
  int64_t rows = 0;
  int64_t vocab = 0;
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// Float32 row losses and an int32 status per row; 256-byte multiple (256 when rows == 0).
[[nodiscard]] size_t cross_entropy_workspace_bytes(const cross_entropy_args& a) noexcept;
/// ok, unsupported_dtype, or unsupported_shape for negative rows, vocab <= 0 (with rows > 0),
/// rows or vocab past INT32_MAX, rows * vocab past int64, a null loss, or a null logits or
/// targets when rows > 0.
[[nodiscard]] kernel_status cross_entropy_can_run(const cross_entropy_args& a) noexcept;
[[nodiscard]] kernel_status cross_entropy_run(const cross_entropy_args& a, void* workspace,
                                              size_t workspace_bytes, cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// Embedding: forward out[r] = table[ids[r]].

/// dtable (vocab, dim) float32 += dout[r] at row ids[r], for every r. Deterministic and bit for
/// bit the CPU's float32 sum (which adds the rows in r order into dtable): a first pass links
/// each r to the next r' > r with the same id and marks the first occurrence of each id; a
/// second pass has each first occurrence walk its chain in r order. The link search is O(rows^2)
/// id comparisons (from L2, early exit at the first match): fine for a training batch's tokens
/// (a few tens of thousands per call), not meant for millions. We chose it over a sort (none in
/// the emulator, and a workspace of keys and values) and over float atomics (run-to-run
/// differences in the embedding's gradient). An id outside [0, vocab) contributes nothing.
struct embedding_backward_args {
  const int32_t* ids = nullptr;  ///< (rows) int32, device
  const void* dout = nullptr;    ///< (rows, dim) of `dt`
  float* dtable = nullptr;       ///< (vocab, dim) float32, +=
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t dim = 0;
  dtype dt = dtype::f32;  ///< dout's dtype: f32 or bf16
};

/// Two int32 per row (next link, first-occurrence flag); 256-byte multiple (256 when rows == 0).
[[nodiscard]] size_t embedding_backward_workspace_bytes(const embedding_backward_args& a) noexcept;
/// ok, unsupported_dtype, or unsupported_shape for negative sizes, rows past INT32_MAX, element
/// offsets past int64, or a null pointer (when rows * dim > 0).
[[nodiscard]] kernel_status embedding_backward_can_run(const embedding_backward_args& a) noexcept;
[[nodiscard]] kernel_status embedding_backward_run(const embedding_backward_args& a,
                                                   void* workspace, size_t workspace_bytes,
                                                   cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// RoPE: the transpose of rope_run's scaled rotation (rope.hpp), in place, same arguments.

/// x holds the gradient with respect to rope_run's output (de-interleaved, as rope_run leaves
/// it); afterwards the gradient with respect to its input (interleaved):
///   dx[2i]   = dy[i] * cos[p, i] + dy[i + half] * sin[p, i]
///   dx[2i+1] = dy[i + half] * cos[p, i] - dy[i] * sin[p, i]
/// products rounded separately (no FMA), as cpu::rope_backward. The same checks as rope_can_run;
/// a position outside [0, table_positions) leaves its vectors untouched.
[[nodiscard]] kernel_status rope_backward_can_run(const rope_args& a) noexcept;
[[nodiscard]] kernel_status rope_backward_run(const rope_args& a, cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// The MoE combine and dispatch copy (permute.hpp's unpermute and permute_rows).

/// unpermute's backward, as cpu::unpermute_backward: for entry j = (t, k) with positions[j] in
/// [0, num_rows): dy[positions[j]] = weight[j] * dout[t] (written or += with accumulate; other
/// rows of dy untouched), dweight[j] = dot(dout[t], y[positions[j]]) in float32 (written or +=
/// with accumulate; 0 written for a skipped entry). dy and dweight may each be null.
/// dy must not overlap dout or y.
struct unpermute_backward_args {
  const void* y = nullptr;             ///< (num_rows, dim) of `dt`; needed for dweight
  const float* weight = nullptr;       ///< (num_tokens, top_k) float32, device; null for 1
  const int32_t* positions = nullptr;  ///< (num_tokens, top_k) int32, device, from permute_plan
  const void* dout = nullptr;          ///< (num_tokens, dim) of `dt`
  void* dy = nullptr;                  ///< (num_rows, dim) of `dt`; may be null
  float* dweight = nullptr;            ///< (num_tokens, top_k) float32, device; may be null
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t dim = 0;
  int64_t num_rows = 0;
  bool accumulate = false;
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, num_tokens * top_k past
/// INT32_MAX, element offsets past int64, a null positions or dout (when there are entries),
/// or a null y with dweight set.
[[nodiscard]] kernel_status unpermute_backward_can_run(const unpermute_backward_args& a) noexcept;
[[nodiscard]] kernel_status unpermute_backward_run(const unpermute_backward_args& a,
                                                   cudaStream_t stream) noexcept;

/// permute_rows' backward, as cpu::permute_rows_backward: dx[t] = the float32 sum over k in
/// order of dpermuted[positions[t, k]] for positions in [0, num_rows), written or += with
/// accumulate (a token with no row gets 0, or keeps dx). dx must not overlap dpermuted.
struct permute_rows_backward_args {
  const void* dpermuted = nullptr;     ///< (num_rows, dim) of `dt`
  const int32_t* positions = nullptr;  ///< (num_tokens, top_k) int32, device
  void* dx = nullptr;                  ///< (num_tokens, dim) of `dt`
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  int64_t dim = 0;
  int64_t num_rows = 0;
  bool accumulate = false;
  dtype dt = dtype::f32;  ///< f32 or bf16
};

/// ok, unsupported_dtype, or unsupported_shape for negative sizes, num_tokens * top_k past
/// INT32_MAX, element offsets past int64, or a null pointer (dx when num_tokens * dim > 0;
/// dpermuted and positions also when top_k > 0).
[[nodiscard]] kernel_status permute_rows_backward_can_run(
    const permute_rows_backward_args& a) noexcept;
[[nodiscard]] kernel_status permute_rows_backward_run(const permute_rows_backward_args& a,
                                                      cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// Linear: forward y (rows, out) = x (rows, in) . weight (out, in)^T (gemm.hpp's linear_desc).

/// Two cuBLASLt products on `stream`, as cpu::linear_backward:
///   dx (rows, in) = dy . weight           (c of `dx_dt`; beta 1 with accumulate); may be null
///   dweight (out, in) += dy^T . x          (float32 always, beta 1); may be null
/// ab_dt bf16 (x, weight, dy stored in bf16; float32 accumulation) or f32 (float32 throughout,
/// no TF32). dx_dt: bf16 or f32 with bf16 inputs, f32 with f32 inputs. A bf16 dx with
/// accumulate may be rounded twice (cuBLASLt can round the product to bf16 before adding beta *
/// C): accumulate into a float32 dx where that matters. Not in the emulator (no cuBLASLt there):
/// its test needs a GPU.
struct linear_backward_args {
  const void* x = nullptr;       ///< (rows, in_features) of ab_dt; needed for dweight
  const void* weight = nullptr;  ///< (out_features, in_features) of ab_dt; needed for dx
  const void* dy = nullptr;      ///< (rows, out_features) of ab_dt
  void* dx = nullptr;            ///< (rows, in_features) of dx_dt; may be null
  float* dweight = nullptr;      ///< (out_features, in_features) float32, +=; may be null
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool accumulate = false;  ///< dx += rather than =
  dtype ab_dt = dtype::bf16;
  dtype dx_dt = dtype::bf16;
};

/// The two products as gemm_descs (either with m == 0 when its output is null or empty): what
/// linear_backward_run queues. Host code; shapes as cpu::linear_backward's.
void linear_backward_descs(const linear_backward_args& a, gemm_desc& dx_desc,
                           gemm_desc& dweight_desc) noexcept;
/// ok, unsupported_dtype (a dtype pair cuBLASLt is not set up for here), or unsupported_shape
/// (negative sizes, a missing operand, or what gemm_can_run refuses in either product).
[[nodiscard]] kernel_status linear_backward_can_run(const linear_backward_args& a) noexcept;
/// Both products are checked before either is queued. workspace: gemm_lt's (gemm.hpp).
[[nodiscard]] kernel_status linear_backward_run(gemm_lt& lt, const linear_backward_args& a,
                                                void* workspace, size_t workspace_bytes,
                                                cudaStream_t stream) noexcept;

// ---------------------------------------------------------------------------------------------
// MLA attention: the backward of mla_prefill (mla_prefill.hpp) without a cached prefix, as
// cpu::mla_prefill_backward (kernels/cpu/mla_attention.hpp), which gives the formulas: the
// probabilities are recomputed from the forward's float32 log-sum-exp (mla_prefill_args::lse),
// D_i = dout_i . out_i, dS = P (dP - D).
//
// Four launches, each a plain CUDA-core kernel over 16-token tiles (correctness first; the
// tensor-core version is future work): D per (token, head) into the workspace; dq per (query
// tile, head), summing over key tiles in order; dk_nope, dv and a per-head dk_pe per (key tile,
// head), summing over query tiles in order, the per-head dk_pe kept in the workspace; then dk_pe
// = the sum over heads in head order. All float32, no atomics: the bits depend on the shapes only.
// The per-head dk_pe costs T * H * dr floats of workspace (T * H * 64 * 4 bytes for DeepSeek-V3,
// a third of q's size in float32), the price of a reduction over heads without atomics.
//
// Device data the host cannot check (cu_seqlens) is the caller's guarantee: offsets
// non-decreasing from 0 within num_tokens. A sequence that breaks it is skipped (its rows of
// every output are left untouched), where the CPU refuses the call.
struct mla_prefill_backward_args {
  // The forward's inputs, as mla_prefill_args (element strides, 0 = packed).
  const void* q = nullptr;  ///< (T, H, dn + dr) of `dt`
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  const void* k_nope = nullptr;  ///< (T, H, dn) of `dt`
  int64_t k_nope_token_stride = 0;
  int64_t k_nope_head_stride = 0;
  const void* k_pe = nullptr;  ///< (T, dr) of `dt`, shared by every head
  int64_t k_pe_token_stride = 0;
  const void* v = nullptr;  ///< (T, H, dv) of `dt`
  int64_t v_token_stride = 0;
  int64_t v_head_stride = 0;
  const void* out = nullptr;     ///< (T, H, dv) of `dt`, packed: the forward's output
  const float* lse = nullptr;    ///< (T, H) float32, packed: mla_prefill_args::lse
  const void* dout = nullptr;    ///< (T, H, dv) of `dt`, packed
  // Gradients of `dt`, written; each may be null (skipped); none may overlap an input.
  void* dq = nullptr;  ///< (T, H, dn + dr), packed
  void* dk_nope = nullptr;  ///< (T, H, dn)
  int64_t dk_nope_token_stride = 0;
  int64_t dk_nope_head_stride = 0;
  void* dk_pe = nullptr;  ///< (T, dr): summed over heads
  int64_t dk_pe_token_stride = 0;
  void* dv = nullptr;  ///< (T, H, dv)
  int64_t dv_token_stride = 0;
  int64_t dv_head_stride = 0;
  const int32_t* cu_seqlens = nullptr;  ///< (num_seqs + 1) int32, device; causal per sequence
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;  ///< T: rows of every (T, ...) tensor
  /// A bound on every sequence's length the host knows, to size the grid; 0 = num_tokens. A
  /// longer sequence is still computed in full (its blocks loop over the extra tiles).
  int64_t max_seqlen = 0;
  int64_t num_heads = 0;
  int64_t nope_dim = 0;  ///< dn
  int64_t rope_dim = 0;  ///< dr
  int64_t v_dim = 0;     ///< dv
  float softmax_scale = 0.0f;  ///< the forward's
  dtype dt = dtype::f32;  ///< f32 or bf16, for every tensor above but lse
};

/// Float32 D (T * H) and, with dk_pe and dr > 0, the per-head dk_pe (T * H * dr), each rounded
/// up to 256 bytes. 0 when there is nothing to compute.
[[nodiscard]] size_t mla_prefill_backward_workspace_bytes(
    const mla_prefill_backward_args& a) noexcept;
/// ok, unsupported_dtype, or unsupported_shape for num_heads outside [1, 65535], v_dim outside
/// [1, 512], dn + dr above 576 (mla_prefill.hpp's limits), negative sizes or strides,
/// counts or strides above INT32_MAX, more than INT32_MAX blocks in the grid, a non-finite scale,
/// or a null input (when num_seqs and num_tokens are > 0; k_nope only when dn > 0, k_pe only when
/// dr > 0).
[[nodiscard]] kernel_status mla_prefill_backward_can_run(
    const mla_prefill_backward_args& a) noexcept;
/// unsupported_shape also when the workspace is null or smaller than the size above.
[[nodiscard]] kernel_status mla_prefill_backward_run(const mla_prefill_backward_args& a,
                                                     void* workspace, size_t workspace_bytes,
                                                     cudaStream_t stream) noexcept;

}  // namespace moe::kernels::cuda
