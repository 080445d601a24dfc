#include "runtime/nccl_all_to_all.hpp"

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>

#ifdef MOE_HAVE_CUDA
#include "runtime/cuda_memory.hpp"
#include "runtime/nccl_comm.hpp"
#endif

namespace moe::runtime {

namespace {

std::string counts_text(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

caf::error bad_plan(std::string why) {
  return make_error(collective_errc::bad_plan, "all-to-all: " + std::move(why));
}

/// Whether peer after peer from row 0, the rows fit `capacity` (counts not negative). The total
/// is compared as it grows, so a huge count cannot wrap the sum into a small one.
bool packed_fits(const std::vector<int64_t>& rows, int64_t capacity) {
  int64_t total = 0;
  for (int64_t n : rows) {
    if (n > capacity - total) return false;
    total += n;
  }
  return true;
}

/// Explicit starts (none: packed, already checked): one per rank, each peer's range inside the
/// buffer, and no two ranges sharing a row, so no peer's rows land on (or are read as) another's.
caf::error check_starts(const char* what, const std::vector<int64_t>& at,
                        const std::vector<int64_t>& rows, int64_t capacity) {
  if (at.empty()) return {};
  if (at.size() != rows.size())
    return bad_plan(std::to_string(at.size()) + " " + what + " starts for a world of " +
                    std::to_string(rows.size()));
  std::vector<std::pair<int64_t, int64_t>> used;  // (start, rows) of the peers with rows
  for (size_t r = 0; r < at.size(); ++r) {
    if (rows[r] == 0) continue;  // nothing moves: where it would start does not matter
    if (at[r] < 0 || at[r] > capacity || rows[r] > capacity - at[r])
      return bad_plan("rank " + std::to_string(r) + ": " + std::to_string(rows[r]) + " rows to " +
                      what + " from row " + std::to_string(at[r]) + " do not fit a buffer of " +
                      std::to_string(capacity) + " rows");
    used.emplace_back(at[r], rows[r]);
  }
  std::sort(used.begin(), used.end());
  for (size_t i = 1; i < used.size(); ++i)
    if (used[i - 1].first + used[i - 1].second > used[i].first)
      return bad_plan(std::string(what) + " ranges overlap: " + counts_text(at) + " starts for " +
                      counts_text(rows) + " rows");
  return {};
}

}  // namespace

caf::error make_error(collective_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("collective"), caf::make_message(std::move(text))};
}

int64_t all_to_all_plan::total_send_rows() const noexcept {
  return std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
}

int64_t all_to_all_plan::total_recv_rows() const noexcept {
  return std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
}

all_to_all_plan all_to_all_plan::reversed() const {
  return {recv_rows, send_rows, row_bytes, recv_at, send_at};
}

caf::error check_all_to_all_plan(const all_to_all_plan& plan, int world_size, int64_t send_capacity_rows,
                                 int64_t recv_capacity_rows) {
  if (world_size < 1) return bad_plan("world size " + std::to_string(world_size));
  const auto ws = static_cast<size_t>(world_size);
  if (plan.send_rows.size() != ws || plan.recv_rows.size() != ws)
    return bad_plan(std::to_string(plan.send_rows.size()) + " send and " +
                    std::to_string(plan.recv_rows.size()) + " receive counts for a world of " +
                    std::to_string(world_size));
  if (plan.row_bytes == 0) return bad_plan("rows of 0 bytes");
  for (int r = 0; r < world_size; ++r) {
    const auto s = plan.send_rows[static_cast<size_t>(r)], v = plan.recv_rows[static_cast<size_t>(r)];
    if (s < 0 || v < 0)
      return bad_plan("rank " + std::to_string(r) + ": " + std::to_string(s) + " rows to send, " +
                      std::to_string(v) + " to receive");
  }
  const bool send_fits =
      plan.send_at.empty() ? packed_fits(plan.send_rows, send_capacity_rows) : true;
  const bool recv_fits =
      plan.recv_at.empty() ? packed_fits(plan.recv_rows, recv_capacity_rows) : true;
  if (!send_fits || !recv_fits)
    return bad_plan(counts_text(plan.send_rows) + " rows to send and " +
                    counts_text(plan.recv_rows) + " to receive do not fit buffers of " +
                    std::to_string(send_capacity_rows) + " and " +
                    std::to_string(recv_capacity_rows) + " rows");
  if (auto err = check_starts("send", plan.send_at, plan.send_rows, send_capacity_rows)) return err;
  return check_starts("receive", plan.recv_at, plan.recv_rows, recv_capacity_rows);
}

#ifdef MOE_HAVE_CUDA

caf::expected<std::vector<int64_t>> exchange_row_counts(ncclComm_t comm, const std::vector<int64_t>& send_rows,
                                                        void* scratch, cudaStream_t s) {
  int world = 0;
  if (auto err = nccl_error(ncclCommCount(comm, &world), "ncclCommCount")) return err;
  if (send_rows.size() != static_cast<size_t>(world))
    return make_error(collective_errc::bad_plan, "row counts: " + std::to_string(send_rows.size()) +
                                                     " counts for a world of " + std::to_string(world));
  auto* out_counts = static_cast<int64_t*>(scratch);
  auto* in_counts = out_counts + world;
  const size_t bytes = send_rows.size() * sizeof(int64_t);
  if (auto err = copy_async(out_counts, send_rows.data(), bytes, s)) return err;
  if (auto err = nccl_error(ncclGroupStart(), "ncclGroupStart")) return err;
  for (int r = 0; r < world; ++r) {
    // One int64 each way per peer; NCCL pairs them by (peer, order within the group).
    const auto sent = ncclSend(out_counts + r, 1, ncclInt64, r, comm, s);
    const auto got = ncclRecv(in_counts + r, 1, ncclInt64, r, comm, s);
    if (sent != ncclSuccess || got != ncclSuccess) {
      ncclGroupEnd();
      return nccl_error(sent != ncclSuccess ? sent : got, "row counts: ncclSend/ncclRecv");
    }
  }
  if (auto err = nccl_error(ncclGroupEnd(), "row counts: ncclGroupEnd")) return err;
  std::vector<int64_t> recv(send_rows.size());
  if (auto err = copy_async(recv.data(), in_counts, bytes, s)) return err;
  if (auto err = cuda_error(cudaStreamSynchronize(s), "row counts: cudaStreamSynchronize")) return err;
  return recv;
}

caf::error all_to_all_rows(ncclComm_t comm, const all_to_all_plan& plan, const void* send, int64_t send_capacity_rows,
                           void* recv, int64_t recv_capacity_rows, cudaStream_t s) {
  int world = 0;
  if (auto err = nccl_error(ncclCommCount(comm, &world), "ncclCommCount")) return err;
  if (auto err = check_all_to_all_plan(plan, world, send_capacity_rows, recv_capacity_rows)) return err;
  // Rows travel as bytes: any dtype, any row width.
  const auto* src = static_cast<const char*>(send);
  auto* dst = static_cast<char*>(recv);
  if (auto err = nccl_error(ncclGroupStart(), "ncclGroupStart")) return err;
  int64_t send_at = 0, recv_at = 0;
  for (int r = 0; r < world; ++r) {
    const auto n_send = plan.send_rows[static_cast<size_t>(r)], n_recv = plan.recv_rows[static_cast<size_t>(r)];
    ncclResult_t st = ncclSuccess;
    const int64_t from = plan.send_at.empty() ? send_at : plan.send_at[static_cast<size_t>(r)];
    const int64_t to = plan.recv_at.empty() ? recv_at : plan.recv_at[static_cast<size_t>(r)];
    if (n_send > 0)
      st = ncclSend(src + from * static_cast<int64_t>(plan.row_bytes),
                    static_cast<size_t>(n_send) * plan.row_bytes, ncclUint8, r, comm, s);
    if (st == ncclSuccess && n_recv > 0)
      st = ncclRecv(dst + to * static_cast<int64_t>(plan.row_bytes),
                    static_cast<size_t>(n_recv) * plan.row_bytes, ncclUint8, r, comm, s);
    if (st != ncclSuccess) {
      ncclGroupEnd();
      return nccl_error(st, "all-to-all: ncclSend/ncclRecv");
    }
    send_at += n_send;
    recv_at += n_recv;
  }
  return nccl_error(ncclGroupEnd(), "all-to-all: ncclGroupEnd");
}

caf::error all_reduce_sum(ncclComm_t comm, void* data, size_t count, bool bf16, cudaStream_t s) {
  return nccl_error(ncclAllReduce(data, data, count, bf16 ? ncclBfloat16 : ncclFloat32, ncclSum, comm, s),
                    "ncclAllReduce");
}

#endif  // MOE_HAVE_CUDA

}  // namespace moe::runtime
