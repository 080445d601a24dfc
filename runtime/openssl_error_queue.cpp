#include "runtime/openssl_error_queue.hpp"

#include <dlfcn.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <cstdio>
#include <cstdlib>

namespace {

// libssl's definition of `name`, the next one after ours in the lookup order.
template <class Fn>
Fn* libssl(const char* name) {
  auto* fn = reinterpret_cast<Fn*>(::dlsym(RTLD_NEXT, name));
  if (fn == nullptr) {
    // Unreachable when libssl is loaded (caf::openssl needs it): nothing sensible to call.
    std::fprintf(stderr, "moe: libssl's %s not found: %s\n", name, ::dlerror());
    std::abort();
  }
  return fn;
}

}  // namespace

extern "C" {

int SSL_read(SSL* ssl, void* buf, int num) {
  static auto* next = libssl<int(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  return next(ssl, buf, num);
}

int SSL_write(SSL* ssl, const void* buf, int num) {
  static auto* next = libssl<int(SSL*, const void*, int)>("SSL_write");
  ERR_clear_error();
  return next(ssl, buf, num);
}

int SSL_accept(SSL* ssl) {
  static auto* next = libssl<int(SSL*)>("SSL_accept");
  ERR_clear_error();
  return next(ssl);
}

int SSL_connect(SSL* ssl) {
  static auto* next = libssl<int(SSL*)>("SSL_connect");
  ERR_clear_error();
  return next(ssl);
}

}  // extern "C"

namespace moe::runtime {

bool openssl_error_queue_guarded() noexcept {
  return ::dlsym(RTLD_DEFAULT, "SSL_read") == reinterpret_cast<void*>(&SSL_read);
}

}  // namespace moe::runtime
