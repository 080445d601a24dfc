// Throwaway certificates for TLS tests, made with libcrypto at test time (no openssl binary, no
// committed keys): a self-signed CA and node certificates it signs, written as PEM files.
//
//   tls_test_certs certs;                       // a fresh directory under the temp dir
//   auto ca = certs.make_ca("cluster-ca");      // cluster-ca.pem
//   auto n0 = certs.make_node(ca, "n0");        // n0.pem (certificate), n0.key (private key)
//   tls_node_options o;
//   o.passphrase = "pw";
//   auto n1 = certs.make_node(ca, "n1", o);  // n1.key
//   encrypted
//
// EC P-256 keys, SHA-256 signatures, node certificates for 127.0.0.1 and localhost usable as
// TLS client and server. Failures are test bugs: they throw std::runtime_error.
// Thread safety: one object per test.
#pragma once

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

namespace moe::test {

struct tls_node_options {
  std::string passphrase;  ///< Non-empty: the key file is encrypted (AES-256-CBC, PKCS#8).
  long valid_days = 3650;  ///< Negative: expired that many days ago.
  std::string extended_key_usage = "serverAuth,clientAuth";  ///< Every node is both.
};

class tls_test_certs {
 public:
  /// A certificate with its key, in memory and on disk.
  struct identity {
    std::shared_ptr<EVP_PKEY> key;
    std::shared_ptr<X509> cert;
    std::filesystem::path cert_file;
    std::filesystem::path key_file;  ///< Empty for a CA (its key stays in memory).
  };

  using node_options = tls_node_options;

  tls_test_certs() {
    static std::atomic<int> counter{0};
    dir_ = std::filesystem::temp_directory_path() /
           ("moe-tls-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  ~tls_test_certs() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  tls_test_certs(const tls_test_certs&) = delete;
  tls_test_certs& operator=(const tls_test_certs&) = delete;

  [[nodiscard]] const std::filesystem::path& dir() const noexcept { return dir_; }

  /// A self-signed CA certificate, written to dir()/<name>.pem.
  identity make_ca(const std::string& name) {
    identity ca;
    ca.key = new_key();
    ca.cert = new_cert(name, *ca.key, nullptr, tls_node_options{}, true);
    ca.cert_file = dir_ / (name + ".pem");
    write_cert(ca.cert_file, *ca.cert);
    return ca;
  }

  /// A node certificate signed by `ca`: dir()/<name>.pem and dir()/<name>.key.
  identity make_node(const identity& ca, const std::string& name, const node_options& o = {}) {
    identity id;
    id.key = new_key();
    id.cert = new_cert(name, *id.key, &ca, o, false);
    id.cert_file = dir_ / (name + ".pem");
    id.key_file = dir_ / (name + ".key");
    write_cert(id.cert_file, *id.cert);
    write_key(id.key_file, *id.key, o.passphrase);
    return id;
  }

  /// Writes `text` to dir()/<name> and returns the path.
  std::filesystem::path write_file(const std::string& name, const std::string& text) {
    auto path = dir_ / name;
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f{std::fopen(path.c_str(), "wb"), &std::fclose};
    if (!f || std::fwrite(text.data(), 1, text.size(), f.get()) != text.size())
      fail("cannot write " + path.string());
    return path;
  }

 private:
  [[noreturn]] static void fail(const std::string& what) {
    char buf[256] = {};
    ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
    throw std::runtime_error("tls_test_certs: " + what + ": " + buf);
  }

  static std::shared_ptr<EVP_PKEY> new_key() {
    EVP_PKEY* k = EVP_EC_gen("P-256");
    if (k == nullptr) fail("cannot generate an EC key");
    return {k, &EVP_PKEY_free};
  }

  static void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    if (ext == nullptr) fail(std::string("cannot make extension ") + value);
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
  }

  std::shared_ptr<X509> new_cert(const std::string& cn, EVP_PKEY& key, const identity* issuer,
                                 const tls_node_options& o, bool is_ca) {
    const long valid_days = o.valid_days;
    std::shared_ptr<X509> cert{X509_new(), &X509_free};
    if (!cert) fail("X509_new");
    X509* x = cert.get();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), ++serial_);
    if (valid_days >= 0) {
      X509_gmtime_adj(X509_getm_notBefore(x), -3600);
      X509_gmtime_adj(X509_getm_notAfter(x), valid_days * 86400L);
    } else {  // expired: valid for one day, ending -valid_days days ago
      X509_gmtime_adj(X509_getm_notBefore(x), (valid_days - 1) * 86400L);
      X509_gmtime_adj(X509_getm_notAfter(x), valid_days * 86400L);
    }
    X509_set_pubkey(x, &key);
    X509_NAME* name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>("moe-runtime tests"), -1, -1,
                               0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509* issuer_cert = issuer ? issuer->cert.get() : x;
    X509_set_issuer_name(x, X509_get_subject_name(issuer_cert));
    if (is_ca) {
      add_ext(x, issuer_cert, NID_basic_constraints, "critical,CA:TRUE");
      add_ext(x, issuer_cert, NID_key_usage, "critical,keyCertSign,cRLSign");
      add_ext(x, issuer_cert, NID_subject_key_identifier, "hash");
    } else {
      add_ext(x, issuer_cert, NID_basic_constraints, "critical,CA:FALSE");
      add_ext(x, issuer_cert, NID_key_usage, "critical,digitalSignature");
      add_ext(x, issuer_cert, NID_ext_key_usage, o.extended_key_usage.c_str());
      add_ext(x, issuer_cert, NID_subject_alt_name, "IP:127.0.0.1,DNS:localhost");
    }
    if (X509_sign(x, issuer ? issuer->key.get() : &key, EVP_sha256()) == 0)
      fail("cannot sign " + cn);
    return cert;
  }

  static void write_cert(const std::filesystem::path& path, X509& cert) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f{std::fopen(path.c_str(), "wb"), &std::fclose};
    if (!f || PEM_write_X509(f.get(), &cert) != 1) fail("cannot write " + path.string());
  }

  static void write_key(const std::filesystem::path& path, EVP_PKEY& key,
                        const std::string& passphrase) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f{std::fopen(path.c_str(), "wb"), &std::fclose};
    const EVP_CIPHER* cipher = passphrase.empty() ? nullptr : EVP_aes_256_cbc();
    auto* pass = passphrase.empty()
                     ? nullptr
                     : reinterpret_cast<unsigned char*>(const_cast<char*>(passphrase.data()));
    if (!f || PEM_write_PrivateKey(f.get(), &key, cipher, pass, static_cast<int>(passphrase.size()),
                                   nullptr, nullptr) != 1) {
      fail("cannot write " + path.string());
    }
  }

  std::filesystem::path dir_;
  long serial_ = 0;
};

}  // namespace moe::test
