// Set-up, the progress loop, shutdown and the public API of the data plane; the transfers
// themselves are in data_plane.transfers.cpp.
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <cstdlib>
#include <random>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include "base/assert.hpp"
#include "runtime/data_plane.internal.hpp"

namespace moe::runtime {

caf::error make_error(data_plane_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("data_plane"),
                    caf::make_message(std::move(text))};
}

namespace data_plane_detail {

// How long shutdown waits for endpoint closes and cancelled requests, after the drain.
constexpr auto close_timeout = std::chrono::seconds(2);

caf::error status_error(ucs_status_t s, const std::string& what) {
  return ucx::make_error(ucx::ucx_errc::transfer_failed, what + ": " + ucs_status_string(s));
}

std::string to_hex(std::span<const std::byte> bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (auto b : bytes) {
    out.push_back(digits[static_cast<uint8_t>(b) >> 4]);
    out.push_back(digits[static_cast<uint8_t>(b) & 0xf]);
  }
  return out;
}

std::optional<std::vector<std::byte>> from_hex(std::string_view s) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (s.size() % 2 != 0 || s.empty()) return std::nullopt;
  std::vector<std::byte> out(s.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = std::byte(static_cast<uint8_t>(hi << 4 | lo));
  }
  return out;
}

caf::expected<peer_address> parse_address(const std::string& text) {
  auto bad = [&](const char* why) {
    return make_error(data_plane_errc::bad_address, "address '" + text + "': " + why);
  };
  peer_address out;
  std::string_view s = text;
  if (auto slash = s.rfind('/'); slash != std::string_view::npos) {
    const std::string plane(s.substr(slash + 1));
    char* end = nullptr;
    const unsigned long v = std::strtoul(plane.c_str(), &end, 16);
    if (plane.empty() || *end != '\0' || v == 0 || v > tag::max_plane_id)
      return bad("plane id is not a hex number in range");
    out.plane = static_cast<uint32_t>(v);
    s = s.substr(0, slash);
  }
  if (s.starts_with(worker_address_prefix)) {
    auto blob = from_hex(s.substr(worker_address_prefix.size()));
    if (!blob) return bad("worker address is not lower-case hex");
    out.is_worker = true;
    out.worker_address = std::move(*blob);
    return out;
  }
  const auto colon = s.rfind(':');
  if (colon == std::string_view::npos) return bad("expected host:port");
  const std::string host(s.substr(0, colon)), port(s.substr(colon + 1));
  char* end = nullptr;
  const unsigned long p = std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p == 0 || p > 65535) return bad("port out of range");
  out.sockaddr.sin_family = AF_INET;
  out.sockaddr.sin_port = htons(static_cast<uint16_t>(p));
  if (inet_pton(AF_INET, host.c_str(), &out.sockaddr.sin_addr) != 1)
    return bad("host is not an IPv4 address");
  return out;
}

data_plane_metrics::data_plane_metrics(prometheus::Registry& r) {
  auto& bytes = prometheus::BuildCounter()
                    .Name("moe_data_plane_bytes_total")
                    .Help("Payload bytes moved by the UCX data plane")
                    .Register(r);
  auto& transfers = prometheus::BuildCounter()
                        .Name("moe_data_plane_transfers_total")
                        .Help("Tensor frames by direction and outcome (ok, error, rejected)")
                        .Register(r);
  auto& seconds = prometheus::BuildHistogram()
                      .Name("moe_data_plane_transfer_seconds")
                      .Help("Send: submission to completion; receive: header to payload landed")
                      .Register(r);
  const prometheus::Histogram::BucketBoundaries buckets{1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3,
                                                        1e-2, 3e-2, 0.1,  0.3,  1.0,  3.0};
  for (int d = 0; d < 2; ++d) {
    const std::string dir = d == 0 ? "send" : "receive";
    bytes_total[d] = &bytes.Add({{"direction", dir}});
    ok[d] = &transfers.Add({{"direction", dir}, {"outcome", "ok"}});
    failed[d] = &transfers.Add({{"direction", dir}, {"outcome", "error"}});
    rejected[d] = &transfers.Add({{"direction", dir}, {"outcome", "rejected"}});
    transfer_seconds[d] = &seconds.Add({{"direction", dir}}, buckets);
  }
}

}  // namespace data_plane_detail

caf::expected<std::string> resolve_ipv4(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found); rc != 0 || found == nullptr)
    return make_error(data_plane_errc::bad_address,
                      "cannot resolve " + host + " to an IPv4 address: " + (rc != 0 ? gai_strerror(rc) : "no address"));
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(found->ai_addr)->sin_addr, text, sizeof text);
  ::freeaddrinfo(found);
  return std::string(text);
}

using namespace data_plane_detail;

// --- start / submit -----------------------------------------------------------------------------

caf::expected<std::unique_ptr<impl>> impl::create(data_plane_options o) {
  auto p = std::make_unique<impl>();
  p->opts = std::move(o);
  p->plane_id = p->opts.plane_id;
  if (p->plane_id > tag::max_plane_id)
    return make_error(data_plane_errc::invalid_argument, "plane_id exceeds 23 bits");
  if (p->plane_id == 0) {
    std::random_device rd;
    p->plane_id = std::uniform_int_distribution<uint32_t>(1, tag::max_plane_id)(rd);
  }
  auto unavailable = [](ucs_status_t s, const char* what) {
    return ucx::make_error(ucx::ucx_errc::unavailable,
                           std::string(what) + ": " + ucs_status_string(s));
  };

  // The context is made here rather than by ucx::context::create because the progress thread
  // sleeps on the worker's event fd, which needs UCP_FEATURE_WAKEUP.
  ucp_config_t* raw_config = nullptr;
  if (auto s = ucp_config_read(nullptr, nullptr, &raw_config); s != UCS_OK)
    return unavailable(s, "ucp_config_read");
  std::unique_ptr<ucp_config_t, void (*)(ucp_config_t*)> config(raw_config, ucp_config_release);
  std::string tls = p->opts.tls;
  if (tls.empty() && !std::getenv("UCX_TLS")) tls = "tcp,sm";
  if (!tls.empty()) {
    if (auto s = ucp_config_modify(config.get(), "TLS", tls.c_str()); s != UCS_OK)
      return unavailable(s, ("UCX_TLS=" + tls).c_str());
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  ucp_context_h ctx = nullptr;
  if (auto s = ucp_init(&params, config.get(), &ctx); s != UCS_OK)
    return unavailable(s, "ucp_init");
  p->context.reset(ctx);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_CLIENT_ID;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the progress thread touches it
  wp.client_id = p->plane_id;               // tells accepting peers who we are
  ucp_worker_h w = nullptr;
  if (auto s = ucp_worker_create(ctx, &wp, &w); s != UCS_OK)
    return unavailable(s, "ucp_worker_create");
  p->worker.reset(w);

  int worker_fd = -1;
  if (auto s = ucp_worker_get_efd(w, &worker_fd); s != UCS_OK)
    return unavailable(s, "ucp_worker_get_efd");
  p->epoll_fd = unique_fd(epoll_create1(EPOLL_CLOEXEC));
  p->wake_fd = unique_fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (p->epoll_fd.get() < 0 || p->wake_fd.get() < 0)
    return unavailable(UCS_ERR_IO_ERROR, "epoll/eventfd");
  for (int fd : {worker_fd, p->wake_fd.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(p->epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      return unavailable(UCS_ERR_IO_ERROR, "epoll_ctl");
  }

  const std::string plane_suffix = "/" + [&] {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%x", p->plane_id);
    return std::string(buf);
  }();
  if (p->opts.listen) {
    auto where = parse_address(p->opts.host + ":1");
    if (!where) return where.error();
    where->sockaddr.sin_port = htons(p->opts.port);
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&where->sockaddr);
    lp.sockaddr.addrlen = sizeof(sockaddr_in);
    lp.conn_handler.cb = on_connection;
    lp.conn_handler.arg = p.get();
    ucp_listener_h l = nullptr;
    if (auto s = ucp_listener_create(w, &lp, &l); s != UCS_OK)
      return unavailable(s, "ucp_listener_create (client-server mode needs tcp in UCX_TLS)");
    p->listener.reset(l);
    ucp_listener_attr_t attr{};
    attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if (auto s = ucp_listener_query(l, &attr); s != UCS_OK)
      return unavailable(s, "ucp_listener_query");
    const auto port = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
    const auto& advertised = p->opts.advertise_host.empty() ? p->opts.host : p->opts.advertise_host;
    p->address = advertised + ":" + std::to_string(port) + plane_suffix;
  } else {
    ucp_address_t* blob = nullptr;
    size_t length = 0;
    if (auto s = ucp_worker_get_address(w, &blob, &length); s != UCS_OK)
      return unavailable(s, "ucp_worker_get_address");
    p->address = std::string(worker_address_prefix) +
                 to_hex({reinterpret_cast<const std::byte*>(blob), length}) + plane_suffix;
    ucp_worker_release_address(w, blob);
  }
  if (p->opts.metrics) p->metrics.emplace(*p->opts.metrics);
  return p;
}

caf::error impl::submit(command c) {
  {
    std::lock_guard guard(mutex);
    if (!accepting) return make_error(data_plane_errc::stopped, "data plane is stopping");
    queue.push_back(std::move(c));
  }
  // Pairs with sleep_until_event: it sets `sleeping` before it last looks at the queue.
  if (sleeping.load()) {
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd.get(), &one, sizeof one);
  }
  return {};
}

// --- the progress loop --------------------------------------------------------------------------

void impl::run() {
  auto last_event = steady::now();
  for (;;) {
    bool busy = execute_commands();
    while (ucp_worker_progress(worker.get()) != 0) busy = true;
    busy |= accept_connections();
    busy |= receive_headers();
    busy |= reap_closing();
    {
      std::lock_guard guard(mutex);
      if (stop_requested && queue.empty()) break;
    }
    if (busy) {
      last_event = steady::now();
    } else if (steady::now() - last_event >= opts.idle_spin) {
      sleep_until_event();
      last_event = steady::now();
    } else {
      // Polling, but giving the core away to whoever else is runnable: on shared cores a pure
      // spin holds the core for a whole time slice while the peer it waits for cannot run.
      std::this_thread::yield();
    }
  }
  shutdown();
}

void impl::sleep_until_event() {
  sleeping.store(true);
  bool pending;
  {
    std::lock_guard guard(mutex);
    pending = !queue.empty() || stop_requested;
  }
  // UCS_ERR_BUSY: events arrived since the last progress; go round again instead.
  if (!pending && ucp_worker_arm(worker.get()) == UCS_OK) {
    epoll_event events[2];
    // The bound only limits the cost of an event a transport failed to signal.
    epoll_wait(epoll_fd.get(), events, 2, /*timeout_ms=*/100);
  }
  sleeping.store(false);
  uint64_t drained;
  [[maybe_unused]] auto n = ::read(wake_fd.get(), &drained, sizeof drained);
}

bool impl::execute_commands() {
  std::vector<command> batch;
  {
    std::lock_guard guard(mutex);
    batch.swap(queue);
  }
  for (auto& c : batch) {
    if (auto* cc = std::get_if<connect_command>(&c)) {
      cc->result.set_value(do_connect(cc->text, cc->where));
    } else if (auto* s = std::get_if<std::unique_ptr<send_op>>(&c)) {
      do_send(std::move(*s));
    } else if (auto* r = std::get_if<std::unique_ptr<receive_op>>(&c)) {
      do_post(std::move(*r));
    } else if (auto* cancel = std::get_if<cancel_command>(&c)) {
      do_cancel(cancel->transfer_tag);
    } else {
      plane_gone(std::get<peer_lost_command>(c).plane, "the control plane reported the peer lost");
    }
  }
  return !batch.empty();
}

void impl::record(direction d, outcome o, uint64_t bytes, steady::time_point since) {
  if (!metrics) return;
  auto& m = *metrics;
  switch (o) {
    case outcome::ok:
      m.ok[d]->Increment();
      m.bytes_total[d]->Increment(static_cast<double>(bytes));
      m.transfer_seconds[d]->Observe(std::chrono::duration<double>(steady::now() - since).count());
      break;
    case outcome::error: m.failed[d]->Increment(); break;
    case outcome::rejected: m.rejected[d]->Increment(); break;
  }
}

// --- stopping -----------------------------------------------------------------------------------

void impl::shutdown() {
  auto stopped = [] { return make_error(data_plane_errc::stopped, "data plane stopped"); };
  for (auto& [t, op] : std::exchange(posted, {})) fail_receive(*op, stopped());
  unmatched.clear();

  // The gate: accepted sends and landing receives get drain_timeout to finish.
  const auto drain_deadline = steady::now() + opts.drain_timeout;
  while ((!in_flight.empty() || !landing.empty()) && steady::now() < drain_deadline) {
    if (ucp_worker_progress(worker.get()) == 0) std::this_thread::yield();
    accept_connections();  // a connection request must be answered; rejecting can crash UCX
    reap_closing();
  }

  // Tell every peer we connected to that we are going, so its receives from us fail at once
  // even over shared memory, where no connection breaks to say so.
  const uint64_t goodbye = tag::header_bit | tag::make(plane_id, tag::control_sequence);
  std::vector<void*> requests;
  for (auto& e : endpoints) {
    if (e->failed || !e->ep || !e->ready || e->address.empty()) continue;
    ucp_request_param_t p{};
    if (auto r = ucp_tag_send_nbx(e->ep, nullptr, 0, goodbye, &p); UCS_PTR_IS_PTR(r))
      requests.push_back(r);
  }
  // Cancelling runs completion callbacks at once, which edit these maps: collect first.
  std::vector<void*> to_cancel;
  for (auto& [d, _] : discards) {
    if (d->request) to_cancel.push_back(d->request);
  }
  for (auto& [op, _] : landing) {
    if (op->request) to_cancel.push_back(op->request);
  }
  for (void* r : to_cancel) ucp_request_cancel(worker.get(), r);

  // Flush healthy endpoints (the goodbye goes out), force failed ones and all of them when the
  // drain timed out (their unfinished sends fail). Endpoints still wiring up wait for that to end
  // (see start_wire_up) until close_timeout.
  const bool force = !in_flight.empty();
  auto close_endpoints = [&](bool even_wiring_up) {
    for (auto& e : endpoints) {
      if (!e->ep || (e->wiring_up && !even_wiring_up)) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = force || e->failed ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      auto r = ucp_ep_close_nbx(e->ep, &p);
      if (UCS_PTR_IS_PTR(r)) closing.push_back(r);
      e->ep = nullptr;
    }
  };
  auto unfinished = [&] {
    return std::any_of(requests.begin(), requests.end(),
                       [](void* r) { return ucp_request_check_status(r) == UCS_INPROGRESS; }) ||
           std::any_of(endpoints.begin(), endpoints.end(), [](auto& e) { return e->ep; }) ||
           !closing.empty() || !in_flight.empty() || !landing.empty() || !headers.empty();
  };
  const auto close_deadline = steady::now() + close_timeout;
  while (unfinished() && steady::now() < close_deadline) {
    close_endpoints(/*even_wiring_up=*/false);
    if (ucp_worker_progress(worker.get()) == 0) std::this_thread::yield();
    accept_connections();  // late arrivals are accepted, then closed like the rest
    reap_closing();
  }
  close_endpoints(/*even_wiring_up=*/true);
  // UCX insists every request is released before its worker goes; a released request runs no
  // callback any more.
  for (void* r : requests) ucp_request_free(r);
  for (void* r : closing) ucp_request_free(r);
  for (auto& e : endpoints) {
    if (e->flush_request) ucp_request_free(std::exchange(e->flush_request, nullptr));
  }
  for (auto& [op, _] : in_flight) {
    for (auto& part : op->parts) {
      if (part.request) ucp_request_free(std::exchange(part.request, nullptr));
    }
  }
  for (auto& [op, _] : landing) {
    if (op->request) ucp_request_free(std::exchange(op->request, nullptr));
  }
  for (auto& [d, _] : discards) {
    if (d->request) ucp_request_free(std::exchange(d->request, nullptr));
  }
  for (auto& [h, _] : headers) {
    if (h->request) ucp_request_free(std::exchange(h->request, nullptr));
  }
  closing.clear();
  // Requests that came after the last accept go with the listener (UCX 1.13 crashes rejecting
  // one whose client has already gone).
  conn_requests.clear();
  listener.reset();
  worker_gone = true;
  worker.reset();
  // Whatever UCX did not complete can no longer touch its buffers: fail it.
  for (auto& [raw, op] : std::exchange(in_flight, {})) {
    ++counters.send_failures;
    op->done(stopped());
  }
  for (auto& [raw, op] : std::exchange(landing, {})) fail_receive(*op, stopped());
  headers.clear();
  discards.clear();
  context.reset();
}

// --- data_plane ---------------------------------------------------------------------------------

data_plane::data_plane(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

data_plane::~data_plane() {
  stop();
}

caf::expected<std::unique_ptr<data_plane>> data_plane::start(data_plane_options opts) {
  auto p = impl::create(std::move(opts));
  if (!p) return p.error();
  impl* raw = p->get();
  std::unique_ptr<data_plane> plane(new data_plane(std::move(*p)));
  raw->thread = std::thread([raw] { raw->run(); });
  raw->thread_id = raw->thread.get_id();
  return plane;
}

const std::string& data_plane::address() const noexcept {
  return impl_->address;
}

uint32_t data_plane::plane_id() const noexcept {
  return impl_->plane_id;
}

uint64_t data_plane::next_transfer_tag() noexcept {
  for (;;) {
    const uint64_t seq = impl_->next_sequence.fetch_add(1, std::memory_order_relaxed) &
                         data_plane_tag::sequence_mask;
    if (seq != 0 && seq != data_plane_tag::control_sequence)
      return data_plane_tag::make(impl_->plane_id, seq);
  }
}

caf::expected<data_plane::peer_id> data_plane::connect(const std::string& address) {
  auto where = parse_address(address);
  if (!where) return where.error();
  if (std::this_thread::get_id() == impl_->thread_id) {
    // It would wait for the progress thread, which is this one; and UCX is in the middle of
    // calling back, no moment to create an endpoint.
    return make_error(data_plane_errc::invalid_argument, "connect() from a completion callback");
  }
  impl::connect_command c{address, std::move(*where), {}};
  auto result = c.result.get_future();
  if (auto err = impl_->submit(std::move(c))) return err;
  if (result.wait_for(std::chrono::seconds(10)) != std::future_status::ready)
    return ucx::make_error(ucx::ucx_errc::timed_out, "the progress thread did not answer");
  return result.get();
}

caf::error data_plane::send(peer_id to, const protocol::tensor_frame_header& header,
                            std::span<const std::byte> payload, send_callback done) {
  auto invalid = [](std::string why) {
    return make_error(data_plane_errc::invalid_argument, "send: " + std::move(why));
  };
  if (!done) return invalid("no completion callback");
  if (!data_plane_tag::is_valid_transfer(header.transfer_tag) ||
      data_plane_tag::plane_of(header.transfer_tag) != impl_->plane_id)
    return invalid("transfer_tag does not come from this plane's next_transfer_tag()");
  if (header.byte_length != payload.size())
    return invalid("byte_length " + std::to_string(header.byte_length) + " for a payload of " +
                   std::to_string(payload.size()) + " bytes");
  if (!header.inline_payload.empty()) return invalid("inline payloads are not sent this way");
  auto op = std::make_unique<impl::send_op>();
  op->owner = impl_.get();
  op->to = to;
  op->transfer_tag = header.transfer_tag;
  op->header_bytes = protocol::encode_frame_header(header);  // on the caller's thread
  op->payload = payload;
  op->done = std::move(done);
  op->submitted = std::chrono::steady_clock::now();
  return impl_->submit(std::move(op));
}

caf::error data_plane::post_receive(uint64_t transfer_tag, std::span<std::byte> buffer,
                                    receive_callback done) {
  if (!done) return make_error(data_plane_errc::invalid_argument, "post_receive: no callback");
  if (!data_plane_tag::is_valid_transfer(transfer_tag))
    return make_error(data_plane_errc::invalid_argument,
                      "post_receive: " + std::to_string(transfer_tag) + " is not a transfer tag");
  auto op = std::make_unique<impl::receive_op>();
  op->owner = impl_.get();
  op->transfer_tag = transfer_tag;
  op->buffer = buffer;
  op->done = std::move(done);
  return impl_->submit(std::move(op));
}

void data_plane::cancel_receive(uint64_t transfer_tag) {
  [[maybe_unused]] auto err = impl_->submit(impl::cancel_command{transfer_tag});
}

void data_plane::mark_peer_lost(uint32_t plane_id) {
  [[maybe_unused]] auto err = impl_->submit(impl::peer_lost_command{plane_id});
}

data_plane_stats data_plane::stats() const noexcept {
  const auto& c = impl_->counters;
  data_plane_stats s;
  s.num_frames_sent = c.frames_sent.load();
  s.num_frames_received = c.frames_received.load();
  s.num_send_failures = c.send_failures.load();
  s.num_receive_failures = c.receive_failures.load();
  s.num_frames_rejected = c.frames_rejected.load();
  s.bytes_sent = c.bytes_sent.load();
  s.bytes_received = c.bytes_received.load();
  return s;
}

void data_plane::stop() {
  if (!impl_) return;
  MOE_ASSERT(std::this_thread::get_id() != impl_->thread_id);  // stop() from a callback
  std::call_once(impl_->stop_once, [this] {
    {
      std::lock_guard guard(impl_->mutex);
      impl_->accepting = false;
      impl_->stop_requested = true;
    }
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(impl_->wake_fd.get(), &one, sizeof one);
    if (impl_->thread.joinable()) impl_->thread.join();
  });
}

}  // namespace moe::runtime
