#include "cli/chaos_socket.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "cli/chaos_faults.hpp"

namespace moe::cli {

void unique_fd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string host_port::to_string() const {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
}

caf::expected<host_port> parse_host_port(const std::string& text, bool allow_zero) {
  auto bad = [&] {
    return make_error(chaos_errc::bad_request,
                      fmt::format("'{}' is not HOST:PORT (e.g. 127.0.0.1:7101 or [::1]:7101)", text));
  };
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) return bad();
  std::string host = text.substr(0, colon);
  if (host.find(':') != std::string::npos) {
    if (host.front() != '[' || host.back() != ']') return bad();
    host = host.substr(1, host.size() - 2);
  }
  const std::string port_text = text.substr(colon + 1);
  if (port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos) return bad();
  const unsigned long port = std::stoul(port_text);
  if (port > 65535 || (port == 0 && !allow_zero)) return bad();
  return host_port{host, static_cast<uint16_t>(port)};
}

namespace {

struct addrinfo_deleter {
  void operator()(addrinfo* a) const noexcept { ::freeaddrinfo(a); }
};
using addrinfo_ptr = std::unique_ptr<addrinfo, addrinfo_deleter>;

caf::expected<addrinfo_ptr> resolve(const host_port& at, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* out = nullptr;
  const std::string port = std::to_string(at.port);
  if (const int rc = ::getaddrinfo(at.host.c_str(), port.c_str(), &hints, &out); rc != 0)
    return make_error(chaos_errc::bad_request, fmt::format("cannot resolve {}: {}", at.host, ::gai_strerror(rc)));
  return addrinfo_ptr{out};
}

}  // namespace

caf::expected<unique_fd> listen_tcp(const host_port& at) {
  auto ai = resolve(at, true);
  if (!ai) return ai.error();
  std::string last = "no address";
  for (addrinfo* a = ai->get(); a != nullptr; a = a->ai_next) {
    unique_fd fd{::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol)};
    if (!fd) continue;
    const int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd.get(), 128) == 0) return fd;
    last = std::strerror(errno);
  }
  return make_error(chaos_errc::io_error, fmt::format("cannot listen on {}: {}", at.to_string(), last));
}

uint16_t local_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return 0;
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return 0;
}

caf::expected<unique_fd> connect_tcp(const host_port& to, std::chrono::milliseconds timeout) {
  auto ai = resolve(to, false);
  if (!ai) return ai.error();
  std::string last = "no address";
  for (addrinfo* a = ai->get(); a != nullptr; a = a->ai_next) {
    unique_fd fd{::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol)};
    if (!fd) continue;
    int rc = ::connect(fd.get(), a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      rc = ::poll(&p, 1, static_cast<int>(timeout.count()));
      if (rc == 0) {
        last = fmt::format("no answer within {} ms", timeout.count());
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc != 0) {
      last = std::strerror(errno);
      continue;
    }
    ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
    const int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
  }
  return make_error(chaos_errc::io_error, fmt::format("cannot connect to {}: {}", to.to_string(), last));
}

bool send_all(int fd, const void* data, size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace moe::cli
