// Backward passes of the CPU kernels: the training reference. Each is the exact derivative of
// its forward kernel (rmsnorm.hpp, gemm.hpp's linear, swiglu.hpp, rope.hpp, permute.hpp), accumulating in
// double where a reduction is involved, and is checked against finite differences of that
// forward kernel (tests/unit/kernels/backward_test.cpp). MLA attention's backward,
// mla_prefill_backward, sits beside its forward in mla_attention.hpp, whose views it shares.
//
// Conventions: row-major, packed unless a stride is given. Gradients of weights are always
// accumulated (+=), since a weight's gradient sums over every use (tokens, micro-batches);
// gradients of inputs are written, or accumulated when `accumulate` is set (a residual stream
// receives several contributions). Any output pointer documented "may be null" skips that output.
// Pure functions of their arguments; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cpu/rope.hpp"
#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// Forward: y (rows, out) = x (rows, in) . weight (out, in)^T.
/// dx (rows, in) = dy . weight (written, or += with accumulate); may be null.
/// dweight (out, in) += dy^T . x; may be null.
[[nodiscard]] kernel_status linear_backward(const float* x, const float* weight, const float* dy, float* dx,
                                            float* dweight, size_t rows, size_t in_features,
                                            size_t out_features, bool accumulate = false) noexcept;

/// Forward: out = x / sqrt(mean(x^2) + eps) * weight, per row of x (rows, dim).
/// dx (rows, dim) written (or += with accumulate); may be null; may alias x or dout.
/// dweight (dim) += sum over rows, summed in double; may be null.
[[nodiscard]] kernel_status rmsnorm_backward(const float* x, const float* weight, const float* dout, float* dx,
                                             float* dweight, size_t rows, size_t dim, float eps,
                                             bool accumulate = false) noexcept;

/// Forward: out = silu(gate) * up, elementwise over (rows, dim).
/// dgate, dup (rows, dim) written; either may be null; each may alias an input (elementwise),
/// not each other.
[[nodiscard]] kernel_status swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate,
                                            float* dup, size_t rows, size_t dim) noexcept;

/// Mean cross-entropy of logits (rows, vocab) against targets (rows); a target < 0 is ignored
/// (not counted, zero gradient), as transformers' ignore_index -100. loss = mean over counted rows
/// of (logsumexp(row) - row[target]), in double; 0 when no row counts. dlogits (rows, vocab) =
/// (softmax(row) - onehot(target)) / counted (written; zero rows for ignored targets); may be null.
/// loss is required. unsupported_shape (nothing written) for a target >= vocab.
[[nodiscard]] kernel_status cross_entropy(const float* logits, const int32_t* targets, size_t rows, size_t vocab,
                                          double* loss, float* dlogits) noexcept;

/// Forward: out[r] = table[ids[r]] ((vocab, dim) table). dtable (vocab, dim) += dout[r] at row
/// ids[r], for every r. unsupported_shape for an id outside [0, vocab) (nothing written).
[[nodiscard]] kernel_status embedding_backward(const int32_t* ids, const float* dout, float* dtable, size_t rows,
                                               size_t vocab, size_t dim) noexcept;

/// The transpose of rope_apply: given the gradient with respect to rope_apply's output, in
/// place, the gradient with respect to its input (same args, same positions). rope_apply
/// de-interleaves each vector and rotates its halves, scaled by rope_attention_factor; this
/// rotates back by the negative angle, scaled the same, and interleaves.
[[nodiscard]] kernel_status rope_backward(const rope_params& p, const rope_apply_args& a,
                                          const int64_t* positions) noexcept;
[[nodiscard]] kernel_status rope_backward(const rope_params& p, const rope_apply_args& a,
                                          const int32_t* positions) noexcept;

/// Forward: permute.hpp's unpermute, out[t] = sum_k weight[t, k] * y[positions[t, k]].
/// dy (num_rows, dim): row positions[t, k] = weight[t, k] * dout[t] (written, or += with
/// accumulate); rows no entry maps to are untouched (as permute_rows leaves them); may be null.
/// dweight (num_tokens, top_k) float32: dot(dout[t], y[positions[t, k]]) in double, 0 for a
/// skipped entry (written, or += with accumulate: the combine weights are the gate's output, an
/// input of the combine, not a parameter); may be null. weight null means 1, as the forward.
/// unsupported_shape (nothing written) for a position < -1 or >= num_rows, a null pointer or
/// sizes past INT32_MAX entries.
[[nodiscard]] kernel_status unpermute_backward(const float* y, size_t num_rows, const float* weight,
                                               const int32_t* positions, size_t num_tokens,
                                               size_t top_k, size_t dim, const float* dout,
                                               float* dy, float* dweight,
                                               bool accumulate = false) noexcept;

/// Forward: permute.hpp's permute_rows, permuted[positions[t, k]] = x[t]. dx (num_tokens, dim)
/// = the sum over k = 0, 1, ... (in that order, float32 from 0.0f) of dpermuted[positions[t, k]]
/// with positions[t, k] >= 0, written (or added to dx with accumulate). A float32 sum in a fixed
/// order, so the CUDA kernel matches it bit for bit.
/// unsupported_shape (nothing written) for a position < -1 or >= num_rows, a null pointer or
/// sizes past INT32_MAX entries.
[[nodiscard]] kernel_status permute_rows_backward(const float* dpermuted, size_t num_rows,
                                                  const int32_t* positions, size_t num_tokens,
                                                  size_t top_k, size_t dim, float* dx,
                                                  bool accumulate = false) noexcept;

}  // namespace moe::kernels::cpu
