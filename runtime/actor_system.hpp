// The CAF actor-system configuration every moe process starts from: our message types, the
// I/O middleman (remote actors between processes), optionally CAF's OpenSSL module (the control
// plane over TLS, runtime/control_plane.hpp), and quiet defaults for logging.
// Thread safety: build one config per actor_system, on the thread that creates the system.
#pragma once

#include <caf/actor_addr.hpp>
#include <caf/actor_system_config.hpp>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>

#include "runtime/cluster_config.hpp"

namespace moe::runtime {

class actor_system_config : public caf::actor_system_config {
 public:
  struct options {
    size_t num_worker_threads = 0;  ///< 0: CAF's default (one per core).
    bool load_middleman = true;     ///< Off for tests of local actors only.
    /// CAF's scheduler: "sharing" (idle workers sleep on a condition variable) or "stealing"
    /// (CAF's default; idle workers poll). Our actors spend their time in BLAS calls whose
    /// threads need the cores that polling workers would burn: measured with
    /// bench/actors_bench.cpp on 2 cores, stealing cost 27-37% of decode throughput against
    /// the reference engine where sharing cost 7-9%.
    std::string scheduler_policy = "sharing";
    /// Set: load caf::openssl::manager with these files, so that control_plane_handle and
    /// publish_control (runtime/control_plane.hpp) connect and listen over TLS, each side
    /// presenting its certificate and refusing a peer whose certificate does not chain to
    /// `ca_file`. Needs load_middleman. Check the files first (check_tls_files; load_cluster_config
    /// does): CAF reads them only when a connection is made, and throws on its I/O thread.
    std::optional<tls_config> tls;
  };

  actor_system_config();
  explicit actor_system_config(const options& opts);
};

/// Blocks until nothing holds `who` any more (no strong reference is left, so the actor has been
/// destroyed), at most `timeout`; true when released, false at the deadline. A null address is
/// released.
///
/// Why: CAF 0.17.6 ends a detached actor's thread only once its actor object is destroyed, and
/// caf::actor_system's destructor, after it has stopped the middleman, waits for every such
/// thread. When another process holds a proxy of the actor, the BASP broker monitors it, and the
/// down message the actor sends it on exit carries a strong reference to the actor (as its
/// sender). An actor that ended a moment before the system's destructor ran could leave that
/// message unread when the middleman stopped: the destructor then waited forever, and a node
/// that had logged "stopped" never exited. So whoever stops a detached actor that other
/// processes know waits for it here, while the middleman still runs, before the system goes;
/// its own handles to the actor must be dropped first.
[[nodiscard]] bool await_released(const caf::actor_addr& who, std::chrono::milliseconds timeout);

}  // namespace moe::runtime
