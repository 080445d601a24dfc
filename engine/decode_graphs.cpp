#include "engine/decode_graphs.hpp"

#include <algorithm>
#include <exception>
#include <utility>

#include "model/model_errc.hpp"

namespace moe::engine::detail {

namespace {

int64_t next_power_of_two(int64_t n) noexcept {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

struct cuda_graph_deleter {
  void operator()(cudaGraph_t g) const noexcept { (void)cudaGraphDestroy(g); }
};
using graph_ptr = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, cuda_graph_deleter>;

/// Ends the capture on every path out of cuda_graph::capture, exceptions included: a stream
/// left capturing would turn every later step's launches into capture errors.
class capture_scope {
 public:
  explicit capture_scope(cudaStream_t s) noexcept : stream_(s) {}
  capture_scope(const capture_scope&) = delete;
  capture_scope& operator=(const capture_scope&) = delete;
  ~capture_scope() {
    if (!ended_) leave_capture(stream_);
  }
  /// The captured graph, or CUDA's error (cudaErrorStreamCaptureInvalidated after a refused
  /// call inside the capture).
  cudaError_t end(graph_ptr& out) noexcept {
    ended_ = true;
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &g);
    out.reset(g);
    return e;
  }

 private:
  cudaStream_t stream_;
  bool ended_ = false;
};

caf::error capture_failed(std::string text) {
  return model::make_error(model::model_errc::kernel_failed, "decode graph: " + std::move(text));
}

}  // namespace

int64_t decode_batch_bucket(int64_t batch) noexcept {
  if (batch < 1 || batch > decode_graph_max_batch) return 0;
  return next_power_of_two(batch);
}

int64_t decode_block_bucket(int64_t max_blocks) noexcept {
  if (max_blocks > (int64_t{1} << 30)) return 0;
  return next_power_of_two(std::max<int64_t>(max_blocks, 1));
}

void leave_capture(cudaStream_t stream) noexcept {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(stream, &g);
    if (g != nullptr) (void)cudaGraphDestroy(g);
  }
  // A refused call inside a capture leaves a (non-sticky) error that the next kernel launch's
  // cudaGetLastError would otherwise take for its own.
  (void)cudaGetLastError();
}

caf::expected<cuda_graph> cuda_graph::capture(cudaStream_t stream,
                                              const std::function<caf::error()>& enqueue) {
  // Nothing should have left the stream capturing or an error pending; if something did, the
  // capture would fail for it, or a wrapper's cudaGetLastError would report it as its own.
  leave_capture(stream);
  if (auto err =
          runtime::cuda_error(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                              "cudaStreamBeginCapture"))
    return err;
  caf::error err;
  graph_ptr graph;
  {
    capture_scope scope(stream);
    try {
      err = enqueue();
    } catch (const std::exception& e) {
      err = capture_failed(std::string("while capturing: ") + e.what());
    } catch (...) {
      err = capture_failed("while capturing: unknown exception");
    }
    // Every wrapper consumes the errors of its own calls, and none was pending at the start:
    // an error still pending is a call inside the capture that failed unnoticed (a refused
    // one, say), so the graph may lack its work.
    if (const cudaError_t pending = cudaPeekAtLastError(); !err && pending != cudaSuccess)
      err = runtime::cuda_error(pending, "a CUDA call inside the capture");
    const cudaError_t end = scope.end(graph);
    // A refused call invalidates the capture, whether or not its caller noticed: the end's
    // status says so.
    if (!err && end != cudaSuccess) err = runtime::cuda_error(end, "cudaStreamEndCapture");
    if (!err && graph == nullptr) err = capture_failed("cudaStreamEndCapture gave no graph");
  }
  if (err) {
    graph.reset();
    leave_capture(stream);
    return err;
  }
  size_t num_nodes = 0;
  if (auto e = runtime::cuda_error(cudaGraphGetNodes(graph.get(), nullptr, &num_nodes),
                                   "cudaGraphGetNodes")) {
    leave_capture(stream);
    return e;
  }
  cudaGraphExec_t exec = nullptr;
  if (auto e = runtime::cuda_error(cudaGraphInstantiate(&exec, graph.get(), 0),
                                   "cudaGraphInstantiate")) {
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
    leave_capture(stream);
    return e;
  }
  cuda_graph out;
  out.exec_.reset(exec);
  out.num_nodes_ = num_nodes;
  return out;
}

caf::error cuda_graph::launch(cudaStream_t stream) const {
  if (!exec_) return capture_failed("launch of an empty graph");
  return runtime::cuda_error(cudaGraphLaunch(exec_.get(), stream), "cudaGraphLaunch");
}

decode_graph* decode_graph_cache::find(const decode_graph_key& key) noexcept {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) return nullptr;
  it->second->last_used = ++clock_;
  return it->second.get();
}

void decode_graph_cache::insert(const decode_graph_key& key, std::unique_ptr<decode_graph> graph) {
  if (auto it = graphs_.find(key); it != graphs_.end()) erase(it);
  while (!graphs_.empty() && static_cast<int64_t>(graphs_.size()) >= max_graphs_) {
    auto oldest = std::min_element(
        graphs_.begin(), graphs_.end(),
        [](const auto& a, const auto& b) { return a.second->last_used < b.second->last_used; });
    erase(oldest);
    ++stats_.num_evicted;
  }
  graph->last_used = ++clock_;
  stats_.device_bytes += graph->arena.size_bytes();
  stats_.host_bytes += graph->staging.size_bytes();
  stats_.last_graph_nodes = graph->graph.num_nodes();
  graphs_.emplace(key, std::move(graph));
  ++stats_.num_captured;
}

void decode_graph_cache::mark_unfit(const decode_graph_key& key, std::string reason) {
  if (auto it = graphs_.find(key); it != graphs_.end()) erase(it);
  unfit_.insert(key);
  ++stats_.num_fallbacks;
  stats_.last_fallback_reason =
      "batch bucket " + std::to_string(key.batch) + ", " + std::to_string(key.blocks) +
      " blocks, " + (key.return_logits ? "logits" : "no logits") + ": " + std::move(reason);
}

void decode_graph_cache::erase(
    std::map<decode_graph_key, std::unique_ptr<decode_graph>>::iterator it) noexcept {
  stats_.device_bytes -= it->second->arena.size_bytes();
  stats_.host_bytes -= it->second->staging.size_bytes();
  graphs_.erase(it);
}

void decode_graph_cache::clear() noexcept {
  while (!graphs_.empty()) erase(graphs_.begin());
}

gpu_decode_graph_stats decode_graph_cache::stats() const {
  gpu_decode_graph_stats s = stats_;
  s.num_graphs = static_cast<int64_t>(graphs_.size());
  return s;
}

}  // namespace moe::engine::detail
