// The data plane's transfers: endpoints, sends, receives and lost peers, all on the progress
// thread (data_plane.internal.hpp).
#include <algorithm>
#include <cstring>

#include "base/assert.hpp"
#include "runtime/data_plane.internal.hpp"

namespace moe::runtime::data_plane_detail {

// --- UCX callbacks (run inside ucp_worker_progress, on the progress thread) ----------------------

void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) noexcept {
  auto* e = static_cast<impl::endpoint_state*>(arg);
  e->owner->endpoint_failed(e, status);
}

void on_connection(ucp_conn_request_h req, void* arg) noexcept {
  // Endpoints are made after progress returns, not from inside UCX's callback.
  static_cast<impl*>(arg)->conn_requests.push_back(req);
}

namespace {

void release(impl* owner, void* request) noexcept {
  if (request && !owner->worker_gone) ucp_request_free(request);
}

void on_flush_done(void* request, ucs_status_t status, void* user) noexcept {
  auto* e = static_cast<impl::endpoint_state*>(user);
  e->flush_request = nullptr;
  release(e->owner, request);
  e->owner->endpoint_ready(e, status);
}

void on_send_done(void* request, ucs_status_t status, void* user) noexcept {
  auto* part = static_cast<impl::send_part*>(user);
  auto* op = part->op;
  part->done = true;
  part->request = nullptr;
  release(op->owner, request);
  if (status != UCS_OK && op->status == UCS_OK) op->status = status;
  if (--op->num_pending == 0) op->owner->finish_send(op);
}

void on_header_done(void* request, ucs_status_t status, const ucp_tag_recv_info_t*,
                    void* user) noexcept {
  auto* h = static_cast<impl::header_op*>(user);
  h->request = nullptr;
  release(h->owner, request);
  h->owner->on_header(h, status);
}

void on_payload_done(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                     void* user) noexcept {
  auto* op = static_cast<impl::receive_op*>(user);
  op->request = nullptr;
  release(op->owner, request);
  op->owner->on_payload(op, status, info ? info->length : 0);
}

void on_discard_done(void* request, ucs_status_t, const ucp_tag_recv_info_t*, void* user) noexcept {
  auto* d = static_cast<impl::discard_op*>(user);
  impl* owner = d->owner;
  owner->discards.erase(d);
  release(owner, request);
}

// UCX either hands back a request (completion comes through the callback) or finishes at once
// and returns a status; this returns the status when finished, nullopt when pending.
// Beware: UCX may run the callback before handing back the request (a receive matching a
// message already there), so an operation is registered before the call and looked up again
// after it, never touched through a pointer the callback may have freed.
std::optional<ucs_status_t> immediate_status(ucs_status_ptr_t r) {
  if (UCS_PTR_IS_PTR(r)) return std::nullopt;
  return UCS_PTR_STATUS(r);
}

ucp_request_param_t host_param() {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  p.memory_type = UCS_MEMORY_TYPE_HOST;
  return p;
}

}  // namespace

}  // namespace moe::runtime::data_plane_detail

namespace moe::runtime {

using namespace data_plane_detail;

caf::expected<data_plane::peer_id> impl::do_connect(const std::string& text,
                                                    const peer_address& where) {
  if (auto it = by_address.find(text); it != by_address.end()) {
    if (!endpoints[it->second - 1]->failed) return it->second;
  }
  auto e = std::make_unique<endpoint_state>();
  e->owner = this;
  e->id = static_cast<peer_id>(endpoints.size() + 1);
  e->address = text;
  e->remote_plane = where.plane;
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.err_mode = error_handling_mode();
  p.err_handler.cb = on_endpoint_error;
  p.err_handler.arg = e.get();
  if (where.is_worker) {
    p.field_mask |= UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    p.address = reinterpret_cast<const ucp_address_t*>(where.worker_address.data());
  } else {
    p.field_mask |= UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER | UCP_EP_PARAMS_FLAGS_SEND_CLIENT_ID;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&where.sockaddr);
    p.sockaddr.addrlen = sizeof(sockaddr_in);
  }
  if (auto s = ucp_ep_create(worker.get(), &p, &e->ep); s != UCS_OK) {
    const bool shm_only = s == UCS_ERR_UNREACHABLE && opts.detect_peer_failure;
    return ucx::make_error(ucx::ucx_errc::connect_failed,
                           "connect to " + text + ": " + ucs_status_string(s) +
                               (shm_only ? " (shared memory cannot detect a failed peer: "
                                           "set detect_peer_failure = false)"
                                         : ""));
  }
  if (where.plane != 0) lost_planes.erase(where.plane);
  by_address[text] = e->id;
  endpoint_state* raw = e.get();
  endpoints.push_back(std::move(e));
  if (where.is_worker) {
    raw->ready = true;  // the full remote address is known: lanes are final from the start
  } else {
    start_wire_up(raw);
  }
  return raw->id;
}

// A flush completes once client-server wire-up has. Waiting for it works around two UCX 1.13
// bugs: requests issued earlier are packed for the provisional lanes and replayed on the final
// ones, which breaks with shared-memory lanes (am_short over its limit, an rkey size
// assertion); and closing a client endpoint mid wire-up can crash its server in UCX's async
// thread. So sends wait for `ready`, and no endpoint is closed while `wiring_up`.
void impl::start_wire_up(endpoint_state* e) {
  e->wiring_up = true;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = on_flush_done;
  p.user_data = e;
  auto r = ucp_ep_flush_nbx(e->ep, &p);
  if (auto s = immediate_status(r)) {
    endpoint_ready(e, *s);
  } else if (e->wiring_up) {  // the callback may already have run
    e->flush_request = r;
  }
}

void impl::endpoint_ready(endpoint_state* e, ucs_status_t status) {
  e->wiring_up = false;
  if (status != UCS_OK) {
    endpoint_failed(e, status);
    return;
  }
  e->ready = true;
  for (send_op* op : std::exchange(e->waiting, {})) start_send(op);
}

bool impl::accept_connections() {
  if (conn_requests.empty()) return false;
  auto requests = std::exchange(conn_requests, {});
  for (ucp_conn_request_h req : requests) {
    ucp_conn_request_attr_t attr{};
    attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ID;
    const bool known = ucp_conn_request_query(req, &attr) == UCS_OK && attr.client_id != 0 &&
                       attr.client_id <= tag::max_plane_id;
    auto e = std::make_unique<endpoint_state>();
    e->owner = this;
    e->id = static_cast<peer_id>(endpoints.size() + 1);
    e->remote_plane = known ? static_cast<uint32_t>(attr.client_id) : 0;
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p.conn_request = req;
    p.err_mode = error_handling_mode();
    p.err_handler.cb = on_endpoint_error;
    p.err_handler.arg = e.get();
    // On failure UCX has already rejected and freed the request: rejecting again is a double free.
    if (ucp_ep_create(worker.get(), &p, &e->ep) != UCS_OK) continue;
    lost_planes.erase(e->remote_plane);
    endpoints.push_back(std::move(e));
    start_wire_up(endpoints.back().get());
  }
  return true;
}

// --- sending ------------------------------------------------------------------------------------

void impl::do_send(std::unique_ptr<send_op> op) {
  if (op->to == 0 || op->to > endpoints.size()) {
    op->done(make_error(data_plane_errc::invalid_argument, "unknown peer"));
    return;
  }
  op->endpoint = endpoints[op->to - 1].get();
  if (op->endpoint->failed || op->endpoint->address.empty()) {
    ++counters.send_failures;
    record(sending, outcome::error, 0, op->submitted);
    op->done(make_error(data_plane_errc::peer_lost, "peer " + op->endpoint->address + " is lost"));
    return;
  }
  send_op* raw = op.get();
  in_flight.emplace(raw, std::move(op));
  if (raw->endpoint->ready) {
    start_send(raw);
  } else {
    raw->endpoint->waiting.push_back(raw);
  }
}

void impl::start_send(send_op* raw) {
  const std::pair<std::span<const std::byte>, uint64_t> messages[] = {
      {raw->header_bytes, tag::header_bit | raw->transfer_tag}, {raw->payload, raw->transfer_tag}};
  raw->num_pending = 3;  // the op outlives this loop even if both parts complete inside it
  for (int i = 0; i < 2; ++i) {
    send_part& part = raw->parts[i];
    part.op = raw;
    ucp_request_param_t p = host_param();
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = on_send_done;
    p.user_data = &part;
    const auto& [bytes, ucx_tag] = messages[i];
    auto r = ucp_tag_send_nbx(raw->endpoint->ep, bytes.data(), bytes.size(), ucx_tag, &p);
    if (auto s = immediate_status(r)) {
      on_send_done(nullptr, *s, &part);
    } else if (!part.done) {
      part.request = r;
    }
  }
  if (--raw->num_pending == 0) finish_send(raw);
}

void impl::finish_send(send_op* raw) {
  auto node = in_flight.extract(raw);
  MOE_ASSERT(!node.empty());
  auto op = std::move(node.mapped());
  caf::error err;
  if (op->status != UCS_OK) {
    err = op->endpoint->failed ? make_error(data_plane_errc::peer_lost,
                                            "peer " + op->endpoint->address +
                                                " lost: " + ucs_status_string(op->status))
                               : status_error(op->status, "send to " + op->endpoint->address);
    ++counters.send_failures;
    record(sending, outcome::error, 0, op->submitted);
  } else {
    ++counters.frames_sent;
    counters.bytes_sent += op->payload.size();
    record(sending, outcome::ok, op->payload.size(), op->submitted);
  }
  op->done(std::move(err));
}

// --- receiving ----------------------------------------------------------------------------------

void impl::do_post(std::unique_ptr<receive_op> op) {
  const uint64_t t = op->transfer_tag;
  const bool duplicate =
      posted.contains(t) || std::any_of(landing.begin(), landing.end(),
                                        [&](auto& kv) { return kv.first->transfer_tag == t; });
  if (duplicate) {
    fail_receive(*op, make_error(data_plane_errc::invalid_argument,
                                 "a receive for this transfer tag is already posted"));
    return;
  }
  if (auto it = unmatched.find(t); it != unmatched.end()) {
    auto header = std::move(it->second);
    unmatched.erase(it);
    match(std::move(op), std::move(header));
    return;
  }
  if (lost_planes.contains(tag::plane_of(t))) {
    fail_receive(*op, make_error(data_plane_errc::peer_lost, "the sending plane is gone"));
    return;
  }
  posted.emplace(t, std::move(op));
}

void impl::do_cancel(uint64_t transfer_tag) {
  if (auto node = posted.extract(transfer_tag); !node.empty()) {
    fail_receive(*node.mapped(), make_error(data_plane_errc::cancelled, "receive cancelled"));
  }
}

bool impl::receive_headers() {
  bool any = false;
  for (;;) {
    auto h = std::make_unique<header_op>();
    ucp_tag_recv_info_t info{};
    ucp_tag_message_h msg =
        ucp_tag_probe_nb(worker.get(), tag::header_bit, tag::header_bit, /*remove=*/1, &info);
    if (msg == nullptr) return any;
    any = true;
    h->owner = this;
    h->ucx_tag = info.sender_tag;
    h->length = info.length;
    // An oversized header is read into an empty buffer: UCX drops it as truncated.
    if (info.length <= opts.max_header_bytes) h->bytes.resize(info.length);
    header_op* raw = h.get();
    headers.emplace(raw, std::move(h));
    ucp_request_param_t p = host_param();
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.recv = on_header_done;
    p.user_data = raw;
    auto r = ucp_tag_msg_recv_nbx(worker.get(), raw->bytes.data(), raw->bytes.size(), msg, &p);
    if (auto s = immediate_status(r)) {
      on_header(raw, *s);
    } else if (auto it = headers.find(raw); it != headers.end()) {
      it->second->request = r;
    }
  }
}

void impl::on_header(header_op* raw, ucs_status_t status) {
  auto h = std::move(headers.extract(raw).mapped());
  const uint64_t transfer_tag = h->ucx_tag & ~tag::header_bit;
  if (tag::sequence_of(transfer_tag) == tag::control_sequence) {
    plane_gone(tag::plane_of(transfer_tag), "the sending plane stopped");
    return;
  }
  caf::expected<tensor_frame_header> header = make_error(data_plane_errc::rejected_frame, "");
  if (status != UCS_OK) {
    header = make_error(data_plane_errc::rejected_frame,
                        "frame header of " + std::to_string(h->length) +
                            " bytes rejected: " + ucs_status_string(status) + " (limit " +
                            std::to_string(opts.max_header_bytes) + ")");
  } else {
    protocol::frame_limits limits;
    limits.max_message_bytes = opts.max_header_bytes;
    header = protocol::decode_frame_header(h->bytes, limits);
    if (!header) {  // one error code for callers; the protocol's text says what was wrong
      header = make_error(data_plane_errc::rejected_frame, moe::error_text(header.error()));
    } else if (header->transfer_tag != transfer_tag) {
      header = make_error(data_plane_errc::rejected_frame,
                          "frame header names transfer " + std::to_string(header->transfer_tag) +
                              " but arrived as " + std::to_string(transfer_tag));
    }
  }
  if (!header) {
    reject_frame();
    discard_payload(transfer_tag);
  }
  if (auto node = posted.extract(transfer_tag); !node.empty()) {
    match(std::move(node.mapped()), std::move(header));
  } else if (unmatched.size() < opts.max_unmatched_headers) {
    // Kept until its receive is posted; a bad header is kept too, so that the receive learns why.
    unmatched.insert_or_assign(transfer_tag, std::move(header));
  } else if (header) {
    reject_frame();  // nobody asked for it and there is no room left to wait
    discard_payload(transfer_tag);
  }
}

void impl::match(std::unique_ptr<receive_op> op, caf::expected<tensor_frame_header> header) {
  if (!header) {  // already counted and its payload discarded when it arrived
    fail_receive(*op, std::move(header.error()));
    return;
  }
  if (header->byte_length != op->buffer.size()) {
    reject_frame();
    fail_receive(
        *op, make_error(data_plane_errc::size_mismatch,
                        "frame of " + std::to_string(header->byte_length) +
                            " bytes for a posted buffer of " + std::to_string(op->buffer.size())));
    discard_payload(op->transfer_tag);
    return;
  }
  op->matched = steady::now();
  if (!header->inline_payload.empty()) {  // a sender may ship small payloads in the header
    std::memcpy(op->buffer.data(), header->inline_payload.data(), op->buffer.size());
    op->header = std::move(*header);
    op->header->inline_payload.clear();
    receive_op* raw = op.get();
    landing.emplace(raw, std::move(op));
    on_payload(raw, UCS_OK, raw->buffer.size());
    return;
  }
  op->header = std::move(*header);
  receive_op* raw = op.get();
  landing.emplace(raw, std::move(op));
  // Always through the callback: it is what reports the received length (UCX 1.13 leaves
  // recv_info unset when a receive completes in place).
  ucp_request_param_t p = host_param();
  p.op_attr_mask |=
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
  p.cb.recv = on_payload_done;
  p.user_data = raw;
  auto r = ucp_tag_recv_nbx(worker.get(), raw->buffer.data(), raw->buffer.size(), raw->transfer_tag,
                            ~ucp_tag_t{0}, &p);
  if (auto s = immediate_status(r)) {
    on_payload(raw, *s, 0);  // only an error can come back this way
  } else if (auto it = landing.find(raw); it != landing.end()) {
    it->second->request = r;
  }
}

void impl::discard_payload(uint64_t transfer_tag) {
  // A zero-byte receive consumes the payload (eager or rendezvous) as truncated: nothing is
  // written anywhere, and the sender's request completes.
  auto d = std::make_unique<discard_op>();
  d->owner = this;
  discard_op* raw = d.get();
  discards.emplace(raw, std::move(d));
  ucp_request_param_t p = host_param();
  p.op_attr_mask |= UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv = on_discard_done;
  p.user_data = raw;
  auto r = ucp_tag_recv_nbx(worker.get(), nullptr, 0, transfer_tag, ~ucp_tag_t{0}, &p);
  if (immediate_status(r)) {
    discards.erase(raw);
  } else if (auto it = discards.find(raw); it != discards.end()) {
    it->second->request = r;
  }
}

void impl::on_payload(receive_op* raw, ucs_status_t status, size_t length) {
  auto op = std::move(landing.extract(raw).mapped());
  if (status == UCS_OK && length != op->buffer.size()) {
    reject_frame();
    fail_receive(*op, make_error(data_plane_errc::rejected_frame,
                                 "payload of " + std::to_string(length) + " bytes, header said " +
                                     std::to_string(op->buffer.size())));
    return;
  }
  if (status != UCS_OK) {
    caf::error e;
    if (status == UCS_ERR_MESSAGE_TRUNCATED) {
      reject_frame();
      e = make_error(data_plane_errc::rejected_frame, "payload longer than its header says");
    } else if (status == UCS_ERR_CANCELED) {
      e = make_error(data_plane_errc::stopped, "receive cancelled while landing");
    } else {
      e = make_error(data_plane_errc::peer_lost,
                     std::string("payload transfer broke off: ") + ucs_status_string(status));
    }
    fail_receive(*op, std::move(e));
    return;
  }
  ++counters.frames_received;
  counters.bytes_received += length;
  record(receiving, outcome::ok, length, op->matched);
  op->done(std::move(*op->header));
}

void impl::fail_receive(receive_op& op, caf::error e) {
  ++counters.receive_failures;
  record(receiving, outcome::error, 0, steady::now());
  op.done(std::move(e));
}

void impl::reject_frame() {
  ++counters.frames_rejected;
  record(receiving, outcome::rejected, 0, steady::now());
}

// --- peers coming and going ---------------------------------------------------------------------

void impl::endpoint_failed(endpoint_state* e, ucs_status_t status) {
  if (e->failed) return;
  e->failed = true;  // its in-flight requests fail through their own callbacks
  if (e->remote_plane != 0) {
    plane_gone(e->remote_plane,
               "endpoint to plane failed: " + std::string(ucs_status_string(status)));
  }
}

void impl::plane_gone(uint32_t plane, const std::string& why) {
  lost_planes.insert(plane);
  for (auto& e : endpoints) {
    if (e->remote_plane == plane) e->failed = true;
  }
  // Receives whose header has not come will never be served. (Landing ones fail through UCX.)
  std::vector<std::unique_ptr<receive_op>> orphans;
  for (auto it = posted.begin(); it != posted.end();) {
    if (tag::plane_of(it->first) == plane) {
      orphans.push_back(std::move(it->second));
      it = posted.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& op : orphans) fail_receive(*op, make_error(data_plane_errc::peer_lost, why));
}

bool impl::reap_closing() {
  bool any = false;
  for (auto& e : endpoints) {
    if (!e->failed) continue;
    for (send_op* op : std::exchange(e->waiting, {})) {  // never started: no UCX request
      op->status = UCS_ERR_CONNECTION_RESET;
      finish_send(op);
      any = true;
    }
    // A failed endpoint must still be closed (forced) to be freed, once wire-up is over.
    if (e->ep && !e->wiring_up && !worker_gone) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      auto r = ucp_ep_close_nbx(e->ep, &p);
      if (UCS_PTR_IS_PTR(r)) closing.push_back(r);
      e->ep = nullptr;
      any = true;
    }
  }
  std::erase_if(closing, [](void* r) {
    if (ucp_request_check_status(r) == UCS_INPROGRESS) return false;
    ucp_request_free(r);
    return true;
  });
  return any;
}

}  // namespace moe::runtime
