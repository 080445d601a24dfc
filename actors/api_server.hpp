// The job-submission API server (protocol/api.capnp): Cap'n Proto RPC in front of the
// controller actor (jobs), the rebalancer actor (rebalance(), when one runs) and the training
// jobs actor (train, trainingStatus, cancelTraining, checkpoint; when the cluster trains).
//
// The server runs its own thread with a kj event loop; RPC calls never block that loop on CAF.
// Each call becomes a request to the controller (the rebalancer, the training jobs actor) from
// a short-lived CAF actor, whose answer is handed back to the kj thread through a cross-thread
// promise. A
// submitted job with a token sink gets a subscriber actor that receives the controller's
// (job_event_atom, job_event) messages and hands them, in order, to the kj thread, which
// forwards them to the client's TokenSink one call at a time (events queued meanwhile are
// merged). A training job with a TrainingSink is streamed the same way from the training jobs
// actor's (train_event_atom, training_event) messages (queued events: the newest is sent).
//
// Authentication: a connection reaches only Gateway.login until it presents the cluster
// secret (compared in constant time; the secret is never logged or echoed). If a client's
// connection drops, every job that was streaming to it is cancelled.
//
// TLS (options.tls, the config's api.tls): every accepted connection must complete a TLS
// handshake (kj's TlsContext over OpenSSL; TLS 1.2 or 1.3) before it reaches the Gateway, and,
// with a client CA, present a client certificate signed by it. The secret is checked all the
// same. A connection that does not complete the handshake within tls_handshake_timeout (a
// plain Cap'n Proto client, a client that does not trust this certificate) is closed and
// logged with its peer address; handshakes run side by side, so a stalled one delays no other.
//
// Lifecycle (a gate, as every service): start() binds and serves; stop() refuses new calls,
// cancels the jobs still streaming, waits up to `stop_grace` for in-flight calls and the jobs'
// final events to reach their clients, then closes every connection and joins the thread.
// The actor system must outlive the server.
//
// Thread safety: start, port, set_cluster_description and stop may be called from any thread;
// stop is idempotent and also run by the destructor.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "actors/controller.hpp"
#include "actors/rebalance_messages.hpp"
#include "actors/training_jobs.hpp"
#include "base/error.hpp"
#include "protocol/api_types.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::actors {

struct api_server_options {
  std::string host = "127.0.0.1";  ///< Address to bind ("0.0.0.0" / "*" for every interface).
  uint16_t port = 0;               ///< 0: an ephemeral port (see api_server::port()).
  std::string secret;              ///< The cluster secret (config `cluster.secret`); non-empty.
  protocol::api_cluster_description cluster;  ///< What describe() answers.
  protocol::api_limits limits;
  /// How long a controller request may take before the call fails with "internal: ...".
  std::chrono::milliseconds request_timeout{30'000};
  /// Answers rebalance(); null: the call fails with "unavailable: rebalancing is not enabled".
  /// Not owned: the server only sends it requests.
  rebalancer_actor rebalancer;
  /// Without a rebalancer: why (the serving cluster's reason), appended to the error.
  std::string rebalance_unavailable;
  /// How long a rebalance may take before the call fails with "internal: ..." (a rebalance
  /// loads weights, so far longer than request_timeout; it keeps running on the cluster).
  std::chrono::milliseconds rebalance_timeout{600'000};
  /// Runs train(), trainingStatus(), cancelTraining() and checkpoint(); null: they fail with
  /// "unavailable: training is not enabled on this server (...)". Not owned.
  training_jobs_actor training_jobs;
  /// Without training_jobs: why, in those parentheses (empty: "no training jobs actor runs").
  std::string training_unavailable;
  /// The model's vocabulary, for the tokenizer of text corpora (model/tokenizer.hpp). One that
  /// no tokenizer fits (0: not given) turns training off as a missing actor does.
  int64_t vocab_size = 0;
  /// How long checkpoint() may take before it fails with "internal: ..." (the running step,
  /// then the write; the checkpoint may still be written after).
  std::chrono::milliseconds checkpoint_timeout{600'000};
  /// How long stop() waits for in-flight calls and the final events of cancelled jobs.
  std::chrono::milliseconds stop_grace{2'000};
  /// A wrong secret is answered only after this delay, to slow down guessing.
  std::chrono::milliseconds failed_login_delay{200};
  /// Serve TLS with these files (read once, by start()); unset: plain TCP, where the secret
  /// crosses the network in the clear.
  std::optional<runtime::api_tls_config> tls;
  /// How long a client may take to complete the TLS handshake before it is disconnected.
  std::chrono::milliseconds tls_handshake_timeout{10'000};
};

class api_server {
 public:
  /// Binds `options.host:options.port` and starts serving. Errors: api_errc::invalid_request
  /// for an empty secret or TLS files that cannot be read or used (the text names the file,
  /// never the passphrase), api_errc::unavailable when the address cannot be bound.
  [[nodiscard]] static caf::expected<std::unique_ptr<api_server>> start(
      caf::actor_system& sys, controller_actor controller, api_server_options options);

  ~api_server();
  api_server(const api_server&) = delete;
  api_server& operator=(const api_server&) = delete;

  /// The bound port (the ephemeral one when options.port was 0).
  [[nodiscard]] uint16_t port() const noexcept;

  /// Whether connections must speak TLS (options.tls was given).
  [[nodiscard]] bool uses_tls() const noexcept;

  /// Replaces what describe() answers from now on (e.g. after the scheduler re-placed actors).
  void set_cluster_description(protocol::api_cluster_description cluster);

  /// Refuses new calls, drains (see above), closes every connection and joins the thread.
  void stop();

  struct impl;

 private:
  explicit api_server(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace moe::actors
