#include "cli/chaos_faults.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <sstream>

#include "cli/local_processes.hpp"

namespace moe::cli {

const char* to_string(chaos_errc e) noexcept {
  switch (e) {
    case chaos_errc::bad_request: return "bad_request";
    case chaos_errc::not_running: return "not_running";
    case chaos_errc::missing_tool: return "missing_tool";
    case chaos_errc::no_namespace: return "no_namespace";
    case chaos_errc::command_failed: return "command_failed";
    case chaos_errc::io_error: return "io_error";
  }
  return "unknown";
}

caf::error make_error(chaos_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("chaos"), caf::make_message(std::move(text))};
}

std::string chaos_timestamp(std::chrono::system_clock::time_point t) {
  using namespace std::chrono;
  const auto us = duration_cast<microseconds>(t.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(us / 1'000'000);
  std::tm utc{};
  ::gmtime_r(&secs, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &utc);
  return fmt::format("{}.{:03}Z (unix {}.{:06})", buf, (us % 1'000'000) / 1000, us / 1'000'000, us % 1'000'000);
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

caf::expected<node_process> find_node_process(const runtime::cluster_config& config, const std::string& node,
                                              const std::filesystem::path& run_dir) {
  const runtime::node_config* found = nullptr;
  std::string names;
  for (const auto& n : config.nodes) {
    if (n.name == node) found = &n;
    names += (names.empty() ? "" : ", ") + n.name;
  }
  if (found == nullptr)
    return make_error(chaos_errc::bad_request,
                      fmt::format("{}: no node named '{}' (nodes: {})", config.source, node, names));
  if (!is_local_host(found->host))
    // `moe cluster up` records the ssh process for a remote node: signalling it would cut the
    // ssh session, not freeze or kill the node.
    return make_error(chaos_errc::bad_request,
                      fmt::format("node {} runs on {}, not on this host: moe chaos signals local nodes only "
                                  "(run it on {})",
                                  node, found->host, found->host));
  node_process p{node, 0, run_dir / (node + ".pid")};
  auto pid = read_pid_file(p.pid_file);
  if (!pid)
    return make_error(chaos_errc::not_running,
                      fmt::format("node {}: no pid file {} (was it started with `moe cluster up --run-dir {}`?)",
                                  node, p.pid_file.string(), run_dir.string()));
  p.pid = *pid;
  if (!process_running(p.pid))
    return make_error(chaos_errc::not_running,
                      fmt::format("node {}: pid {} (from {}) is not running", node, p.pid, p.pid_file.string()));
  return p;
}

caf::error signal_node(const node_process& p, int sig) {
  // A node leads its process group when `moe cluster up` started it; otherwise (a node started
  // by hand, its pid written by a script) only the process itself is ours to signal.
  const bool leader = ::getpgid(p.pid) == p.pid;
  if (::kill(leader ? -p.pid : p.pid, sig) != 0) {
    const int err = errno;
    return make_error(err == ESRCH ? chaos_errc::not_running : chaos_errc::io_error,
                      fmt::format("node {}: kill({}, {}): {}", p.node, leader ? -p.pid : p.pid, ::strsignal(sig),
                                  std::strerror(err)));
  }
  return {};
}

caf::error check_netem_spec(const netem_spec& s) {
  auto bad = [](std::string text) { return make_error(chaos_errc::bad_request, std::move(text)); };
  const bool shaping = s.delay_ms || s.loss_pct;
  if (s.clear && (shaping || s.jitter_ms)) return bad("--clear takes no --delay, --jitter or --loss");
  if (!s.clear && !shaping) return bad("give --delay MS, --loss PCT (or both), or --clear");
  if (s.jitter_ms && !s.delay_ms) return bad("--jitter needs --delay");
  auto finite_nonneg = [](double v) { return std::isfinite(v) && v >= 0; };
  if (s.delay_ms && !finite_nonneg(*s.delay_ms)) return bad(fmt::format("--delay {} is not >= 0", *s.delay_ms));
  if (s.jitter_ms && !finite_nonneg(*s.jitter_ms)) return bad(fmt::format("--jitter {} is not >= 0", *s.jitter_ms));
  if (s.loss_pct && !(finite_nonneg(*s.loss_pct) && *s.loss_pct <= 100))
    return bad(fmt::format("--loss {} is not a percentage in [0, 100]", *s.loss_pct));
  return {};
}

std::vector<std::string> netem_argv(const std::string& ip, const std::string& tc, const std::string& netns,
                                    const std::string& dev, const netem_spec& s) {
  // tc reads "12.5ms" and "0.5%"; {:g} keeps integers plain.
  std::vector<std::string> argv{ip, "netns", "exec", netns, tc, "qdisc"};
  if (s.clear) {
    argv.insert(argv.end(), {"del", "dev", dev, "root"});
    return argv;
  }
  argv.insert(argv.end(), {"replace", "dev", dev, "root", "netem"});
  if (s.delay_ms) {
    argv.insert(argv.end(), {"delay", fmt::format("{:g}ms", *s.delay_ms)});
    if (s.jitter_ms) argv.push_back(fmt::format("{:g}ms", *s.jitter_ms));
  }
  if (s.loss_pct) argv.insert(argv.end(), {"loss", fmt::format("{:g}%", *s.loss_pct)});
  return argv;
}

std::string find_program(const std::string& name) {
  const char* env = std::getenv("PATH");
  std::string path = env != nullptr ? env : "";
  path += ":/usr/sbin:/sbin:/usr/bin:/bin";
  std::istringstream dirs(path);
  for (std::string dir; std::getline(dirs, dir, ':');) {
    if (dir.empty()) continue;
    const std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return {};
}

caf::expected<command_result> run_captured(const std::vector<std::string>& argv) {
  if (argv.empty()) return make_error(chaos_errc::bad_request, "run: empty command");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    return make_error(chaos_errc::io_error, std::string("pipe: ") + std::strerror(errno));
  const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    if (null_fd >= 0) ::close(null_fd);
    return make_error(chaos_errc::io_error, std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    ::execv(args[0], args.data());
    _exit(127);
  }
  ::close(fds[1]);
  if (null_fd >= 0) ::close(null_fd);
  command_result r;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) {
      r.output.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  while (!r.output.empty() && (r.output.back() == '\n' || r.output.back() == ' ')) r.output.pop_back();
  return r;
}

caf::error check_link_spec(const link_spec& s) {
  auto bad = [](std::string text) { return make_error(chaos_errc::bad_request, std::move(text)); };
  const bool shaping = s.rate_kbit || s.loss_pct;
  if (s.clear && shaping) return bad("--clear takes no --rate or --loss");
  if (!s.clear && !shaping) return bad("give --rate KBIT, --loss PCT (or both), or --clear");
  if (s.rate_kbit && !(std::isfinite(*s.rate_kbit) && *s.rate_kbit >= 8 && *s.rate_kbit <= 1e8))
    return bad(fmt::format("--rate {} is not a rate in [8, 1e8] kbit/s", *s.rate_kbit));
  if (s.loss_pct && !(std::isfinite(*s.loss_pct) && *s.loss_pct >= 0 && *s.loss_pct <= 100))
    return bad(fmt::format("--loss {} is not a percentage in [0, 100]", *s.loss_pct));
  return {};
}

namespace {

// Device names go into an nftables rule: only what Linux interface names are made of.
caf::error check_device_name(const std::string& dev) {
  const bool ok = !dev.empty() && dev.size() < 16 && std::all_of(dev.begin(), dev.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
  if (ok) return {};
  return make_error(chaos_errc::bad_request,
                    fmt::format("'{}' is not a network device name (1-15 of A-Z a-z 0-9 _ - .)", dev));
}

std::string nft_table(const std::string& dev) {
  std::string t = "moe_chaos_";
  for (char c : dev) t += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return t;
}

// `ip netns exec NS` would say "Cannot open network namespace": name the cause and the remedy.
caf::error check_namespace(const std::string& netns) {
  struct stat st{};
  if (::stat(("/run/netns/" + netns).c_str(), &st) == 0) return {};
  return make_error(chaos_errc::no_namespace,
                    fmt::format("no network namespace '{}' (/run/netns/{} does not exist; `ip netns list` shows "
                                "the namespaces)",
                                netns, netns));
}

caf::expected<std::string> require_program(const std::string& name, const std::string& package) {
  auto path = find_program(name);
  if (path.empty()) return make_error(chaos_errc::missing_tool, fmt::format("no '{}' command (install {})", name, package));
  return path;
}

}  // namespace

std::vector<link_command> link_commands(const std::string& ip, const std::string& tc, const std::string& nft,
                                        const std::string& netns, const std::string& dev, const link_spec& s) {
  const std::vector<std::string> in_ns{ip, "netns", "exec", netns};
  auto cmd = [&](std::vector<std::string> tail, bool undo) {
    auto argv = in_ns;
    argv.insert(argv.end(), tail.begin(), tail.end());
    return link_command{std::move(argv), undo};
  };
  const std::string table = nft_table(dev);
  std::vector<link_command> out;
  out.push_back(cmd({nft, "delete", "table", "inet", table}, true));
  if (s.rate_kbit) {
    // The bucket holds at least one 64 KiB GSO packet (else tbf drops it) and 10 ms at the
    // rate; packets wait up to 5 s for tokens, so the link is slow, not lossy.
    const auto burst = std::max<int64_t>(70'000, static_cast<int64_t>(*s.rate_kbit * 1000 / 8 / 100));
    out.push_back(cmd({tc, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", fmt::format("{}kbit", std::llround(*s.rate_kbit)),
                       "burst", std::to_string(burst), "latency", "5s"},
                      false));
  } else {
    out.push_back(cmd({tc, "qdisc", "del", "dev", dev, "root"}, true));
  }
  if (s.loss_pct) {
    // numgen draws per packet; parts per million keep fractional percentages.
    const auto ppm = static_cast<int64_t>(std::llround(*s.loss_pct * 10'000));
    out.push_back(cmd({nft, "add", "table", "inet", table}, false));
    out.push_back(cmd({nft, "add", "chain", "inet", table, "egress",
                       "{ type filter hook output priority 0 ; policy accept ; }"},
                      false));
    out.push_back(cmd({nft, "add", "rule", "inet", table, "egress", "oifname", "\"" + dev + "\"", "numgen", "random",
                       "mod", "1000000", "<", std::to_string(ppm), "counter", "drop"},
                      false));
  }
  return out;
}

caf::expected<std::string> apply_link(const std::string& netns, const std::string& dev, const link_spec& spec) {
  if (auto err = check_link_spec(spec)) return err;
  if (auto err = check_device_name(dev)) return err;
  auto ip = require_program("ip", "iproute2");
  if (!ip) return ip.error();
  auto tc = require_program("tc", "iproute2");
  if (!tc) return tc.error();
  auto nft = require_program("nft", "nftables");
  if (!nft) return nft.error();
  if (auto err = check_namespace(netns)) return err;
  // A drop rule names the device as a string and would match nothing: ask for it first.
  auto link = run_captured({*ip, "-n", netns, "link", "show", "dev", dev});
  if (!link) return link.error();
  if (link->exit_code != 0)
    return make_error(chaos_errc::bad_request, fmt::format("no device '{}' in namespace {}: {}", dev, netns, link->output));
  for (const auto& c : link_commands(*ip, *tc, *nft, netns, dev, spec)) {
    auto r = run_captured(c.argv);
    if (!r) return r.error();
    if (r->exit_code == 0 || c.undo) continue;
    std::string line;
    for (size_t i = 4; i < c.argv.size(); ++i) line += (i > 4 ? " " : "") + c.argv[i];
    if (r->output.find("qdisc kind is unknown") != std::string::npos)
      return make_error(chaos_errc::missing_tool,
                        fmt::format("this kernel has no tbf qdisc (sch_tbf): `{}` said: {}", line, r->output));
    if (r->output.find("Cannot find device") != std::string::npos)
      return make_error(chaos_errc::bad_request, fmt::format("no device '{}' in namespace {}: {}", dev, netns, r->output));
    if (r->output.find("Protocol not supported") != std::string::npos ||
        r->output.find("Operation not supported") != std::string::npos)
      return make_error(chaos_errc::missing_tool,
                        fmt::format("this kernel cannot do `{}` (nf_tables with numgen?): {}", line, r->output));
    return make_error(chaos_errc::command_failed,
                      fmt::format("`ip netns exec {} {}` exited {}: {}", netns, line, r->exit_code, r->output));
  }
  std::string shown;
  auto qdisc = run_captured({*ip, "netns", "exec", netns, *tc, "qdisc", "show", "dev", dev});
  shown += qdisc && qdisc->exit_code == 0 ? qdisc->output : "(tc qdisc show failed)";
  if (spec.loss_pct) {
    auto rules = run_captured({*ip, "netns", "exec", netns, *nft, "list", "chain", "inet", nft_table(dev), "egress"});
    // One line: the rule as nft lists it, with its counter.
    std::string compact;
    if (rules && rules->exit_code == 0) {
      std::istringstream words(rules->output);
      for (std::string w; words >> w;) compact += (compact.empty() ? "" : " ") + w;
    }
    shown += "; nft: " + (compact.empty() ? std::string("(nft list failed)") : compact);
  }
  return shown;
}

caf::expected<std::string> apply_netem(const std::string& netns, const std::string& dev, const netem_spec& spec) {
  if (auto err = check_netem_spec(spec)) return err;
  auto ip_path = require_program("ip", "iproute2");
  if (!ip_path) return ip_path.error();
  auto tc_path = require_program("tc", "iproute2");
  if (!tc_path) return tc_path.error();
  const std::string ip = *ip_path, tc = *tc_path;
  if (auto err = check_namespace(netns)) return err;
  auto r = run_captured(netem_argv(ip, tc, netns, dev, spec));
  if (!r) return r.error();
  if (r->exit_code != 0) {
    // Clearing a device that has no qdisc of ours is what the caller wanted anyway.
    const bool nothing_to_clear = spec.clear && (r->output.find("No such file or directory") != std::string::npos ||
                                                 r->output.find("Cannot delete qdisc with handle of zero") !=
                                                     std::string::npos);
    if (!nothing_to_clear) {
      if (r->output.find("qdisc kind is unknown") != std::string::npos)
        return make_error(chaos_errc::missing_tool,
                          fmt::format("this kernel has no netem qdisc (sch_netem not built or not loaded: modprobe "
                                      "sch_netem): tc said: {}",
                                      r->output));
      if (r->output.find("Cannot find device") != std::string::npos)
        return make_error(chaos_errc::bad_request,
                          fmt::format("no device '{}' in namespace {}: {}", dev, netns, r->output));
      return make_error(chaos_errc::command_failed,
                        fmt::format("`ip netns exec {} tc qdisc ...` exited {}: {}", netns, r->exit_code, r->output));
    }
  }
  auto show = run_captured({ip, "netns", "exec", netns, tc, "qdisc", "show", "dev", dev});
  if (!show || show->exit_code != 0) return std::string("(tc qdisc show failed)");
  return show->output;
}

}  // namespace moe::cli
