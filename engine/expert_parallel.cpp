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

/// Allocates each (buffer, bytes) pair; at least one byte each, so every pointer is live.
caf::error allocate_all(std::initializer_list<std::pair<runtime::device_buffer*, size_t>> list) {
  for (const auto& [buffer, bytes] : list) {
    auto b = runtime::device_buffer::allocate(bytes > 0 ? bytes : 1);
    if (!b) return with_context(b.error(), "expert parallel: buffers");
    *buffer = std::move(*b);
  }
  return {};
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
  const int64_t recv_capacity = world * send_capacity;

  std::unique_ptr<expert_parallel_moe> m(new expert_parallel_moe);
  m->comm_ = comm;
  m->shape_ = shape;
  m->rank_ = rank;
  m->world_ = world;
  m->local_ = E / world;
  m->send_capacity_ = send_capacity;
  m->recv_capacity_ = recv_capacity;
  const size_t elem = kernels::dtype_bytes(shape.dt);
  const size_t D = static_cast<size_t>(shape.dim), I = static_cast<size_t>(shape.intermediate);
  const size_t send = static_cast<size_t>(send_capacity), recv = static_cast<size_t>(recv_capacity);
  const size_t header = static_cast<size_t>(world) * static_cast<size_t>(m->local_ + 1) * 4;
  const size_t i32 = sizeof(int32_t);
  if (auto err = allocate_all({{&m->offsets_, static_cast<size_t>(E + 1) * i32},
                               {&m->positions_, send * i32},
                               {&m->inverse_, send * i32},
                               {&m->send_rows_, send * D * elem},
                               {&m->home_rows_, send * D * elem},
                               {&m->header_out_, header},
                               {&m->header_in_, header},
                               {&m->recv_rows_, recv * D * elem},
                               {&m->act_, recv * I * elem},
                               // f32 runs the gate|up product and SwiGLU apart (bf16 fuses them).
                               {&m->gate_up_, shape.dt == dtype::f32 ? recv * 2 * I * elem : 0},
                               {&m->sorted_out_, recv * D * elem},
                               {&m->recv_out_, recv * D * elem},
                               {&m->local_offsets_, static_cast<size_t>(m->local_ + 1) * i32},
                               {&m->by_expert_, recv * i32},
                               {&m->by_arrival_, recv * i32}}))
    return err;
  auto host_offsets = runtime::pinned_host_buffer::allocate(static_cast<size_t>(E + 1) * i32);
  auto host_header = runtime::pinned_host_buffer::allocate(2 * header);
  // The local offsets, then the two gather maps.
  auto host_maps =
      runtime::pinned_host_buffer::allocate((static_cast<size_t>(m->local_ + 1) + 2 * recv) * i32);
  for (auto* b : {&host_offsets, &host_header, &host_maps})
    if (!*b) return with_context(b->error(), "expert parallel: pinned buffers");
  m->host_offsets_ = std::move(*host_offsets);
  m->host_header_ = std::move(*host_header);
  m->host_maps_ = std::move(*host_maps);
  m->send_counts_.assign(static_cast<size_t>(world), 0);
  m->recv_counts_.assign(static_cast<size_t>(world), 0);
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

  // What fails here fails before any peer waits on this rank: it joins the exchange as a
  // refusal, so that the world stays in step and every rank hears of it.
  caf::error local = sort_rows(x, topk_idx, T, s);
  if (local) {
    refusal = error_text(local);
    std::fill_n(static_cast<int32_t*>(host_offsets_.data()), E + 1, 0);
  }
  if (auto err = exchange_headers(refusal, s)) return local ? local : err;

  const int64_t bytes = D * static_cast<int64_t>(kernels::dtype_bytes(shape_.dt));
  const runtime::all_to_all_plan dispatch{send_counts_, recv_counts_, static_cast<size_t>(bytes)};
  if (auto err = runtime::all_to_all_rows(comm_, dispatch, send_rows_.data(), send_capacity_,
                                          recv_rows_.data(), recv_capacity_, s))
    return with_context(err, "expert parallel: dispatch");
  if (auto err = run_experts(dispatch.total_recv_rows(), w, s)) return err;
  if (auto err = runtime::all_to_all_rows(comm_, dispatch.reversed(), recv_out_.data(),
                                          recv_capacity_, home_rows_.data(), send_capacity_, s))
    return with_context(err, "expert parallel: combine");
  if (T == 0) return {};
  kcu::unpermute_args u;
  u.y = home_rows_.data();
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
  const int64_t L = local_, row = L + 1;
  const auto* offsets = static_cast<const int32_t*>(host_offsets_.data());
  auto* out = static_cast<int32_t*>(host_header_.data());
  int32_t* in = out + world_ * row;
  for (int p = 0; p < world_; ++p) {
    int32_t* h = out + p * row;
    h[0] = refusal.empty() ? 0 : 1;
    for (int64_t j = 0; j < L; ++j) h[1 + j] = offsets[p * L + j + 1] - offsets[p * L + j];
    send_counts_[static_cast<size_t>(p)] = offsets[(p + 1) * L] - offsets[p * L];
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
  for (int p = 0; p < world_; ++p) {
    int64_t total = 0;
    for (int64_t j = 0; j < L; ++j) {
      const int32_t n = in[p * row + 1 + j];
      peer_expert_rows_[static_cast<size_t>(p * L + j)] = n;
      total += n;
    }
    recv_counts_[static_cast<size_t>(p)] = total;
  }
  return {};
}

/// The local experts over the `rows` received rows (peer by peer, each peer's by expert): the
/// gather map by_expert_ reads them expert by expert, by_arrival_ puts the outputs back.
caf::error expert_parallel_moe::run_experts(int64_t rows, const expert_parallel_weights& w,
                                            cudaStream_t s) {
  const int64_t L = local_, D = shape_.dim, I = shape_.intermediate;
  std::fill(expert_rows_.begin(), expert_rows_.end(), 0);
  if (rows == 0) return {};
  auto* local_offsets = static_cast<int32_t*>(host_maps_.data());
  int32_t* by_expert = local_offsets + L + 1;
  int32_t* by_arrival = by_expert + rows;
  int32_t next = 0;
  for (int64_t j = 0; j < L; ++j) {
    local_offsets[j] = next;
    int64_t peer_start = 0;  // where peer p's rows begin in the received rows
    for (int p = 0; p < world_; ++p) {
      int64_t at = peer_start;  // where its rows for expert j begin
      for (int64_t q = 0; q < j; ++q) at += peer_expert_rows_[static_cast<size_t>(p * L + q)];
      const int32_t n = peer_expert_rows_[static_cast<size_t>(p * L + j)];
      for (int32_t r = 0; r < n; ++r) {
        by_expert[next] = static_cast<int32_t>(at + r);
        by_arrival[at + r] = next++;
      }
      expert_rows_[static_cast<size_t>(j)] += n;
      peer_start += recv_counts_[static_cast<size_t>(p)];
    }
  }
  local_offsets[L] = next;
  const size_t i32 = sizeof(int32_t);
  if (auto err = runtime::copy_async(local_offsets_.data(), local_offsets,
                                     static_cast<size_t>(L + 1) * i32, s))
    return err;
  if (auto err =
          runtime::copy_async(by_expert_.data(), by_expert, static_cast<size_t>(rows) * i32, s))
    return err;
  if (auto err =
          runtime::copy_async(by_arrival_.data(), by_arrival, static_cast<size_t>(rows) * i32, s))
    return err;

  kcu::grouped_gemm_args g;
  g.x = recv_rows_.data();
  g.x_entries = static_cast<const int32_t*>(by_expert_.data());
  g.entries_per_x_row = 1;
  g.num_x_rows = rows;
  g.expert_offsets = static_cast<const int32_t*>(local_offsets_.data());
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
  back.ids = static_cast<const int32_t*>(by_arrival_.data());
  back.out = recv_out_.data();
  back.num_rows = rows;
  back.num_ids = rows;
  back.dim = D;
  back.dt = shape_.dt;
  return check(kcu::gather_rows_run(back, s), "experts' outputs back in arrival order");
}

}  // namespace moe::engine
