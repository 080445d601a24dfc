// The OpenSSL error-queue guard (runtime/openssl_error_queue.hpp): an error another connection
// left in this thread's queue must not make a connection that is merely waiting for data look
// failed.
#include "runtime/openssl_error_queue.hpp"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <memory>

#include "tests/unit/runtime/tls_test_certs.hpp"

namespace {

struct ctx_free {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct ssl_free {
  void operator()(SSL* s) const { SSL_free(s); }
};

// A TLS 1.2 link in memory (as CAF 0.17 makes them: TLSv1_2_method), handshake done, no data
// in flight: a read on either end finds nothing and must say "retry". Established, as CAF's
// links are: a handshake in progress empties the queue by itself and would prove nothing.
struct quiet_link {
  moe::test::tls_test_certs certs;
  std::unique_ptr<SSL_CTX, ctx_free> server_ctx{SSL_CTX_new(TLS_server_method())};
  std::unique_ptr<SSL_CTX, ctx_free> client_ctx{SSL_CTX_new(TLS_client_method())};
  std::unique_ptr<SSL, ssl_free> server, client;

  quiet_link() {
    const auto ca = certs.make_ca("ca");
    const auto node = certs.make_node(ca, "node");
    for (auto* c : {server_ctx.get(), client_ctx.get()}) {
      SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
      SSL_CTX_set_max_proto_version(c, TLS1_2_VERSION);
    }
    EXPECT_EQ(SSL_CTX_use_certificate(server_ctx.get(), node.cert.get()), 1);
    EXPECT_EQ(SSL_CTX_use_PrivateKey(server_ctx.get(), node.key.get()), 1);
    server.reset(SSL_new(server_ctx.get()));
    client.reset(SSL_new(client_ctx.get()));
    BIO *a = nullptr, *b = nullptr;
    EXPECT_EQ(BIO_new_bio_pair(&a, 0, &b, 0), 1);
    SSL_set_bio(server.get(), a, a);  // each SSL owns its end
    SSL_set_bio(client.get(), b, b);
    SSL_set_accept_state(server.get());
    SSL_set_connect_state(client.get());
    bool done = false;
    for (int round = 0; round < 10 && !done; ++round) {
      const int c = SSL_do_handshake(client.get());
      const int s = SSL_do_handshake(server.get());
      done = c == 1 && s == 1;
    }
    EXPECT_TRUE(done) << "the in-memory handshake did not finish";
    ERR_clear_error();
  }
};

// What a dead peer leaves behind on another connection of the same thread (OpenSSL 3).
void leave_an_error_behind() { ERR_raise(ERR_LIB_SSL, SSL_R_UNEXPECTED_EOF_WHILE_READING); }

TEST(openssl_error_queue, the_executable_routes_libssl_calls_through_the_guard) {
  EXPECT_TRUE(moe::runtime::openssl_error_queue_guarded());
}

TEST(openssl_error_queue, a_stale_error_does_not_fail_a_read_that_waits_for_data) {
  quiet_link link;
  char buf[16];
  leave_an_error_behind();
  const int ret = SSL_read(link.client.get(), buf, sizeof buf);
  ASSERT_LE(ret, 0);
  EXPECT_EQ(SSL_get_error(link.client.get(), ret), SSL_ERROR_WANT_READ);
  ERR_clear_error();
}

TEST(openssl_error_queue, the_same_read_through_libssl_alone_looks_failed) {
  // Why the guard exists: libssl's own SSL_read leaves the stale error where SSL_get_error
  // reads it first, and CAF 0.17 closes the connection on SSL_ERROR_SSL.
  using read_fn = int(SSL*, void*, int);
  auto* libssl_read = reinterpret_cast<read_fn*>(::dlsym(RTLD_NEXT, "SSL_read"));
  ASSERT_NE(libssl_read, nullptr);
  ASSERT_NE(reinterpret_cast<void*>(libssl_read), ::dlsym(RTLD_DEFAULT, "SSL_read"));
  quiet_link link;
  char buf[16];
  leave_an_error_behind();
  const int ret = libssl_read(link.client.get(), buf, sizeof buf);
  ASSERT_LE(ret, 0);
  EXPECT_EQ(SSL_get_error(link.client.get(), ret), SSL_ERROR_SSL);
  ERR_clear_error();
}

TEST(openssl_error_queue, data_still_flows_through_the_guard) {
  quiet_link link;
  leave_an_error_behind();
  const char out[] = "hello";
  ASSERT_EQ(SSL_write(link.server.get(), out, sizeof out), static_cast<int>(sizeof out));
  leave_an_error_behind();
  char in[sizeof out] = {};
  ASSERT_EQ(SSL_read(link.client.get(), in, sizeof in), static_cast<int>(sizeof out));
  EXPECT_STREQ(in, out);
  ERR_clear_error();
}

}  // namespace
