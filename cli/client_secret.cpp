#include "cli/client_secret.hpp"

#include <cstdlib>
#include <fstream>

namespace moe::cli {

caf::expected<std::string> client_secret(const std::string& secret, const std::string& secret_file) {
  if (!secret.empty()) return secret;
  if (!secret_file.empty()) {
    std::ifstream in(secret_file);
    std::string line;
    if (!in || !std::getline(in, line) || line.empty()) {
      return client::make_error(client::client_errc::invalid_request,
                                "--secret-file " + secret_file + ": cannot read a secret from it");
    }
    return line;
  }
  if (const char* env = std::getenv("MOE_CLUSTER_SECRET"); env && *env) return std::string(env);
  return client::make_error(client::client_errc::invalid_request,
                            "no cluster secret: give --secret-file or --secret, or set MOE_CLUSTER_SECRET");
}

void add_api_tls_flags(CLI::App& cmd, api_tls_flags& flags) {
  cmd.add_flag("--tls", flags.tls, "Connect over TLS, trusting the system's CAs (implied by the flags below)");
  cmd.add_option("--ca-file", flags.ca_file, "Connect over TLS; the server's certificate must chain to a CA in this PEM file")
      ->check(CLI::ExistingFile);
  cmd.add_option("--server-name", flags.server_name,
                 "With TLS: the name the server's certificate must hold (default: the host of --address; "
                 "give it when dialling an IP address)");
  cmd.add_option("--cert", flags.certificate, "With TLS: this client's certificate (PEM), for a server that asks for one")
      ->check(CLI::ExistingFile);
  cmd.add_option("--key", flags.key, "With TLS: the private key of --cert (PEM, not encrypted)")->check(CLI::ExistingFile);
}

caf::expected<client::client_options> api_client_options(const api_tls_flags& flags) {
  client::client_options o;
  const bool any = flags.tls || !flags.ca_file.empty() || !flags.server_name.empty() ||
                   !flags.certificate.empty() || !flags.key.empty();
  if (!any) return o;
  if (flags.certificate.empty() != flags.key.empty()) {
    return client::make_error(client::client_errc::invalid_request,
                              "--cert and --key go together: give both (a client certificate and its key) or neither");
  }
  o.tls = client::client_tls_options{flags.ca_file, flags.certificate, flags.key, flags.server_name};
  return o;
}

}  // namespace moe::cli
