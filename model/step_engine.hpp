// A whole model's serving steps on one engine, behind one interface: what an actor that serves
// a data-parallel replica of the model runs (actors/engine_shard.hpp). A prefill caches new
// sequences and returns each one's next token; a decode takes one token per cached sequence and
// returns the next. The tokens are kernels::cpu::sample's draws from each row's logits, with the
// row's parameters and its counter (seed, offset: the tokens that request sampled so far), so
// every engine behind this interface gives a request the same tokens as the reference engine
// and the actor graph, wherever their logits agree.
//
// Engines: reference_step_engine (below: model::reference_engine, float32 on the CPU) and, in
// CUDA builds, engine::gpu_step_engine (engine/gpu_step_engine.hpp: the GPU engine, which draws
// on the device).
//
// Errors: model_errc::bad_input (unknown, duplicate or already cached sequences, token ids
// outside the vocabulary, empty prompts, positions past max_position_embeddings, sampling
// parameters out of range) before anything runs; model_errc::cache_full (transient: retry once
// sequences are released). A failed prefill leaves none of its sequences cached.
// Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/sampling.hpp"
#include "model/config.hpp"
#include "model/reference_engine.hpp"

namespace moe::model {

/// One sequence's share of a step: its prompt (prefill) or its newest token (decode), and how
/// its next token is drawn.
struct step_sequence {
  uint64_t id = 0;
  std::span<const int32_t> tokens;
  kernels::cpu::sampling_params sampling{0.0f, 0, 1.0f};  ///< temperature 0: greedy
  uint64_t seed = 0;
  uint64_t offset = 0;  ///< tokens this sequence has sampled so far
};

struct step_output {
  std::vector<int32_t> tokens;  ///< (sequences): each one's next token, in the step's order
  std::vector<float> logits;    ///< (sequences, vocab) float32 when asked for, else empty
};

class step_engine {
 public:
  virtual ~step_engine() = default;
  [[nodiscard]] virtual caf::expected<step_output> prefill(std::span<const step_sequence> seqs,
                                                           bool want_logits) = 0;
  /// Each sequence's tokens: exactly one.
  [[nodiscard]] virtual caf::expected<step_output> decode(std::span<const step_sequence> seqs,
                                                          bool want_logits) = 0;
  /// Forgets a sequence and frees its cache; unknown ids are ignored.
  virtual void release(uint64_t id) = 0;
  [[nodiscard]] virtual int64_t cached_tokens(uint64_t id) const = 0;
  /// Free blocks of its latent KV cache (what a shard reports: moe_attention_free_cache_blocks).
  [[nodiscard]] virtual int64_t free_cache_blocks() const = 0;
  [[nodiscard]] virtual const model_config& config() const = 0;
  /// Where it runs and in what dtype, for people (e.g. "cpu f32", "cuda:0 bf16").
  [[nodiscard]] virtual std::string device() const = 0;
};

/// What every step engine checks before it runs a step: model_errc::bad_input naming the
/// sequence when its sampling is out of range (a temperature below 0 or NaN, top_p outside
/// (0, 1]) or, in a decode step, it does not carry exactly one token; none otherwise.
[[nodiscard]] caf::error check_step(std::span<const step_sequence> seqs, bool decode);

/// The reference engine (float32, CPU) as a step engine: its logits, sampled on the host.
class reference_step_engine final : public step_engine {
 public:
  explicit reference_step_engine(reference_engine engine);

  caf::expected<step_output> prefill(std::span<const step_sequence> seqs,
                                     bool want_logits) override;
  caf::expected<step_output> decode(std::span<const step_sequence> seqs, bool want_logits) override;
  void release(uint64_t id) override;
  int64_t cached_tokens(uint64_t id) const override;
  int64_t free_cache_blocks() const override { return engine_.num_free_cache_blocks(); }
  const model_config& config() const override;
  std::string device() const override { return "cpu f32 (reference engine)"; }

 private:
  caf::expected<step_output> sample(std::span<const step_sequence> seqs, std::vector<float> logits,
                                    bool want_logits);
  reference_engine engine_;
  kernels::cpu::sampler sampler_;
};

}  // namespace moe::model
