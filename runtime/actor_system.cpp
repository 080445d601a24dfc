#include "runtime/actor_system.hpp"

#include <caf/actor_control_block.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>

#include <algorithm>
#include <thread>

#include <spdlog/spdlog.h>

#include "base/assert.hpp"
#include "runtime/openssl_error_queue.hpp"

#include "runtime/caf_types.hpp"

namespace moe::runtime {

actor_system_config::actor_system_config() : actor_system_config(options{}) {}

actor_system_config::actor_system_config(const options& opts) {
  add_message_types<caf::id_block::moe>();
  if (opts.load_middleman) {
    load<caf::io::middleman>();
    // Incoming messages are deserialized on the middleman's I/O thread, not by BASP workers on
    // the scheduler's pool: a pool held by long compute would otherwise hold every message behind
    // it (CAF delivers them in order), heartbeats and their answers included, and get live nodes
    // called down. Our control messages are small; tensors travel over the data plane.
    set("middleman.workers", size_t{0});
  }
  if (opts.tls) {
    MOE_ASSERT(opts.load_middleman);  // CAF's openssl module runs on the middleman's multiplexer
    load<caf::openssl::manager>();
    // The "openssl" group of CAF 0.17's options (openssl.certificate, .key, .passphrase,
    // .cafile, .capath) binds these members; its sessions read them for every connection. Any
    // of them non-empty turns on authentication: TLS with SSL_VERIFY_PEER and
    // SSL_VERIFY_FAIL_IF_NO_PEER_CERT on both sides (otherwise CAF falls back to anonymous
    // ECDH, which encrypts but authenticates nobody).
    openssl_certificate = opts.tls->certificate.string();
    openssl_key = opts.tls->key.string();
    openssl_passphrase = opts.tls->passphrase;
    openssl_cafile = opts.tls->ca_file.string();
    openssl_capath.clear();
    // Else one failed TLS connection closes the process's healthy ones (openssl_error_queue.hpp).
    if (!openssl_error_queue_guarded())
      spdlog::warn("TLS: this executable does not export the OpenSSL error-queue guard "
                   "(runtime/openssl_error_queue.hpp): a failed TLS link may close healthy ones");
  }
  if (opts.num_worker_threads > 0) set("scheduler.max-threads", opts.num_worker_threads);
  set("scheduler.policy", caf::atom_from_string(opts.scheduler_policy));
  // No console logger and no caf-application.ini lookup surprises from CAF itself: our CLI
  // owns the command line, so CAF must not try to parse it.
  set("logger.console", caf::atom("none"));
}

bool await_released(const caf::actor_addr& who, std::chrono::milliseconds timeout) {
  // The weak reference in `who` keeps the control block readable. Its strong count is read, not
  // upgraded: upgrading would itself hold the actor for a moment.
  const caf::actor_control_block* ctrl = who.get();
  if (ctrl == nullptr) return true;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // Polled: CAF has no hook for an actor's destruction. The broker reads its mailbox within
  // milliseconds, so the waits start short.
  auto pause = std::chrono::microseconds(100);
  while (ctrl->strong_refs.load(std::memory_order_acquire) != 0) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace moe::runtime
