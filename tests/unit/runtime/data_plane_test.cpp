// The UCX data plane for real: two planes in one process over 127.0.0.1 (tcp, and shared memory
// through worker addresses), raw UCX messages injected as a hostile peer would, and a second
// process (tests/tools/data_plane_peer.cpp) over tcp and over pure shared memory.
// No timing assertions anywhere: every wait is bounded only so that a bug fails, never hangs.
#include "runtime/data_plane.hpp"

#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <cstring>
#include <fcntl.h>
#include <future>
#include <map>
#include <optional>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "runtime/ucx/ucx.hpp"

extern char** environ;

using namespace moe::runtime;
namespace tag = data_plane_tag;
using moe::protocol::tensor_frame_header;
using namespace std::chrono_literals;

namespace {

constexpr auto bound = 30s;  // only ever reached by a bug

// One callback's result, waited for with a bound.
template <class T>
class result_of {
 public:
  [[nodiscard]] auto callback() {
    return [p = promise_](T v) { p->set_value(std::move(v)); };
  }
  std::optional<T> wait() {
    if (future_.wait_for(bound) != std::future_status::ready) return std::nullopt;
    return future_.get();
  }
  [[nodiscard]] bool ready() const { return future_.wait_for(0s) == std::future_status::ready; }

 private:
  std::shared_ptr<std::promise<T>> promise_ = std::make_shared<std::promise<T>>();
  std::future<T> future_ = promise_->get_future();
};
using send_result = result_of<caf::error>;
using receive_result = result_of<caf::expected<tensor_frame_header>>;

struct transport {
  const char* name;
  const char* tls;
  bool listen;
  bool detect_peer_failure;  // UCX 1.13 can only with tcp
};
void PrintTo(const transport& t, std::ostream* os) {
  *os << t.name;
}  // readable test names

const transport tcp{"tcp", "tcp", true, true};
// Client-server set-up over tcp, then shared memory (sysv, cma) for the frames.
const transport sockaddr_shm{"sockaddr_shm", "tcp,sm", true, false};
// No tcp at all: worker addresses exchanged out of band.
const transport shm_only{"shm_only", "sm", false, false};

data_plane_options options_for(const transport& t) {
  data_plane_options o;
  o.tls = t.tls;
  o.listen = t.listen;
  o.detect_peer_failure = t.detect_peer_failure;
  o.drain_timeout = 30s;
  return o;
}

std::unique_ptr<data_plane> start_plane(data_plane_options o) {
  auto p = data_plane::start(std::move(o));
  if (!p) {
    ADD_FAILURE() << moe::error_text(p.error());
    return nullptr;
  }
  return std::move(*p);
}

std::vector<std::byte> pattern(size_t n, uint64_t seed) {
  std::vector<std::byte> v(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return v;
}

// A (rows, hidden) float32 activation frame of `from`, with its routing metadata.
tensor_frame_header activations(data_plane& from, uint64_t rows, uint64_t hidden) {
  tensor_frame_header h;
  h.kind = moe::protocol::frame_kind::activations;
  h.dt = moe::kernels::dtype::f32;
  h.shape = {rows, hidden};
  h.layer = 3;
  h.step = 42;
  h.placement_version = 7;
  for (uint32_t r = 0; r < rows; ++r) {
    h.token_indices.push_back(2 * r + 1);
    h.expert_indices.push_back(r % 256);
  }
  h.transfer_tag = from.next_transfer_tag();
  h.byte_length = rows * hidden * sizeof(float);
  return h;
}

void expect_same_header(const tensor_frame_header& got, const tensor_frame_header& want) {
  EXPECT_EQ(got.kind, want.kind);
  EXPECT_EQ(got.dt, want.dt);
  EXPECT_EQ(got.shape, want.shape);
  EXPECT_EQ(got.layer, want.layer);
  EXPECT_EQ(got.step, want.step);
  EXPECT_EQ(got.placement_version, want.placement_version);
  EXPECT_EQ(got.token_indices, want.token_indices);
  EXPECT_EQ(got.expert_indices, want.expert_indices);
  EXPECT_EQ(got.transfer_tag, want.transfer_tag);
  EXPECT_EQ(got.byte_length, want.byte_length);
}

bool has_code(const caf::error& e, data_plane_errc code) {
  return e.category() == caf::atom("data_plane") && e.code() == static_cast<uint8_t>(code);
}

struct plane_pair {
  std::unique_ptr<data_plane> a, b;
  data_plane::peer_id a_to_b = 0, b_to_a = 0;
};

plane_pair connect_pair(data_plane_options oa, data_plane_options ob) {
  plane_pair p;
  p.a = start_plane(std::move(oa));
  p.b = start_plane(std::move(ob));
  if (!p.a || !p.b) return {};
  auto ab = p.a->connect(p.b->address());
  auto ba = p.b->connect(p.a->address());
  EXPECT_TRUE(ab && ba);
  if (!ab || !ba) return {};
  p.a_to_b = *ab;
  p.b_to_a = *ba;
  return p;
}

}  // namespace

// --- two planes, one process --------------------------------------------------------------------

class data_plane_transports : public testing::TestWithParam<transport> {};

INSTANTIATE_TEST_SUITE_P(loopback, data_plane_transports,
                         testing::Values(tcp, sockaddr_shm, shm_only),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_P(data_plane_transports, activation_frames_arrive_bit_exact_in_posted_buffers) {
  auto p = connect_pair(options_for(GetParam()), options_for(GetParam()));
  ASSERT_TRUE(p.a);
  // (rows, hidden): empty, one row, odd, eager-sized, rendezvous-sized, 64 MiB.
  const std::pair<uint64_t, uint64_t> shapes[] = {{0, 7168}, {1, 7168},  {3, 5},
                                                  {16, 256}, {64, 7168}, {2048, 8192}};
  for (auto [rows, hidden] : shapes) {
    SCOPED_TRACE(testing::Message() << rows << " x " << hidden);
    const auto h = activations(*p.a, rows, hidden);
    const auto sent = pattern(h.byte_length, rows);
    std::vector<std::byte> buffer(h.byte_length);
    receive_result received;
    send_result send_done;
    ASSERT_FALSE(p.b->post_receive(h.transfer_tag, buffer, received.callback()));
    ASSERT_FALSE(p.a->send(p.a_to_b, h, sent, send_done.callback()));
    auto got = received.wait();
    ASSERT_TRUE(got) << "receive did not complete";
    ASSERT_TRUE(*got) << moe::error_text(got->error());
    expect_same_header(**got, h);
    EXPECT_TRUE(buffer == sent) << "payload differs";
    auto s = send_done.wait();
    ASSERT_TRUE(s);
    EXPECT_FALSE(*s) << moe::error_text(*s);
  }
  EXPECT_EQ(p.b->stats().num_frames_received, std::size(shapes));
  EXPECT_EQ(p.a->stats().num_frames_sent, std::size(shapes));
  EXPECT_EQ(p.b->stats().num_frames_rejected, 0u);
}

TEST_P(data_plane_transports, many_concurrent_transfers_in_both_directions) {
  auto p = connect_pair(options_for(GetParam()), options_for(GetParam()));
  ASSERT_TRUE(p.a);
  constexpr int frames_per_thread = 24;
  struct transfer {
    tensor_frame_header header;
    std::vector<std::byte> sent, buffer;
    send_result sent_done;
    receive_result received;
  };
  // Two submitting threads per direction; sizes from 0 to 1 MiB, eager and rendezvous mixed.
  auto run = [&](data_plane& from, data_plane::peer_id to, data_plane& at, int seed) {
    std::vector<std::unique_ptr<transfer>> ts;
    for (int i = 0; i < frames_per_thread; ++i) {
      auto t = std::make_unique<transfer>();
      const uint64_t rows = (i * 7 + seed) % 33;
      t->header = activations(from, rows, i % 3 == 0 ? 8192 : 96);
      t->sent = pattern(t->header.byte_length, seed * 1000 + i);
      t->buffer.resize(t->header.byte_length);
      auto post = [&] {
        EXPECT_FALSE(at.post_receive(t->header.transfer_tag, t->buffer, t->received.callback()));
      };
      // Half the receives are posted after their frame was sent: the header waits for them.
      if (i % 2 == 0) post();
      EXPECT_FALSE(from.send(to, t->header, t->sent, t->sent_done.callback()));
      if (i % 2 == 1) post();
      ts.push_back(std::move(t));
    }
    return ts;
  };
  std::vector<std::unique_ptr<transfer>> all[4];
  std::thread threads[] = {
      std::thread([&] { all[0] = run(*p.a, p.a_to_b, *p.b, 1); }),
      std::thread([&] { all[1] = run(*p.a, p.a_to_b, *p.b, 2); }),
      std::thread([&] { all[2] = run(*p.b, p.b_to_a, *p.a, 3); }),
      std::thread([&] { all[3] = run(*p.b, p.b_to_a, *p.a, 4); }),
  };
  for (auto& t : threads) t.join();
  for (auto& ts : all) {
    for (auto& t : ts) {
      auto got = t->received.wait();
      ASSERT_TRUE(got) << "receive did not complete";
      ASSERT_TRUE(*got) << moe::error_text(got->error());
      expect_same_header(**got, t->header);
      EXPECT_TRUE(t->buffer == t->sent);
      auto s = t->sent_done.wait();
      ASSERT_TRUE(s);
      EXPECT_FALSE(*s);
    }
  }
  EXPECT_EQ(p.a->stats().num_frames_received + p.b->stats().num_frames_received,
            4u * frames_per_thread);
}

TEST(data_plane, a_frame_that_does_not_fit_the_posted_buffer_is_refused_without_writing) {
  auto p = connect_pair(options_for(tcp), options_for(tcp));
  ASSERT_TRUE(p.a);
  for (uint64_t rows : {1u, 1024u}) {  // eager and rendezvous payloads
    SCOPED_TRACE(rows);
    const auto h = activations(*p.a, rows, 1024);
    const auto sent = pattern(h.byte_length, 9);
    std::vector<std::byte> buffer(h.byte_length / 2, std::byte{0xab});
    const auto untouched = buffer;
    receive_result received;
    send_result send_done;
    ASSERT_FALSE(p.b->post_receive(h.transfer_tag, buffer, received.callback()));
    ASSERT_FALSE(p.a->send(p.a_to_b, h, sent, send_done.callback()));
    auto got = received.wait();
    ASSERT_TRUE(got);
    ASSERT_FALSE(*got);
    EXPECT_TRUE(has_code(got->error(), data_plane_errc::size_mismatch))
        << moe::error_text(got->error());
    // The payload is discarded, so the sender is not left waiting for a receiver.
    ASSERT_TRUE(send_done.wait());
    EXPECT_TRUE(buffer == untouched) << "a refused frame wrote into the buffer";
  }
  EXPECT_EQ(p.b->stats().num_frames_rejected, 2u);

  // The plane is unharmed: the next frame arrives.
  const auto h = activations(*p.a, 4, 1024);
  const auto sent = pattern(h.byte_length, 10);
  std::vector<std::byte> buffer(h.byte_length);
  receive_result received;
  send_result send_done;
  ASSERT_FALSE(p.b->post_receive(h.transfer_tag, buffer, received.callback()));
  ASSERT_FALSE(p.a->send(p.a_to_b, h, sent, send_done.callback()));
  auto got = received.wait();
  ASSERT_TRUE(got && *got);
  EXPECT_TRUE(buffer == sent);
}

TEST(data_plane, malformed_oversized_and_truncated_frames_are_rejected_and_counted) {
  // A raw UCX client plays a broken or hostile peer, sending straight into the tag spaces.
  auto o = options_for(tcp);
  o.max_header_bytes = 1024;
  std::unique_ptr<data_plane> plane = start_plane(o);
  ASSERT_TRUE(plane);
  const auto& addr = plane->address();
  const auto port = static_cast<uint16_t>(
      std::stoul(addr.substr(addr.find(':') + 1, addr.find('/') - addr.find(':') - 1)));
  // Declared in this order so that the rogue is gone (its sockets closed) before the plane
  // stops: nobody would progress its side of a graceful close.
  auto ctx = ucx::context::create();
  ASSERT_TRUE(ctx);
  auto w = ucx::worker::create(*ctx);
  ASSERT_TRUE(w);
  auto ep = ucx::endpoint::connect(*w, "127.0.0.1", port);
  ASSERT_TRUE(ep) << moe::error_text(ep.error());
  auto raw_send = [&](std::span<const std::byte> bytes, uint64_t ucx_tag) {
    auto r = ep->tag_send(bytes, ucx_tag);
    ASSERT_TRUE(r);
    EXPECT_FALSE(r->wait({&*w}, 200'000'000));
  };
  constexpr uint32_t rogue_plane = 0x1234;
  const auto garbage = pattern(64, 1);
  const auto huge = pattern(4096, 2);
  tensor_frame_header h;
  h.dt = moe::kernels::dtype::u8;
  h.shape = {16};
  h.byte_length = 16;
  std::vector<uint64_t> tags;
  for (uint64_t seq = 1; seq <= 4; ++seq) tags.push_back(tag::make(rogue_plane, seq));
  raw_send(garbage, tag::header_bit | tags[0]);  // not Cap'n Proto
  raw_send(huge, tag::header_bit | tags[1]);     // above max_header_bytes
  h.transfer_tag = tags[2];                      // payload longer than its header says
  raw_send(moe::protocol::encode_frame_header(h), tag::header_bit | tags[2]);
  raw_send(pattern(32, 3), tags[2]);
  h.transfer_tag = tags[3];  // payload shorter than its header says
  raw_send(moe::protocol::encode_frame_header(h), tag::header_bit | tags[3]);
  raw_send(pattern(8, 4), tags[3]);

  for (uint64_t t : tags) {
    SCOPED_TRACE(tag::sequence_of(t));
    std::vector<std::byte> buffer(16, std::byte{0xcd});
    receive_result received;
    ASSERT_FALSE(plane->post_receive(t, buffer, received.callback()));
    for (int spin = 0; spin < 1000 && !received.ready(); ++spin) {
      w->progress();  // the rogue's side of a rendezvous, if UCX picked one
      std::this_thread::sleep_for(1ms);
    }
    auto got = received.wait();
    ASSERT_TRUE(got);
    ASSERT_FALSE(*got);
    EXPECT_TRUE(has_code(got->error(), data_plane_errc::rejected_frame))
        << moe::error_text(got->error());
  }
  EXPECT_EQ(plane->stats().num_frames_rejected, 4u);
  EXPECT_EQ(plane->stats().num_frames_received, 0u);
}

TEST(data_plane, a_stopping_peer_fails_the_receives_still_waiting_for_it) {
  auto p = connect_pair(options_for(tcp), options_for(tcp));
  ASSERT_TRUE(p.a);
  std::vector<tensor_frame_header> headers;
  std::vector<std::vector<std::byte>> buffers(4, std::vector<std::byte>(4096));
  receive_result received[4];
  for (int i = 0; i < 4; ++i) {
    headers.push_back(activations(*p.a, 1, 1024));
    ASSERT_FALSE(p.b->post_receive(headers[i].transfer_tag, buffers[i], received[i].callback()));
  }
  const auto payload = pattern(4096, 5);
  for (int i = 0; i < 2; ++i) {
    send_result s;
    ASSERT_FALSE(p.a->send(p.a_to_b, headers[i], payload, s.callback()));
    auto got = received[i].wait();
    ASSERT_TRUE(got && *got);
  }
  p.a->stop();  // frames 2 and 3 will never come
  for (int i = 2; i < 4; ++i) {
    auto got = received[i].wait();
    ASSERT_TRUE(got) << "a receive from a stopped peer hung";
    ASSERT_FALSE(*got);
    EXPECT_TRUE(has_code(got->error(), data_plane_errc::peer_lost))
        << moe::error_text(got->error());
  }
  // Later receives from it, and sends to it, fail at once instead of waiting forever.
  receive_result late;
  std::vector<std::byte> buffer(4);
  ASSERT_FALSE(p.b->post_receive(tag::make(p.a->plane_id(), 999), buffer, late.callback()));
  auto got = late.wait();
  ASSERT_TRUE(got && !*got);
  EXPECT_TRUE(has_code(got->error(), data_plane_errc::peer_lost));
  auto h = activations(*p.b, 1, 1);
  send_result s;
  ASSERT_FALSE(p.b->send(p.b_to_a, h, pattern(4, 1), s.callback()));
  auto sent = s.wait();
  ASSERT_TRUE(sent);
  EXPECT_TRUE(*sent) << "a send to a stopped peer succeeded";
}

TEST(data_plane, stop_drains_transfers_in_flight) {
  auto p = connect_pair(options_for(tcp), options_for(tcp));
  ASSERT_TRUE(p.a);
  constexpr int n = 8;
  std::vector<tensor_frame_header> headers;
  std::vector<std::vector<std::byte>> sent, buffers;
  send_result sent_done[n];
  receive_result received[n];
  for (int i = 0; i < n; ++i) {
    headers.push_back(activations(*p.a, 512, 2048));  // 4 MiB each: rendezvous
    sent.push_back(pattern(headers[i].byte_length, 20 + i));
    buffers.emplace_back(headers[i].byte_length);
    ASSERT_FALSE(p.b->post_receive(headers[i].transfer_tag, buffers[i], received[i].callback()));
  }
  for (int i = 0; i < n; ++i)
    ASSERT_FALSE(p.a->send(p.a_to_b, headers[i], sent[i], sent_done[i].callback()));
  p.a->stop();
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(sent_done[i].ready()) << "stop() returned before send " << i << " finished";
    auto s = sent_done[i].wait();
    EXPECT_FALSE(*s) << moe::error_text(*s);
    auto got = received[i].wait();
    ASSERT_TRUE(got && *got);
    EXPECT_TRUE(buffers[i] == sent[i]);
  }
  // Nothing new is accepted once stopped.
  send_result refused;
  EXPECT_TRUE(has_code(p.a->send(p.a_to_b, activations(*p.a, 0, 1), {}, refused.callback()),
                       data_plane_errc::stopped));
}

TEST(data_plane, stop_gives_up_on_a_send_nobody_receives_after_the_drain_timeout) {
  auto oa = options_for(tcp);
  oa.drain_timeout = 100ms;
  auto p = connect_pair(oa, options_for(tcp));
  ASSERT_TRUE(p.a);
  const auto h = activations(*p.a, 2048, 2048);  // 16 MiB: rendezvous waits for a receive
  const auto payload = pattern(h.byte_length, 1);
  send_result s;
  ASSERT_FALSE(p.a->send(p.a_to_b, h, payload, s.callback()));
  p.a->stop();
  ASSERT_TRUE(s.ready());
  EXPECT_TRUE(*s.wait()) << "an undelivered send reported success";
}

TEST(data_plane, cancelled_and_invalid_requests) {
  auto p = connect_pair(options_for(tcp), options_for(tcp));
  ASSERT_TRUE(p.a);
  std::vector<std::byte> buffer(16);
  receive_result r;
  const uint64_t t = tag::make(p.a->plane_id(), 77);
  ASSERT_FALSE(p.b->post_receive(t, buffer, r.callback()));
  p.b->cancel_receive(t);
  auto got = r.wait();
  ASSERT_TRUE(got && !*got);
  EXPECT_TRUE(has_code(got->error(), data_plane_errc::cancelled));

  auto h = activations(*p.a, 1, 4);
  const auto payload = pattern(16, 1);
  auto cb = [](caf::error) { ADD_FAILURE() << "a refused send called back"; };
  auto foreign = h;
  foreign.transfer_tag = tag::make(p.b->plane_id(), 1);
  EXPECT_TRUE(
      has_code(p.a->send(p.a_to_b, foreign, payload, cb), data_plane_errc::invalid_argument));
  EXPECT_TRUE(has_code(p.a->send(p.a_to_b, h, std::span(payload).first(8), cb),
                       data_plane_errc::invalid_argument));
  EXPECT_TRUE(
      has_code(p.b->post_receive(0, buffer, [](auto) {}), data_plane_errc::invalid_argument));
  EXPECT_TRUE(has_code(p.b->post_receive(tag::header_bit | t, buffer, [](auto) {}),
                       data_plane_errc::invalid_argument));
  auto bad = p.a->connect("not an address");
  ASSERT_FALSE(bad);
  EXPECT_TRUE(has_code(bad.error(), data_plane_errc::bad_address));
  // connect is idempotent per address.
  auto again = p.a->connect(p.b->address());
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, p.a_to_b);

  // Where UCX cannot tell, the control plane says a peer is gone.
  receive_result orphan;
  ASSERT_FALSE(p.b->post_receive(tag::make(p.a->plane_id(), 78), buffer, orphan.callback()));
  p.b->mark_peer_lost(p.a->plane_id());
  got = orphan.wait();
  ASSERT_TRUE(got && !*got);
  EXPECT_TRUE(has_code(got->error(), data_plane_errc::peer_lost));
}

TEST(data_plane, metrics_count_bytes_and_transfers) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto o = options_for(tcp);
  o.metrics = registry;
  auto p = connect_pair(o, o);
  ASSERT_TRUE(p.a);
  const auto h = activations(*p.a, 8, 1024);
  const auto payload = pattern(h.byte_length, 1);
  std::vector<std::byte> buffer(h.byte_length);
  receive_result r;
  send_result s;
  ASSERT_FALSE(p.b->post_receive(h.transfer_tag, buffer, r.callback()));
  ASSERT_FALSE(p.a->send(p.a_to_b, h, payload, s.callback()));
  ASSERT_TRUE(r.wait());
  ASSERT_TRUE(s.wait());
  std::map<std::string, double> bytes;
  uint64_t num_observed = 0;
  for (const auto& family : registry->Collect()) {
    for (const auto& m : family.metric) {
      if (family.name == "moe_data_plane_bytes_total") bytes[m.label.at(0).value] = m.counter.value;
      if (family.name == "moe_data_plane_transfer_seconds")
        num_observed += m.histogram.sample_count;
    }
  }
  EXPECT_EQ(bytes["send"], static_cast<double>(h.byte_length));
  EXPECT_EQ(bytes["receive"], static_cast<double>(h.byte_length));
  EXPECT_EQ(num_observed, 2u);
}

// --- two processes ------------------------------------------------------------------------------

namespace {

// A child with its stdin and stdout on pipes; killed and reaped on destruction if still running.
class child_process {
 public:
  static std::unique_ptr<child_process> spawn(const std::vector<std::string>& args) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) return nullptr;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    auto c = std::make_unique<child_process>();
    const int rc = posix_spawn(&c->pid_, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(in[0]);
    ::close(out[1]);
    c->stdin_ = in[1];
    c->stdout_ = out[0];
    if (rc != 0) c->pid_ = -1;
    return c;
  }
  ~child_process() {
    close_stdin();
    if (stdout_ >= 0) ::close(stdout_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  [[nodiscard]] bool running() const { return pid_ > 0; }
  std::optional<std::string> read_line() {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{stdout_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char ch;
      if (::read(stdout_, &ch, 1) != 1) return std::nullopt;
      if (ch == '\n') return line;
      line.push_back(ch);
    }
    return std::nullopt;
  }
  bool write_line(const std::string& s) {
    const std::string line = s + "\n";
    return ::write(stdin_, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  }
  void close_stdin() {
    if (stdin_ >= 0) ::close(stdin_);
    stdin_ = -1;
  }
  /// The exit status, or -1 after killing a child that outlived the bound, or a signal number
  /// + 1000 when it died of one.
  int wait() {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(10ms);
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1000 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1, stdout_ = -1;
};

uint32_t plane_in(const std::string& address) {
  return static_cast<uint32_t>(std::stoul(address.substr(address.rfind('/') + 1), nullptr, 16));
}

std::unique_ptr<child_process> spawn_peer(const transport& t, bool crash) {
  std::vector<std::string> args = {MOE_DATA_PLANE_PEER,
                                   "--tls",
                                   t.tls,
                                   "--listen",
                                   t.listen ? "1" : "0",
                                   "--detect-peer-failure",
                                   t.detect_peer_failure ? "1" : "0"};
  if (crash) args.push_back("--crash");
  ::signal(SIGPIPE, SIG_IGN);  // a dead child must fail the test, not kill it
  auto c = child_process::spawn(args);
  EXPECT_TRUE(c && c->running()) << "cannot spawn " << MOE_DATA_PLANE_PEER;
  return c;
}

}  // namespace

class data_plane_processes : public testing::TestWithParam<transport> {};

INSTANTIATE_TEST_SUITE_P(two_processes, data_plane_processes, testing::Values(tcp, shm_only),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_P(data_plane_processes, frames_go_to_another_process_and_come_back_bit_exact) {
  auto me = start_plane(options_for(GetParam()));
  ASSERT_TRUE(me);
  auto child = spawn_peer(GetParam(), /*crash=*/false);
  ASSERT_TRUE(child && child->running());
  auto line = child->read_line();
  ASSERT_TRUE(line && line->starts_with("ADDR ")) << "no address from the peer process";
  const std::string child_address = line->substr(5);
  const uint64_t rows[] = {0, 1, 64, 2048};  // x 2048 floats: 0 B, 8 KiB, 512 KiB, 16 MiB
  std::string sizes;
  for (auto r : rows) sizes += (sizes.empty() ? "" : ",") + std::to_string(r * 2048 * 4);
  ASSERT_TRUE(child->write_line(me->address() + " " + sizes));
  auto peer = me->connect(child_address);
  ASSERT_TRUE(peer) << moe::error_text(peer.error());
  const uint32_t child_plane = plane_in(child_address);

  const size_t n = std::size(rows);
  std::vector<tensor_frame_header> headers;
  std::vector<std::vector<std::byte>> sent, echoed;
  std::vector<send_result> sent_done(n);
  std::vector<receive_result> received(n);
  for (size_t i = 0; i < n; ++i) {
    headers.push_back(activations(*me, rows[i], 2048));
    headers[i].transfer_tag = tag::make(me->plane_id(), i + 1);  // what the peer expects
    sent.push_back(pattern(headers[i].byte_length, 100 + i));
    echoed.emplace_back(headers[i].byte_length);
    ASSERT_FALSE(
        me->post_receive(tag::make(child_plane, i + 1), echoed[i], received[i].callback()));
    ASSERT_FALSE(me->send(*peer, headers[i], sent[i], sent_done[i].callback()));
  }
  for (size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    auto s = sent_done[i].wait();
    ASSERT_TRUE(s);
    EXPECT_FALSE(*s) << moe::error_text(*s);
    auto got = received[i].wait();
    ASSERT_TRUE(got) << "no echo";
    ASSERT_TRUE(*got) << moe::error_text(got->error());
    auto want = headers[i];
    want.transfer_tag = tag::make(child_plane, i + 1);
    expect_same_header(**got, want);
    EXPECT_TRUE(echoed[i] == sent[i]) << "echoed payload differs";
  }
  child->close_stdin();
  EXPECT_EQ(child->wait(), 0);
}

TEST(data_plane_processes, a_crashed_peer_fails_pending_receives_instead_of_hanging) {
  auto me = start_plane(options_for(tcp));
  ASSERT_TRUE(me);
  auto child = spawn_peer(tcp, /*crash=*/true);
  ASSERT_TRUE(child && child->running());
  auto line = child->read_line();
  ASSERT_TRUE(line && line->starts_with("ADDR "));
  const std::string child_address = line->substr(5);
  const uint32_t child_plane = plane_in(child_address);
  ASSERT_TRUE(child->write_line(me->address() + " 4096"));
  auto peer = me->connect(child_address);
  ASSERT_TRUE(peer);

  // One echo proves both connections are up before the peer dies.
  auto h = activations(*me, 1, 1024);
  h.transfer_tag = tag::make(me->plane_id(), 1);
  const auto payload = pattern(4096, 1);
  std::vector<std::byte> echo(4096), big(64 << 20), never(64);
  receive_result echoed, big_frame, never_sent;
  send_result s;
  ASSERT_FALSE(me->post_receive(tag::make(child_plane, 1), echo, echoed.callback()));
  ASSERT_FALSE(me->post_receive(tag::make(child_plane, 100), big, big_frame.callback()));
  ASSERT_FALSE(me->post_receive(tag::make(child_plane, 101), never, never_sent.callback()));
  ASSERT_FALSE(me->send(*peer, h, payload, s.callback()));
  auto got = echoed.wait();
  ASSERT_TRUE(got && *got);

  EXPECT_EQ(child->wait(), 1000 + SIGKILL);
  // The 64 MiB frame was cut off at some point: it completes either way, never half-written
  // and reported as success.
  auto b = big_frame.wait();
  ASSERT_TRUE(b) << "a receive from a crashed peer hung";
  if (*b) {
    EXPECT_TRUE(
        std::all_of(big.begin(), big.end(), [](std::byte x) { return x == std::byte{0x5a}; }));
  }
  auto nv = never_sent.wait();
  ASSERT_TRUE(nv) << "a receive from a crashed peer hung";
  ASSERT_FALSE(*nv);
  EXPECT_TRUE(has_code(nv->error(), data_plane_errc::peer_lost)) << moe::error_text(nv->error());
}
