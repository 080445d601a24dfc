// `moe submit`: one generation job through a running cluster's job API (moe::client).
// Output contract (as `moe run`): the generated token ids, space-separated, on one line of
// stdout; on failure "moe submit: error: <why>" on stderr and exit status 1.
//   moe submit --address 127.0.0.1:7101 --prompt-ids 5,17,42 --max-new-tokens 16
// The cluster secret comes from --secret, --secret-file or MOE_CLUSTER_SECRET (prefer the
// latter two: a command line is visible to every user of the machine). A server with api.tls
// needs --ca-file (and --server-name when dialling an IP address; --cert/--key when it asks
// for client certificates): cli/client_secret.hpp.
#include <fmt/format.h>

#include <memory>
#include <optional>

#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "cli/prompt_ids.hpp"
#include "cli/client_secret.hpp"
#include "client/job_client.hpp"

namespace moe::cli {

namespace {

struct submit_options {
  std::string address;
  std::string secret;
  std::string secret_file;
  api_tls_flags tls;
  generation_flags gen;
  uint64_t deadline_ms = 0;
  bool stream = false;
};

int fail(const std::string& text) {
  fmt::print(stderr, "moe submit: error: {}\n", text);
  return 1;
}

int run_submit(const submit_options& o) {
  auto address = client::parse_address(o.address);
  if (!address) return fail(error_text(address.error()));
  auto secret = client_secret(o.secret, o.secret_file);
  if (!secret) return fail(error_text(secret.error()));
  client::generation_request_spec spec;
  auto prompt = parse_token_ids(o.gen.prompt_ids, "--prompt-ids");
  if (!prompt) return fail(error_text(prompt.error()));
  spec.prompt = std::move(*prompt);
  if (!o.gen.stop_ids.empty()) {
    auto stop = parse_token_ids(o.gen.stop_ids, "--stop-ids");
    if (!stop) return fail(error_text(stop.error()));
    spec.stop_token_ids = std::move(*stop);
  }
  spec.max_new_tokens = o.gen.max_new_tokens;
  // The same sampling rules as `moe run`: greedy unless a temperature is given; top-k / top-p
  // alone sample at temperature 1, as Hugging Face does.
  if (o.gen.temperature) {
    spec.temperature = *o.gen.temperature;
  } else if (o.gen.top_k > 0 || o.gen.top_p < 1.0f) {
    spec.temperature = 1.0f;
  }
  spec.top_p = o.gen.top_p;
  spec.top_k = static_cast<uint32_t>(o.gen.top_k);
  spec.seed = o.gen.seed;
  spec.deadline_ms = o.deadline_ms;

  auto connect_options = api_client_options(o.tls);
  if (!connect_options) return fail(error_text(connect_options.error()));
  auto c = client::job_client::connect(address->first, address->second, *secret, *connect_options);
  if (!c) return fail(error_text(c.error()));
  if (!o.stream) {
    auto tokens = (*c)->generate(spec);
    if (!tokens) return fail(error_text(tokens.error()));
    fmt::print("{}\n", fmt::join(*tokens, " "));
    return 0;
  }
  // --stream: print each token as it arrives; the finished line is the same as without it.
  bool first = true;
  auto id = (*c)->submit(spec, [&first](const client::client_event& e) {
    for (int32_t t : e.tokens) {
      fmt::print("{}{}", first ? "" : " ", t);
      first = false;
    }
    std::fflush(stdout);
  });
  if (!id) return fail(error_text(id.error()));
  auto done = (*c)->wait(*id);
  fmt::print("\n");
  if (!done) return fail(error_text(done.error()));
  if (done->state == client::job_state::failed) return fail("job failed: " + done->error);
  if (done->state == client::job_state::cancelled) return fail("job was cancelled");
  return 0;
}

}  // namespace

void add_submit_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<submit_options>();
  auto* cmd = app.add_subcommand("submit", "Generate tokens on a running cluster (its job API)");
  cmd->add_option("--address", o->address, "The cluster's API address, HOST:PORT")->required();
  cmd->add_option("--secret", o->secret, "The cluster secret (visible in ps: prefer the others)");
  cmd->add_option("--secret-file", o->secret_file, "A file whose first line is the cluster secret");
  add_generation_flags(*cmd, o->gen);
  cmd->add_option(
         "--deadline-ms", o->deadline_ms,
         "Fail the request unless it finishes within this many milliseconds (0: the cluster's "
         "batching.request_timeout_ms)")
      ->check(whole_number(0));
  cmd->add_flag("--stream", o->stream, "Print tokens as they arrive");
  add_api_tls_flags(*cmd, o->tls);
  cmd->footer("The secret may also come from the environment variable MOE_CLUSTER_SECRET.");
  cmd->callback([o, &ctx] { ctx.exit_code = run_submit(*o); });
}

}  // namespace moe::cli
