// MoE dispatch and combine between expert groups on different GPUs, over NCCL: every rank sends
// each peer the rows (token activations) routed to the experts that peer holds, and gets back
// the peers' rows for its own experts (dispatch); after the experts ran, the same exchange with
// the directions swapped brings every output row home (combine). Also the all-reduce of the
// attention shards' gradients.
//
// The row counts differ per pair and per step, so an exchange has two parts:
//   exchange_row_counts: each rank's per-peer send counts, all-to-all, onto the host (the
//                        receive sizes; one small NCCL exchange and one stream sync);
//   all_to_all_rows:     the rows themselves, ncclSend/ncclRecv pairs in one NCCL group
//                        (deadlock-free whatever the order; NCCL's own AlltoAll is newer than
//                        some NCCL builds this runs with, so it is not used).
// Rows sent to rank r are contiguous in `send` (the permute kernel lays them out by expert, and
// experts are grouped by rank); rows from rank r land contiguous in `recv`, rank by rank.
// The world of one is a local copy through NCCL and is what CI-free tests check on one GPU.
//
// Ownership: the caller owns the communicator and every buffer. Thread safety: a communicator
// is driven by one thread at a time (NCCL's rule). Only built with the CUDA backend, except the
// argument checks, which need no GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/error.hpp"

namespace moe::runtime {

enum class collective_errc : uint8_t {
  bad_plan = 1,  ///< Permanent: the counts do not fit the world or the buffers (a bug upstream).
};

[[nodiscard]] caf::error make_error(collective_errc code, std::string text);

/// The shape of one all-to-all, per peer rank (index = rank): rows sent and rows received.
struct all_to_all_plan {
  std::vector<int64_t> send_rows;
  std::vector<int64_t> recv_rows;
  size_t row_bytes = 0;
  /// Where each peer's rows start in the send (receive) buffer, in rows. Empty: packed, peer
  /// after peer from row 0. A round of a larger exchange (expert_parallel_moe's chunks) sends a
  /// slice of each peer's rows and brings the outputs back to where their inputs were.
  std::vector<int64_t> send_at = {};
  std::vector<int64_t> recv_at = {};

  [[nodiscard]] int64_t total_send_rows() const noexcept;
  [[nodiscard]] int64_t total_recv_rows() const noexcept;
  /// The plan of the way back (combine after dispatch): sends and receives swapped.
  [[nodiscard]] all_to_all_plan reversed() const;
};

/// Host-side checks of a plan against a world of `world_size` ranks and buffers holding
/// `send_capacity_rows` and `recv_capacity_rows` rows: one count per rank, none negative,
/// row_bytes > 0, totals within the buffers; with explicit starts (send_at, recv_at), one per
/// rank, each peer's rows within the buffer and no two peers' ranges in one buffer overlapping
/// (a peer without rows has no range, whatever its start). An
/// empty error when it holds; else collective_errc::bad_plan naming the rule and the values.
[[nodiscard]] caf::error check_all_to_all_plan(const all_to_all_plan& plan, int world_size,
                                               int64_t send_capacity_rows,
                                               int64_t recv_capacity_rows);

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::collective_errc, "collective")

#ifdef MOE_HAVE_CUDA

#include <cuda_runtime_api.h>
#include <nccl.h>

namespace moe::runtime {

/// Every rank passes its per-peer send counts (world_size entries); every rank gets back what
/// each peer will send it. `scratch` is device memory of at least 2 * world_size int64 values.
/// Blocks until the counts are on the host (a stream sync on `s`).
[[nodiscard]] caf::expected<std::vector<int64_t>> exchange_row_counts(ncclComm_t comm,
                                                                      const std::vector<int64_t>& send_rows,
                                                                      void* scratch, cudaStream_t s);

/// Queues the exchange of `plan` on `s`: rows [sum(send_rows[<r]), +send_rows[r]) of `send` go
/// to rank r; rank r's rows land at [sum(recv_rows[<r]), +recv_rows[r]) of `recv` (or from
/// send_at[r] and at recv_at[r], where the plan gives them). The plan is
/// checked first (nothing is queued if it is wrong). `send` and `recv` must not overlap.
[[nodiscard]] caf::error all_to_all_rows(ncclComm_t comm, const all_to_all_plan& plan, const void* send,
                                         int64_t send_capacity_rows, void* recv, int64_t recv_capacity_rows,
                                         cudaStream_t s);

/// Sums `count` float32 (or bf16) values across the world in place: the attention shards'
/// gradient all-reduce.
[[nodiscard]] caf::error all_reduce_sum(ncclComm_t comm, void* data, size_t count, bool bf16, cudaStream_t s);

}  // namespace moe::runtime

#endif  // MOE_HAVE_CUDA
