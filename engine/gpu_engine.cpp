#include "engine/gpu_engine.hpp"

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "base/assert.hpp"
#include "engine/decode_graphs.hpp"
#include "engine/device_weights.hpp"
#include "engine/expert_parallel.hpp"
#include "engine/forward_pass.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cpu/sampling.hpp"
#include "kernels/cuda/gemm.hpp"
#include "kernels/cuda/grouped_gemm.hpp"
#include "kernels/cuda/grouped_gemm_cublas.hpp"
#include "kernels/cuda/mla_decode.hpp"
#include "kernels/cuda/mla_prefill.hpp"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/sampling.hpp"
#include "kernels/cuda/skinny_linear.hpp"
#include "model/cache_blocks.hpp"
#include "model/model_errc.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/device_allocator.hpp"

namespace moe::engine {

namespace kcu = kernels::cuda;
using kernels::dtype;
using model::model_errc;

namespace {

caf::error bad_input(std::string text) {
  return model::make_error(model_errc::bad_input, "gpu engine: " + std::move(text));
}

/// The shapes the kernels cannot take, found before anything is allocated.
caf::error check_kernel_limits(const model::model_config& c) {
  auto limit = [](const char* what, int64_t value, int64_t most) -> caf::error {
    if (value <= most) return {};
    return model::make_error(model_errc::kernel_failed,
                             std::string("gpu engine: ") + what + " " + std::to_string(value) +
                                 " is above the kernels' limit " + std::to_string(most));
  };
  caf::error err;
  if ((err = limit("kv_lora_rank", c.kv_lora_rank, kcu::mla_decode_max_latent_dim)) ||
      (err = limit("kv_lora_rank + qk_rope_head_dim", c.kv_lora_rank + c.qk_rope_head_dim,
                   kcu::mla_decode_max_entry_dim)) ||
      (err = limit("qk_head_dim", c.qk_head_dim(), kcu::mla_prefill_max_qk_dim)) ||
      (err = limit("v_head_dim", c.v_head_dim, kcu::mla_prefill_max_v_dim)) ||
      (err = limit("qk_rope_head_dim", c.qk_rope_head_dim, kcu::rope_max_head_dim)) ||
      (err = limit("n_routed_experts", c.n_routed_experts,
                   std::min(kcu::moe_gate_max_experts, kcu::grouped_gemm_max_experts))) ||
      (err = limit("num_experts_per_tok", c.num_experts_per_tok, kcu::moe_gate_max_top_k)))
    return err;
  return {};
}

/// Host addresses of a step's metadata: the pinned staging buffer mirrors the device arena's
/// first metadata_bytes, so a device pointer's offset from the arena finds its host twin.
struct metadata_view {
  char* host = nullptr;
  const char* device_base = nullptr;
  template <class T>
  T* operator()(T* device_ptr) const {
    return reinterpret_cast<T*>(host + (reinterpret_cast<const char*>(device_ptr) - device_base));
  }
};

/// Refuses what cpu::sample would refuse, and a list that is not one per row.
caf::error check_sampling(std::span<const gpu_row_sampling> sampling, int64_t rows) {
  if (sampling.empty()) return {};
  if (static_cast<int64_t>(sampling.size()) != rows)
    return bad_input("sampling has " + std::to_string(sampling.size()) + " entries for " +
                     std::to_string(rows) + " rows");
  for (size_t i = 0; i < sampling.size(); ++i) {
    const auto& p = sampling[i].params;
    if (!(p.temperature >= 0.0f) || !(p.top_p > 0.0f && p.top_p <= 1.0f))
      return bad_input("sampling of row " + std::to_string(i) +
                       ": temperature must be >= 0 and top_p within (0, 1]");
  }
  return {};
}

/// The device rows of a step's sampling: greedy past `sampling` (padding rows, or none given).
void fill_sampling(kcu::sample_row* rows, int64_t num_rows,
                   std::span<const gpu_row_sampling> sampling) {
  for (int64_t i = 0; i < num_rows; ++i) {
    kcu::sample_row r;
    if (i < static_cast<int64_t>(sampling.size())) {
      const gpu_row_sampling& s = sampling[static_cast<size_t>(i)];
      r.temperature = s.params.temperature;
      // Past INT32_MAX is past any vocabulary: the same as the vocabulary's size.
      r.top_k = static_cast<int32_t>(std::min<size_t>(s.params.top_k, INT32_MAX));
      r.top_p = s.params.top_p;
      r.seed = s.seed;
      r.offset = s.offset;
    }
    rows[i] = r;
  }
}

/// A step's results, copied off the staging buffer: the first `rows` rows (a padded decode
/// step's padding rows are dropped), and each MoE layer's first `routing_entries` choices when
/// the step captured the routing.
gpu_step_result read_results(const char* host, const detail::step_results_layout& r,
                             int64_t vocab, int64_t rows, int64_t num_moe_layers,
                             size_t routing_entries) {
  const auto n = static_cast<size_t>(rows);
  gpu_step_result out;
  if (r.logits_bytes > 0) {
    out.logits.resize(n * static_cast<size_t>(vocab));
    std::memcpy(out.logits.data(), host, out.logits.size() * sizeof(float));
  }
  out.tokens.resize(n);
  std::memcpy(out.tokens.data(), host + r.logits_bytes, n * sizeof(int32_t));
  if (r.routing_bytes == 0) return out;
  const char* routing = host + r.logits_bytes + r.tokens_bytes;
  const size_t layer_bytes = r.routing_per_layer * sizeof(int32_t);
  for (int64_t l = 0; l < num_moe_layers; ++l) {
    auto& layer = out.routing.emplace_back(std::min(routing_entries, r.routing_per_layer));
    std::memcpy(layer.data(), routing + static_cast<size_t>(l) * layer_bytes,
                layer.size() * sizeof(int32_t));
  }
  return out;
}

}  // namespace

struct gpu_engine::state {
  state(const model::model_config& c, const gpu_engine_options& o)
      : config(c),
        options(o),
        blocks(o.cache.num_blocks, o.cache.block_size),
        graphs(o.max_decode_graphs) {}
  state(const state&) = delete;
  state& operator=(const state&) = delete;
  ~state() {
    // Kernels may still read what is about to be freed (after an error, for instance).
    if (stream.get() != nullptr) (void)cudaStreamSynchronize(stream.get());
  }

  [[nodiscard]] runtime::stream_key key() const noexcept {
    return reinterpret_cast<runtime::stream_key>(stream.get());
  }
  caf::error ensure_staging(size_t bytes);
  using fill_fn = std::function<void(const detail::step_buffers&, const metadata_view&)>;
  using eager_fn = std::function<caf::expected<gpu_step_result>()>;
  /// A step of `shape`, returning its first real_rows rows (fewer in a padded decode step).
  /// Its rows are drawn as `sampling` says (rows the device left to the host included).
  caf::expected<gpu_step_result> run_step(const detail::step_shape& shape, bool return_logits,
                                          bool capture_routing, const fill_fn& fill,
                                          int64_t real_rows,
                                          std::span<const gpu_row_sampling> sampling);
  void fill_decode(std::span<const model::decode_input> batch,
                   std::span<const gpu_row_sampling> sampling, const detail::step_shape& shape,
                   const detail::step_buffers& b, const metadata_view& host) const;
  caf::expected<gpu_step_result> decode_graphed(std::span<const model::decode_input> batch,
                                                std::span<const gpu_row_sampling> sampling,
                                                const detail::step_shape& shape,
                                                bool return_logits);
  caf::expected<gpu_step_result> replay(detail::decode_graph& g,
                                        std::span<const model::decode_input> batch,
                                        std::span<const gpu_row_sampling> sampling);
  caf::expected<gpu_step_result> first_graph_step(const detail::decode_graph_key& key,
                                                  std::span<const model::decode_input> batch,
                                                  std::span<const gpu_row_sampling> sampling,
                                                  const eager_fn& eager);
  /// Draws on the host the rows the device left to it (kcu::sample_on_host), from the step's
  /// logits: those returned, or the row copied from `device_logits` (the step is drained).
  caf::error draw_on_host(gpu_step_result& out, const float* device_logits,
                          std::span<const gpu_row_sampling> sampling) const;
  /// A decode step padded to a graph's buckets: the shape of the graph of (batch, blocks), and of
  /// every eager step that falls in those buckets.
  [[nodiscard]] detail::step_shape padded_decode_shape(int64_t batch, int64_t blocks) const;
  caf::expected<std::unique_ptr<detail::decode_graph>> make_graph(
      const detail::decode_graph_key& key);
  caf::expected<gpu_step_result> prefill(std::span<const model::sequence_input> seqs,
                                         const gpu_prefill_options& options);
  caf::expected<gpu_step_result> decode(std::span<const model::decode_input> batch,
                                        const gpu_decode_options& options);
  /// With expert parallelism: this rank's part (no rows) of the MoE layers' rounds a step
  /// begun at `before` (expert_parallel_moe::rounds()) did not reach, so that every rank makes
  /// as many rounds a step, whatever failed. Each round still runs this rank's experts over
  /// the rows its peers send. The first error, if any.
  caf::error finish_rounds(uint64_t before);
  /// `step()` (a prefill or a decode step), then, with expert parallelism, the rounds it did
  /// not reach; the step's error first, else the rounds'.
  template <class Step>
  caf::expected<gpu_step_result> collective(const Step& step) {
    const uint64_t before = expert_parallel ? expert_parallel->rounds() : 0;
    caf::expected<gpu_step_result> out = step();
    if (auto err = finish_rounds(before); err && out) return err;
    return out;
  }

  model::model_config config;
  gpu_engine_options options;
  // Declaration order is release order reversed: allocations go back to the allocator before
  // it gives its blocks back to CUDA, and the stream outlives them all.
  runtime::cuda_stream stream;
  // overlap_shared_experts only: the side stream and the events that fork and join it.
  std::optional<runtime::cuda_stream> side_stream;
  std::optional<runtime::cuda_event> shared_start, shared_done;
  std::unique_ptr<runtime::caching_device_allocator> allocator;
  runtime::device_allocation cache, rope_cos, rope_sin, gemm_workspace, side_gemm_workspace,
      fp8_expanded, blas_pointers, one_expert_offsets;
  std::optional<device_weights> weights;
  kcu::gemm_lt gemm;
  kcu::cublas_grouped_gemm blas;  // with cublas_grouped_experts only
  runtime::pinned_host_buffer staging, blas_host;
  model::cache_block_allocator blocks;
  std::unordered_map<uint64_t, int64_t> lengths;
  int64_t num_moe_layers = 0;
  std::vector<int64_t> moe_layers;  // their indices, in order
  // expert_parallel only: every MoE layer's routed experts across the world (its buffers are
  // its own; released after the stream is drained, by ~state).
  std::unique_ptr<expert_parallel_moe> expert_parallel;
  gpu_kernel_stats kernels;
  detail::model_state model;
  // Last, so released first: the graphs' arenas go back to the allocator while it exists.
  detail::decode_graph_cache graphs;
};

caf::error gpu_engine::state::ensure_staging(size_t bytes) {
  if (staging.size_bytes() >= bytes) return {};
  staging = runtime::pinned_host_buffer{};
  auto b = runtime::pinned_host_buffer::allocate(std::max<size_t>(bytes, size_t{1} << 20));
  if (!b) return b.error();
  staging = std::move(*b);
  return {};
}

caf::expected<gpu_step_result> gpu_engine::state::run_step(
    const detail::step_shape& shape, bool return_logits, bool capture_routing, const fill_fn& fill,
    int64_t real_rows, std::span<const gpu_row_sampling> sampling) {
  if (auto err = runtime::cuda_error(cudaSetDevice(options.device), "cudaSetDevice")) return err;
  detail::step_buffers dev;
  const size_t arena_bytes = detail::carve_step_buffers(model, shape, nullptr, dev);
  auto arena = allocator->allocate(arena_bytes, key());
  if (!arena) return arena.error();
  char* base = static_cast<char*>(arena->data());
  detail::carve_step_buffers(model, shape, base, dev);
  const auto results = detail::results_layout(model, shape, return_logits, capture_routing);
  if (auto err = ensure_staging(std::max(dev.metadata_bytes, results.total_bytes()))) return err;
  char* host = static_cast<char*>(staging.data());
  fill(dev, metadata_view{host, base});
  caf::error err = detail::enqueue_step(model, shape, dev, results, host);
  // Always drained, so that nothing queued reads the arena or the staging buffer after an error.
  const caf::error sync_err = stream.synchronize();
  if (err) return err;
  if (sync_err) return sync_err;
  // A prefill keeps every token's routing; a decode step its real rows' (one token each).
  const size_t routing_entries =
      shape.decode ? static_cast<size_t>(real_rows * config.num_experts_per_tok)
                   : results.routing_per_layer;
  gpu_step_result out = read_results(host, results, config.vocab_size, real_rows,
                                     capture_routing ? shape.num_moe_layers : 0, routing_entries);
  if (auto e = draw_on_host(out, dev.logits, sampling)) return e;
  return out;
}

caf::error gpu_engine::state::draw_on_host(gpu_step_result& out, const float* device_logits,
                                           std::span<const gpu_row_sampling> sampling) const {
  const auto vocab = static_cast<size_t>(config.vocab_size);
  std::vector<float> row;
  kernels::cpu::sampler sampler(vocab);
  for (size_t i = 0; i < out.tokens.size(); ++i) {
    if (out.tokens[i] != kcu::sample_on_host) continue;
    if (i >= sampling.size())
      return model::make_error(model_errc::kernel_failed,
                               "gpu engine: the device left a greedy row to the host");
    const float* logits = nullptr;
    if (!out.logits.empty()) {
      logits = out.logits.data() + i * vocab;
    } else {
      row.resize(vocab);
      if (auto err = runtime::cuda_error(cudaMemcpy(row.data(), device_logits + i * vocab,
                                                    vocab * sizeof(float), cudaMemcpyDeviceToHost),
                                         "cudaMemcpy (a row's logits)"))
        return err;
      logits = row.data();
    }
    if (sampler.draw(logits, sampling[i].params, sampling[i].seed, sampling[i].offset,
                     &out.tokens[i]) != kernels::kernel_status::ok)
      return bad_input("sampling of row " + std::to_string(i) + " was refused");
  }
  return {};
}

void gpu_engine::state::fill_decode(std::span<const model::decode_input> batch,
                                    std::span<const gpu_row_sampling> sampling,
                                    const detail::step_shape& shape, const detail::step_buffers& b,
                                    const metadata_view& host) const {
  fill_sampling(host(b.sampling), shape.num_logit_rows, sampling);
  int32_t* ids = host(b.token_ids);
  int32_t* positions = host(b.positions);
  int64_t* slots = host(b.slots);
  int32_t* table = host(b.block_table);
  int32_t* seq_lens = host(b.seq_lens);
  const auto width = static_cast<size_t>(shape.max_blocks);
  const auto real = static_cast<int64_t>(batch.size());
  const int64_t block_size = options.cache.block_size;
  const auto scratch = static_cast<int32_t>(options.cache.num_blocks);
  for (int64_t i = 0; i < shape.num_tokens; ++i) {
    int32_t* row = table + static_cast<size_t>(i) * width;
    if (i < real) {
      const model::decode_input& d = batch[static_cast<size_t>(i)];
      const int64_t pos = lengths.at(d.id);
      ids[i] = d.token;
      positions[i] = static_cast<int32_t>(pos);
      slots[i] = blocks.slot(d.id, pos);
      seq_lens[i] = static_cast<int32_t>(pos + 1);
      const auto& owned = blocks.blocks(d.id);
      MOE_ASSERT(owned.size() <= width);
      // Entries past a sequence's blocks are never read (seq_lens bounds the kernel).
      std::fill(std::copy(owned.begin(), owned.end(), row), row + width, scratch);
      continue;
    }
    // A graph's padding row: token 0 at position 0 of the scratch block, which no sequence
    // owns; each such row appends into its own slot where the block has room. Every kernel
    // treats rows independently (MoE rows only add to their experts' groups), so these rows
    // change no real row's result; theirs are dropped.
    ids[i] = 0;
    positions[i] = 0;
    slots[i] = int64_t{scratch} * block_size + (i - real) % block_size;
    seq_lens[i] = 1;
    std::fill_n(row, width, scratch);
  }
}

detail::step_shape gpu_engine::state::padded_decode_shape(int64_t batch, int64_t blocks) const {
  detail::step_shape shape;
  shape.decode = true;
  shape.num_tokens = shape.num_seqs = shape.num_logit_rows = batch;
  shape.max_blocks = blocks;
  // The split of the attention is planned for the longest sequence the table can hold; each
  // row still attends over its own seq_lens, read on the device.
  shape.max_seq_len = blocks * options.cache.block_size;
  shape.num_moe_layers = num_moe_layers;
  return shape;
}

caf::expected<std::unique_ptr<detail::decode_graph>> gpu_engine::state::make_graph(
    const detail::decode_graph_key& k) {
  auto g = std::make_unique<detail::decode_graph>();
  g->shape = padded_decode_shape(k.batch, k.blocks);
  const size_t arena_bytes = detail::carve_step_buffers(model, g->shape, nullptr, g->buffers);
  auto arena = allocator->allocate(arena_bytes, key());
  if (!arena) return arena.error();
  g->arena = std::move(*arena);
  detail::carve_step_buffers(model, g->shape, static_cast<char*>(g->arena.data()), g->buffers);
  g->results = detail::results_layout(model, g->shape, k.return_logits, false);
  auto pinned = runtime::pinned_host_buffer::allocate(
      std::max(g->buffers.metadata_bytes, g->results.total_bytes()));
  if (!pinned) return pinned.error();
  g->staging = std::move(*pinned);
  return g;
}

caf::expected<gpu_step_result> gpu_engine::state::decode_graphed(
    std::span<const model::decode_input> batch, std::span<const gpu_row_sampling> sampling,
    const detail::step_shape& shape, bool return_logits) {
  const eager_fn eager = [&] {
    return run_step(
        shape, return_logits, false,
        [&](const detail::step_buffers& b, const metadata_view& host) {
          fill_decode(batch, sampling, shape, b, host);
        },
        static_cast<int64_t>(batch.size()), sampling);
  };
  const detail::decode_graph_key k{detail::decode_batch_bucket(shape.num_seqs),
                                   detail::decode_block_bucket(shape.max_blocks), return_logits};
  if (k.batch == 0 || k.blocks == 0) return eager();  // beyond the buckets: by design
  if (graphs.unfit(k)) {
    graphs.count_fallback();
    return eager();
  }
  if (auto err = runtime::cuda_error(cudaSetDevice(options.device), "cudaSetDevice")) return err;
  detail::decode_graph* g = graphs.find(k);
  if (g == nullptr) return first_graph_step(k, batch, sampling, eager);
  auto out = replay(*g, batch, sampling);
  if (out) {
    graphs.count_replay();
    return out;
  }
  // The step's only lasting effect, its tokens' cache entries, is rewritten alike eagerly.
  graphs.mark_unfit(k, "replay: " + error_text(out.error()));
  return eager();
}

caf::expected<gpu_step_result> gpu_engine::state::replay(
    detail::decode_graph& g, std::span<const model::decode_input> batch,
    std::span<const gpu_row_sampling> sampling) {
  char* host = static_cast<char*>(g.staging.data());
  fill_decode(batch, sampling, g.shape, g.buffers,
              metadata_view{host, static_cast<const char*>(g.arena.data())});
  caf::error err = g.graph.launch(stream.get());
  const caf::error sync_err = stream.synchronize();
  if (err) return err;
  if (sync_err) return sync_err;
  gpu_step_result out =
      read_results(host, g.results, config.vocab_size, static_cast<int64_t>(batch.size()), 0, 0);
  if (auto e = draw_on_host(out, g.buffers.logits, sampling)) return e;
  return out;
}

/// A key's first step runs eagerly in the graph's own buffers and shapes, then the same work is
/// captured: every kernel module is loaded and every cuBLASLt plan made before the capture,
/// so nothing but launches and copies happens inside it. The step's results come from that
/// eager run, so a capture that fails afterwards costs nothing but the graph.
caf::expected<gpu_step_result> gpu_engine::state::first_graph_step(
    const detail::decode_graph_key& k, std::span<const model::decode_input> batch,
    std::span<const gpu_row_sampling> sampling, const eager_fn& eager) {
  auto made = make_graph(k);
  if (!made) {
    graphs.mark_unfit(k, "buffers: " + error_text(made.error()));
    return eager();
  }
  detail::decode_graph& g = **made;
  char* host = static_cast<char*>(g.staging.data());
  fill_decode(batch, sampling, g.shape, g.buffers,
              metadata_view{host, static_cast<const char*>(g.arena.data())});
  caf::error err = detail::enqueue_step(model, g.shape, g.buffers, g.results, host);
  const caf::error sync_err = stream.synchronize();
  if (!err) err = sync_err;
  if (err) {
    graphs.mark_unfit(k, "padded step: " + error_text(err));
    return eager();
  }
  gpu_step_result out =
      read_results(host, g.results, config.vocab_size, static_cast<int64_t>(batch.size()), 0, 0);
  if (auto e = draw_on_host(out, g.buffers.logits, sampling)) return e;
  auto graph = detail::cuda_graph::capture(stream.get(), [&]() -> caf::error {
    if (auto e = detail::enqueue_step(model, g.shape, g.buffers, g.results, host)) return e;
    if (options.decode_graph_capture_hook) return options.decode_graph_capture_hook(stream.get());
    return {};
  });
  if (!graph) {
    graphs.mark_unfit(k, "capture: " + error_text(graph.error()));
    return out;
  }
  g.graph = std::move(*graph);
  graphs.insert(k, std::move(*made));
  return out;
}

caf::error gpu_engine::state::finish_rounds(uint64_t before) {
  if (!expert_parallel) return {};
  // A step refused on the host set no device, and this thread may have driven another since:
  // the rounds' kernels must launch on the engine's.
  caf::error first = runtime::cuda_error(cudaSetDevice(options.device), "cudaSetDevice");
  // Every call is one round (expert_parallel_moe::rounds), so this ends.
  for (uint64_t done = expert_parallel->rounds() - before;
       done < static_cast<uint64_t>(num_moe_layers); done = expert_parallel->rounds() - before) {
    const device_moe& w = *weights->layer(moe_layers[done]).moe;
    caf::error err = expert_parallel->forward(nullptr, nullptr, nullptr, 0,
                                              {w.experts_gate_up.data, w.experts_down.data},
                                              nullptr, stream.get());
    if (err && !first) first = with_context(err, "gpu engine: expert parallel round");
  }
  return first;
}

gpu_engine::gpu_engine(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
gpu_engine::gpu_engine(gpu_engine&&) noexcept = default;
gpu_engine& gpu_engine::operator=(gpu_engine&&) noexcept = default;
gpu_engine::~gpu_engine() = default;

caf::expected<gpu_engine> gpu_engine::create(std::shared_ptr<const model::checkpoint> ckpt,
                                             const gpu_engine_options& options) {
  if (!ckpt) return bad_input("no checkpoint");
  const model::model_config& c = ckpt->config;
  if (options.dtype != dtype::bf16 && options.dtype != dtype::f32)
    return bad_input("dtype must be bf16 or f32, not " + std::string(kernels::to_string(options.dtype)));
  // One block more than asked for (the scratch block of decode graphs' padding rows), and
  // block ids are int32 on the device.
  if (options.cache.num_blocks <= 0 || options.cache.block_size <= 0 ||
      options.cache.num_blocks >= INT32_MAX)
    return bad_input("the cache needs a positive number of blocks (below 2^31 - 1) and block size");
  if (options.decode_graphs && options.max_decode_graphs < 1)
    return bad_input("max_decode_graphs must be at least 1 with decode_graphs");
  if (options.skinny_rows < 0 || options.skinny_rows > kernels::cuda::skinny_linear_max_rows)
    return bad_input("skinny_rows must be within 0 .. " +
                     std::to_string(kernels::cuda::skinny_linear_max_rows));
  if (options.grouped_dense_rows < 0 ||
      options.grouped_dense_rows > gpu_engine_options::max_grouped_dense_rows)
    return bad_input("grouped_dense_rows must be within 0 .. " +
                     std::to_string(gpu_engine_options::max_grouped_dense_rows));
  if (const gpu_expert_parallel& ep = options.expert_parallel; ep.comm != nullptr) {
    if (c.n_routed_experts == 0)
      return bad_input("expert parallelism: the model has no routed experts");
    if (ep.max_tokens < 1) return bad_input("expert parallelism: max_tokens must be positive");
    if (options.decode_graphs)
      return bad_input(
          "expert parallelism: decode_graphs must be off (each MoE layer's round waits for its "
          "row counts on the host, which a CUDA graph cannot hold)");
    if (options.cublas_grouped_experts || options.wgmma_experts)
      return bad_input(
          "expert parallelism: cublas_grouped_experts and wgmma_experts must be off (the routed "
          "experts run on expert_parallel_moe's grouped GEMM)");
  }
  auto rope = model::rope_kernel_params(c);
  if (!rope) return rope.error();
  if (auto err = check_kernel_limits(c)) return err;
  int num_devices = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&num_devices); e != cudaSuccess || num_devices == 0) {
    (void)cudaGetLastError();
    return runtime::make_error(runtime::cuda_errc::no_device,
                               std::string("gpu engine: no GPU: ") +
                                   (e != cudaSuccess ? cudaGetErrorString(e) : "no device found"));
  }
  if (options.device < 0 || options.device >= num_devices)
    return bad_input("device " + std::to_string(options.device) + " does not exist (" +
                     std::to_string(num_devices) + " found)");
  if (auto err = runtime::cuda_error(cudaSetDevice(options.device), "cudaSetDevice")) return err;

  auto s = std::make_unique<state>(c, options);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (c.is_moe_layer(l)) s->moe_layers.push_back(l);
  s->num_moe_layers = static_cast<int64_t>(s->moe_layers.size());
  auto stream = runtime::cuda_stream::create();
  if (!stream) return stream.error();
  s->stream = std::move(*stream);
  s->allocator = std::make_unique<runtime::caching_device_allocator>(
      std::make_unique<runtime::cuda_memory_source>(options.device));
  expert_range experts;  // all of them
  if (options.expert_parallel.comm != nullptr) {
    expert_parallel_shape shape;
    shape.num_experts = c.n_routed_experts;
    shape.dim = c.hidden_size;
    shape.intermediate = c.moe_intermediate_size;
    shape.top_k = c.num_experts_per_tok;
    shape.max_tokens = options.expert_parallel.max_tokens;
    shape.dt = options.dtype;
    shape.recv_rows = options.expert_parallel.recv_rows;
    auto ep = expert_parallel_moe::create(options.expert_parallel.comm, shape);
    if (!ep) return with_context(ep.error(), "gpu engine");
    s->expert_parallel = std::move(*ep);
    experts = {s->expert_parallel->first_expert(), s->expert_parallel->local_experts()};
  }
  auto weights = device_weights::upload(*ckpt, options.dtype, s->stream.get(), experts);
  if (!weights) return weights.error();
  s->weights.emplace(std::move(*weights));
  if (s->expert_parallel)
    for (const int64_t l : s->moe_layers)
      if (s->weights->layer(l).moe->experts_gate_up.fp8() ||
          s->weights->layer(l).moe->experts_down.fp8())
        return bad_input(
            "expert parallelism: the routed experts must be bf16 or f32, not FP8 (load the "
            "checkpoint without keep_fp8)");

  const size_t es = kernels::dtype_bytes(options.dtype);
  kernels::cpu::mla_cache_layout layout;
  // The last block is the scratch block: cache_block_allocator never hands it out.
  layout.num_blocks = static_cast<size_t>(options.cache.num_blocks) + 1;
  layout.block_size = static_cast<size_t>(options.cache.block_size);
  layout.latent_dim = static_cast<size_t>(c.kv_lora_rank);
  layout.rope_dim = static_cast<size_t>(c.qk_rope_head_dim);
  const size_t cache_bytes = static_cast<size_t>(c.num_hidden_layers) * layout.num_blocks *
                             layout.block_size * (layout.latent_dim + layout.rope_dim) * es;
  auto cache = s->allocator->allocate(cache_bytes, s->key());
  if (!cache) return cache.error();
  s->cache = std::move(*cache);
  // Never read before written; zeroed so that a stray read shows up as zeros, not old data.
  if (auto err = runtime::cuda_error(cudaMemsetAsync(s->cache.data(), 0, cache_bytes, s->stream.get()),
                                     "cudaMemsetAsync(cache)"))
    return err;

  // cos/sin for every position a cached sequence can reach.
  const int64_t positions =
      std::min(c.max_position_embeddings, options.cache.num_blocks * options.cache.block_size);
  const size_t half = static_cast<size_t>(c.qk_rope_head_dim) / 2;
  std::vector<float> cos(static_cast<size_t>(positions) * half), sin(cos.size());
  if (kernels::cpu::rope_cos_sin_table(*rope, 0, static_cast<size_t>(positions), cos.data(),
                                       sin.data()) != kernels::kernel_status::ok)
    return model::make_error(model_errc::bad_config, "gpu engine: RoPE tables rejected");
  auto cos_dev = s->allocator->allocate(cos.size() * sizeof(float), s->key());
  if (!cos_dev) return cos_dev.error();
  auto sin_dev = s->allocator->allocate(sin.size() * sizeof(float), s->key());
  if (!sin_dev) return sin_dev.error();
  s->rope_cos = std::move(*cos_dev);
  s->rope_sin = std::move(*sin_dev);
  if (auto err = runtime::copy_async(s->rope_cos.data(), cos.data(), cos.size() * sizeof(float),
                                     s->stream.get()))
    return err;
  if (auto err = runtime::copy_async(s->rope_sin.data(), sin.data(), sin.size() * sizeof(float),
                                     s->stream.get()))
    return err;

  if (const auto st = kcu::gemm_lt::create(s->gemm); st != kernels::kernel_status::ok)
    return model::make_error(model_errc::kernel_failed,
                             "gpu engine: cuBLASLt: " + std::string(kernels::to_string(st)));
  auto workspace = s->allocator->allocate(kcu::gemm_workspace_bytes, s->key());
  if (!workspace) return workspace.error();
  s->gemm_workspace = std::move(*workspace);
  if (options.overlap_shared_experts && c.n_routed_experts > 0 && c.n_shared_experts > 0) {
    auto side = runtime::cuda_stream::create();
    if (!side) return side.error();
    s->side_stream = std::move(*side);
    for (auto* event : {&s->shared_start, &s->shared_done}) {
      auto e = runtime::cuda_event::create();
      if (!e) return e.error();
      *event = std::move(*e);
    }
    // Used only between the fork and the join, which the step's stream waits for.
    auto side_workspace = s->allocator->allocate(kcu::gemm_workspace_bytes, s->key());
    if (!side_workspace) return side_workspace.error();
    s->side_gemm_workspace = std::move(*side_workspace);
  }

  // Where an FP8 weight is expanded for its product (fp8_products::expand, and the fallback of
  // block_scaled): the largest one outside the routed experts, in bf16.
  if (const int64_t n = s->weights->max_fp8_linear_elements(); n > 0) {
    auto expanded = s->allocator->allocate(static_cast<size_t>(n) * 2, s->key());
    if (!expanded) return expanded.error();
    s->fp8_expanded = std::move(*expanded);
  }

  // cuBLAS's grouped GEMM for prefill's experts: the expert offsets' pinned landing place and
  // the operand addresses' scratch, for both products of a layer.
  if (options.cublas_grouped_experts && c.n_routed_experts > 0) {
    if (const auto st = kcu::cublas_grouped_gemm::create(s->blas); st != kernels::kernel_status::ok)
      return model::make_error(model_errc::kernel_failed,
                               "gpu engine: cuBLAS: " + std::string(kernels::to_string(st)));
    const auto E = static_cast<size_t>(c.n_routed_experts);
    auto host =
        runtime::pinned_host_buffer::allocate((E + 1) * sizeof(int32_t) + 6 * E * sizeof(void*));
    if (!host) return host.error();
    s->blas_host = std::move(*host);
    auto pointers = s->allocator->allocate(6 * E * sizeof(void*), s->key());
    if (!pointers) return pointers.error();
    s->blas_pointers = std::move(*pointers);
  }

  // The grouped GEMM's offsets for a product of r rows as one expert: {0, r} at 2 r.
  std::vector<int32_t> one_expert;  // outlives its copy (the synchronisation below)
  if (options.grouped_dense_rows > 0) {
    one_expert.assign(2 * (gpu_engine_options::max_grouped_dense_rows + 1), 0);
    for (size_t r = 0; 2 * r < one_expert.size(); ++r)
      one_expert[2 * r + 1] = static_cast<int32_t>(r);
    auto table = s->allocator->allocate(one_expert.size() * sizeof(int32_t), s->key());
    if (!table) return table.error();
    s->one_expert_offsets = std::move(*table);
    if (auto err = runtime::copy_async(s->one_expert_offsets.data(), one_expert.data(),
                                       one_expert.size() * sizeof(int32_t), s->stream.get()))
      return err;
  }

  detail::model_state& m = s->model;
  m.config = &s->config;
  m.dt = options.dtype;
  m.weights = &*s->weights;
  m.cache_layout = layout;
  m.cache = s->cache.data();
  m.rope_cos = static_cast<const float*>(s->rope_cos.data());
  m.rope_sin = static_cast<const float*>(s->rope_sin.data());
  m.rope_positions = positions;
  m.softmax_scale = static_cast<float>(model::attention_softmax_scale(c));
  m.eps = static_cast<float>(c.rms_norm_eps);
  m.gemm = &s->gemm;
  m.gemm_workspace = s->gemm_workspace.data();
  m.gemm_workspace_bytes = kcu::gemm_workspace_bytes;
  m.stream = s->stream.get();
  if (s->side_stream) {
    m.side_stream = s->side_stream->get();
    m.shared_start = s->shared_start->get();
    m.shared_done = s->shared_done->get();
    m.side_gemm_workspace = s->side_gemm_workspace.data();
  }
  m.fp8_block_scaled = options.fp8 == gpu_engine_options::fp8_products::block_scaled;
  m.skinny_rows = options.skinny_rows;
  m.grouped_dense_rows = options.grouped_dense_rows;
  m.wgmma_experts = options.wgmma_experts;
  m.kernels = &s->kernels;
  m.one_expert_offsets = static_cast<const int32_t*>(s->one_expert_offsets.data());
  if (s->blas_host.size_bytes() > 0) {
    // The pointers first (8-byte aligned at the buffer's start), then the offsets.
    const auto E = static_cast<size_t>(c.n_routed_experts);
    m.blas = &s->blas;
    m.host_pointers = static_cast<const void**>(s->blas_host.data());
    m.host_offsets =
        reinterpret_cast<int32_t*>(static_cast<char*>(s->blas_host.data()) + 6 * E * sizeof(void*));
    m.device_pointers = static_cast<void**>(s->blas_pointers.data());
  }
  m.fp8_expanded = s->fp8_expanded.data();
  m.expert_parallel = s->expert_parallel.get();
  // The host tables above must outlive their copies.
  if (auto err = s->stream.synchronize()) return err;
  return gpu_engine(std::move(s));
}

caf::expected<gpu_step_result> gpu_engine::prefill(std::span<const model::sequence_input> seqs,
                                                   const gpu_prefill_options& options) {
  return state_->collective([&] { return state_->prefill(seqs, options); });
}

caf::expected<gpu_step_result> gpu_engine::decode(std::span<const model::decode_input> batch,
                                                  const gpu_decode_options& options) {
  return state_->collective([&] { return state_->decode(batch, options); });
}

caf::expected<gpu_step_result> gpu_engine::state::prefill(
    std::span<const model::sequence_input> seqs, const gpu_prefill_options& options) {
  state& s = *this;
  const model::model_config& c = s.config;
  if (seqs.empty()) return gpu_step_result{};
  int64_t num_tokens = 0, longest = 0;
  std::unordered_set<uint64_t> seen;
  for (const auto& q : seqs) {
    const std::string name = "sequence " + std::to_string(q.id);
    if (q.tokens.empty()) return bad_input(name + " is empty");
    if (s.lengths.count(q.id) || !seen.insert(q.id).second)
      return bad_input(name + " is already in the batch or cache");
    if (static_cast<int64_t>(q.tokens.size()) > c.max_position_embeddings)
      return bad_input(name + " is longer than max_position_embeddings");
    for (const int32_t t : q.tokens)
      if (t < 0 || t >= c.vocab_size)
        return bad_input(name + ": token id " + std::to_string(t) +
                         " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    num_tokens += static_cast<int64_t>(q.tokens.size());
    longest = std::max<int64_t>(longest, static_cast<int64_t>(q.tokens.size()));
  }
  if (num_tokens > INT32_MAX) return bad_input("more than 2^31 - 1 tokens in one prefill");
  if (s.expert_parallel && num_tokens > s.options.expert_parallel.max_tokens)
    return bad_input(std::to_string(num_tokens) +
                     " tokens in one prefill, above expert "
                     "parallelism's max_tokens " +
                     std::to_string(s.options.expert_parallel.max_tokens));
  if (options.all_logits && !options.sampling.empty())
    return bad_input("sampling draws each sequence's next token: not with all_logits");
  if (auto err = check_sampling(options.sampling, static_cast<int64_t>(seqs.size()))) return err;
  // All sequences' blocks or none, so a full cache changes nothing.
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (auto err = s.blocks.reserve(seqs[i].id, static_cast<int64_t>(seqs[i].tokens.size()))) {
      for (size_t j = 0; j < i; ++j) s.blocks.release(seqs[j].id);
      return err;
    }
  }
  detail::step_shape shape;
  shape.num_tokens = num_tokens;
  shape.num_seqs = static_cast<int64_t>(seqs.size());
  shape.max_seq_len = longest;
  shape.num_logit_rows = options.all_logits ? num_tokens : shape.num_seqs;
  shape.num_moe_layers = s.num_moe_layers;
  auto out = s.run_step(
      shape, options.return_logits, options.capture_routing,
      [&](const detail::step_buffers& b, const metadata_view& host) {
        int32_t* ids = host(b.token_ids);
        int32_t* positions = host(b.positions);
        int64_t* slots = host(b.slots);
        int32_t* cu = host(b.cu_seqlens);
        int32_t* last = host(b.last_rows);
        fill_sampling(host(b.sampling), shape.num_logit_rows, options.sampling);
        int32_t t = 0;
        cu[0] = 0;
        for (size_t i = 0; i < seqs.size(); ++i) {
          for (size_t p = 0; p < seqs[i].tokens.size(); ++p, ++t) {
            ids[t] = seqs[i].tokens[p];
            positions[t] = static_cast<int32_t>(p);
            slots[t] = s.blocks.slot(seqs[i].id, static_cast<int64_t>(p));
          }
          cu[i + 1] = t;
          last[i] = t - 1;
        }
      },
      shape.num_logit_rows, options.sampling);
  if (!out) {
    for (const auto& q : seqs) s.blocks.release(q.id);
    return out.error();
  }
  for (const auto& q : seqs) s.lengths[q.id] = static_cast<int64_t>(q.tokens.size());
  return out;
}

caf::expected<gpu_step_result> gpu_engine::state::decode(std::span<const model::decode_input> batch,
                                                         const gpu_decode_options& options) {
  state& s = *this;
  const model::model_config& c = s.config;
  if (batch.empty()) return gpu_step_result{};
  std::unordered_set<uint64_t> seen;
  int64_t longest = 0;
  for (const auto& d : batch) {
    const std::string name = "sequence " + std::to_string(d.id);
    auto it = s.lengths.find(d.id);
    if (it == s.lengths.end()) return bad_input(name + " has no prefill");
    if (!seen.insert(d.id).second) return bad_input(name + " is twice in the batch");
    if (it->second >= c.max_position_embeddings)
      return bad_input(name + " reached max_position_embeddings");
    if (d.token < 0 || d.token >= c.vocab_size)
      return bad_input(name + ": token id " + std::to_string(d.token) +
                       " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    longest = std::max(longest, it->second + 1);
  }
  if (auto err = check_sampling(options.sampling, static_cast<int64_t>(batch.size()))) return err;
  if (s.expert_parallel &&
      static_cast<int64_t>(batch.size()) > s.options.expert_parallel.max_tokens)
    return bad_input("a batch of " + std::to_string(batch.size()) +
                     ", above expert parallelism's max_tokens " +
                     std::to_string(s.options.expert_parallel.max_tokens));
  for (const auto& d : batch)
    if (auto err = s.blocks.reserve(d.id, s.lengths[d.id] + 1)) return err;
  size_t max_blocks = 1;
  for (const auto& d : batch) max_blocks = std::max(max_blocks, s.blocks.blocks(d.id).size());
  detail::step_shape shape;
  shape.decode = true;
  shape.num_tokens = shape.num_seqs = shape.num_logit_rows = static_cast<int64_t>(batch.size());
  shape.max_seq_len = longest;
  shape.max_blocks = static_cast<int64_t>(max_blocks);
  shape.num_moe_layers = s.num_moe_layers;
  // With decode graphs, every step within the buckets runs at its graph's padded shape, eager
  // ones included (use_graph false, capture_routing, a fallback): the same kernels on the same
  // shapes, so a step gives the same values, bit for bit, whether it was replayed or not.
  if (s.options.decode_graphs) {
    const int64_t batch_bucket = detail::decode_batch_bucket(shape.num_seqs);
    const int64_t block_bucket = detail::decode_block_bucket(shape.max_blocks);
    if (batch_bucket != 0 && block_bucket != 0)
      shape = s.padded_decode_shape(batch_bucket, block_bucket);
  }
  // Routing capture is for tests and analysis: not worth a graph of its own.
  auto out = s.options.decode_graphs && options.use_graph && !options.capture_routing
                 ? s.decode_graphed(batch, options.sampling, shape, options.return_logits)
                 : s.run_step(
                       shape, options.return_logits, options.capture_routing,
                       [&](const detail::step_buffers& b, const metadata_view& host) {
                         s.fill_decode(batch, options.sampling, shape, b, host);
                       },
                       static_cast<int64_t>(batch.size()), options.sampling);
  if (!out) return out.error();
  for (const auto& d : batch) ++s.lengths[d.id];
  return out;
}

void gpu_engine::release(uint64_t id) {
  state_->blocks.release(id);
  state_->lengths.erase(id);
}

int64_t gpu_engine::cached_tokens(uint64_t id) const noexcept {
  auto it = state_->lengths.find(id);
  return it == state_->lengths.end() ? 0 : it->second;
}

int64_t gpu_engine::num_free_cache_blocks() const noexcept {
  return state_->blocks.num_free_blocks();
}

const model::model_config& gpu_engine::config() const noexcept { return state_->config; }
dtype gpu_engine::storage_dtype() const noexcept { return state_->options.dtype; }
size_t gpu_engine::weight_bytes() const noexcept { return state_->weights->size_bytes(); }
size_t gpu_engine::cache_bytes() const noexcept { return state_->cache.size_bytes(); }
gpu_decode_graph_stats gpu_engine::decode_graph_stats() const { return state_->graphs.stats(); }

gpu_kernel_stats gpu_engine::kernel_stats() const noexcept {
  return state_->kernels;
}

bool gpu_engine::expert_parallel() const noexcept {
  return state_->expert_parallel != nullptr;
}

}  // namespace moe::engine
