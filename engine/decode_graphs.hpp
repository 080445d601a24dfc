// CUDA graphs of the GPU engine's decode step. A decode step queues about 30 kernels and copies
// per layer, each small at serving batches, so launching them costs a good part of the step; a
// graph replays the whole step with one launch. A graph fixes every shape and pointer, so the
// engine pads the batch to a bucket (decode_batch_bucket) and the block table to a width bucket
// (decode_block_bucket), and keeps one graph per (batch bucket, width bucket, return_logits).
// Each graph owns the memory its nodes name: its step arena (activations and the metadata's
// device copy) and its pinned staging buffer, whose metadata a replay rewrites before the
// launch (the graph's first node uploads it; its last nodes download the results into it).
//
// Failures never escape as a broken stream: cuda_graph::capture always ends the capture it
// began, destroys a partial graph and clears CUDA's last error, and the engine runs such a step
// eagerly (decode_graph_cache remembers the key as unfit and counts the fallback).
//
// Ownership: a decode_graph owns its executable graph, its arena (from the engine's caching
// allocator, which must outlive it) and its staging buffer; decode_graph_cache owns the
// graphs. Thread safety: confined to the engine's thread, as the engine.
#pragma once

#include <cuda_runtime_api.h>

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>

#include "base/error.hpp"
#include "engine/forward_pass.hpp"
#include "engine/gpu_engine.hpp"
#include "runtime/cuda_memory.hpp"
#include "runtime/device_allocator.hpp"

namespace moe::engine::detail {

/// The largest batch bucket; a larger batch runs eagerly.
inline constexpr int64_t decode_graph_max_batch = 256;

/// The batch a graph for `batch` rows runs: the next power of two (1, 2, 4, ..., 256); 0 when
/// batch < 1 or above decode_graph_max_batch (no graph).
[[nodiscard]] int64_t decode_batch_bucket(int64_t batch) noexcept;
/// The block table's width in a graph: the next power of two >= max(max_blocks, 1) (a sequence
/// crosses log2 of its length in widths, not one per block). 0 above 2^30 (no graph).
[[nodiscard]] int64_t decode_block_bucket(int64_t max_blocks) noexcept;

struct decode_graph_key {
  int64_t batch = 0;   ///< a decode_batch_bucket
  int64_t blocks = 0;  ///< a decode_block_bucket
  bool return_logits = true;
  friend auto operator<=>(const decode_graph_key&, const decode_graph_key&) = default;
};

struct cuda_graph_exec_deleter {
  void operator()(cudaGraphExec_t e) const noexcept { (void)cudaGraphExecDestroy(e); }
};

/// An instantiated CUDA graph (move-only). The graph it was made from is destroyed once
/// instantiated: the executable does not need it.
class cuda_graph {
 public:
  cuda_graph() = default;

  /// Captures what `enqueue` queues on `stream` (cudaStreamCaptureModeThreadLocal: another
  /// thread's unsafe calls do not break it) and instantiates it. Fails with enqueue's error, or
  /// the CUDA error of a call the capture refused, of ending the capture or of instantiation
  /// (model_errc::kernel_failed or cuda_errc). Whatever happened, `stream` is out of capture
  /// mode on return, no partial graph is left, and CUDA's last error is cleared.
  [[nodiscard]] static caf::expected<cuda_graph> capture(
      cudaStream_t stream, const std::function<caf::error()>& enqueue);

  /// Queues one replay on `stream`.
  [[nodiscard]] caf::error launch(cudaStream_t stream) const;
  [[nodiscard]] explicit operator bool() const noexcept { return exec_ != nullptr; }
  /// The captured graph's nodes (kernels, copies, library calls' launches): what one replay
  /// launches.
  [[nodiscard]] size_t num_nodes() const noexcept { return num_nodes_; }

 private:
  std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, cuda_graph_exec_deleter> exec_;
  size_t num_nodes_ = 0;
};

/// Ends a capture `stream` may still be in (discarding its graph) and clears CUDA's last
/// error: what every failure path runs, so that the stream takes eager work again.
void leave_capture(cudaStream_t stream) noexcept;

/// One graph and the memory its nodes name. The graph is declared last so that it is
/// destroyed first.
struct decode_graph {
  step_shape shape;             ///< the padded shape
  step_buffers buffers;         ///< carved from arena
  step_results_layout results;  ///< in staging
  runtime::device_allocation arena;
  runtime::pinned_host_buffer staging;
  uint64_t last_used = 0;
  cuda_graph graph;
};

/// The engine's decode graphs, by key, with the keys that failed (never tried again: a kernel
/// that refused a shape refuses it every time) and the counts gpu_decode_graph_stats reports.
/// At most max_graphs are kept; the least recently used is dropped (its arena goes back to the
/// allocator) to make room.
class decode_graph_cache {
 public:
  explicit decode_graph_cache(int64_t max_graphs) noexcept : max_graphs_(max_graphs) {}

  /// The key's graph (marked used), or null.
  [[nodiscard]] decode_graph* find(const decode_graph_key& key) noexcept;
  [[nodiscard]] bool unfit(const decode_graph_key& key) const noexcept {
    return unfit_.count(key) != 0;
  }
  /// Keeps a newly captured graph, dropping the least recently used one beyond max_graphs.
  void insert(const decode_graph_key& key, std::unique_ptr<decode_graph> graph);
  /// The key's graph failed (`reason` says how): drops it, never tries the key again, and
  /// counts the step as a fallback.
  void mark_unfit(const decode_graph_key& key, std::string reason);
  /// A step of an unfit key ran eagerly.
  void count_fallback() noexcept { ++stats_.num_fallbacks; }
  void count_replay() noexcept { ++stats_.num_replays; }
  /// Drops every graph (the caller has drained the stream).
  void clear() noexcept;

  [[nodiscard]] gpu_decode_graph_stats stats() const;

 private:
  void erase(std::map<decode_graph_key, std::unique_ptr<decode_graph>>::iterator it) noexcept;

  int64_t max_graphs_;
  uint64_t clock_ = 0;
  std::map<decode_graph_key, std::unique_ptr<decode_graph>> graphs_;
  std::set<decode_graph_key> unfit_;
  gpu_decode_graph_stats stats_;
};

}  // namespace moe::engine::detail
