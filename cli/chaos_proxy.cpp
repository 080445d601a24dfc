#include "cli/chaos_proxy.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include "cli/chaos_faults.hpp"

namespace moe::cli {

namespace {

using clock_type = std::chrono::steady_clock;

}  // namespace

bit_flipper::bit_flipper(double rate, uint64_t seed) : rate_(rate), state_(seed) { until_next_ = next_skip(); }

uint64_t bit_flipper::next_skip() {
  if (rate_ <= 0) return std::numeric_limits<uint64_t>::max();
  if (rate_ >= 1) return 0;
  // Geometric gap between flipped bytes: the same as deciding every byte with probability
  // `rate`, at the cost of one draw per flip.
  const double u = (static_cast<double>(splitmix64(state_) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
  const double gap = std::floor(std::log(u) / std::log1p(-rate_));
  return gap >= 1.8e19 ? std::numeric_limits<uint64_t>::max() : static_cast<uint64_t>(gap);
}

size_t bit_flipper::apply(char* data, size_t size) {
  size_t flipped = 0;
  size_t at = 0;
  while (at < size) {
    if (until_next_ >= size - at) {
      if (until_next_ != std::numeric_limits<uint64_t>::max()) until_next_ -= size - at;
      break;
    }
    at += until_next_;
    data[at] = static_cast<char>(static_cast<unsigned char>(data[at]) ^ (1u << (splitmix64(state_) % 8)));
    ++flipped;
    ++at;
    until_next_ = next_skip();
  }
  return flipped;
}

struct chaos_proxy::impl {
  proxy_options options;
  log_function log;
  std::mutex log_mutex;
  unique_fd listener;
  unique_fd wake;  ///< eventfd: readable once stop() was called.
  std::atomic<bool> stopping{false};
  std::thread acceptor;
  struct connection {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  std::mutex connections_mutex;
  std::list<connection> connections;

  void say(const std::string& line) {
    std::lock_guard guard{log_mutex};
    if (log) log(line);
  }

  void accept_loop();
  void relay(uint64_t index, unique_fd client, std::string peer);
  void reap_finished();
};

namespace {

/// One direction of a relayed connection.
struct direction_state {
  direction_state(const char* n, int f, int t, bit_flipper b) : name(n), from(f), to(t), flipper(b) {}
  const char* name;  ///< "to server" / "to client"
  int from = -1, to = -1;
  bit_flipper flipper;
  struct chunk {
    std::vector<char> bytes;
    clock_type::time_point due;
  };
  std::deque<chunk> queue;
  bool eof = false;        ///< `from` said EOF (or failed)
  bool half_closed = false;  ///< EOF passed on to `to`
  uint64_t bytes = 0;
  uint64_t flips = 0;
};

std::string peer_name(const sockaddr_storage& ss) {
  char host[64] = "?";
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return host_port{host, port}.to_string();
}

}  // namespace

void chaos_proxy::impl::reap_finished() {
  std::lock_guard guard{connections_mutex};
  for (auto it = connections.begin(); it != connections.end();) {
    if (it->done.load()) {
      it->thread.join();
      it = connections.erase(it);
    } else {
      ++it;
    }
  }
}

void chaos_proxy::impl::accept_loop() {
  uint64_t next_index = 0;
  while (!stopping.load()) {
    pollfd p[2] = {{listener.get(), POLLIN, 0}, {wake.get(), POLLIN, 0}};
    if (::poll(p, 2, 1000) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    reap_finished();
    if (p[1].revents != 0 || stopping.load()) break;
    if ((p[0].revents & POLLIN) == 0) continue;
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    unique_fd client{::accept4(listener.get(), reinterpret_cast<sockaddr*>(&ss), &len, SOCK_CLOEXEC)};
    if (!client) continue;
    const uint64_t index = ++next_index;
    std::lock_guard guard{connections_mutex};
    auto& c = connections.emplace_back();
    c.thread = std::thread([this, index, fd = std::move(client), peer = peer_name(ss), &c]() mutable {
      relay(index, std::move(fd), std::move(peer));
      c.done.store(true);
    });
  }
}

void chaos_proxy::impl::relay(uint64_t index, unique_fd client, std::string peer) {
  using std::chrono::milliseconds;
  auto server = connect_tcp(options.target, milliseconds(5000));
  if (!server) {
    say(fmt::format("conn {} from {}: {}; closing the client", index, peer, error_text(server.error())));
    return;
  }
  const int one = 1;
  ::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  say(fmt::format("conn {} from {}: open", index, peer));
  auto rate_for = [&](proxy_direction d) {
    return options.corrupt_direction == proxy_direction::both || options.corrupt_direction == d
               ? options.corrupt_rate
               : 0.0;
  };
  // Seeds differ per connection and direction but follow from --seed alone.
  direction_state dirs[2] = {
      {"to server", client.get(), server->get(), bit_flipper(rate_for(proxy_direction::to_server),
                                                             options.seed * 1000003 + index * 2)},
      {"to client", server->get(), client.get(), bit_flipper(rate_for(proxy_direction::to_client),
                                                             options.seed * 1000003 + index * 2 + 1)},
  };
  const milliseconds delay{options.delay_ms};
  uint64_t forwarded = 0;
  std::string ended;
  const char* first_eof = nullptr;
  std::vector<char> buf(16384);
  while (ended.empty()) {
    const auto now = clock_type::now();
    int timeout_ms = 1000;
    for (auto& d : dirs) {
      if (!d.queue.empty()) {
        const auto wait = std::chrono::duration_cast<milliseconds>(d.queue.front().due - now).count() + 1;
        timeout_ms = std::min<int>(timeout_ms, static_cast<int>(std::max<int64_t>(0, wait)));
      }
    }
    pollfd p[3] = {{dirs[0].eof ? -1 : dirs[0].from, POLLIN, 0},
                   {dirs[1].eof ? -1 : dirs[1].from, POLLIN, 0},
                   {wake.get(), POLLIN, 0}};
    if (::poll(p, 3, timeout_ms) < 0) {
      if (errno == EINTR) continue;
      ended = fmt::format("poll failed: {}", std::strerror(errno));
      break;
    }
    if (p[2].revents != 0) {
      ended = "proxy stopping";
      break;
    }
    for (int i = 0; i < 2 && ended.empty(); ++i) {
      auto& d = dirs[i];
      if (d.eof || p[i].revents == 0) continue;
      const ssize_t n = ::recv(d.from, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        d.eof = true;
        if (n < 0) ended = fmt::format("{} side failed: {}", i == 0 ? "client" : "server", std::strerror(errno));
        continue;
      }
      direction_state::chunk c{{buf.begin(), buf.begin() + n}, clock_type::now() + delay};
      d.flips += d.flipper.apply(c.bytes.data(), c.bytes.size());
      d.queue.push_back(std::move(c));
    }
    // Forward what is due, in order; cut the connection at --drop-after.
    const auto after = clock_type::now();
    for (auto& d : dirs) {
      while (ended.empty() && !d.queue.empty() && d.queue.front().due <= after) {
        auto& c = d.queue.front();
        size_t size = c.bytes.size();
        bool cut = false;
        if (options.drop_after_bytes && forwarded + size >= *options.drop_after_bytes) {
          size = static_cast<size_t>(*options.drop_after_bytes - forwarded);
          cut = true;
        }
        if (size > 0 && !send_all(d.to, c.bytes.data(), size)) {
          ended = fmt::format("{}: the receiving side is gone", d.name);
          break;
        }
        forwarded += size;
        d.bytes += size;
        d.queue.pop_front();
        if (cut) ended = fmt::format("cut after {} bytes (--drop-after)", forwarded);
      }
      if (ended.empty() && d.eof && d.queue.empty() && !d.half_closed) {
        ::shutdown(d.to, SHUT_WR);  // pass the EOF on: the other direction may still carry data
        d.half_closed = true;
      }
    }
    if (first_eof == nullptr) {
      if (dirs[0].eof) first_eof = "the client";
      else if (dirs[1].eof) first_eof = "the server";
    }
    if (ended.empty() && dirs[0].half_closed && dirs[1].half_closed) ended = fmt::format("closed by {}", first_eof);
  }
  ::shutdown(client.get(), SHUT_RDWR);
  ::shutdown(server->get(), SHUT_RDWR);
  say(fmt::format("conn {} from {}: {}; to server {} B ({} bits flipped), to client {} B ({} bits flipped)", index,
                  peer, ended, dirs[0].bytes, dirs[0].flips, dirs[1].bytes, dirs[1].flips));
}

chaos_proxy::chaos_proxy(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

caf::expected<std::unique_ptr<chaos_proxy>> chaos_proxy::start(const proxy_options& o, log_function log) {
  if (!(o.corrupt_rate >= 0 && o.corrupt_rate <= 1))
    return make_error(chaos_errc::bad_request, fmt::format("--corrupt-rate {} is not in [0, 1]", o.corrupt_rate));
  auto p = std::make_unique<impl>();
  p->options = o;
  p->log = std::move(log);
  auto listener = listen_tcp(o.listen);
  if (!listener) return listener.error();
  p->listener = std::move(*listener);
  p->wake = unique_fd{::eventfd(0, EFD_CLOEXEC)};
  if (!p->wake) return make_error(chaos_errc::io_error, std::string("eventfd: ") + std::strerror(errno));
  auto* raw = p.get();
  p->acceptor = std::thread([raw] { raw->accept_loop(); });
  return std::unique_ptr<chaos_proxy>(new chaos_proxy(std::move(p)));
}

uint16_t chaos_proxy::port() const noexcept { return local_port(impl_->listener.get()); }

void chaos_proxy::stop() {
  if (impl_->stopping.exchange(true)) return;
  const uint64_t one = 1;
  // Every thread polls the eventfd: one write wakes them all (it stays readable).
  [[maybe_unused]] const auto n = ::write(impl_->wake.get(), &one, sizeof one);
  if (impl_->acceptor.joinable()) impl_->acceptor.join();
  std::lock_guard guard{impl_->connections_mutex};
  for (auto& c : impl_->connections) c.thread.join();
  impl_->connections.clear();
}

chaos_proxy::~chaos_proxy() { stop(); }

}  // namespace moe::cli
