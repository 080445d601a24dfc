// The GPU engine: a whole DeepSeek-V3-class model's forward pass on one GPU, prefill then
// decode, composed from the CUDA kernels in kernels/cuda. It mirrors model::reference_engine
// (the CPU yardstick: same blocks, same order; engine/forward_pass.hpp lists where the order of
// roundings differs) and is tested against it and against transformers' goldens.
//
// What lives on the device: the weights (device_weights.hpp, in bf16 or f32; a checkpoint's FP8
// weights stay FP8 in a bf16 engine when it was loaded with model::load_options::keep_fp8), the
// paged latent KV cache (num_blocks blocks of block_size tokens, every layer's pool alike; the
// block tables are model::cache_block_allocator's bookkeeping on the host; one more block, never
// handed out, is where a decode graph's padding rows write), YaRN's cos/sin tables (built on the
// host by kernels::cpu::rope_cos_sin_table, uploaded once), cuBLASLt's workspace, each step's
// activations (one allocation from the caching device allocator), and with decode_graphs the
// graphs with their own activations. Every kernel and copy runs on the engine's one stream; a
// call returns when its results are on the host.
//
// Input checks happen on the host, before anything is uploaded or queued: token ids outside
// the vocabulary, empty prompts, unknown or duplicate sequence ids and positions past the
// model's limit are model_errc::bad_input with the reason; a full cache is
// model_errc::cache_full (transient: retry when sequences are released) and changes nothing.
//
// With gpu_engine_options::expert_parallel, the engine is one rank of an NCCL world holding its
// share of the routed experts; each step is then collective (gpu_expert_parallel says how).
//
// Ownership: the engine shares the checkpoint (only while creating: the device copy is its
// own) and owns every device resource, released after the stream is drained; not the NCCL
// communicator, which must outlive it.
// Thread safety: one thread at a time (a CUDA stream and plan caches inside).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/sampling.hpp"
#include "kernels/dtype.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"
#include "model/reference_engine.hpp"

// NCCL's communicator handle, as nccl.h declares it (this header stays free of NCCL's).
struct ncclComm;
typedef struct ncclComm* ncclComm_t;  // NOLINT(modernize-use-using): nccl.h's own spelling

namespace moe::engine {

/// Expert parallelism: the engine is one rank of an NCCL world (engine/expert_parallel.hpp).
/// Each rank's engine holds the whole model but the routed experts, of which it holds its share
/// (rank r of n: each MoE layer's experts [r E / n, (r + 1) E / n)), and runs its own sequences
/// (attention is data parallel); every MoE layer sends each token's rows to the ranks of its
/// experts and gets their weighted sum back. So a model whose experts do not fit one GPU is
/// served by several, and each GPU reads only its experts' weights in a step.
///
/// Every prefill and decode call is then a collective step: every rank of the world makes its
/// calls in the same order and number (prefill on one rank may meet decode on another), and a
/// rank with nothing to run passes an empty batch, which still takes its part in each layer's
/// round. A step one rank refuses (bad input, a full cache, more than max_tokens tokens) still
/// takes its part (with no rows), so its peers' steps go through; a step that fails on a rank
/// after its rows left (a kernel or NCCL failure) breaks the world, as any failed collective.
struct gpu_expert_parallel {
  ncclComm_t comm = nullptr;  ///< the world, on the engine's device; not owned. Null: off
  /// The most tokens one step of this rank runs: a prefill's prompts together, a decode's
  /// batch. Sizes the layer's send buffers (max_tokens x top_k rows of hidden) and, by default,
  /// its receive buffers (world x max_tokens x top_k rows: the worst routing).
  int64_t max_tokens = 0;
  /// Rows of hidden the receive buffers hold (expert_parallel_shape::recv_rows): 0 for the worst
  /// routing; fewer bound the layer's memory, and a round whose routing sends more than
  /// recv_rows / world rows between two ranks runs in chunks, with the same results.
  int64_t recv_rows = 0;
};

struct gpu_engine_options {
  /// Storage dtype of weights, activations and the cache: bf16 (serving) or f32 (exactness
  /// checks: every product in float32, no TF32). Accumulation is float32 either way.
  kernels::dtype dtype = kernels::dtype::bf16;
  /// Blocks of the device latent cache and their size in tokens.
  model::latent_cache_options cache;
  /// CUDA device ordinal.
  int device = 0;
  /// How the products use FP8 weights (kept FP8 in a bf16 engine; see device_weights.hpp). The
  /// routed experts' grouped GEMM expands each weight tile to bf16 in shared memory either way.
  enum class fp8_products : uint8_t {
    /// Each product's input quantized per row and 128 columns to e4m3, times the FP8 weight in
    /// cuBLASLt's block-scaled FP8 product: DeepSeek-V3's own inference (its checkpoints'
    /// "activation_scheme": "dynamic"), FP8 tensor cores on Hopper. Where cuBLASLt has no such
    /// algorithm (another card; n or k not a multiple of 128; blocks other than 128x128) a
    /// product falls back to `expand`.
    block_scaled,
    /// The weight expanded to bf16 right before the bf16 product: the bf16 engine's values on
    /// the same checkpoint (the same products of the same bf16 weights), with the memory of FP8.
    expand,
  };
  fp8_products fp8 = fp8_products::block_scaled;
  /// Products of at most this many rows (decode at small batches; the absorbed attention's
  /// per-head products too, one batched launch each, and with the router up to 64 rows, their
  /// weights being small enough to re-read from L2) run on the weight-streaming
  /// kernel of kernels/cuda/skinny_linear.hpp instead of cuBLASLt, whose kernels are tiled for
  /// many rows; an FP8 weight then streams as FP8 and is expanded to bf16 in registers (the
  /// values of `expand`, whichever `fp8` says). 0 .. kernels::cuda::skinny_linear_max_rows (8);
  /// 0: cuBLASLt for every row count. Rows are counted after the decode graphs' padding, so
  /// graph and eager steps take the same kernel. Shapes the kernel refuses (k not a multiple of
  /// one 16-byte load, misaligned rows) use cuBLASLt.
  int64_t skinny_rows = 4;
  /// Prefill's routed experts through cuBLAS's grouped GEMM (kernels/cuda/grouped_gemm_cublas.hpp)
  /// instead of our grouped GEMM kernel: each MoE layer copies its experts' row offsets to the
  /// host and waits for them (a prefill is never replayed from a graph; decode keeps ours).
  /// Off until a card measures it faster: moe_bench_gpu_engine reports the prefill both ways
  /// ("prefill_cublas_grouped_experts"). FP8 experts keep ours, which reads their FP8 tiles, and
  /// so does a product cuBLAS refuses.
  bool cublas_grouped_experts = false;
  /// On an sm_90 card, the routed experts' products of many rows per expert (prefill: the
  /// grouped GEMM's wide tiling) on Hopper's warpgroup MMA (kernels/cuda/grouped_gemm.hpp's
  /// `wgmma`) instead of WMMA, bf16 experts only (the gate|up product and SwiGLU in one launch
  /// there too, as on WMMA: `fuse_swiglu`). Off until a card measures it faster:
  /// moe_bench_gpu_engine reports the prefill both ways ("prefill_wgmma_experts").
  /// kernel_stats() says which kernel ran.
  bool wgmma_experts = false;
  /// Products of more than skinny_rows and at most this many rows (decode at batch 16 to 64,
  /// after the graphs' padding, and prefills of as few tokens), with bf16 or FP8 weights, the
  /// residual adds and the LM head's float32 logits included, run on the grouped expert GEMM as
  /// one expert (its row tiles of a weight slice together, so the slice is read once): its
  /// decode tiling streamed the experts' weights at 0.87 of copy bandwidth on an H200, where
  /// cuBLASLt's tiles reached 0.18 to 0.58 of it at 32 rows. 0 .. max_grouped_dense_rows; 0 (the
  /// default until a card measures it: moe_bench_gpu_engine's decode_grouped_dense) keeps cuBLASLt.
  int64_t grouped_dense_rows = 0;
  static constexpr int64_t max_grouped_dense_rows = 64;
  /// Decode steps run the shared experts' gate|up product and SwiGLU on a second stream while
  /// the routed experts' gate, permutation and grouped products run on the engine's (forked and
  /// joined by events, in the decode graphs too): at small batches each of those kernels leaves
  /// most of the card idle. The shared experts' down product adds into the output after both,
  /// so the values are the same bits either way. Costs a stream, two events and a second
  /// cuBLASLt workspace. Off: all on one stream (moe_bench_gpu_engine measures both).
  bool overlap_shared_experts = true;
  /// Replay decode steps from CUDA graphs (engine/decode_graphs.hpp): one launch per step
  /// instead of ~30 per layer. A batch is padded to the next power of two up to 256 and its
  /// block table to the next power-of-two width; each (batch, width, return_logits) gets its
  /// graph on its first step, which runs eagerly in the graph's buffers and is then captured.
  /// Steps with capture_routing, batches above 256 and shapes whose capture failed run eagerly
  /// (decode_graph_stats() counts them and says why); within the buckets an eager step still
  /// runs at the padded shape, so a step's results are the same, bit for bit, replayed or not. On by default since they passed their
  /// tests on an H200 (2026-11-29; 1.02-1.04x there on v2lite-8L, whose steps are bound by
  /// their kernels). Off: every step launches kernel by kernel.
  bool decode_graphs = true;
  /// The most graphs kept (>= 1); the least recently used is dropped beyond it. Each holds
  /// device memory the size of an eager step's activations at its padded shape (logits
  /// included: rows x vocab x 4 bytes with return_logits) and a pinned buffer of its results.
  int64_t max_decode_graphs = 32;
  /// Off unless comm is set; then decode_graphs, cublas_grouped_experts and wgmma_experts must
  /// be off (each layer's round waits for its counts on the host, which a graph cannot hold,
  /// and the routed experts run on expert_parallel_moe's grouped GEMM), and the experts bf16 or
  /// f32 (not FP8).
  gpu_expert_parallel expert_parallel;
  /// Tests only (fault injection): called inside every decode graph capture, after the step
  /// is queued, with the engine's cudaStream_t. An error it returns, or a CUDA call it makes
  /// that the capture refuses (a synchronisation, say), fails that capture as a kernel refusal
  /// or an uncapturable call would.
  std::function<caf::error(void* stream)> decode_graph_capture_hook;
};

/// What the decode graphs did so far (gpu_engine_options::decode_graphs).
struct gpu_decode_graph_stats {
  uint64_t num_captured = 0;   ///< graphs captured and instantiated (again after an eviction)
  uint64_t num_replays = 0;    ///< decode steps run from a graph
  /// Steps that should have run from a graph and ran eagerly: their graph failed (arena
  /// allocation, the padded step, capture, instantiation or launch) in this step or before.
  uint64_t num_fallbacks = 0;
  uint64_t num_evicted = 0;    ///< graphs dropped for max_decode_graphs
  int64_t num_graphs = 0;      ///< held now
  size_t device_bytes = 0;     ///< their arenas
  size_t host_bytes = 0;       ///< their pinned staging buffers
  /// Nodes of the graph captured last: the kernels (and copies) one decode step launches.
  size_t last_graph_nodes = 0;
  std::string last_fallback_reason;  ///< the key and the error of the last failure
};

/// Which kernels ran the products the options above choose between, counted as steps are
/// queued: prefills, eager decode steps and decode graph captures (a graph's replays re-run
/// what its capture queued and are not counted).
struct gpu_kernel_stats {
  /// The routed experts' grouped products (two per MoE layer and step), on
  uint64_t experts_grouped_gemm = 0;  ///< kernels/cuda/grouped_gemm.hpp: WMMA (f32: CUDA cores)
  uint64_t experts_wgmma = 0;         ///< the same on Hopper's wgmma (wgmma_experts)
  uint64_t experts_cublas = 0;        ///< cuBLAS's grouped GEMM (cublas_grouped_experts)
  /// MoE layers whose routed experts ran across the world (expert_parallel), one a layer and step.
  uint64_t experts_parallel = 0;
  /// The exchanges (dispatch, experts, combine) those layers ran: one a layer where the receive
  /// buffers held the round's routing (none where no rank routed a row), more where they did not.
  uint64_t experts_parallel_chunks = 0;
  /// Dense products run on the grouped GEMM as one expert (grouped_dense_rows).
  uint64_t dense_as_one_expert = 0;
  /// Products of FP8 weights beyond skinny_rows (fp8_products): on cuBLASLt's block-scaled
  /// FP8 product, or with the weight expanded to bf16 first (`expand`, or a shape the
  /// block-scaled product does not take).
  uint64_t fp8_block_scaled = 0;
  uint64_t fp8_expanded = 0;
};

/// How one row's token is drawn: kernels::cpu::sample's parameters and its counter-based draw
/// (seed, offset: the tokens that request sampled so far). The device draws the token
/// cpu::sample draws from the row's logits (kernels/cuda/sampling.hpp: exactly, except where the
/// draw falls within float rounding of a boundary between two tokens); rows the device leaves
/// to the host (top_k above 1024) are drawn there by cpu::sample from the same logits.
struct gpu_row_sampling {
  kernels::cpu::sampling_params params{0.0f, 0, 1.0f};  ///< temperature 0 (the default): greedy
  uint64_t seed = 0;
  uint64_t offset = 0;
};

struct gpu_prefill_options {
  bool all_logits = false;       ///< logits for every position, not only each sequence's last
  /// Copy the logits to the host. Off: only the greedy tokens come back (a greedy server's
  /// step then moves a few bytes, not rows x vocab floats: 13 MB at batch 32 of a 102400 vocab).
  bool return_logits = true;
  bool capture_routing = false;  ///< each MoE layer's top-k expert choices
  /// Empty: greedy. Otherwise one per sequence, in order (not with all_logits). A
  /// temperature below 0 or NaN, or top_p outside (0, 1], is model_errc::bad_input before
  /// anything runs.
  std::span<const gpu_row_sampling> sampling;
};

struct gpu_decode_options {
  bool return_logits = true;     ///< as gpu_prefill_options::return_logits
  bool capture_routing = false;  ///< each MoE layer's top-k expert choices
  /// Empty: greedy. Otherwise one per batch row, as gpu_prefill_options::sampling. Decode graphs
  /// read them as data: a step replays its graph whatever its rows' sampling.
  std::span<const gpu_row_sampling> sampling;
  /// With the engine's decode_graphs on: false runs this step eagerly, at the graph's padded
  /// shape (the graph path's yardstick in tests and benchmarks: the same work, launched kernel
  /// by kernel). Ignored when decode_graphs is off.
  bool use_graph = true;
};

/// What a step returns, on the host.
struct gpu_step_result {
  /// (rows, vocab) float32: a prefill's sequences (or every position with all_logits), a
  /// decode's batch, in the order given. Empty when the step's return_logits was off.
  std::vector<float> logits;
  /// (rows): each row's next token, chosen on the device: the argmax of its logits (lowest
  /// index on ties, as kernels::cpu::sample_greedy), or drawn as the step's `sampling` says.
  std::vector<int32_t> tokens;
  /// capture_routing: per MoE layer (in layer order), (tokens, top_k) expert ids, each token's
  /// choices in descending score order; tokens packed as the step gave them.
  std::vector<std::vector<int32_t>> routing;
};

class gpu_engine {
 public:
  /// Uploads the weights and allocates the cache. Errors: model_errc::bad_input for a dtype
  /// other than bf16/f32 or a non-positive cache size, bad_config for RoPE variants the kernels
  /// lack, missing_tensor/bad_tensor naming a tensor, CUDA errors (cuda_errc::no_device without
  /// a GPU, out_of_memory), model_errc::kernel_failed when a kernel cannot take the model's
  /// shapes (e.g. a latent wider than mla_decode_max_latent_dim).
  [[nodiscard]] static caf::expected<gpu_engine> create(std::shared_ptr<const model::checkpoint> ckpt,
                                                        const gpu_engine_options& options = {});

  gpu_engine(gpu_engine&&) noexcept;
  gpu_engine& operator=(gpu_engine&&) noexcept;
  /// Waits for the stream, then frees everything.
  ~gpu_engine();

  /// Runs new sequences' prompts (ids not yet cached, distinct) and caches them. On an error
  /// nothing of these sequences stays cached. With expert_parallel, a collective step (see
  /// gpu_expert_parallel): an empty `seqs` is this rank's part with nothing to run.
  [[nodiscard]] caf::expected<gpu_step_result> prefill(std::span<const model::sequence_input> seqs,
                                                       const gpu_prefill_options& options = {});
  /// One token per cached sequence (distinct ids) -> logits (B, vocab). On bad input nothing
  /// changes; on a full cache, sequences earlier in the batch may keep a block reserved for
  /// their next token (as the reference engine). With expert_parallel, a collective step, as
  /// prefill.
  [[nodiscard]] caf::expected<gpu_step_result> decode(std::span<const model::decode_input> batch,
                                                      const gpu_decode_options& options = {});
  /// Forgets a sequence and frees its cache blocks; unknown ids are ignored.
  void release(uint64_t id);
  /// Tokens cached for `id`, 0 when unknown.
  [[nodiscard]] int64_t cached_tokens(uint64_t id) const noexcept;
  [[nodiscard]] int64_t num_free_cache_blocks() const noexcept;

  [[nodiscard]] const model::model_config& config() const noexcept;
  [[nodiscard]] kernels::dtype storage_dtype() const noexcept;
  /// Device bytes of the weights and of the cache.
  [[nodiscard]] size_t weight_bytes() const noexcept;
  [[nodiscard]] size_t cache_bytes() const noexcept;
  [[nodiscard]] gpu_decode_graph_stats decode_graph_stats() const;
  [[nodiscard]] gpu_kernel_stats kernel_stats() const noexcept;
  /// Whether this engine is one rank of an expert-parallel world (its steps are collective).
  [[nodiscard]] bool expert_parallel() const noexcept;

 private:
  struct state;
  explicit gpu_engine(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

}  // namespace moe::engine
