// `moe chaos`: fault injection against a running cluster, for operators and the fault tests
// (tests/fault/, docs/operations.md "Fault injection").
//   kill|stop|cont --config C --node N [--run-dir D]
//                 SIGKILL / SIGSTOP / SIGCONT to a node process `moe cluster up` started (its
//                 pid file in the run dir, the same default as `moe cluster`)
//   netem --netns NS --dev DEV (--delay MS [--jitter MS] [--loss PCT] | --loss PCT | --clear)
//                 tc netem inside a network namespace
//   link --netns NS --dev DEV ([--rate KBIT] [--loss PCT] | --clear)
//                 the same without netem: a tbf rate limit, nftables random drops
//   proxy --listen HOST:PORT --to HOST:PORT [--corrupt-rate R] [--drop-after B] [--delay-ms MS]
//                 a relay that corrupts, cuts or delays live streams, until SIGINT/SIGTERM
//   garbage --address HOST:PORT [--kind K] [--count N]
//                 malformed Cap'n Proto frames, one connection each, and what the server did
// Every fault is printed with a timestamp ("... (unix 1738324800.123456)") so that tests measure
// detection and recovery from it.
// Exit status: 0 done; 1 bad arguments or config, or the fault could not be injected; 2 this host
// cannot inject it (no ip/tc/nft, no netem or tbf in the kernel, no such namespace); 3 garbage: the server
// did not reject a frame or stopped answering. Usage errors: CLI11's codes (>= 100).
#include <fmt/format.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <memory>

#include "cli/chaos_faults.hpp"
#include "cli/chaos_garbage.hpp"
#include "cli/chaos_proxy.hpp"
#include "cli/client_secret.hpp"
#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "cli/local_processes.hpp"

namespace moe::cli {

namespace {

constexpr int exit_failed = 1;
constexpr int exit_unsupported = 2;
constexpr int exit_not_rejected = 3;

std::string now_stamp() { return chaos_timestamp(std::chrono::system_clock::now()); }

const char* signal_name(int sig) {
  switch (sig) {
    case SIGKILL: return "SIGKILL";
    case SIGSTOP: return "SIGSTOP";
    case SIGCONT: return "SIGCONT";
    default: return "a signal";
  }
}

int fail(const std::string& sub, const caf::error& err) {
  fmt::print(stderr, "moe chaos {}: error: {}\n", sub, error_text(err));
  const bool unsupported = err.category() == caf::atom("chaos") &&
                           (err.code() == static_cast<uint8_t>(chaos_errc::missing_tool) ||
                            err.code() == static_cast<uint8_t>(chaos_errc::no_namespace));
  return unsupported ? exit_unsupported : exit_failed;
}

struct signal_options {
  std::string config, node, run_dir;
};

int run_signal(const std::string& sub, int sig, const signal_options& o) {
  auto cfg = runtime::load_cluster_config(o.config);
  if (!cfg) return fail(sub, cfg.error());
  auto p = find_node_process(*cfg, o.node, cluster_run_dir(o.run_dir, cfg->name));
  if (!p) return fail(sub, p.error());
  const std::string stamp = now_stamp();
  if (auto err = signal_node(*p, sig)) return fail(sub, err);
  fmt::print("moe chaos {}: {}: {} sent to node {} (pid {}, from {})\n", sub, stamp, signal_name(sig), p->node,
             p->pid, p->pid_file.string());
  if (sig == SIGKILL) {
    // Gone means gone: say when, so a test knows the node can no longer answer anything.
    const auto t0 = std::chrono::steady_clock::now();
    const bool gone = wait_for_exit(p->pid, std::chrono::seconds(5));
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    if (gone) {
      fmt::print("moe chaos {}: node {} exited {} ms later\n", sub, p->node, ms.count());
    } else {
      fmt::print(stderr, "moe chaos {}: error: node {} (pid {}) still runs 5 s after SIGKILL\n", sub, p->node, p->pid);
      return exit_failed;
    }
  }
  std::fflush(stdout);
  return 0;
}

struct netem_options {
  std::string netns, dev;
  netem_spec spec;
};

int run_netem(const netem_options& o) {
  const std::string stamp = now_stamp();
  auto shown = apply_netem(o.netns, o.dev, o.spec);
  if (!shown) return fail("netem", shown.error());
  std::string what = "cleared";
  if (!o.spec.clear) {
    what = "netem";
    if (o.spec.delay_ms) what += fmt::format(" delay {:g} ms", *o.spec.delay_ms);
    if (o.spec.jitter_ms) what += fmt::format(" jitter {:g} ms", *o.spec.jitter_ms);
    if (o.spec.loss_pct) what += fmt::format(" loss {:g}%", *o.spec.loss_pct);
  }
  fmt::print("moe chaos netem: {}: {} on {} in namespace {}; tc: {}\n", stamp, what, o.dev, o.netns,
             shown->empty() ? "(no qdisc)" : *shown);
  std::fflush(stdout);
  return 0;
}

struct link_options {
  std::string netns, dev;
  link_spec spec;
};

int run_link(const link_options& o) {
  const std::string stamp = now_stamp();
  auto shown = apply_link(o.netns, o.dev, o.spec);
  if (!shown) return fail("link", shown.error());
  std::string what = "cleared";
  if (!o.spec.clear) {
    what.clear();
    if (o.spec.rate_kbit) what += fmt::format("rate {:g} kbit/s", *o.spec.rate_kbit);
    if (o.spec.loss_pct) what += fmt::format("{}loss {:g}%", what.empty() ? "" : ", ", *o.spec.loss_pct);
  }
  fmt::print("moe chaos link: {}: {} on {} in namespace {}; tc: {}\n", stamp, what, o.dev, o.netns, *shown);
  std::fflush(stdout);
  return 0;
}

struct proxy_cli_options {
  std::string listen, to, direction = "both";
  double corrupt_rate = 0;
  std::optional<uint64_t> drop_after;
  uint32_t delay_ms = 0;
  uint64_t seed = 1;
};

int run_proxy(const proxy_cli_options& c) {
  proxy_options o;
  auto listen = parse_host_port(c.listen, true);
  if (!listen) return fail("proxy", listen.error());
  auto to = parse_host_port(c.to, false);
  if (!to) return fail("proxy", to.error());
  o.listen = *listen;
  o.target = *to;
  o.corrupt_rate = c.corrupt_rate;
  o.corrupt_direction = c.direction == "to-server"   ? proxy_direction::to_server
                        : c.direction == "to-client" ? proxy_direction::to_client
                                                     : proxy_direction::both;
  o.drop_after_bytes = c.drop_after;
  o.delay_ms = c.delay_ms;
  o.seed = c.seed;
  // Blocked before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  auto proxy = chaos_proxy::start(o, [](const std::string& line) {
    fmt::print("moe chaos proxy: {}: {}\n", now_stamp(), line);
    std::fflush(stdout);
  });
  if (!proxy) return fail("proxy", proxy.error());
  fmt::print("moe chaos proxy: {}: listening on {} -> {} (corrupt-rate {:g} {}, drop-after {}, delay {} ms, seed {})\n",
             now_stamp(), host_port{o.listen.host, (*proxy)->port()}.to_string(), o.target.to_string(),
             o.corrupt_rate, c.direction, c.drop_after ? std::to_string(*c.drop_after) + " B" : "none", o.delay_ms,
             o.seed);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop_signals, &sig);
  (*proxy)->stop();
  fmt::print("moe chaos proxy: {}: stopped ({})\n", now_stamp(), sig == SIGINT ? "SIGINT" : "SIGTERM");
  return 0;
}

struct garbage_options {
  std::string address, kind = "all", secret, secret_file;
  int count = 1;
  uint64_t seed = 1;
  double timeout_s = 2;
};

int run_garbage(const garbage_options& o) {
  auto target = parse_host_port(o.address, false);
  if (!target) return fail("garbage", target.error());
  auto kinds = parse_garbage_kinds(o.kind);
  if (!kinds) return fail("garbage", kinds.error());
  if (o.count < 1) return fail("garbage", make_error(chaos_errc::bad_request, "--count must be >= 1"));
  // The secret is optional: with it, wrong-version reaches the server's version check.
  std::string secret;
  if (!o.secret.empty() || !o.secret_file.empty() || std::getenv("MOE_CLUSTER_SECRET") != nullptr) {
    auto s = client_secret(o.secret, o.secret_file);
    if (!s) return fail("garbage", s.error());
    secret = *s;
  }
  const std::chrono::milliseconds timeout{static_cast<int64_t>(o.timeout_s * 1000)};
  int sent = 0, rejected = 0;
  for (int i = 0; i < o.count; ++i) {
    for (auto kind : *kinds) {
      for (const auto& frame : make_garbage(kind, o.seed + static_cast<uint64_t>(i), secret)) {
        const std::string stamp = now_stamp();
        auto out = send_garbage(*target, frame, timeout);
        ++sent;
        rejected += out.rejected ? 1 : 0;
        fmt::print("moe chaos garbage: {}: {} #{} -> {}: sent {} B: {} [{}]\n", stamp, out.variant, i + 1,
                   target->to_string(), out.bytes_sent, out.what, out.rejected ? "rejected" : "NOT REJECTED");
        std::fflush(stdout);
      }
    }
  }
  auto probe = probe_server(*target, timeout);
  fmt::print("moe chaos garbage: {}: after {} connection(s), {} rejected: {} ({})\n", now_stamp(), sent, rejected,
             probe.ok ? "the server still answers" : "THE SERVER NO LONGER ANSWERS", probe.what);
  return probe.ok && rejected == sent ? 0 : exit_not_rejected;
}

}  // namespace

void add_chaos_command(CLI::App& app, command_context& ctx) {
  auto* cmd = app.add_subcommand("chaos", "Inject faults into a running cluster (docs/operations.md, fault injection)");
  cmd->require_subcommand(1);
  cmd->footer(
      "Exit status: 0 done; 1 error or the fault could not be injected; 2 not possible on this host (no ip/tc/nft, "
      "no netem, no such namespace); 3 garbage: a frame was not rejected or the server stopped answering.");

  struct signal_sub {
    const char* name;
    int sig;
    const char* help;
  };
  const signal_sub signal_subs[] = {
      {"kill", SIGKILL, "SIGKILL a node process started by `moe cluster up` (its process group)"},
      {"stop", SIGSTOP, "SIGSTOP a node process (it hangs: detected by heartbeat timeout)"},
      {"cont", SIGCONT, "SIGCONT a node process stopped with `moe chaos stop`"},
  };
  for (const auto& s : signal_subs) {
    auto o = std::make_shared<signal_options>();
    auto* sub = cmd->add_subcommand(s.name, s.help);
    sub->add_option("--config", o->config, "Cluster config (YAML)")->required();
    sub->add_option("--node", o->node, "The node's name in the config")->required();
    sub->add_option("--run-dir", o->run_dir, "Pid files of `moe cluster up` (default ${XDG_RUNTIME_DIR:-/tmp}/moe-CLUSTER)");
    sub->callback([o, &ctx, name = std::string(s.name), sig = s.sig] { ctx.exit_code = run_signal(name, sig, *o); });
  }

  {
    auto o = std::make_shared<netem_options>();
    auto delay = std::make_shared<double>(0), jitter = std::make_shared<double>(0), loss = std::make_shared<double>(0);
    auto* sub = cmd->add_subcommand("netem", "Delay or drop a device's traffic inside a network namespace (tc netem)");
    sub->add_option("--netns", o->netns, "Network namespace (ip netns list)")->required();
    sub->add_option("--dev", o->dev, "Device inside the namespace (e.g. its veth)")->required();
    auto* d = sub->add_option("--delay", *delay, "Added delay, ms");
    auto* j = sub->add_option("--jitter", *jitter, "Delay jitter, ms (with --delay)")->needs(d);
    auto* l = sub->add_option("--loss", *loss, "Packets dropped, percent");
    sub->add_flag("--clear", o->spec.clear, "Remove the netem qdisc")->excludes(d)->excludes(j)->excludes(l);
    sub->callback([o, delay, jitter, loss, d, j, l, &ctx] {
      if (d->count() > 0) o->spec.delay_ms = *delay;
      if (j->count() > 0) o->spec.jitter_ms = *jitter;
      if (l->count() > 0) o->spec.loss_pct = *loss;
      ctx.exit_code = run_netem(*o);
    });
  }

  {
    auto o = std::make_shared<link_options>();
    auto rate = std::make_shared<double>(0), loss = std::make_shared<double>(0);
    auto* sub = cmd->add_subcommand(
        "link", "Slow down (tc tbf) or drop (nftables) a device's traffic inside a network namespace, without netem");
    sub->add_option("--netns", o->netns, "Network namespace (ip netns list)")->required();
    sub->add_option("--dev", o->dev, "Device inside the namespace (e.g. its veth)")->required();
    auto* r = sub->add_option("--rate", *rate, "Rate limit, kbit/s: packets beyond it wait (latency grows with traffic)");
    auto* l = sub->add_option("--loss", *loss, "Packets leaving the device dropped at random, percent");
    sub->add_flag("--clear", o->spec.clear, "Remove the rate limit and the drops")->excludes(r)->excludes(l);
    sub->callback([o, rate, loss, r, l, &ctx] {
      if (r->count() > 0) o->spec.rate_kbit = *rate;
      if (l->count() > 0) o->spec.loss_pct = *loss;
      ctx.exit_code = run_link(*o);
    });
  }

  {
    auto o = std::make_shared<proxy_cli_options>();
    auto drop = std::make_shared<uint64_t>(0);
    auto* sub = cmd->add_subcommand("proxy", "A TCP relay that corrupts, cuts or delays traffic, until SIGINT/SIGTERM");
    sub->add_option("--listen", o->listen, "HOST:PORT to accept clients on (port 0: ephemeral, printed)")->required();
    sub->add_option("--to", o->to, "HOST:PORT of the server")->required();
    sub->add_option("--corrupt-rate", o->corrupt_rate, "Probability per byte of flipping one bit (0..1, default 0)");
    sub->add_option("--corrupt-direction", o->direction, "both (default), to-server or to-client")
        ->check(CLI::IsMember({"both", "to-server", "to-client"}));
    auto* da = sub->add_option("--drop-after", *drop, "Cut each connection after this many bytes (both ways)");
    sub->add_option("--delay-ms", o->delay_ms, "Hold every chunk this long (latency)");
    sub->add_option("--seed", o->seed, "Seed of the corruption (default 1): the same seed flips the same bytes")
        ->check(seed_number());
    sub->callback([o, drop, da, &ctx] {
      if (da->count() > 0) o->drop_after = *drop;
      ctx.exit_code = run_proxy(*o);
    });
  }

  {
    auto o = std::make_shared<garbage_options>();
    auto* sub = cmd->add_subcommand("garbage", "Send malformed Cap'n Proto frames; report what the server did");
    sub->add_option("--address", o->address, "HOST:PORT: the job API or a node's control port")->required();
    sub->add_option("--kind", o->kind, "truncated, oversized, random, wrong-version, a comma-separated list, or all (default)");
    sub->add_option("--count", o->count, "Send each frame this many times (default 1)");
    sub->add_option("--seed", o->seed, "Seed of the random frames (default 1)")->check(seed_number());
    sub->add_option("--timeout", o->timeout_s,
                    "Seconds to wait for the server's reaction (default 2)")
        ->check(timeout_seconds());
    sub->add_option("--secret", o->secret, "The cluster secret: wrong-version then reaches the version check");
    sub->add_option("--secret-file", o->secret_file, "A file whose first line is the cluster secret");
    sub->callback([o, &ctx] { ctx.exit_code = run_garbage(*o); });
  }
}

}  // namespace moe::cli
