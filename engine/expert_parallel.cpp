#include "engine/expert_parallel.hpp"

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/gather.hpp"
#include "kernels/cuda/grouped_gemm.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "model/model_errc.hpp"
#include "runtime/nccl_all_to_all.hpp"
#include "runtime/nccl_comm.hpp"

namespace moe::engine {

namespace kcu = kernels::cuda;
using kernels::dtype;
using kernels::kernel_status;

namespace {

caf::error bad_input(std::string text) {
  return model::make_error(model::model_errc::bad_input, "expert parallel: " + std::move(text));
}

caf::error check(kernel_status s, const char* what) {
  if (s == kernel_status::ok) return {};
  return model::make_error(
      model::model_errc::kernel_failed,
      std::string("expert parallel: ") + what + ": " + std::string(kernels::to_string(s)));
}

caf::error synchronize(cudaStream_t s, const char* what) {
  return runtime::cuda_error(cudaStreamSynchronize(s), what);
}

/// Allocates each (buffer, bytes) pair, at least one byte each so that every pointer is live,
/// and adds the bytes to `total`.
caf::error allocate_all(size_t& total,
                        std::initializer_list<std::pair<runtime::device_buffer*, size_t>> list) {
  for (const auto& [buffer, bytes] : list) {
    auto b = runtime::device_buffer::allocate(bytes > 0 ? bytes : 1);
    if (!b) return with_context(b.error(), "expert parallel: buffers");
    *buffer = std::move(*b);
    total += bytes > 0 ? bytes : 1;
  }
  return {};
}

/// Rows of `count` that chunk c moves when a chunk moves at most `per_chunk`.
int64_t chunk_rows(int64_t count, int64_t c, int64_t per_chunk) {
  return std::clamp<int64_t>(count - c * per_chunk, 0, per_chunk);
}

}  // namespace

caf::expected<std::unique_ptr<expert_parallel_moe>> expert_parallel_moe::create(
    ncclComm_t comm, const expert_parallel_shape& shape) {
  if (comm == nullptr) return bad_input("no communicator");
  int world = 0, rank = 0;
  if (auto err = runtime::nccl_error(ncclCommCount(comm, &world), "ncclCommCount")) return err;
  if (auto err = runtime::nccl_error(ncclCommUserRank(comm, &rank), "ncclCommUserRank")) return err;
  const int64_t E = shape.num_experts;
  if (E < 1 || E > kcu::permute_max_experts)
    return bad_input(std::to_string(E) + " experts (from 1 to " +
                     std::to_string(kcu::permute_max_experts) + ")");
  if (E % world != 0)
    return bad_input(std::to_string(E) + " experts do not split evenly over a world of " +
                     std::to_string(world));
  if (shape.dim < 1 || shape.intermediate < 1 || shape.top_k < 1 || shape.top_k > E ||
      shape.max_tokens < 1)
    return bad_input(
        "dim, intermediate, max_tokens and top_k (at most the experts) must be "
        "positive: " +
        std::to_string(shape.dim) + ", " + std::to_string(shape.intermediate) + ", " +
        std::to_string(shape.max_tokens) + ", " + std::to_string(shape.top_k));
  if (shape.dt != dtype::f32 && shape.dt != dtype::bf16)
    return bad_input("activations and weights must be f32 or bf16");
  // Divided, not multiplied: a max_tokens near int64's limit must not wrap the product.
  if (shape.max_tokens > INT32_MAX / shape.top_k / world)
    return bad_input(std::to_string(world) + " ranks x " + std::to_string(shape.max_tokens) +
                     " tokens x top_k " + std::to_string(shape.top_k) +
                     " receive rows are past the kernels' int32 rows");
  const int64_t send_capacity = shape.max_tokens * shape.top_k;
  const int64_t worst = world * send_capacity;
  if (shape.recv_rows < 0 || (shape.recv_rows > 0 && shape.recv_rows < world))
    return bad_input("receive buffers of " + std::to_string(shape.recv_rows) +
                     " rows (0 for the worst routing, else at least a row for each of the " +
                     std::to_string(world) + " ranks)");
  const int64_t recv_capacity = shape.recv_rows == 0 ? worst : std::min(shape.recv_rows, worst);
  const int64_t pair_rows = recv_capacity / world;
  // Every chunk's gather maps, side by side: a call moves at most `worst` rows to this rank, in
  // at most as many chunks as the largest send to one peer (send_capacity) takes.
  const int64_t max_chunks = (send_capacity + pair_rows - 1) / pair_rows;
  const int64_t map_ints = max_chunks * (E / world + 1) + 2 * worst;

  std::unique_ptr<expert_parallel_moe> m(new expert_parallel_moe);
  m->comm_ = comm;
  m->shape_ = shape;
  m->rank_ = rank;
  m->world_ = world;
  m->local_ = E / world;
  m->send_capacity_ = send_capacity;
  m->recv_capacity_ = recv_capacity;
  m->pair_rows_ = pair_rows;
  const size_t elem = kernels::dtype_bytes(shape.dt);
  const size_t D = static_cast<size_t>(shape.dim), I = static_cast<size_t>(shape.intermediate);
  const size_t send = static_cast<size_t>(send_capacity), recv = static_cast<size_t>(recv_capacity);
  const size_t header = static_cast<size_t>(world) * static_cast<size_t>(m->local_ + 2) * 4;
  const size_t i32 = sizeof(int32_t);
  const size_t maps = static_cast<size_t>(map_ints) * i32;
  if (auto err = allocate_all(m->device_bytes_,
                              {{&m->offsets_, static_cast<size_t>(E + 1) * i32},
                               {&m->positions_, send * i32},
                               {&m->inverse_, send * i32},
                               {&m->send_rows_, send * D * elem},
                               {&m->header_out_, header},
                               {&m->header_in_, header},
                               {&m->recv_rows_, recv * D * elem},
                               {&m->act_, recv * I * elem},
                               // f32 runs the gate|up product and SwiGLU apart (bf16 fuses them).
                               {&m->gate_up_, shape.dt == dtype::f32 ? recv * 2 * I * elem : 0},
                               {&m->sorted_out_, recv * D * elem},
                               {&m->maps_, maps}}))
    return err;
  auto host_offsets = runtime::pinned_host_buffer::allocate(static_cast<size_t>(E + 1) * i32);
  auto host_header = runtime::pinned_host_buffer::allocate(2 * header);
  auto host_maps = runtime::pinned_host_buffer::allocate(maps);
  for (auto* b : {&host_offsets, &host_header, &host_maps})
    if (!*b) return with_context(b->error(), "expert parallel: pinned buffers");
  m->host_offsets_ = std::move(*host_offsets);
  m->host_header_ = std::move(*host_header);
  m->host_maps_ = std::move(*host_maps);
  m->send_counts_.assign(static_cast<size_t>(world), 0);
  m->recv_counts_.assign(static_cast<size_t>(world), 0);
  m->send_start_.assign(static_cast<size_t>(world), 0);
  m->expert_rows_.assign(static_cast<size_t>(m->local_), 0);
  m->peer_expert_rows_.assign(static_cast<size_t>(world * m->local_), 0);
  return m;
}

caf::error expert_parallel_moe::forward(const void* x, const int32_t* topk_idx,
                                        const float* topk_weight, int64_t tokens,
                                        const expert_parallel_weights& w, void* out,
                                        cudaStream_t s) {
  // A refusal still takes part in the header exchange (with no rows), so that every rank
  // returns it rather than waiting for this one's rows.
  std::string refusal;
  if (tokens < 0 || tokens > shape_.max_tokens)
    refusal = std::to_string(tokens) + " tokens (this layer takes up to " +
              std::to_string(shape_.max_tokens) + " a rank)";
  else if (tokens > 0 && (x == nullptr || topk_idx == nullptr || out == nullptr))
    refusal = "no input, routing or output for " + std::to_string(tokens) + " tokens";
  else if (w.gate_up == nullptr || w.down == nullptr)
    refusal = "no expert weights";
  const int64_t T = refusal.empty() ? tokens : 0;
  const int64_t k = shape_.top_k, D = shape_.dim, E = shape_.num_experts;
  const int64_t entries = T * k;
  chunks_ = 0;

  // What fails here fails before any peer waits on this rank: it joins the exchange as a
  // refusal, so that the world stays in step and every rank hears of it.
  caf::error local = sort_rows(x, topk_idx, T, s);
  if (local) {
    refusal = error_text(local);
    std::fill_n(static_cast<int32_t*>(host_offsets_.data()), E + 1, 0);
  }
  if (auto err = exchange_headers(refusal, s)) return local ? local : err;

  if (auto err = plan_chunks(s)) return err;
  for (int64_t c = 0; c < chunks_; ++c)
    if (auto err = run_chunk(c, w, s)) return err;
  if (T == 0) return {};
  kcu::unpermute_args u;
  u.y = send_rows_.data();  // every row's output, back where the row left from
  u.weight = topk_weight;
  u.positions = static_cast<const int32_t*>(positions_.data());
  u.out = out;
  u.num_tokens = T;
  u.top_k = k;
  u.dim = D;
  u.num_rows = entries;
  u.dt = shape_.dt;
  return check(kcu::unpermute_run(u, s), "combine");
}

/// This rank's rows by expert (into send_rows_) and the experts' offsets on the host.
caf::error expert_parallel_moe::sort_rows(const void* x, const int32_t* topk_idx, int64_t tokens,
                                          cudaStream_t s) {
  kcu::permute_plan_args plan;
  plan.topk_idx = topk_idx;
  plan.num_tokens = tokens;
  plan.top_k = shape_.top_k;
  plan.num_experts = shape_.num_experts;
  plan.expert_offsets = static_cast<int32_t*>(offsets_.data());
  plan.positions = static_cast<int32_t*>(positions_.data());
  plan.inverse = static_cast<int32_t*>(inverse_.data());
  if (auto err = check(kcu::permute_plan_run(plan, s), "permute plan")) return err;
  const int64_t entries = plan.num_tokens * plan.top_k;
  if (entries > 0) {
    kcu::permute_rows_args pr;
    pr.x = x;
    pr.positions = plan.positions;
    pr.permuted = send_rows_.data();
    pr.num_tokens = plan.num_tokens;
    pr.top_k = plan.top_k;
    pr.dim = shape_.dim;
    pr.num_rows = entries;
    pr.dt = shape_.dt;
    if (auto err = check(kcu::permute_rows_run(pr, s), "permute rows")) return err;
  }
  if (auto err =
          runtime::copy_async(host_offsets_.data(), plan.expert_offsets,
                              static_cast<size_t>(shape_.num_experts + 1) * sizeof(int32_t), s))
    return err;
  return synchronize(s, "expert parallel: expert offsets to the host");
}

/// Sends each peer [refused, rows for each of its experts] and reads the same from each, into
/// send_counts_, recv_counts_ and peer_expert_rows_; fails on every rank if any refused.
caf::error expert_parallel_moe::exchange_headers(const std::string& refusal, cudaStream_t s) {
  ++rounds_;
  const int64_t L = local_, row = L + 2;
  const auto* offsets = static_cast<const int32_t*>(host_offsets_.data());
  auto* out = static_cast<int32_t*>(host_header_.data());
  int32_t* in = out + world_ * row;
  int64_t largest = 0;
  for (int p = 0; p < world_; ++p) {
    send_start_[static_cast<size_t>(p)] = offsets[p * L];
    send_counts_[static_cast<size_t>(p)] = offsets[(p + 1) * L] - offsets[p * L];
    largest = std::max(largest, send_counts_[static_cast<size_t>(p)]);
  }
  for (int p = 0; p < world_; ++p) {
    int32_t* h = out + p * row;
    h[0] = refusal.empty() ? 0 : 1;
    h[1] = static_cast<int32_t>(largest);  // at most max_tokens x top_k
    for (int64_t j = 0; j < L; ++j) h[2 + j] = offsets[p * L + j + 1] - offsets[p * L + j];
  }
  const size_t header_bytes = static_cast<size_t>(world_ * row) * sizeof(int32_t);
  const std::vector<int64_t> one(static_cast<size_t>(world_), 1);
  if (auto err = runtime::copy_async(header_out_.data(), out, header_bytes, s)) return err;
  if (auto err = runtime::all_to_all_rows(comm_, {one, one, static_cast<size_t>(row) * 4},
                                          header_out_.data(), world_, header_in_.data(), world_, s))
    return with_context(err, "expert parallel: header exchange");
  if (auto err = runtime::copy_async(in, header_in_.data(), header_bytes, s)) return err;
  if (auto err = synchronize(s, "expert parallel: headers to the host")) return err;

  if (!refusal.empty()) return bad_input("rank " + std::to_string(rank_) + ": " + refusal);
  for (int p = 0; p < world_; ++p)
    if (in[p * row] != 0)
      return model::make_error(model::model_errc::peer_refused,
                               "expert parallel: rank " + std::to_string(p) +
                                   " refused its part of the step (its own error says why)");
  // Every rank reads every rank's largest send, so all agree on the busiest pair, hence on
  // the number of chunks.
  // Every rank's counts come from its own permute plan, within max_tokens x top_k rows a peer;
  // past that (or below zero) the world is broken (its ranks disagree on the shape), and the
  // maps would overrun their buffers.
  int64_t busiest = 0;
  std::fill(expert_rows_.begin(), expert_rows_.end(), 0);
  for (int p = 0; p < world_; ++p) {
    busiest = std::max<int64_t>(busiest, in[p * row + 1]);
    bool consistent = in[p * row + 1] >= 0 && in[p * row + 1] <= send_capacity_;
    int64_t total = 0;
    for (int64_t j = 0; j < L; ++j) {
      const int32_t n = in[p * row + 2 + j];
      peer_expert_rows_[static_cast<size_t>(p * L + j)] = n;
      expert_rows_[static_cast<size_t>(j)] += n;
      total += n;
      consistent = consistent && n >= 0;
    }
    recv_counts_[static_cast<size_t>(p)] = total;
    if (!consistent || total > send_capacity_)
      return model::make_error(model::model_errc::kernel_failed,
                               "expert parallel: rank " + std::to_string(p) +
                                   "'s header is past the layer's shape (" +
                                   std::to_string(send_capacity_) + " rows a peer)");
  }
  chunks_ = (busiest + pair_rows_ - 1) / pair_rows_;
  return {};
}

/// Every chunk's gather maps, side by side in host_maps_ and copied to maps_ at once. Chunk c
/// takes rows [c P, c P + n) of each peer's (P: pair_rows_), peer after peer; for it:
///   local offsets (L + 1)  where each local expert's rows start, read by expert
///   by_expert (rows)       the arrival index of each row, read by expert
///   by_arrival (rows)      the inverse: where each arrived row's output is, read by expert
caf::error expert_parallel_moe::plan_chunks(cudaStream_t s) {
  const int64_t L = local_, P = pair_rows_;
  auto* maps = static_cast<int32_t*>(host_maps_.data());
  int64_t maps_used = 0;  // int32s of host_maps_ written
  chunk_maps_.clear();
  // Peer p's rows for local expert j are [first, first + n) of its rows, sorted by expert.
  std::vector<int64_t> first(static_cast<size_t>(world_ * L));
  for (int p = 0; p < world_; ++p)
    for (int64_t j = 0, at = 0; j < L; ++j) {
      first[static_cast<size_t>(p * L + j)] = at;
      at += peer_expert_rows_[static_cast<size_t>(p * L + j)];
    }
  for (int64_t c = 0; c < chunks_; ++c) {
    int64_t rows = 0;
    for (int p = 0; p < world_; ++p) rows += chunk_rows(recv_counts_[static_cast<size_t>(p)], c, P);
    int32_t* local_offsets = maps + maps_used;
    int32_t* by_expert = local_offsets + L + 1;
    int32_t* by_arrival = by_expert + rows;
    chunk_maps_.push_back({maps_used, rows});
    maps_used += L + 1 + 2 * rows;
    int32_t next = 0;
    for (int64_t j = 0; j < L; ++j) {
      local_offsets[j] = next;
      int64_t peer_start = 0;  // where peer p's rows of this chunk begin on arrival
      for (int p = 0; p < world_; ++p) {
        const int64_t from = first[static_cast<size_t>(p * L + j)];
        const int64_t n = peer_expert_rows_[static_cast<size_t>(p * L + j)];
        const int64_t lo = std::max(from, c * P), hi = std::min(from + n, c * P + P);
        for (int64_t at = lo; at < hi; ++at) {
          const int64_t arrival = peer_start + at - c * P;
          by_expert[next] = static_cast<int32_t>(arrival);
          by_arrival[arrival] = next++;
        }
        peer_start += chunk_rows(recv_counts_[static_cast<size_t>(p)], c, P);
      }
    }
    local_offsets[L] = next;
  }
  if (maps_used == 0) return {};
  return runtime::copy_async(maps_.data(), maps, static_cast<size_t>(maps_used) * sizeof(int32_t),
                             s);
}

/// Chunk c: each peer's slice of rows out, the local experts over what came in, the outputs
/// back to where their rows left from.
caf::error expert_parallel_moe::run_chunk(int64_t c, const expert_parallel_weights& w,
                                          cudaStream_t s) {
  const auto n = static_cast<size_t>(world_);
  runtime::all_to_all_plan dispatch;
  dispatch.row_bytes = static_cast<size_t>(shape_.dim) * kernels::dtype_bytes(shape_.dt);
  dispatch.send_rows.resize(n);
  dispatch.recv_rows.resize(n);
  dispatch.send_at.resize(n);
  for (size_t p = 0; p < n; ++p) {
    dispatch.send_rows[p] = chunk_rows(send_counts_[p], c, pair_rows_);
    dispatch.recv_rows[p] = chunk_rows(recv_counts_[p], c, pair_rows_);
    dispatch.send_at[p] = send_start_[p] + c * pair_rows_;
  }
  if (auto err = runtime::all_to_all_rows(comm_, dispatch, send_rows_.data(), send_capacity_,
                                          recv_rows_.data(), recv_capacity_, s))
    return with_context(err, "expert parallel: dispatch");
  if (auto err = run_experts(c, w, s)) return err;
  if (auto err = runtime::all_to_all_rows(comm_, dispatch.reversed(), recv_rows_.data(),
                                          recv_capacity_, send_rows_.data(), send_capacity_, s))
    return with_context(err, "expert parallel: combine");
  return {};
}

/// The local experts over chunk c's received rows (peer by peer, each peer's by expert): the
/// gather map by_expert reads them expert by expert, and by_arrival puts each output at its
/// row's arrival index in recv_rows_, whose inputs the gate|up product has read by then.
caf::error expert_parallel_moe::run_experts(int64_t c, const expert_parallel_weights& w,
                                            cudaStream_t s) {
  const int64_t L = local_, D = shape_.dim, I = shape_.intermediate;
  const auto [maps_at, rows] = chunk_maps_[static_cast<size_t>(c)];
  if (rows == 0) return {};
  const int32_t* local_offsets = static_cast<const int32_t*>(maps_.data()) + maps_at;
  const int32_t* by_expert = local_offsets + L + 1;
  const int32_t* by_arrival = by_expert + rows;

  kcu::grouped_gemm_args g;
  g.x = recv_rows_.data();
  g.x_entries = by_expert;
  g.entries_per_x_row = 1;
  g.num_x_rows = rows;
  g.expert_offsets = local_offsets;
  g.weights = w.gate_up;
  g.num_rows = rows;
  g.num_experts = L;
  g.n = 2 * I;
  g.k = D;
  g.dt = g.y_dt = shape_.dt;
  if (shape_.dt == dtype::bf16) {
    g.y = act_.data();
    g.fuse_swiglu = true;
    if (auto err = check(kcu::grouped_gemm_run(g, s), "experts gate|up + swiglu")) return err;
  } else {
    g.y = gate_up_.data();
    if (auto err = check(kcu::grouped_gemm_run(g, s), "experts gate|up")) return err;
    kcu::swiglu_args a;
    a.gate_up = gate_up_.data();
    a.out = act_.data();
    a.rows = rows;
    a.dim = I;
    a.dt = shape_.dt;
    if (auto err = check(kcu::swiglu_run(a, s), "experts swiglu")) return err;
  }
  kcu::grouped_gemm_args d = g;
  d.x = act_.data();  // already by expert
  d.x_entries = nullptr;
  d.num_x_rows = 0;
  d.fuse_swiglu = false;
  d.weights = w.down;
  d.y = sorted_out_.data();
  d.n = D;
  d.k = I;
  if (auto err = check(kcu::grouped_gemm_run(d, s), "experts down")) return err;
  kcu::gather_rows_args back;
  back.table = sorted_out_.data();
  back.ids = by_arrival;
  back.out = recv_rows_.data();
  back.num_rows = rows;
  back.num_ids = rows;
  back.dim = D;
  back.dt = shape_.dt;
  return check(kcu::gather_rows_run(back, s), "experts' outputs back in arrival order");
}

}  // namespace moe::engine
