// The GPU engine as a step engine (model/step_engine.hpp): what an engine shard
// (actors/engine_shard.hpp) runs to serve the GPU engine behind the controller and the job API.
// Tokens are drawn on the device (gpu_row_sampling: the reference sampler's draws from the
// step's logits), so a step copies logits to the host only when asked for them.
// A step check_step refuses never reaches the engine; an expert-parallel engine
// (gpu_engine_options::expert_parallel) still takes its part in the world's step then, as an
// empty batch, so that its peers' steps go through.
// Ownership: owns the engine. Thread safety: one thread at a time (the engine's stream).
#pragma once

#include "engine/gpu_engine.hpp"
#include "model/step_engine.hpp"

namespace moe::engine {

class gpu_step_engine final : public model::step_engine {
 public:
  /// `device`: the ordinal `engine` was created on (gpu_engine_options::device), for device().
  gpu_step_engine(gpu_engine engine, int device) : engine_(std::move(engine)), device_(device) {}

  caf::expected<model::step_output> prefill(std::span<const model::step_sequence> seqs,
                                            bool want_logits) override;
  caf::expected<model::step_output> decode(std::span<const model::step_sequence> seqs,
                                           bool want_logits) override;
  void release(uint64_t id) override { engine_.release(id); }
  int64_t cached_tokens(uint64_t id) const override { return engine_.cached_tokens(id); }
  int64_t free_cache_blocks() const override { return engine_.num_free_cache_blocks(); }
  const model::model_config& config() const override { return engine_.config(); }
  std::string device() const override;

  [[nodiscard]] const gpu_engine& engine() const noexcept { return engine_; }

 private:
  void fill_sampling(std::span<const model::step_sequence> seqs);  // into sampling_
  /// `refusal`, after this rank's empty part of the world's step when the engine is expert
  /// parallel.
  caf::error refused(caf::error refusal, bool decode);
  gpu_engine engine_;
  int device_ = 0;
  std::vector<gpu_row_sampling> sampling_;  // the step's rows, reused
};

}  // namespace moe::engine
