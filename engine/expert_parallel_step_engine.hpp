// Several GPUs serving one model as one step engine (model/step_engine.hpp): an expert-parallel
// group. Each GPU runs a GPU engine holding its share of the routed experts and its own sequences
// (gpu_engine_options::expert_parallel, over an NCCL world of this process's GPUs); the group
// gives a step's sequences to the ranks and drives every rank through the same collective steps
// on threads of its own. So an engine shard (actors/engine_shard.hpp) serves a model whose
// experts do not fit one GPU behind the same controller and job API: `moe serve --engine gpu
// --expert-parallel N`.
//
// Sequences: a new one goes to the rank with the fewest sequences among those whose cache has
// room for its prompt (then the most free blocks, then the lowest rank) and stays there; its
// decode steps run there. A step runs as rounds: in each, every rank runs (prefill or decode)
// its next sequences up to max_tokens_per_rank tokens, or an empty step, so every rank makes the
// same calls; a step within that budget on every rank is one round, a step without sequences
// none.
//
// Errors, before anything runs: model::check_step's, sequences unknown (decode), already cached
// or twice in the step (model_errc::bad_input), a prompt longer than max_tokens_per_rank
// (bad_input), and model_errc::cache_full when no rank has room for a new prompt or a rank lacks
// the blocks its sequences' next tokens need (transient; nothing changes). A rank's engine may
// still refuse its part (a token outside the vocabulary): a prefill then releases every sequence
// of the step, on every rank, and a decode returns the error with its other ranks' sequences
// advanced (as the single-GPU engine's decode may keep a block for earlier sequences); the error
// is the lowest such rank's own, not a peer's model_errc::peer_refused notice of it. A kernel
// or NCCL failure breaks the world, as any failed collective: the group is then to be dropped.
//
// Ownership: owns its communicators, engines and threads (joined before the engines go, which go
// before the communicators). Thread safety: one caller at a time, as every step engine.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "engine/gpu_engine.hpp"
#include "model/step_engine.hpp"

namespace moe::engine {

struct expert_parallel_group_options {
  /// Each rank's engine options; the group sets device, expert_parallel and decode_graphs (off:
  /// expert parallelism runs eagerly) per rank. cache: each rank's own cache.
  gpu_engine_options engine;
  /// One rank per device, in rank order; at least one, distinct. The model's routed experts
  /// must split evenly over them.
  std::vector<int> devices;
  /// The most tokens one rank runs in one round (a prefill's prompts together, a decode's
  /// batch): bounds each rank's send buffers (this x top_k rows of hidden) and, by default, its
  /// receive buffers (ranks x this x top_k rows).
  int64_t max_tokens_per_rank = 2048;
  /// Rows of hidden each rank's receive buffers hold (gpu_expert_parallel::recv_rows): 0 for the
  /// worst routing; fewer, at least one a rank, bound each GPU's memory for the exchange, and
  /// rounds whose routing needs more run their MoE layers in chunks (same results).
  int64_t recv_rows_per_rank = 0;
};

class expert_parallel_step_engine final : public model::step_engine {
 public:
  /// NCCL communicators over `devices` (ncclCommInitAll) and one engine per device. Errors: the
  /// engines' (gpu_engine::create), NCCL's, model_errc::bad_input for no device, a repeated one
  /// or a max_tokens_per_rank below 1.
  [[nodiscard]] static caf::expected<std::unique_ptr<expert_parallel_step_engine>> create(
      std::shared_ptr<const model::checkpoint> ckpt, const expert_parallel_group_options& options);
  ~expert_parallel_step_engine() override;
  expert_parallel_step_engine(const expert_parallel_step_engine&) = delete;
  expert_parallel_step_engine& operator=(const expert_parallel_step_engine&) = delete;

  caf::expected<model::step_output> prefill(std::span<const model::step_sequence> seqs,
                                            bool want_logits) override;
  caf::expected<model::step_output> decode(std::span<const model::step_sequence> seqs,
                                           bool want_logits) override;
  void release(uint64_t id) override;
  int64_t cached_tokens(uint64_t id) const override;
  /// Every rank's together.
  int64_t free_cache_blocks() const override;
  const model::model_config& config() const override;
  std::string device() const override;

  [[nodiscard]] int world_size() const noexcept;
  /// The rank holding a sequence, or -1.
  [[nodiscard]] int rank_of(uint64_t id) const noexcept;
  /// Rank r's engine (kernel and cache figures).
  [[nodiscard]] const gpu_engine& rank_engine(int r) const;
  /// Rounds run so far (one per step within the per-rank budget).
  [[nodiscard]] uint64_t rounds() const noexcept { return rounds_; }

 private:
  struct state;
  explicit expert_parallel_step_engine(std::unique_ptr<state> s);
  /// Runs seqs as rounds, each rank its `assigned` indices into seqs, in order.
  caf::expected<model::step_output> run(std::span<const model::step_sequence> seqs,
                                        const std::vector<std::vector<size_t>>& assigned,
                                        bool decode, bool want_logits);
  std::unique_ptr<state> state_;
  uint64_t rounds_ = 0;
};

}  // namespace moe::engine
