// `moe rebalance`: rebalance a running cluster's experts now, through its job API
// (JobService.rebalance, moe::client), and print what the rebalance did.
//   moe rebalance --address 127.0.0.1:7101 --secret-file secret.txt [--json]
// Output contract: one line per fact for people, e.g.
//   placement version 1 -> 2
//   balance ratio (mean over 3 MoE layers): 1.84 -> 1.07
//   replicas moved: 12 (3.1 MiB)
//   tokens counted: 48213
//   took 0.420 s
// or "no change: the placement is already balanced (ratio 1.03)" first when nothing moved;
// --json prints the whole report (per-layer ratios too) as one JSON object. On failure
// "moe rebalance: error: <code>: <why>" on stderr and exit status 1 (`overloaded:` and
// `unavailable:` may succeed later; docs/job_api.md lists the codes).
// The cluster secret comes from --secret-file, --secret or MOE_CLUSTER_SECRET, and TLS from
// --ca-file / --server-name / --cert / --key, as for `moe submit` (cli/client_secret.hpp).
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <memory>

#include "cli/command.hpp"
#include "cli/client_secret.hpp"
#include "client/job_client.hpp"
#include "runtime/cluster_config.hpp"

namespace moe::cli {

namespace {

struct rebalance_options {
  std::string address;
  std::string secret;
  std::string secret_file;
  api_tls_flags tls;
  bool json = false;
};

int fail(const std::string& text) {
  fmt::print(stderr, "moe rebalance: error: {}\n", text);
  return 1;
}

nlohmann::json to_json(const client::client_rebalance_report& r) {
  return {{"changed", r.changed},
          {"version_before", r.version_before},
          {"version_after", r.version_after},
          {"balance_before", r.balance_before},
          {"balance_after", r.balance_after},
          {"layer_balance_before", r.layer_balance_before},
          {"layer_balance_after", r.layer_balance_after},
          {"tokens_counted", r.tokens_counted},
          {"replicas_moved", r.replicas_moved},
          {"bytes_moved", r.bytes_moved},
          {"duration_seconds", r.duration_seconds},
          {"trigger", r.trigger}};
}

void print_human(const client::client_rebalance_report& r) {
  const size_t num_layers = r.layer_balance_before.size();
  if (!r.changed) {
    fmt::print("no change: the placement is already balanced (ratio {:.2f})\n", r.balance_before);
    fmt::print("placement version {}\n", r.version_before);
  } else {
    fmt::print("placement version {} -> {}\n", r.version_before, r.version_after);
    fmt::print("balance ratio (mean over {} MoE layer{}): {:.2f} -> {:.2f}\n", num_layers,
               num_layers == 1 ? "" : "s", r.balance_before, r.balance_after);
    fmt::print("replicas moved: {} ({})\n", r.replicas_moved, runtime::format_bytes(r.bytes_moved));
  }
  fmt::print("tokens counted: {}\n", r.tokens_counted);
  fmt::print("took {:.3f} s\n", r.duration_seconds);
}

int run_rebalance(const rebalance_options& o) {
  auto address = client::parse_address(o.address);
  if (!address) return fail(error_text(address.error()));
  auto secret = client_secret(o.secret, o.secret_file);
  if (!secret) return fail(error_text(secret.error()));
  auto connect_options = api_client_options(o.tls);
  if (!connect_options) return fail(error_text(connect_options.error()));
  auto c = client::job_client::connect(address->first, address->second, *secret, *connect_options);
  if (!c) return fail(error_text(c.error()));
  auto report = (*c)->rebalance();
  if (!report) return fail(error_text(report.error()));
  if (o.json) {
    fmt::print("{}\n", to_json(*report).dump(2));
  } else {
    print_human(*report);
  }
  return 0;
}

}  // namespace

void add_rebalance_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<rebalance_options>();
  auto* cmd = app.add_subcommand(
      "rebalance", "Rebalance a running cluster's experts now (its job API) and print what moved");
  cmd->add_option("--address", o->address, "The cluster's API address, HOST:PORT")->required();
  cmd->add_option("--secret-file", o->secret_file, "A file whose first line is the cluster secret");
  cmd->add_option("--secret", o->secret, "The cluster secret (visible in ps: prefer the others)");
  cmd->add_flag("--json", o->json, "Print the report as JSON");
  add_api_tls_flags(*cmd, o->tls);
  cmd->footer("The secret may also come from the environment variable MOE_CLUSTER_SECRET.");
  cmd->callback([o, &ctx] { ctx.exit_code = run_rebalance(*o); });
}

}  // namespace moe::cli
