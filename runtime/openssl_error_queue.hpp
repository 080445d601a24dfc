// Keeps one TLS connection's failure from closing the others (CAF 0.17 with caf::openssl).
//
// CAF 0.17.6's openssl sessions (libcaf_openssl, session.cpp) ask SSL_get_error why an
// SSL_read, SSL_write, SSL_accept or SSL_connect returned <= 0 but never empty OpenSSL's
// per-thread error queue, which SSL_get_error consults first. One connection's failure (a peer
// that died: OpenSSL 3 queues "unexpected eof while reading"; a peer with a certificate from
// another CA) stays queued, and the next call on any other connection of the same multiplexer
// thread that merely has no data yet (SSL_ERROR_WANT_READ) reads as SSL_ERROR_SSL: CAF closes
// that healthy link. With cluster.tls, a node that died, or a `moe cluster status` that exited,
// took the coordinator's links to the other nodes down with it.
//
// OpenSSL's contract (SSL_get_error(3)) is an empty queue before each of those calls.
// openssl_error_queue.cpp defines the four functions in the executable that links it: the
// dynamic linker resolves every library's calls (CAF's too) to them before libssl's, and they
// empty the queue, then call libssl's.
#pragma once

namespace moe::runtime {

/// Whether the process's SSL_read (and friends) are the queue-emptying ones: false when the
/// executable does not export them (then TLS links stay exposed to the failure above).
[[nodiscard]] bool openssl_error_queue_guarded() noexcept;

}  // namespace moe::runtime
