// The versions of every linked dependency and the GPUs found, for `moe version`.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "runtime/devices.hpp"

namespace moe::cli {

struct version_report {
  std::string moe_version;
  std::vector<std::pair<std::string, std::string>> dependencies;  ///< (name, version)
  runtime::device_inventory devices;
};

[[nodiscard]] version_report collect_versions();
[[nodiscard]] std::string render_table(const version_report& r);
[[nodiscard]] std::string render_json(const version_report& r);

}  // namespace moe::cli
