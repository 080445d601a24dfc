// TLS for the job API (protocol/api.capnp over TCP): the kj::TlsContext of the server
// (actors/api_server.hpp: its key pair, and the CAs of client certificates when it asks for
// them) and of a client (client/job_client.hpp: the CAs it trusts, its own key pair when the
// server asks for one), and why a handshake failed, in words a user can act on.
//
// kj's TLS (Cap'n Proto 0.9, over OpenSSL) is used as it is: TLS 1.2 at least, kj's cipher list
// (Mozilla's "intermediate"), certificate checks that cannot be turned off. A client checks the
// server's certificate against `expectedServerHostname` with OpenSSL's host name check, which in
// this version matches DNS names (and the common name), not IP addresses: a client that dials
// an IP address must name a server_name the certificate holds (client_options::tls).
//
// Errors are values (api_errc::invalid_request, the file named); no exception leaves these
// functions, and no passphrase appears in any text.
// Thread safety: plain functions. A context may be shared by the connections of one thread.
#pragma once

#include <kj/compat/tls.h>

#include <filesystem>
#include <string>
#include <string_view>

#include "base/error.hpp"

namespace moe::protocol {

struct api_tls_server_files {
  std::filesystem::path certificate;     ///< PEM: the server's certificate (a chain may follow).
  std::filesystem::path key;             ///< PEM: its private key.
  std::string passphrase;                ///< Of an encrypted key; empty: not encrypted.
  std::filesystem::path client_ca_file;  ///< PEM: CAs of client certificates; empty: none asked.
};

/// The server's context: presents `certificate`; with client_ca_file, refuses a client whose
/// certificate does not chain to one of those CAs (the system's CAs are never trusted for that).
[[nodiscard]] caf::expected<kj::Own<kj::TlsContext>> make_api_server_tls(
    const api_tls_server_files& files);

struct api_tls_client_files {
  std::filesystem::path
      ca_file;  ///< PEM: CAs the server's certificate must chain to; empty: the system's.
  std::filesystem::path
      certificate;            ///< PEM: a client certificate, for servers that ask; with `key`.
  std::filesystem::path key;  ///< PEM: its private key (not encrypted).
};

/// A client's context. Giving only one of certificate and key is an error.
[[nodiscard]] caf::expected<kj::Own<kj::TlsContext>> make_api_client_tls(
    const api_tls_client_files& files);

/// `what` (a kj exception's description from a handshake, or from the first call on a TLS
/// connection the server dropped) with its likely cause in front, e.g. "the server's
/// certificate does not name '10.0.0.5' (...): TLS peer's certificate is not trusted; reason =
/// hostname mismatch". `server_name`: the name the client checked.
[[nodiscard]] std::string explain_tls_failure(std::string_view what, std::string_view server_name);

}  // namespace moe::protocol
