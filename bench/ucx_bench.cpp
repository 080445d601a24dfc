// The UCX data plane between two processes, against ucx_perftest on the same machine and
// transport in the same run: bandwidth and one-way latency of frames from 1 KiB to 64 MiB
// (powers of 4). Prints one JSON object; ratio_bandwidth = ours / ucx_perftest (target: >= 0.8
// from 1 MiB up), ratio_latency = ours / ucx_perftest (lower is better).
//
//   moe_bench_ucx [--transports tcp,shm] [--max-bytes 67108864] [--bytes-per-size 134217728]
//                 [--repeats 5] [--idle-spin-us 100]
//
// Ours: this process (sender) and a copy of itself started with --peer (receiver), each with a
// data_plane; bandwidth = n frames of one size with 8 in flight, timed until the receiver's
// acknowledgement of the last arrives; latency = ping-pong round trip / 2. ucx_perftest runs
// tag_bw and tag_lat with as many iterations, as a server and a client on 127.0.0.1, with
// UCX_TLS set to the same transports ("tcp", or "sm" = sysv/posix + cma for shm). Bandwidth is
// measured `repeats` times per size, ours and ucx_perftest taking turns, and the medians are
// compared: on two shared cores single runs swing by 2-4x.
// Every figure is 1e9 bytes per second (GB/s) or microseconds, one way.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <netinet/in.h>
#include <optional>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sstream>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "runtime/data_plane.hpp"
#include "runtime/ucx/ucx.hpp"

extern char** environ;

using moe::protocol::tensor_frame_header;
using moe::runtime::data_plane;
using nlohmann::json;
namespace tag = moe::runtime::data_plane_tag;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

struct transport {
  std::string name, tls;
  bool listen, detect_peer_failure;
};

const transport transports[] = {
    {"tcp", "tcp", true, true},   // client-server through a listener
    {"shm", "sm", false, false},  // worker addresses over the pipe; sysv/posix + cma
};

moe::runtime::data_plane_options options_for(const transport& t, std::chrono::microseconds spin) {
  moe::runtime::data_plane_options o;
  o.idle_spin = spin;
  o.tls = t.tls;
  o.listen = t.listen;
  o.detect_peer_failure = t.detect_peer_failure;
  return o;
}

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "moe_bench_ucx: %s\n", why.c_str());
  std::exit(1);
}

// A child process with stdin/stdout on pipes (or stdout discarded); killed and reaped at the end.
class child_process {
 public:
  child_process(const std::vector<std::string>& args, const std::vector<std::string>& env,
                bool capture) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) die("pipe");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    if (capture) {
      posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    } else {
      posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    }
    std::vector<char*> argv, envp;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data()) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
    if (pid_ < 0) die("cannot start " + args[0]);
  }
  ~child_process() {
    if (stdin_ >= 0) ::close(stdin_);
    ::close(stdout_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  std::string read_line(std::chrono::seconds bound = 60s) {
    std::string line;
    const auto deadline = clock_type::now() + bound;
    while (clock_type::now() < deadline) {
      pollfd p{stdout_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char ch;
      if (::read(stdout_, &ch, 1) != 1) break;
      if (ch == '\n') return line;
      line.push_back(ch);
    }
    die("no answer from the peer process");
  }
  void write_line(const std::string& s) {
    const std::string line = s + "\n";
    if (::write(stdin_, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
      die("the peer process is gone");
  }
  /// Exit status, or -1 when it had to be killed after `bound`.
  int wait(std::chrono::seconds bound) {
    if (stdin_ >= 0) ::close(std::exchange(stdin_, -1));
    int status = 0;
    const auto deadline = clock_type::now() + bound;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (clock_type::now() > deadline) return -1;  // the destructor kills it
      std::this_thread::sleep_for(5ms);
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  void drain_stdout_into(std::string& out) {
    char buf[4096];
    for (ssize_t n; (n = ::read(stdout_, buf, sizeof buf)) > 0;) out.append(buf, n);
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1, stdout_ = -1;
};

tensor_frame_header frame(uint64_t bytes, uint64_t transfer_tag) {
  tensor_frame_header h;
  h.kind = moe::protocol::frame_kind::activations;
  h.dt = moe::kernels::dtype::f32;
  h.shape = {bytes / 4 / 256, 256};  // sizes are multiples of 1 KiB: (rows, 256) float32
  h.byte_length = bytes;
  h.transfer_tag = transfer_tag;
  return h;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

uint32_t plane_in(const std::string& address) {
  return static_cast<uint32_t>(std::stoul(address.substr(address.rfind('/') + 1), nullptr, 16));
}

// Waits for a count reached on the progress thread.
struct latch {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  std::string error;
  void open(std::string why = {}) {
    std::lock_guard guard(mutex);
    if (!why.empty() && error.empty()) error = std::move(why);
    done = true;
    cv.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex);
    if (!cv.wait_for(lock, 120s, [&] { return done; })) die("a transfer hung");
    if (!error.empty()) die(error);
  }
};

// --- the peer process -----------------------------------------------------------------------

int run_peer(const transport& t, std::chrono::microseconds spin) {
  auto plane = data_plane::start(options_for(t, spin));
  if (!plane) die(moe::error_text(plane.error()));
  std::cout << "ADDR " << (*plane)->address() << std::endl;
  std::string sender_address;
  std::getline(std::cin, sender_address);
  auto peer = (*plane)->connect(sender_address);
  if (!peer) die(moe::error_text(peer.error()));
  const uint32_t sender_plane = plane_in(sender_address);
  std::vector<std::byte> buffer, ack(1024);
  std::string command;
  while (std::getline(std::cin, command)) {
    std::istringstream in(command);
    std::string what;
    uint64_t bytes = 0, n = 0, base = 0;
    in >> what >> bytes >> n >> base;
    if (what == "QUIT") break;
    if (buffer.size() < bytes) buffer.resize(bytes);
    const std::span<std::byte> into(buffer.data(), bytes);
    if (what == "BW") {  // n frames into one buffer (contents unused), then one acknowledgement
      auto left = std::make_shared<std::atomic<uint64_t>>(n);
      for (uint64_t i = 0; i < n; ++i) {
        auto err = (*plane)->post_receive(
            tag::make(sender_plane, base + i), into, [&, left, base](auto h) {
              if (!h) die(moe::error_text(h.error()));
              if (left->fetch_sub(1) != 1) return;
              auto a = frame(ack.size(), tag::make((*plane)->plane_id(), base));
              if (auto e = (*plane)->send(*peer, a, ack, [](caf::error) {}))
                die(moe::error_text(e));
            });
        if (err) die(moe::error_text(err));
      }
    } else if (what == "LAT") {  // answer ping i with pong i, from the progress thread
      auto on_ping = std::make_shared<std::function<void(uint64_t)>>();
      *on_ping = [&, on_ping, into, n, base](uint64_t i) {
        auto err = (*plane)->post_receive(
            tag::make(sender_plane, base + i), into, [&, on_ping, into, n, base, i](auto h) {
              if (!h) die(moe::error_text(h.error()));
              if (i + 1 < n) (*on_ping)(i + 1);
              h->transfer_tag = tag::make((*plane)->plane_id(), base + i);
              if (auto e = (*plane)->send(*peer, *h, into, [](caf::error) {}))
                die(moe::error_text(e));
              if (i + 1 == n) *on_ping = nullptr;  // break the cycle
            });
        if (err) die(moe::error_text(err));
      };
      (*on_ping)(0);
    }
    std::cout << "READY" << std::endl;
  }
  (*plane)->stop();
  return 0;
}

// --- ours -----------------------------------------------------------------------------------

class our_side {
 public:
  our_side(const transport& t, std::chrono::microseconds spin, const std::string& self_exe)
      : child_({self_exe, "--peer", "--transport", t.name, "--idle-spin-us",
                std::to_string(spin.count())},
               environment(), true) {
    auto plane = data_plane::start(options_for(t, spin));
    if (!plane) die(moe::error_text(plane.error()));
    plane_ = std::move(*plane);
    auto line = child_.read_line();
    if (!line.starts_with("ADDR ")) die("unexpected peer output: " + line);
    const std::string peer_address = line.substr(5);
    peer_plane_ = plane_in(peer_address);
    child_.write_line(plane_->address());
    auto peer = plane_->connect(peer_address);
    if (!peer) die(moe::error_text(peer.error()));
    peer_ = *peer;
  }
  ~our_side() {
    child_.write_line("QUIT");
    child_.wait(30s);
    plane_->stop();
  }

  /// n frames of `bytes`, `window` in flight; seconds until the last is acknowledged.
  double bandwidth_run(const std::vector<std::byte>& payload, uint64_t bytes, uint64_t n) {
    constexpr uint64_t window = 8;
    const uint64_t base = next_base(n);
    child_.write_line("BW " + std::to_string(bytes) + " " + std::to_string(n) + " " +
                      std::to_string(base));
    if (child_.read_line() != "READY") die("peer not ready");
    auto acked = std::make_shared<latch>();
    std::vector<std::byte> ack(1024);
    check(plane_->post_receive(tag::make(peer_plane_, base), ack, [acked](auto h) {
      acked->open(h ? "" : moe::error_text(h.error()));
    }));
    std::span<const std::byte> data(payload.data(), bytes);
    auto next = std::make_shared<std::atomic<uint64_t>>(0);
    // Each completion starts the next send, on the progress thread, as an actor would.
    auto send_one = std::make_shared<std::function<void()>>();
    *send_one = [this, data, base, n, next, acked, weak = std::weak_ptr(send_one)] {
      const uint64_t i = next->fetch_add(1);
      if (i >= n) return;
      auto err = plane_->send(peer_, frame(data.size(), tag::make(plane_->plane_id(), base + i)),
                              data, [self = weak.lock(), acked](caf::error e) {
                                if (e) return acked->open(moe::error_text(e));
                                if (self) (*self)();
                              });
      if (err) acked->open(moe::error_text(err));
    };
    const auto t0 = clock_type::now();
    for (uint64_t w = 0; w < std::min(window, n); ++w) (*send_one)();
    acked->wait();
    const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
    return seconds;
  }

  /// n ping-pongs of `bytes`; seconds for all of them.
  double latency_run(const std::vector<std::byte>& payload, std::vector<std::byte>& buffer,
                     uint64_t bytes, uint64_t n) {
    const uint64_t base = next_base(n);
    child_.write_line("LAT " + std::to_string(bytes) + " " + std::to_string(n) + " " +
                      std::to_string(base));
    if (child_.read_line() != "READY") die("peer not ready");
    latch finished;
    std::span<const std::byte> data(payload.data(), bytes);
    std::span<std::byte> into(buffer.data(), bytes);
    auto ping = std::make_shared<std::function<void(uint64_t)>>();
    *ping = [this, data, into, base, n, &finished, weak = std::weak_ptr(ping)](uint64_t i) {
      auto self = weak.lock();
      check(plane_->post_receive(tag::make(peer_plane_, base + i), into,
                                 [self, i, n, &finished](auto h) {
                                   if (!h) return finished.open(moe::error_text(h.error()));
                                   if (i + 1 == n) return finished.open();
                                   (*self)(i + 1);
                                 }));
      check(plane_->send(peer_, frame(data.size(), tag::make(plane_->plane_id(), base + i)), data,
                         [](caf::error) {}));
    };
    const auto t0 = clock_type::now();
    (*ping)(0);
    finished.wait();
    return std::chrono::duration<double>(clock_type::now() - t0).count();
  }

 private:
  static std::vector<std::string> environment() {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    return env;
  }
  static void check(const caf::error& e) {
    if (e) die(moe::error_text(e));
  }
  uint64_t next_base(uint64_t n) {
    const uint64_t b = next_sequence_;
    next_sequence_ += n + 1;
    return b;
  }

  child_process child_;
  std::unique_ptr<data_plane> plane_;
  data_plane::peer_id peer_ = 0;
  uint32_t peer_plane_ = 0;
  uint64_t next_sequence_ = 1;
};

// --- ucx_perftest ---------------------------------------------------------------------------

std::optional<std::string> find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const auto candidate = std::filesystem::path(dir) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return std::nullopt;
}

uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

/// One ucx_perftest test: the CSV field `column` of its result line (overall_bw: MB/s with
/// MB = 2^20 bytes; overall_lat: microseconds, one way), or nullopt when it failed.
std::optional<double> perftest(const std::string& exe, const std::string& tls,
                               const std::string& test, uint64_t bytes, uint64_t n,
                               const std::string& column) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    if (!std::string_view(*e).starts_with("UCX_TLS=")) env.emplace_back(*e);
  }
  env.push_back("UCX_TLS=" + tls);
  for (int attempt = 0; attempt < 3; ++attempt) {
    const std::string port = std::to_string(free_port());
    child_process server({exe, "-p", port}, env, false);
    std::this_thread::sleep_for(150ms);  // the server must listen before the client connects
    child_process client(
        {exe, "127.0.0.1", "-p", port, "-t", test, "-s", std::to_string(bytes), "-n",
         std::to_string(n), "-w", std::to_string(std::max<uint64_t>(2, n / 8)), "-v"},
        env, true);
    const int status = client.wait(120s);
    server.wait(5s);
    std::string out;
    client.drain_stdout_into(out);
    if (status != 0) continue;
    // Header line "iterations,...,overall_bw,..." then one line of numbers.
    std::istringstream lines(out);
    std::vector<std::string> header;
    for (std::string line; std::getline(lines, line);) {
      std::vector<std::string> cells;
      std::istringstream cs(line);
      for (std::string c; std::getline(cs, c, ',');) cells.push_back(c);
      if (!cells.empty() && cells[0] == "iterations") {
        header = cells;
      } else if (!header.empty() && cells.size() == header.size()) {
        for (size_t i = 0; i < header.size(); ++i) {
          if (header[i] == column) return std::stod(cells[i]);
        }
      }
    }
  }
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"UCX data plane vs ucx_perftest"};
  std::string transport_list = "tcp,shm", peer_transport;
  bool peer = false;
  uint64_t max_bytes = 64ull << 20, bytes_per_size = 128ull << 20;
  int repeats = 5;
  app.add_option("--transports", transport_list, "tcp,shm");
  app.add_option("--max-bytes", max_bytes, "largest frame (1 KiB .. this, powers of 4)");
  app.add_option("--bytes-per-size", bytes_per_size, "bytes moved per bandwidth measurement");
  app.add_option("--repeats", repeats, "bandwidth measurements per size and side (median)");
  app.add_flag("--peer", peer, "internal: run as the receiving process");
  app.add_option("--transport", peer_transport, "internal: the peer's transport");
  int64_t idle_spin_us = moe::runtime::data_plane_options{}.idle_spin.count();
  app.add_option("--idle-spin-us", idle_spin_us, "data_plane_options::idle_spin of both planes");
  CLI11_PARSE(app, argc, argv);
  ::signal(SIGPIPE, SIG_IGN);

  if (peer) {
    for (const auto& t : transports) {
      if (t.name == peer_transport) return run_peer(t, std::chrono::microseconds(idle_spin_us));
    }
    die("unknown transport " + peer_transport);
  }

  const std::string self_exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const auto perftest_exe = find_in_path("ucx_perftest");
  std::vector<uint64_t> sizes;
  for (uint64_t s = 1024; s <= max_bytes; s *= 4) sizes.push_back(s);
  std::vector<std::byte> payload(sizes.back(), std::byte{0x3c}), buffer(sizes.back());

  json out;
  out["benchmark"] = "ucx_data_plane";
  out["ucx_version"] = moe::runtime::ucx::version_string();
  out["cpus"] = std::thread::hardware_concurrency();
  out["ucx_perftest"] = perftest_exe ? json(*perftest_exe) : json("ucx_perftest unavailable");
  out["units"] = {{"bandwidth", "GB/s (1e9 bytes/s)"}, {"latency", "us, one way (round trip / 2)"}};
  out["target"] = "ratio_bandwidth >= 0.8 for 1 MiB and larger";
  const auto started = clock_type::now();
  for (const auto& t : transports) {
    if (transport_list.find(t.name) == std::string::npos) continue;
    json rows = json::array();
    bool met = true;
    our_side side(t, std::chrono::microseconds(idle_spin_us), self_exe);
    side.bandwidth_run(payload, sizes.back(), 4);  // warm-up: connections, registrations
    for (uint64_t bytes : sizes) {
      const uint64_t n_bw = std::clamp<uint64_t>(bytes_per_size / bytes, 8, 4000);
      const uint64_t n_lat = std::clamp<uint64_t>((8ull << 20) / bytes, 4, 200);
      side.bandwidth_run(payload, bytes, std::max<uint64_t>(2, n_bw / 8));  // warm-up
      // Ours and ucx_perftest take turns, `repeats` times, so that drifting load on the shared
      // cores hits both alike; each reports its median.
      std::vector<double> ours_bw, theirs_bw;
      for (int r = 0; r < repeats; ++r) {
        ours_bw.push_back(n_bw * bytes / side.bandwidth_run(payload, bytes, n_bw) / 1e9);
        if (!perftest_exe) continue;
        if (auto bw = perftest(*perftest_exe, t.tls, "tag_bw", bytes, n_bw, "overall_bw"))
          theirs_bw.push_back(*bw * 1048576.0 / 1e9);  // perftest's MB is 2^20 bytes
      }
      const double ours_lat = side.latency_run(payload, buffer, bytes, n_lat) / n_lat / 2 * 1e6;
      json row = {{"bytes", bytes},
                  {"iterations", {{"bandwidth", n_bw}, {"latency", n_lat}}},
                  {"ours",
                   {{"bandwidth_gbps", median(ours_bw)},
                    {"bandwidth_samples", ours_bw},
                    {"latency_us", ours_lat}}}};
      if (perftest_exe) {
        json theirs;
        if (!theirs_bw.empty()) {
          const double ratio = median(ours_bw) / median(theirs_bw);
          theirs["bandwidth_gbps"] = median(theirs_bw);
          theirs["bandwidth_samples"] = theirs_bw;
          row["ratio_bandwidth"] = ratio;
          if (bytes >= (1u << 20) && ratio < 0.8) met = false;
        }
        if (auto lat = perftest(*perftest_exe, t.tls, "tag_lat", bytes, n_lat, "overall_lat")) {
          theirs["latency_us"] = *lat;
          row["ratio_latency"] = ours_lat / *lat;
        }
        row["ucx_perftest"] = theirs;
      }
      rows.push_back(row);
    }
    json entry = {{"transport", t.name},
                  {"ucx_tls", t.tls},
                  {"set_up", t.listen ? "client-server (listener), peer failure detection"
                                      : "worker addresses exchanged over a pipe"},
                  {"sizes", rows}};
    if (perftest_exe) entry["target_met"] = met;
    out["transports"].push_back(entry);
  }
  out["seconds"] = std::chrono::duration<double>(clock_type::now() - started).count();
  if (std::ifstream load("/proc/loadavg"); load) {  // other work on the machine skews both sides
    double one_minute = 0;
    load >> one_minute;
    out["load_average_1m"] = one_minute;
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}
