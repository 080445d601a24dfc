// A MoE layer's routed experts cut across the GPUs of an NCCL world (expert parallelism): rank r
// holds experts [r L, (r + 1) L) of the layer's E (L = E / world size), every rank passes the
// tokens it holds (attention is data parallel: each rank its own tokens, their count its own),
// and every token's rows go to the ranks of its experts and come back as that token's weighted
// sum of their outputs. One call, on every rank of the world, per layer and step:
//
//   permute_plan + permute_rows   this rank's rows sorted by expert, hence by destination rank
//   header exchange               each peer gets, for each of its experts, how many rows come,
//                                 whether this rank refused its call and the most rows it sends
//                                 one peer (one small all-to-all and a stream sync: the receive
//                                 sizes reach the host)
//   per chunk (one, unless the receive buffers are smaller than the worst routing):
//     dispatch                    the rows (all_to_all_rows), from each peer sorted by expert
//     experts                     gate|up with SwiGLU and down (grouped_gemm), reading the
//                                 received rows through a gather map sorted by local expert,
//                                 the outputs put back in received order (gather_rows)
//     combine                     the dispatch's plan reversed: every row back to its token's
//                                 rank, where it left from
//   unpermute                     each token's sum over its k experts, in k order from zero
//
// Every product of a row depends on that row and its expert's weights alone, and the sum over k
// runs in the same order, so a token's output is the same, bit for bit, whatever the world's
// size and whatever the other ranks route (the tests hold a world of n to a world of one).
//
// A call one rank refuses (too many tokens, a missing pointer) still joins the header exchange,
// so the refusal reaches every rank instead of leaving it waiting on NCCL for rows that never
// come: the refusing rank returns model_errc::bad_input, the others model_errc::peer_refused
// naming it; nothing is dispatched. Device data the host cannot check are the caller's
// guarantee: topk_idx from the gate (distinct per token; an id outside [0, E) is skipped, as
// permute_plan skips it, and adds nothing to its token). A
// kernel or copy that fails before the exchange (sorting this rank's rows) is a refusal too:
// that rank returns its error, the others peer_refused naming it. One that fails after it (the
// experts' products, the transfers) leaves the peers waiting in NCCL: the world is broken and
// must be torn down, as after any failed collective.
//
// The receive buffers hold recv_rows rows of D; by default the worst routing (every token of
// every rank to this rank's experts: world size x max_tokens x top_k), which every call moves in
// one chunk. Smaller buffers bound the layer's memory whatever the routing: each pair of ranks
// then moves at most recv_rows / world rows a chunk, and a call runs as many chunks as the
// world's busiest pair needs (every rank learns that count from the headers, so all run the
// same number). Rows are independent, so the outputs are the same, bit for bit, in any number of
// chunks. Two host syncs a call (the header's counts and the plan's offsets), so a call is not
// captured in a CUDA graph.
//
// Ownership: owns its device and pinned buffers, not the communicator, the weights or the
// caller's tensors. Thread safety: one thread at a time, on the communicator's device (NCCL's
// rule for a communicator).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "base/error.hpp"
#include "kernels/dtype.hpp"
#include "runtime/cuda_memory.hpp"

namespace moe::engine {

/// The layer's shape, the same on every rank.
struct expert_parallel_shape {
  int64_t num_experts = 0;   ///< E, all ranks together; a multiple of the world's size, <= 1024
  int64_t dim = 0;           ///< D, the hidden size
  int64_t intermediate = 0;  ///< I, each expert's
  int64_t top_k = 0;         ///< experts per token
  int64_t max_tokens = 0;    ///< the most tokens one rank passes to one call
  kernels::dtype dt = kernels::dtype::bf16;  ///< activations and weights: bf16 or f32
  /// Rows the receive buffers hold: 0 for the worst routing (world x max_tokens x top_k, one
  /// chunk a call); else at least the world's size, at most the worst routing (a larger value
  /// is that), and a call moves at most recv_rows / world rows between two ranks a chunk.
  int64_t recv_rows = 0;
};

/// This rank's experts, stacked as the single-GPU engine stacks a layer's.
struct expert_parallel_weights {
  const void* gate_up = nullptr;  ///< (L, 2 I, D) of dt: each expert's I gate rows, then I up rows
  const void* down = nullptr;     ///< (L, D, I) of dt
};

class expert_parallel_moe {
 public:
  /// Buffers for `shape` on the communicator's device (the current one). model_errc::bad_input
  /// for a shape the kernels cannot take or E not a multiple of the world's size; CUDA errors
  /// (out of memory) as runtime's.
  [[nodiscard]] static caf::expected<std::unique_ptr<expert_parallel_moe>> create(
      ncclComm_t comm, const expert_parallel_shape& shape);

  /// out (tokens, D) = for each token t, sum over its k experts e in k order of
  /// topk_weight[t, k] * down_e(silu(gate_e x[t]) * up_e x[t]); rows of dt. Collective: every
  /// rank calls it, each with its own tokens (0 included). Blocks until the dispatch is queued
  /// (two stream syncs); the rest is queued on `s`, the communicator's device's stream.
  /// x: (tokens, D) of dt; topk_idx: (tokens, top_k) int32; topk_weight: (tokens, top_k) float32
  /// (null: weights of 1); out: (tokens, D) of dt, not overlapping x.
  caf::error forward(const void* x, const int32_t* topk_idx, const float* topk_weight,
                     int64_t tokens, const expert_parallel_weights& w, void* out, cudaStream_t s);

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int world_size() const noexcept { return world_; }
  [[nodiscard]] int64_t first_expert() const noexcept { return rank_ * local_; }
  [[nodiscard]] int64_t local_experts() const noexcept { return local_; }
  /// Rows each local expert took in the last call, from every rank: this rank's share of the
  /// layer's load (what the scheduler's replication balances).
  [[nodiscard]] const std::vector<int64_t>& last_expert_rows() const noexcept {
    return expert_rows_;
  }
  /// Calls that reached the header exchange, refused ones included: each is one round of the
  /// world's collectives, so a caller that must keep in step with its peers (the GPU engine
  /// after a failed step) counts its rounds here.
  [[nodiscard]] uint64_t rounds() const noexcept { return rounds_; }
  /// Chunks (dispatch, experts, combine) the last call ran: 0 when no rank routed a row, 1 when
  /// the receive buffers held the busiest pair's rows.
  [[nodiscard]] int64_t last_chunks() const noexcept { return chunks_; }
  /// Rows the receive buffers hold (shape.recv_rows, or the worst routing for 0).
  [[nodiscard]] int64_t recv_capacity() const noexcept { return recv_capacity_; }
  /// Device memory the layer's buffers hold, in bytes.
  [[nodiscard]] size_t device_bytes() const noexcept { return device_bytes_; }

 private:
  expert_parallel_moe() = default;
  caf::error sort_rows(const void* x, const int32_t* topk_idx, int64_t tokens, cudaStream_t s);
  caf::error exchange_headers(const std::string& refusal, cudaStream_t s);
  caf::error plan_chunks(cudaStream_t s);
  caf::error run_chunk(int64_t chunk, const expert_parallel_weights& w, cudaStream_t s);
  caf::error run_experts(int64_t chunk, const expert_parallel_weights& w, cudaStream_t s);

  ncclComm_t comm_ = nullptr;
  expert_parallel_shape shape_;
  int rank_ = 0;
  int world_ = 1;
  int64_t local_ = 0;
  int64_t send_capacity_ = 0;  // rows: max_tokens x top_k
  int64_t recv_capacity_ = 0;  // rows: recv_rows, or world x max_tokens x top_k
  int64_t pair_rows_ = 0;      // the most rows a chunk moves between two ranks

  // Device buffers. A chunk's combine brings each output row back to where its input row left
  // from in send_rows_ (that input has gone), and the gathered outputs go back out from
  // recv_rows_ (its inputs were read by the gate|up product): no buffer of their own.
  runtime::device_buffer offsets_, positions_, inverse_;  // permute_plan's, over all E experts
  runtime::device_buffer send_rows_;                      // (send_capacity, D)
  runtime::device_buffer header_out_, header_in_;         // (world, L + 2) int32
  runtime::device_buffer recv_rows_, act_, gate_up_, sorted_out_;  // (recv_capacity, D / I)
  runtime::device_buffer maps_;  // every chunk's gather maps (see plan_chunks)
  size_t device_bytes_ = 0;
  // Pinned host staging for what crosses to and from the host. host_maps_ holds every chunk's
  // gather maps of a call side by side, so that no chunk's copy reads what a later one wrote.
  runtime::pinned_host_buffer host_offsets_, host_header_, host_maps_;

  std::vector<int64_t> send_counts_, recv_counts_;  // rows, per peer
  std::vector<int64_t> send_start_;                 // where each peer's rows start in send_rows_
  std::vector<int64_t> expert_rows_;                // per local expert
  std::vector<int32_t> peer_expert_rows_;           // (world, L): rows from each peer per expert
  int64_t chunks_ = 0;
  struct chunk_maps {
    int64_t at = 0;    // int32s into maps_
    int64_t rows = 0;  // rows the chunk brings to this rank
  };
  std::vector<chunk_maps> chunk_maps_;  // this call's, by chunk
  uint64_t rounds_ = 0;
};

}  // namespace moe::engine
