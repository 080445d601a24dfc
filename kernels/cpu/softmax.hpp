// Row-wise softmax and log-softmax over float32 rows (attention probabilities, sampling,
// cross-entropy). Max-subtracted, with the sum in double so long rows (a 129k vocabulary)
// do not lose the small terms.
// Thread safety: pure functions; safe to call concurrently on disjoint outputs.
#pragma once

#include <cstddef>

#include "kernels/kernel_status.hpp"

namespace moe::kernels::cpu {

/// out[r, :] = exp(x[r, :] - max) / sum(exp(x[r, :] - max)). x, out: (rows, dim); may alias.
/// A row of all -inf has no distribution: it becomes NaN, as torch.softmax gives.
[[nodiscard]] kernel_status softmax_rows(const float* x, float* out, size_t rows,
                                         size_t dim) noexcept;

/// out[r, :] = x[r, :] - max - log(sum(exp(x[r, :] - max))). x, out: (rows, dim); may alias.
[[nodiscard]] kernel_status log_softmax_rows(const float* x, float* out, size_t rows,
                                             size_t dim) noexcept;

}  // namespace moe::kernels::cpu
