// One decoder layer's attention half: input RMSNorm, multi-head latent attention (MLA) with the
// compressed latent KV cache, o_proj and the residual add, then the post-attention RMSNorm
// whose output is what the layer's MLP or router consumes.
//
// Two paths to the same math: prefill decompresses keys and values (kv_b_proj) for whole
// prompts; decode attends over the paged latent cache with kv_b_proj absorbed into the query
// and output sides, never decompressing the cache.
// Ownership: borrows its weights (see weight_lookup.hpp); owns scratch buffers.
// Thread safety: confined to one thread (the attention shard's); scratch is reused per call.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/rope.hpp"
#include "model/attention_weights.hpp"
#include "model/config.hpp"
#include "model/latent_cache.hpp"
#include "model/weight_lookup.hpp"

namespace moe::model {

/// Packed sequences of a prefill call: sequence s holds tokens [cu_seqlens[s], cu_seqlens[s+1]).
struct prefill_layout {
  std::span<const int32_t> cu_seqlens;  ///< (num_seqs + 1), from 0
  std::span<const int64_t> positions;   ///< (T) position of each token in its sequence
  std::span<const int64_t> slots;       ///< (T) cache slot of each token
};

/// One new token per sequence, attending to everything cached for it.
struct decode_layout {
  std::span<const int64_t> positions;    ///< (B)
  std::span<const int64_t> slots;        ///< (B) cache slot for the new token
  std::span<const int32_t> block_table;  ///< (B, max_blocks_per_seq)
  size_t max_blocks_per_seq = 0;
  std::span<const int32_t> seq_lens;     ///< (B) cached tokens including the new one
};

class attention_block {
 public:
  [[nodiscard]] static caf::expected<attention_block> bind(const model_config& c, int64_t layer,
                                                           const weight_lookup& weights);

  /// x: (T, hidden), the residual stream, updated in place: x += attention(input_norm(x)).
  /// mlp_in: (T, hidden) <- post_attention_norm(x). Writes every token's latent into `cache`.
  [[nodiscard]] caf::error prefill(float* x, float* mlp_in, size_t num_tokens,
                                   const prefill_layout& layout, latent_cache& cache);

  /// As prefill for one new token per sequence (x, mlp_in: (B, hidden)).
  [[nodiscard]] caf::error decode(float* x, float* mlp_in, size_t batch,
                                  const decode_layout& layout, latent_cache& cache);

  [[nodiscard]] int64_t layer() const noexcept { return w_.layer; }

 private:
  // Projections shared by both paths: q (T, H, dn + dr) with rope applied to its rope part,
  // latent_ (T, R) normed, ckv_ (T, R + dr) whose rope part is rotated; writes the cache.
  caf::error project(const float* x, size_t num_tokens, std::span<const int64_t> positions,
                     std::span<const int64_t> slots, latent_cache& cache);
  caf::error finish(float* x, float* mlp_in, size_t num_tokens);

  detail::attention_weights w_;

  std::vector<float> normed_, q_a_, q_, ckv_, latent_, kv_, attn_, q_latent_, out_latent_;
};

}  // namespace moe::model
