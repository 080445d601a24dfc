#include "cli/version.hpp"

#include <CLI/CLI.hpp>
#include <CLI/Version.hpp>
#include <caf/config.hpp>
#include <capnp/common.h>
#include <cblas.h>
#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/version.h>
#include <ucp/api/ucp.h>

#include <nlohmann/json.hpp>

#include "cli/command.hpp"

#ifdef MOE_HAVE_CUDA
#include "runtime/nccl_comm.hpp"
#endif

namespace moe::cli {

namespace {

std::string dotted(int major, int minor, int patch) {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace

version_report collect_versions() {
  version_report r;
  r.moe_version = MOE_VERSION;
  auto& d = r.dependencies;
  d.emplace_back("CAF", dotted(CAF_MAJOR_VERSION, CAF_MINOR_VERSION, CAF_PATCH_VERSION));
  d.emplace_back("UCX", ucp_get_version_string());
  d.emplace_back("Cap'n Proto",
                 dotted(CAPNP_VERSION_MAJOR, CAPNP_VERSION_MINOR, CAPNP_VERSION_MICRO));
  d.emplace_back("prometheus-cpp", MOE_PROMETHEUS_CPP_VERSION);
  // openblas_get_config() names the version and the kernel set chosen for this CPU.
  d.emplace_back("OpenBLAS", openblas_get_config());
  d.emplace_back("yaml-cpp", MOE_YAML_CPP_VERSION);
  d.emplace_back("nlohmann-json", dotted(NLOHMANN_JSON_VERSION_MAJOR, NLOHMANN_JSON_VERSION_MINOR,
                                         NLOHMANN_JSON_VERSION_PATCH));
  d.emplace_back("CLI11", CLI11_VERSION);
  d.emplace_back("spdlog", dotted(SPDLOG_VER_MAJOR, SPDLOG_VER_MINOR, SPDLOG_VER_PATCH));
  d.emplace_back("fmt", dotted(FMT_VERSION / 10000, FMT_VERSION / 100 % 100, FMT_VERSION % 100));
  d.emplace_back("cpp-httplib", CPPHTTPLIB_VERSION);
  r.devices = runtime::discover_devices();
#ifdef MOE_HAVE_CUDA
  d.emplace_back("CUDA runtime", runtime::cuda_version_string(r.devices.cuda_runtime_version));
  d.emplace_back("CUDA driver",
                 r.devices.cuda_driver_version > 0
                     ? runtime::cuda_version_string(r.devices.cuda_driver_version)
                     : std::string("none (no NVIDIA driver installed)"));
  d.emplace_back("NCCL", runtime::nccl_version_string());
#else
  d.emplace_back("CUDA runtime", "not built (MOE_CUDA=OFF or no nvcc at build time)");
  d.emplace_back("NCCL", "not built");
#endif
  return r;
}

std::string render_table(const version_report& r) {
  std::string out = fmt::format("moe {}\n\n{:<16} {}\n", r.moe_version, "dependency", "version");
  for (const auto& [name, version] : r.dependencies)
    out += fmt::format("{:<16} {}\n", name, version);
  out += "\n";
  if (r.devices.gpus.empty()) {
    out += fmt::format("GPUs: none found ({}); running on CPU\n", r.devices.no_gpu_reason);
  } else {
    out += fmt::format("GPUs: {}\n", r.devices.gpus.size());
    for (const auto& g : r.devices.gpus) {
      out += fmt::format("  [{}] {}  {:.1f} GiB  sm_{}{}  {} SMs\n", g.index, g.name,
                         static_cast<double>(g.memory_bytes) / (1ull << 30), g.compute_major,
                         g.compute_minor, g.num_multiprocessors);
    }
  }
  return out;
}

std::string render_json(const version_report& r) {
  nlohmann::json j;
  j["moe"] = r.moe_version;
  for (const auto& [name, version] : r.dependencies) j["dependencies"][name] = version;
  j["gpus"] = nlohmann::json::array();
  for (const auto& g : r.devices.gpus) {
    j["gpus"].push_back({{"index", g.index},
                         {"name", g.name},
                         {"memory_bytes", g.memory_bytes},
                         {"compute_capability", std::to_string(g.compute_major) + "." +
                                                    std::to_string(g.compute_minor)}});
  }
  if (r.devices.gpus.empty()) j["no_gpu_reason"] = r.devices.no_gpu_reason;
  return j.dump(2);
}

void add_version_command(CLI::App& app, command_context& ctx) {
  auto* cmd = app.add_subcommand("version", "Print the versions of every dependency and the GPUs");
  auto json = std::make_shared<bool>(false);
  cmd->add_flag("--json", *json, "Print JSON instead of a table");
  cmd->callback([json, &ctx] {
    const auto report = collect_versions();
    std::fputs((*json ? render_json(report) + "\n" : render_table(report)).c_str(), stdout);
    ctx.exit_code = 0;
  });
}

}  // namespace moe::cli
