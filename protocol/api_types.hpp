// The job-submission API (protocol/api.capnp) as plain C++ values, shared by the server
// (actors/api_server.hpp) and the client library (client/job_client.hpp), so that neither
// side's callers see Cap'n Proto types and both validate a request the same way.
// Thread safety: plain values and pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/error.hpp"

namespace moe::protocol {

/// The API version this build speaks (the schema's apiVersion).
[[nodiscard]] uint16_t api_version() noexcept;

/// Why the server refused a call. On the wire: the exception description "<code>: <text>".
enum class api_errc : uint8_t {
  unauthenticated = 1,  ///< Permanent: the cluster secret was wrong.
  unsupported_version,  ///< Permanent: client and server speak different API versions.
  invalid_request,      ///< Permanent: the request is malformed (the text says which field).
  overloaded,           ///< Transient: the controller's queue is full; retry later.
  unknown_job,          ///< Permanent: no job with that id.
  unavailable,          ///< Transient: the server is stopping; retry against another server.
  internal,             ///< Maybe transient: the controller failed or did not answer.
};

[[nodiscard]] const char* to_string(api_errc code) noexcept;
/// "overloaded" -> api_errc::overloaded; nullopt for anything else.
[[nodiscard]] std::optional<api_errc> parse_api_errc(std::string_view code) noexcept;
[[nodiscard]] caf::error make_error(api_errc code, std::string text);

enum class api_job_state : uint8_t { queued, running, finished, cancelled, failed };
[[nodiscard]] const char* to_string(api_job_state s) noexcept;

struct api_generation_spec {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  float temperature = 0.0f;  ///< 0: greedy
  uint32_t top_k = 0;        ///< 0: all tokens
  float top_p = 1.0f;
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;
  uint64_t deadline_ms = 0;  ///< 0: the cluster's default (batching.request_timeout_ms)
};

/// One step of a job's token stream; the last one has finished = true.
struct api_job_event {
  uint64_t job_id = 0;
  std::vector<int32_t> tokens;  ///< New tokens since the previous event.
  bool finished = false;
  api_job_state state = api_job_state::running;
  std::string finish_reason;    ///< "length", "stop", "cancelled" or "error" once finished.
  std::string error;            ///< Set when state == failed.
};

struct api_job_status {
  uint64_t job_id = 0;
  api_job_state state = api_job_state::queued;
  std::vector<int32_t> tokens;  ///< Generated so far.
  std::string finish_reason;
  std::string error;
  int32_t shard = -1;
};

struct api_node {
  std::string name;
  std::string host;
  std::vector<std::string> devices;
};

struct api_actor_info {
  std::string kind;  ///< "attention", "router", "expert_group", "engine_shard", "controller", ...
  std::string id;
  std::string node;
  std::string device;
};

/// What describe() answers. The server is handed this value; it does not ask the scheduler.
struct api_cluster_description {
  std::string name;
  std::vector<api_node> nodes;
  std::vector<api_actor_info> actors;
  uint64_t placement_version = 0;
  std::string placement_json;
};

/// What rebalance() answers: one online expert rebalance (actors/rebalance_messages.hpp's
/// rebalance_report). Balance ratios are max / mean expert-group load of a MoE layer (1 is
/// perfect): `before` as measured under the old placement, `after` predicted for the new one
/// from the same counts; balance_before / balance_after are the means over the MoE layers.
struct api_rebalance_report {
  bool changed = false;  ///< false: the placement was kept (nothing moved)
  uint64_t version_before = 0;
  uint64_t version_after = 0;
  double balance_before = 0;
  double balance_after = 0;
  std::vector<double> layer_balance_before;  ///< per MoE layer, ascending layer id
  std::vector<double> layer_balance_after;   ///< the same layers
  uint64_t tokens_counted = 0;  ///< routed (token, expert) choices counted, all layers
  int64_t replicas_moved = 0;   ///< (layer, expert) replicas some expert group loaded
  uint64_t bytes_moved = 0;     ///< weight bytes those loads read
  double duration_seconds = 0;  ///< from the load reports to the commit
  std::string trigger;          ///< "on_demand" or "periodic"
};

/// A training job (JobService.train): a corpus and how to train on it. The defaults are those
/// of actors::training_job and the schema's (a test holds the three together).
struct api_training_spec {
  /// Token ids, or UTF-8 text that the server tokenises (byte level: one id per byte).
  std::variant<std::vector<int32_t>, std::string> corpus;
  int64_t sequence_length = 64;   ///< tokens per sequence (windows of the corpus, no overlap)
  int64_t batch_sequences = 8;    ///< sequences per step
  int64_t steps = 100;
  double learning_rate = 1e-3;    ///< the peak, after warmup_steps of linear warmup
  int64_t warmup_steps = 0;
  double min_learning_rate = 0;   ///< cosine decay reaches it at the last step
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;             ///< max global gradient norm; <= 0: no clipping
  double balance_loss_weight = 1e-4;  ///< the sequence-wise balance loss weight (alpha)
  double bias_update_speed = 1e-3;    ///< gamma of the routing-bias update
  uint64_t seed = 0;                  ///< the order in which windows are visited
};

/// A training job's progress: after every step, and once more when it ends (finished).
struct api_training_event {
  uint64_t job_id = 0;
  int64_t step = 0;   ///< steps done
  int64_t steps = 0;  ///< steps asked for
  double loss = 0;    ///< the last step's mean next-token cross-entropy
  double learning_rate = 0;
  double grad_norm = 0;               ///< before clipping
  double tokens_per_second = 0;       ///< since the job started
  std::vector<double> load_balance;   ///< the last step's max / mean expert load per MoE layer
  bool finished = false;
  api_job_state state = api_job_state::queued;
  std::string error;       ///< set when state == failed
  std::string checkpoint;  ///< set on the event after a checkpoint was written there
  uint32_t rollbacks = 0;  ///< node failures survived by rolling back to a snapshot (step went back)
};

/// Bounds a server enforces before a request reaches the controller.
struct api_limits {
  size_t max_prompt_tokens = 1u << 20;
  size_t max_stop_token_ids = 1024;
  /// A training corpus: ids, or bytes of text (either fits a 64 MiB message with room to spare).
  size_t max_corpus_tokens = size_t{1} << 22;
  size_t max_corpus_bytes = size_t{1} << 24;
  /// batchSequences * sequenceLength of a training step.
  int64_t max_training_batch_tokens = int64_t{1} << 20;
  size_t max_checkpoint_directory_bytes = 4096;
};

/// invalid_request naming the field, or nothing when `spec` is well-formed: a non-empty prompt
/// of ids >= 0, max_new_tokens >= 0, temperature >= 0 and finite, top_p in (0, 1].
[[nodiscard]] caf::error validate(const api_generation_spec& spec, const api_limits& limits = {});

/// invalid_request naming the field, or nothing when `spec` is well-formed: a non-empty corpus
/// (ids >= 0; a token corpus of at least one sequence), sequenceLength >= 2, batchSequences >= 1,
/// steps >= 1, warmupSteps >= 0, learningRate > 0, minLearningRate in [0, learningRate], betas
/// in [0, 1), eps > 0, weightDecay, balanceLossWeight and biasUpdateSpeed >= 0, every number
/// finite, and the limits. What only the model knows (its vocabulary and context, the length of
/// a tokenised text) the server checks after this.
[[nodiscard]] caf::error validate(const api_training_spec& spec, const api_limits& limits = {});

/// invalid_request, or nothing when `directory` names a checkpoint directory a server accepts:
/// an absolute path (the server's working directory is nobody's business), without NUL bytes,
/// within the limit.
[[nodiscard]] caf::error validate_checkpoint_directory(std::string_view directory,
                                                       const api_limits& limits = {});

/// Several queued events of one training job as the one the server sends when its client fell
/// behind: the newest (so a finished event is never dropped), carrying the newest checkpoint
/// path among them when it has none itself. Requires a non-empty list, oldest first.
[[nodiscard]] api_training_event merge_training_events(std::vector<api_training_event> events);

/// invalid_request naming the field, or nothing when `report` is well-formed: balance ratios
/// finite and >= 0, one entry per layer in both per-layer lists, replicasMoved >= 0,
/// durationSeconds finite and >= 0. The client checks what a server answers.
[[nodiscard]] caf::error validate(const api_rebalance_report& report);

}  // namespace moe::protocol

MOE_ERROR_ENUM(moe::protocol::api_errc, "api")
