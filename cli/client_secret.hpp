// What a client command of the job API (`moe submit`, `moe rebalance`) needs to connect:
// - the cluster secret: --secret, else the first line of --secret-file, else
//   $MOE_CLUSTER_SECRET (prefer the file or the environment: a --secret shows in ps);
// - TLS towards a server with api.tls: --ca-file (the CA that signed the server's
//   certificate), --server-name (the name to check it for; default: the host of --address),
//   --cert/--key (a client certificate, for a server with api.tls.client_ca_file), --tls (TLS
//   trusting the system's CAs). Any of them turns TLS on.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "base/error.hpp"
#include "client/job_client.hpp"

namespace moe::cli {

/// client_errc::invalid_request when none is given or the file cannot be read.
[[nodiscard]] caf::expected<std::string> client_secret(const std::string& secret, const std::string& secret_file);

struct api_tls_flags {
  bool tls = false;
  std::string ca_file;
  std::string server_name;
  std::string certificate;
  std::string key;
};

/// Adds --tls, --ca-file, --server-name, --cert and --key to `cmd`, stored in `flags`.
void add_api_tls_flags(CLI::App& cmd, api_tls_flags& flags);

/// The client options of the flags: TLS when any TLS flag is given. Errors (invalid_request):
/// --cert without --key or the other way round.
[[nodiscard]] caf::expected<client::client_options> api_client_options(const api_tls_flags& flags);

}  // namespace moe::cli
