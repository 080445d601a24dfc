// Where a client command (`moe submit`, `moe rebalance`) gets the cluster secret: --secret,
// else the first line of --secret-file, else $MOE_CLUSTER_SECRET (prefer the file or the
// environment: a --secret shows in ps).
#pragma once

#include <string>

#include "base/error.hpp"

namespace moe::cli {

/// client_errc::invalid_request when none is given or the file cannot be read.
[[nodiscard]] caf::expected<std::string> client_secret(const std::string& secret, const std::string& secret_file);

}  // namespace moe::cli
