#include "cli/chaos_garbage.hpp"

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <kj/exception.h>
#include <map>
#include <optional>

#include "cli/chaos_faults.hpp"
#include "protocol/api.capnp.h"

namespace moe::cli {

namespace {

using std::chrono::milliseconds;
using clock_type = std::chrono::steady_clock;
namespace rpc = capnp::rpc;
namespace wire = moe::protocol::capnp;

void put_u32(std::vector<char>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));  // little endian
}

void append_message(std::vector<char>& out, capnp::MessageBuilder& mb) {
  const auto words = capnp::messageToFlatArray(mb);
  const auto bytes = words.asBytes();
  out.insert(out.end(), bytes.begin(), bytes.end());
}

void append_bootstrap(std::vector<char>& out, uint32_t question) {
  capnp::MallocMessageBuilder mb;
  mb.initRoot<rpc::Message>().initBootstrap().setQuestionId(question);
  append_message(out, mb);
}

/// A call on the answer of the Bootstrap question (the Gateway), pipelined.
rpc::Call::Builder init_call(capnp::MallocMessageBuilder& mb, uint32_t question, uint32_t bootstrap_question,
                             uint64_t interface_id, uint16_t method) {
  auto call = mb.initRoot<rpc::Message>().initCall();
  call.setQuestionId(question);
  call.initTarget().initPromisedAnswer().setQuestionId(bootstrap_question);
  call.setInterfaceId(interface_id);
  call.setMethodId(method);
  return call;
}

/// Reads Cap'n Proto stream frames out of what the server sent, and says what they were.
class frame_reader {
 public:
  /// Takes newly received bytes; answers one line per complete message.
  std::vector<std::string> feed(const char* data, size_t size) {
    received_ += size;
    std::vector<std::string> out;
    if (!capnp_) return out;
    buf_.append(data, size);
    for (;;) {
      auto frame = take_frame();
      if (!frame) break;
      try {
        capnp::FlatArrayMessageReader reader(*frame);
        out.push_back(describe(reader.getRoot<rpc::Message>()));
      } catch (const kj::Exception& e) {
        // Not RPC after all (or a server that sends garbage back): stop parsing, keep counting.
        capnp_ = false;
        out.push_back(fmt::format("an unreadable message: {}", e.getDescription().cStr()));
        break;
      }
    }
    return out;
  }
  [[nodiscard]] size_t received() const noexcept { return received_; }
  [[nodiscard]] bool looks_like_capnp() const noexcept { return capnp_; }
  /// Answers received per question id: "results" or "exception: ...".
  [[nodiscard]] const std::map<uint32_t, std::string>& answers() const noexcept { return answers_; }
  [[nodiscard]] const std::optional<std::string>& abort_reason() const noexcept { return abort_; }

 private:
  static uint32_t u32_at(const std::string& b, size_t at) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(b[at + i])) << (8 * i);
    return v;
  }

  std::optional<kj::Array<capnp::word>> take_frame() {
    if (buf_.size() < 4) return std::nullopt;
    const uint64_t count = static_cast<uint64_t>(u32_at(buf_, 0)) + 1;
    if (count > 512) {
      capnp_ = false;
      return std::nullopt;
    }
    const size_t table = ((4 + 4 * count) + 7) / 8 * 8;
    if (buf_.size() < table) return std::nullopt;
    uint64_t words = 0;
    for (uint64_t i = 0; i < count; ++i) words += u32_at(buf_, 4 + 4 * i);
    const uint64_t total = table + 8 * words;
    if (total > (64u << 20)) {
      capnp_ = false;
      return std::nullopt;
    }
    if (buf_.size() < total) return std::nullopt;
    auto frame = kj::heapArray<capnp::word>(total / 8);
    std::memcpy(frame.begin(), buf_.data(), total);
    buf_.erase(0, total);
    return frame;
  }

  std::string describe(rpc::Message::Reader m) {
    switch (m.which()) {
      case rpc::Message::ABORT:
        abort_ = m.getAbort().getReason().cStr();
        return fmt::format("abort: {}", *abort_);
      case rpc::Message::RETURN: {
        auto r = m.getReturn();
        std::string what;
        switch (r.which()) {
          case rpc::Return::RESULTS: what = "results"; break;
          case rpc::Return::EXCEPTION: what = fmt::format("exception: {}", r.getException().getReason().cStr()); break;
          case rpc::Return::CANCELED: what = "canceled"; break;
          default: what = fmt::format("return kind {}", static_cast<int>(r.which())); break;
        }
        answers_[r.getAnswerId()] = what;
        return fmt::format("return {}: {}", r.getAnswerId(), what);
      }
      default: return fmt::format("message kind {}", static_cast<int>(m.which()));
    }
  }

  std::string buf_;
  size_t received_ = 0;
  bool capnp_ = true;
  std::map<uint32_t, std::string> answers_;
  std::optional<std::string> abort_;
};

int ms_since(clock_type::time_point t0) {
  return static_cast<int>(std::chrono::duration_cast<milliseconds>(clock_type::now() - t0).count());
}

enum class wait_result { closed, reset, answered, timed_out };

/// Reads until the server closes, resets, answers every question in `questions` (when any), or
/// `timeout` passes.
wait_result wait_for_reaction(int fd, frame_reader& reader, const std::vector<uint32_t>& questions,
                              milliseconds timeout) {
  const auto deadline = clock_type::now() + timeout;
  char buf[8192];
  for (;;) {
    if (!questions.empty()) {
      bool all = true;
      for (auto q : questions) all = all && reader.answers().count(q) > 0;
      if (all) return wait_result::answered;
    }
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - clock_type::now()).count();
    if (left <= 0) return wait_result::timed_out;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      reader.feed(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) return wait_result::closed;
    if (errno == EINTR) continue;
    return wait_result::reset;
  }
}

}  // namespace

const char* to_string(garbage_kind k) noexcept {
  switch (k) {
    case garbage_kind::truncated: return "truncated";
    case garbage_kind::oversized: return "oversized";
    case garbage_kind::random: return "random";
    case garbage_kind::wrong_version: return "wrong-version";
  }
  return "unknown";
}

caf::expected<std::vector<garbage_kind>> parse_garbage_kinds(const std::string& text) {
  const garbage_kind all[] = {garbage_kind::truncated, garbage_kind::oversized, garbage_kind::random,
                              garbage_kind::wrong_version};
  if (text == "all") return std::vector<garbage_kind>(std::begin(all), std::end(all));
  std::vector<garbage_kind> out;
  size_t begin = 0;
  for (;;) {
    const auto comma = text.find(',', begin);
    const std::string name = text.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    const auto* k = std::find_if(std::begin(all), std::end(all), [&](auto kind) { return name == to_string(kind); });
    if (k == std::end(all))
      return make_error(chaos_errc::bad_request,
                        fmt::format("--kind {}: expected truncated, oversized, random, wrong-version (or a "
                                    "comma-separated list of them) or all",
                                    text));
    out.push_back(*k);
    if (comma == std::string::npos) return out;
    begin = comma + 1;
  }
}

std::vector<garbage_frame> make_garbage(garbage_kind kind, uint64_t seed, const std::string& secret) {
  std::vector<garbage_frame> out;
  switch (kind) {
    case garbage_kind::truncated: {
      // The table announces 4 segments but stops after the first size.
      garbage_frame table{"truncated-table", {}, {}};
      put_u32(table.bytes, 3);
      put_u32(table.bytes, 4);
      out.push_back(std::move(table));
      // One segment of 8 words (64 bytes) of which 20 arrive.
      garbage_frame segment{"truncated-segment", {}, {}};
      put_u32(segment.bytes, 0);
      put_u32(segment.bytes, 8);
      segment.bytes.resize(segment.bytes.size() + 20, '\0');
      out.push_back(std::move(segment));
      break;
    }
    case garbage_kind::oversized: {
      // 2^32 segments: Cap'n Proto allows 512.
      garbage_frame count{"oversized-segment-count", {}, {}};
      put_u32(count.bytes, 0xfffffffe);
      count.bytes.resize(64, '\0');
      out.push_back(std::move(count));
      // One segment of 2^31 - 1 words (16 GiB) followed by 64 bytes: a reader that allocated
      // what the table says, or waited for it, would be at the sender's mercy.
      garbage_frame size{"oversized-segment-size", {}, {}};
      put_u32(size.bytes, 0);
      put_u32(size.bytes, 0x7fffffff);
      size.bytes.resize(size.bytes.size() + 64, '\x5a');
      out.push_back(std::move(size));
      break;
    }
    case garbage_kind::random: {
      garbage_frame r{"random", {}, {}};
      uint64_t state = seed;
      for (int i = 0; i < 512 / 4; ++i) put_u32(r.bytes, static_cast<uint32_t>(splitmix64(state)));
      out.push_back(std::move(r));
      break;
    }
    case garbage_kind::wrong_version: {
      // Well-formed RPC that asks for what does not exist: every call must come back an error.
      garbage_frame w{"wrong-version", {}, {1, 2, 3}};
      append_bootstrap(w.bytes, 0);
      const uint64_t gateway = capnp::typeId<wire::Gateway>();
      {
        capnp::MallocMessageBuilder mb;
        auto call = init_call(mb, 1, 0, gateway, 0);
        auto login = call.initParams().getContent().initAs<wire::Gateway::LoginParams>();
        login.setSecret(secret);
        login.setClientVersion(static_cast<uint16_t>(wire::API_VERSION + 1000));
        append_message(w.bytes, mb);
      }
      {
        capnp::MallocMessageBuilder mb;
        init_call(mb, 2, 0, gateway, 77).initParams().getContent().clear();  // no such method
        append_message(w.bytes, mb);
      }
      {
        capnp::MallocMessageBuilder mb;
        init_call(mb, 3, 0, 0x0123456789abcdefULL, 0).initParams().getContent().clear();  // no such interface
        append_message(w.bytes, mb);
      }
      out.push_back(std::move(w));
      break;
    }
  }
  return out;
}

garbage_outcome send_garbage(const host_port& target, const garbage_frame& frame, milliseconds timeout) {
  garbage_outcome o{frame.variant, 0, false, ""};
  const auto t0 = clock_type::now();
  auto fd = connect_tcp(target, timeout);
  if (!fd) {
    o.what = error_text(fd.error());
    return o;
  }
  frame_reader reader;
  if (!send_all(fd->get(), frame.bytes.data(), frame.bytes.size())) {
    // The server dropped us before we finished: a rejection too.
    o.rejected = true;
    o.what = fmt::format("the server closed the connection while we sent ({} ms)", ms_since(t0));
    return o;
  }
  o.bytes_sent = frame.bytes.size();
  auto r = wait_for_reaction(fd->get(), reader, frame.questions, timeout);
  bool after_eof = false;
  if (r == wait_result::timed_out) {
    // A frame cut short leaves a correct server waiting for the rest: our EOF must end it.
    ::shutdown(fd->get(), SHUT_WR);
    after_eof = true;
    r = wait_for_reaction(fd->get(), reader, frame.questions, timeout);
  }
  std::string answered;
  bool all_errors = !reader.answers().empty();
  for (auto q : frame.questions) {
    auto it = reader.answers().find(q);
    const std::string a = it == reader.answers().end() ? "no answer" : it->second;
    all_errors = all_errors && a.starts_with("exception: ");
    answered += fmt::format("{}call {}: {}", answered.empty() ? "" : "; ", q, a);
  }
  const std::string when = after_eof ? fmt::format("only after our EOF ({} ms)", ms_since(t0))
                                     : fmt::format("at once ({} ms)", ms_since(t0));
  switch (r) {
    case wait_result::closed: o.what = "closed by the server " + when; break;
    case wait_result::reset: o.what = "reset by the server " + when; break;
    case wait_result::answered: o.what = "answered " + when; break;
    case wait_result::timed_out:
      o.what = fmt::format("no reaction in {} ms, even after our EOF: the server holds the connection",
                           ms_since(t0));
      break;
  }
  o.rejected = r == wait_result::closed || r == wait_result::reset || (r == wait_result::answered && all_errors);
  if (reader.abort_reason()) o.what += fmt::format("; abort: {}", *reader.abort_reason());
  if (!frame.questions.empty()) o.what += "; " + answered;
  if (!reader.looks_like_capnp() && reader.received() > 0)
    o.what += fmt::format("; received {} bytes that are not Cap'n Proto RPC", reader.received());
  return o;
}

probe_outcome probe_server(const host_port& target, milliseconds timeout) {
  const auto t0 = clock_type::now();
  auto fd = connect_tcp(target, timeout);
  if (!fd) return {false, error_text(fd.error())};
  frame_reader reader;
  // A CAF node greets first (its BASP handshake); a Cap'n Proto server waits to be asked.
  auto r = wait_for_reaction(fd->get(), reader, {}, std::min(timeout, milliseconds(300)));
  if (reader.received() > 0)
    return {true, fmt::format("a new connection was greeted with {} bytes ({} ms)", reader.received(), ms_since(t0))};
  if (r == wait_result::closed || r == wait_result::reset)
    return {false, "a new connection was closed at once"};
  std::vector<char> boot;
  append_bootstrap(boot, 0);
  if (!send_all(fd->get(), boot.data(), boot.size())) return {false, "a new connection was closed at once"};
  r = wait_for_reaction(fd->get(), reader, {0}, timeout);
  if (r == wait_result::answered)
    return {true, fmt::format("a new connection's RPC Bootstrap was answered ({}, {} ms)", reader.answers().at(0),
                              ms_since(t0))};
  return {false, fmt::format("a new connection's RPC Bootstrap got no answer ({})",
                             r == wait_result::timed_out ? "timed out" : "closed")};
}

}  // namespace moe::cli
