// moe::client: the C++ client of the job-submission API (protocol/api.capnp), for programs and
// for `moe submit`. It speaks Cap'n Proto RPC to a cluster's API server; it knows nothing of
// CAF actors (errors are caf::error values, as everywhere in the project).
//
//   auto c = moe::client::job_client::connect("127.0.0.1", 7101, secret);
//   if (!c) ... c.error() names the cause (connection refused, unauthenticated, ...)
//   auto tokens = (*c)->generate({.prompt = {5, 17, 42}, .max_new_tokens = 8});
//
// Every failure comes back as a client_errc error whose text names the cause; no exception
// leaves this library (Cap'n Proto's are caught at each call).
//
// Thread safety: a job_client is confined to the thread that called connect(): Cap'n Proto
// runs one event loop per thread, and events are delivered only while that thread is inside a
// call of this class (submit, wait, status, cancel, describe, rebalance, the training calls,
// poll). Several clients may share a thread. Ownership: the client owns its connection; destroying it closes
// the connection, which makes the server cancel every job still streaming to it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "protocol/api_types.hpp"

namespace moe::client {

enum class client_errc : uint8_t {
  connection_failed = 1,  ///< Transient: the server could not be reached (refused, unresolved).
  disconnected,           ///< Transient: the connection dropped; a submit may have been accepted.
  unauthenticated,        ///< Permanent: the server did not accept the cluster secret.
  unsupported_version,    ///< Permanent: client and server speak different API versions.
  invalid_request,        ///< Permanent: the request is malformed (found here or by the server).
  overloaded,             ///< Transient: the cluster's queue is full; retry later.
  unknown_job,            ///< Permanent: the server knows no job with that id.
  unavailable,            ///< Transient: the server is stopping.
  timed_out,              ///< Transient: no answer within the time given.
  job_failed,             ///< Permanent: the job failed on the cluster (the text says why).
  job_cancelled,          ///< The job was cancelled (by a cancel call or a stopping server).
  server_error,           ///< Maybe transient: any other failure the server reported.
  tls_failed,             ///< Permanent: the TLS handshake failed (the text says why: an untrusted
                          ///< or misnamed server certificate, a server without TLS, a refused or
                          ///< missing client certificate).
};

[[nodiscard]] const char* to_string(client_errc code) noexcept;
[[nodiscard]] caf::error make_error(client_errc code, std::string text);

using generation_request_spec = protocol::api_generation_spec;
using client_event = protocol::api_job_event;
using client_status = protocol::api_job_status;
using client_cluster_description = protocol::api_cluster_description;
using client_rebalance_report = protocol::api_rebalance_report;
using job_state = protocol::api_job_state;
using training_request_spec = protocol::api_training_spec;
using training_event = protocol::api_training_event;

/// TLS towards a server whose config has api.tls (docs/job_api.md). The server's certificate
/// must chain to a CA of `ca_file` and name `server_name`. Cap'n Proto 0.9's TLS matches DNS
/// names and the common name only, not IP addresses: to dial an IP, give a server_name the
/// certificate holds.
struct client_tls_options {
  std::string ca_file;      ///< PEM: the CAs to trust; empty: the system's trust store.
  std::string certificate;  ///< PEM: this client's certificate, for a server that asks for one.
  std::string key;          ///< PEM: its private key (not encrypted); with `certificate`.
  std::string server_name;  ///< The name to check the certificate for; empty: the host dialled.
};

struct client_options {
  std::chrono::milliseconds connect_timeout{10'000};
  /// Limit for one call (login, submit, status, cancel, describe); 0: none. wait() has its own.
  std::chrono::milliseconds call_timeout{60'000};
  /// Limit for rebalance() (it loads weights); 0: none. A little above the server's default
  /// limit (api_server_options::rebalance_timeout), so that the server's answer wins.
  std::chrono::milliseconds rebalance_timeout{660'000};
  /// Limit for checkpoint() (the running step, then the write); 0: none. Above the server's
  /// api_server_options::checkpoint_timeout for the same reason.
  std::chrono::milliseconds checkpoint_timeout{660'000};
  /// Set: connect over TLS (the handshake counts against connect_timeout); unset: plain TCP,
  /// which a server with api.tls drops (connect then fails, naming TLS as the likely cause).
  std::optional<client_tls_options> tls;
};

/// "host:port", "[::1]:7101" -> (host, port); invalid_request when malformed.
[[nodiscard]] caf::expected<std::pair<std::string, uint16_t>> parse_address(std::string_view text);

class job_client {
 public:
  using event_handler = std::function<void(const client_event&)>;
  using training_event_handler = std::function<void(const training_event&)>;

  /// Connects (over TLS when options.tls is set) and logs in with the cluster secret.
  /// Errors: connection_failed, tls_failed, unauthenticated, unsupported_version, timed_out.
  [[nodiscard]] static caf::expected<std::unique_ptr<job_client>> connect(
      const std::string& host, uint16_t port, const std::string& secret,
      const client_options& options = {});

  ~job_client();
  job_client(const job_client&) = delete;
  job_client& operator=(const job_client&) = delete;

  /// Queues a generation job and answers its id. `on_event` (optional) sees the job's events in
  /// order, on this thread, while this client is inside one of its calls; it may run before
  /// submit returns. An exception thrown by it fails the job (the server cancels it).
  [[nodiscard]] caf::expected<uint64_t> submit(const generation_request_spec& spec,
                                               event_handler on_event = {});

  /// Delivers events until job `job_id` (submitted by this client) has finished, and answers
  /// its final state with every token it generated. timeout 0: no limit. A finished job is
  /// forgotten once waited for.
  [[nodiscard]] caf::expected<client_status> wait(uint64_t job_id,
                                                  std::chrono::milliseconds timeout = {});

  /// submit + wait: the generated tokens; job_failed / job_cancelled when it did not finish.
  [[nodiscard]] caf::expected<std::vector<int32_t>> generate(const generation_request_spec& spec);

  [[nodiscard]] caf::expected<client_status> status(uint64_t job_id);
  /// Whether the job was still active.
  [[nodiscard]] caf::expected<bool> cancel(uint64_t job_id);
  [[nodiscard]] caf::expected<client_cluster_description> describe();

  /// Rebalances the cluster's experts now (serving continues) and answers what the rebalance
  /// did; blocks for as long as it runs (options.rebalance_timeout). Errors: unavailable
  /// (rebalancing is not enabled on the cluster, no load counted yet, a phase failed: the text
  /// says which; the placement did not change), overloaded (a rebalance is already running),
  /// invalid_request (the layout cannot be rebalanced), server_error (e.g. an older server
  /// without the call, or a malformed report), timed_out (the rebalance may still be running).
  [[nodiscard]] caf::expected<client_rebalance_report> rebalance();

  // --- training (the server's cluster trains its serving weights; one job at a time) ---
  // Training jobs have ids of their own, apart from generation jobs'. Without training on the
  // server every call answers unavailable; a server older than these calls, server_error.

  /// Queues a training job and answers its id. `on_event` (optional) sees the job's events (one
  /// per step, then the final one) on this thread while this client is inside one of its
  /// calls; when it falls behind, the server skips to the newest. An exception thrown by it
  /// fails the job (the server cancels it). It must not call this client (Cap'n Proto allows
  /// no nested wait): cancel or checkpoint from another client. Errors: invalid_request (found
  /// here: the field is named; or by the server: a token id outside the vocabulary, a
  /// sequence_length beyond the model's context, a corpus shorter than one sequence),
  /// overloaded (the server's queue of training jobs is full), unavailable.
  [[nodiscard]] caf::expected<uint64_t> submit_training(const training_request_spec& spec,
                                                        training_event_handler on_event = {});

  /// Delivers events until training job `job_id` (submitted by this client) ended, and
  /// answers its final event (whatever its state). timeout 0: no limit. Forgotten once waited for.
  [[nodiscard]] caf::expected<training_event> wait_training(uint64_t job_id,
                                                            std::chrono::milliseconds timeout = {});

  /// submit_training + wait_training: the final event of a job that finished; job_failed /
  /// job_cancelled (the text says why, and at which step) when it did not.
  [[nodiscard]] caf::expected<training_event> train(const training_request_spec& spec,
                                                    training_event_handler on_event = {});

  /// The job's latest event (step 0, state queued before its first step).
  [[nodiscard]] caf::expected<training_event> training_status(uint64_t job_id);
  /// Whether the training job was still queued or running (it stops after its running step).
  [[nodiscard]] caf::expected<bool> cancel_training(uint64_t job_id);

  /// Writes a training checkpoint of the cluster's weights (model/training_checkpoint.hpp) to
  /// `directory` on the SERVER's file system (an absolute path), between two steps of a running
  /// job or now, and answers the directory written. Blocks up to options.checkpoint_timeout.
  /// Errors: invalid_request (not an absolute path), server_error (the write failed: the text
  /// says why), timed_out (it may still be written), unavailable.
  [[nodiscard]] caf::expected<std::string> checkpoint(const std::string& directory);

  /// Delivers the events that have already arrived, without blocking.
  void poll();

  /// The API version the server announced at login.
  [[nodiscard]] uint16_t server_version() const noexcept;

  struct impl;

 private:
  explicit job_client(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace moe::client

MOE_ERROR_ENUM(moe::client::client_errc, "client")
