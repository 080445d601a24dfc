// The single-process reference engine: every block of the model composed in one place, with the
// latent KV cache, for batches of sequences of different lengths. Prefill then decode.
//
// It is the yardstick the actor runtime is measured against (same blocks, same order of
// floating-point operations), and what `moe run` uses.
// Ownership: shares the checkpoint (keeps it alive), owns the blocks and the cache.
// Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/error.hpp"
#include "model/attention_block.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"
#include "model/mlp_block.hpp"
#include "kernels/cpu/sampling.hpp"
#include "model/moe_blocks.hpp"

namespace moe::model {

struct engine_options {
  latent_cache_options cache;
};

struct sequence_input {
  uint64_t id = 0;
  std::span<const int32_t> tokens;
};

struct prefill_options {
  bool all_logits = false;       ///< logits for every position, not only each sequence's last
  bool capture_hidden = false;   ///< each layer's input, and the final normed state last
  bool capture_routing = false;  ///< each MoE layer's top-k expert choices
};

struct prefill_result {
  /// (num_seqs, vocab): each sequence's last position; (T, vocab) with all_logits.
  std::vector<float> logits;
  /// capture_hidden: num_hidden_layers + 1 tensors of (T, hidden), tokens packed.
  std::vector<std::vector<float>> hidden;
  /// capture_routing: per MoE layer (in layer order), (T, top_k) expert ids.
  std::vector<std::vector<int32_t>> routing;
};

struct decode_input {
  uint64_t id = 0;
  int32_t token = 0;
};

/// Embedding lookup, final norm and LM head.
class embedding_head {
 public:
  [[nodiscard]] static caf::expected<embedding_head> bind(const model_config& c,
                                                          const weight_lookup& weights);
  /// out: (n, hidden). model_errc::bad_input naming the first id outside [0, vocab).
  [[nodiscard]] caf::error embed(std::span<const int32_t> ids, float* out) const;
  /// out (rows, hidden) = final RMSNorm of x.
  [[nodiscard]] caf::error final_norm(const float* x, size_t rows, float* out) const;
  /// x: (rows, hidden) -> logits (rows, vocab), through the final RMSNorm. normed may be null.
  [[nodiscard]] caf::error logits(const float* x, size_t rows, float* out, float* normed) const;

 private:
  const float* embed_ = nullptr;  // (vocab, hidden)
  const float* norm_ = nullptr;   // (hidden)
  const float* head_ = nullptr;   // (vocab, hidden)
  int64_t vocab_ = 0, hidden_ = 0;
  float eps_ = 1e-6f;
};

/// One MoE layer's routed and shared experts, all in this process.
struct moe_layer_blocks {
  router_block router;
  expert_set experts;
  std::optional<mlp_block> shared;
};

class reference_engine {
 public:
  [[nodiscard]] static caf::expected<reference_engine> create(std::shared_ptr<const checkpoint> ckpt,
                                                              const engine_options& options = {});

  /// Runs new sequences' prompts (ids not yet in the cache) and caches them.
  [[nodiscard]] caf::expected<prefill_result> prefill(std::span<const sequence_input> seqs,
                                                      const prefill_options& options = {});
  /// One token per cached sequence -> logits (B, vocab).
  [[nodiscard]] caf::expected<std::vector<float>> decode(std::span<const decode_input> batch);
  /// Forgets a sequence and frees its cache blocks.
  void release(uint64_t id);
  [[nodiscard]] int64_t cached_tokens(uint64_t id) const noexcept;
  [[nodiscard]] int64_t num_free_cache_blocks() const noexcept { return cache_->num_free_blocks(); }

  [[nodiscard]] const model_config& config() const noexcept { return ckpt_->config; }

  /// Tokens routed to each logical expert since creation: one row of n_routed_experts counts per
  /// layer (empty rows for dense layers).
  [[nodiscard]] const std::vector<std::vector<uint64_t>>& expert_token_counts() const noexcept {
    return expert_counts_;
  }

 private:
  caf::error run_ffn(int64_t layer, const float* mlp_in, float* x, size_t num_tokens,
                     std::vector<int32_t>* routing);

  std::shared_ptr<const checkpoint> ckpt_;
  std::optional<embedding_head> head_;
  std::vector<attention_block> attention_;
  std::vector<std::optional<mlp_block>> dense_;
  std::vector<std::optional<moe_layer_blocks>> moe_;
  std::unique_ptr<latent_cache> cache_;
  std::unordered_map<uint64_t, int64_t> lengths_;
  std::vector<std::vector<uint64_t>> expert_counts_;
  mlp_scratch scratch_;
  std::vector<float> x_, mlp_in_, y_, shared_, rows_in_, rows_out_, topk_weight_;
  std::vector<int32_t> topk_idx_;
};

/// What `moe run` and the tests ask of generation.
struct generation_request {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  kernels::cpu::sampling_params sampling{0.0f, 0, 1.0f};  ///< temperature 0: greedy
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;
};

/// Prefills every prompt together, then decodes them as one batch until each is done
/// (max_new_tokens, or a stop token, which is kept). Returns the generated ids per request.
[[nodiscard]] caf::expected<std::vector<std::vector<int32_t>>> generate(
    reference_engine& engine, std::span<const generation_request> requests);

}  // namespace moe::model
