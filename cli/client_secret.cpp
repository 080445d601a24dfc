#include "cli/client_secret.hpp"

#include <cstdlib>
#include <fstream>

#include "client/job_client.hpp"

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

}  // namespace moe::cli
