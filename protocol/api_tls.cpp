#include "protocol/api_tls.hpp"

#include <kj/vector.h>

#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "protocol/api_types.hpp"

namespace moe::protocol {

namespace {

caf::error tls_error(const std::string& what) {
  return make_error(api_errc::invalid_request, "TLS: " + what);
}

// The whole file, or nothing.
std::optional<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return text.str();
}

// Each PEM certificate of `pem` on its own: kj trusts only the first certificate of each
// TlsCertificate it is given, and a CA file may hold several CAs.
std::vector<std::string> split_certificates(const std::string& pem) {
  static constexpr std::string_view begin = "-----BEGIN CERTIFICATE-----";
  static constexpr std::string_view end = "-----END CERTIFICATE-----";
  std::vector<std::string> out;
  for (size_t at = pem.find(begin); at != std::string::npos; at = pem.find(begin, at)) {
    const size_t stop = pem.find(end, at);
    if (stop == std::string::npos) break;
    out.push_back(pem.substr(at, stop + end.size() - at) + "\n");
    at = stop + end.size();
  }
  return out;
}

kj::StringPtr view(const std::string& s) {
  return kj::StringPtr(s.c_str(), s.size());
}

// What both sides share: TLS 1.2 at least, only the CAs of `ca_file` trusted (empty: the
// system's), a key pair when `certificate` is given. Errors name the file that failed.
caf::expected<kj::Own<kj::TlsContext>> make_context(const std::filesystem::path& certificate,
                                                    const std::filesystem::path& key,
                                                    const std::string& passphrase,
                                                    const std::filesystem::path& ca_file,
                                                    bool verify_clients) {
  std::optional<std::string> cert_pem, key_pem, ca_pem;
  const std::pair<const std::filesystem::path*, std::optional<std::string>*> files[] = {
      {&certificate, &cert_pem}, {&key, &key_pem}, {&ca_file, &ca_pem}};
  for (const auto& [path, text] : files) {
    if (path->empty()) continue;
    *text = read_file(*path);
    if (!*text) return tls_error("cannot read " + path->string());
  }
  // kj throws on a bad file (its OpenSSL errors name no file): say which one it was.
  std::string blame = certificate.string();
  bool decrypting = false;
  try {
    kj::TlsContext::Options o;
    o.minVersion = kj::TlsVersion::TLS_1_2;
    std::optional<kj::TlsKeypair> keypair;
    if (cert_pem) {
      kj::TlsCertificate chain(view(*cert_pem));
      blame = key.string();
      decrypting = !passphrase.empty();
      kj::Maybe<kj::StringPtr> pass;
      if (decrypting) pass = view(passphrase);
      keypair.emplace(kj::TlsKeypair{kj::TlsPrivateKey(view(*key_pem), pass), kj::mv(chain)});
      o.defaultKeypair = *keypair;
      decrypting = false;
    }
    kj::Vector<kj::TlsCertificate> trusted;
    if (ca_pem) {
      blame = ca_file.string();
      for (const auto& pem : split_certificates(*ca_pem))
        trusted.add(kj::TlsCertificate(view(pem)));
      if (trusted.empty()) {
        return tls_error(ca_file.string() +
                         " holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
      }
      o.useSystemTrustStore = false;
      o.trustedCertificates = trusted.asPtr();
    }
    o.verifyClients = verify_clients;
    // Here OpenSSL checks that the key belongs to the certificate.
    if (cert_pem) blame = key.string() + " with " + certificate.string();
    // The context takes its own references to the key pair and the CAs.
    return kj::heap<kj::TlsContext>(kj::mv(o));
  } catch (const kj::Exception& e) {
    std::string what = e.getDescription().cStr();
    if (decrypting) what = "cannot decrypt it (wrong passphrase?): " + what;
    return tls_error(blame + ": " + what);
  }
}

}  // namespace

caf::expected<kj::Own<kj::TlsContext>> make_api_server_tls(const api_tls_server_files& files) {
  if (files.certificate.empty() || files.key.empty())
    return tls_error("a server needs a certificate and its key");
  return make_context(files.certificate, files.key, files.passphrase, files.client_ca_file,
                      !files.client_ca_file.empty());
}

caf::expected<kj::Own<kj::TlsContext>> make_api_client_tls(const api_tls_client_files& files) {
  if (files.certificate.empty() != files.key.empty()) {
    return tls_error(
        "a client certificate needs its key, and a key its certificate: give both or neither");
  }
  return make_context(files.certificate, files.key, {}, files.ca_file, false);
}

std::string explain_tls_failure(std::string_view what, std::string_view server_name) {
  auto has = [&](std::string_view s) { return what.find(s) != std::string_view::npos; };
  std::string why;
  if (has("hostname mismatch")) {
    why = "the server's certificate does not name '" + std::string(server_name) +
          "' (dial a name it holds, or give one as the name to check, e.g. --server-name; this "
          "client matches "
          "DNS names and the common name, not IP addresses)";
  } else if (has("not trusted") || has("certificate verify failed")) {
    why = "the server's certificate is not signed by a CA this client trusts (e.g. --ca-file)";
  } else if (has("wrong version number") || has("packet length too long") || has("record layer") ||
             has("http request") || has("peer provided no certificate")) {
    why = "the server does not speak TLS on this port (no api.tls in its config?)";
  } else if (has("certificate required") || has("did not return a certificate")) {
    why =
        "the server asks for a client certificate (api.tls.client_ca_file): give one and its key "
        "(e.g. --cert, --key)";
  } else if (has("unknown ca") || has("bad certificate") || has("certificate unknown") ||
             has("decrypt error")) {
    why = "the server refused this client's certificate (not signed by its client_ca_file?)";
  }
  return why.empty() ? std::string(what) : why + ": " + std::string(what);
}

}  // namespace moe::protocol
