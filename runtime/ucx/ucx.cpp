#include "runtime/ucx/ucx.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>
#include <utility>

namespace moe::runtime::ucx {

caf::error make_error(ucx_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("ucx"), caf::make_message(std::move(text))};
}

std::string version_string() { return ucp_get_version_string(); }

namespace {

caf::error status_error(ucs_status_t s, ucx_errc code, const char* what) {
  return make_error(code, std::string(what) + ": " + ucs_status_string(s));
}

caf::expected<sockaddr_in> make_sockaddr(const std::string& host, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    return make_error(ucx_errc::connect_failed, "'" + host + "' is not an IPv4 address");
  }
  return addr;
}

// Endpoint errors (peer gone) arrive here; the failed requests report them themselves.
void on_endpoint_error(void*, ucp_ep_h, ucs_status_t) noexcept {}

}  // namespace

// --- context / worker ---------------------------------------------------------------------------

caf::expected<context> context::create() {
  ucp_config_t* config = nullptr;
  if (auto s = ucp_config_read(nullptr, nullptr, &config); s != UCS_OK)
    return status_error(s, ucx_errc::unavailable, "ucp_config_read");
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG;
  ucp_context_h raw = nullptr;
  const auto s = ucp_init(&params, config, &raw);
  ucp_config_release(config);
  if (s != UCS_OK) return status_error(s, ucx_errc::unavailable, "ucp_init");
  context c;
  c.ctx_.reset(raw);
  return c;
}

caf::expected<worker> worker::create(const context& ctx) {
  ucp_worker_params_t params{};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  params.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h raw = nullptr;
  if (auto s = ucp_worker_create(ctx.get(), &params, &raw); s != UCS_OK)
    return status_error(s, ucx_errc::unavailable, "ucp_worker_create");
  worker w;
  w.worker_.reset(raw);
  return w;
}

// --- request ------------------------------------------------------------------------------------

request::request(request&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)), worker_(other.worker_) {}

request& request::operator=(request&& other) noexcept {
  if (this != &other) {
    release();
    handle_ = std::exchange(other.handle_, nullptr);
    worker_ = other.worker_;
  }
  return *this;
}

request::~request() { release(); }

void request::release() noexcept {
  if (!handle_) return;
  if (ucp_request_check_status(handle_) == UCS_INPROGRESS && worker_) {
    ucp_request_cancel(worker_->get(), handle_);
    while (ucp_request_check_status(handle_) == UCS_INPROGRESS) worker_->progress();
  }
  ucp_request_free(handle_);
  handle_ = nullptr;
}

bool request::done() const noexcept {
  return !handle_ || ucp_request_check_status(handle_) != UCS_INPROGRESS;
}

caf::error request::result() const {
  if (!handle_) return {};
  const auto s = ucp_request_check_status(handle_);
  if (s == UCS_OK) return {};
  if (s == UCS_INPROGRESS) return make_error(ucx_errc::timed_out, "transfer still in progress");
  return status_error(s, ucx_errc::transfer_failed, "transfer");
}

caf::error request::wait(std::initializer_list<const worker*> workers, uint64_t max_spins) {
  for (uint64_t spin = 0; !done(); ++spin) {
    if (max_spins != 0 && spin >= max_spins)
      return make_error(ucx_errc::timed_out, "transfer did not complete in time");
    for (const worker* w : workers) w->progress();
  }
  return result();
}

// --- endpoint -----------------------------------------------------------------------------------

endpoint::endpoint(endpoint&& other) noexcept
    : ep_(std::exchange(other.ep_, nullptr)), worker_(other.worker_) {}

endpoint& endpoint::operator=(endpoint&& other) noexcept {
  if (this != &other) {
    close();
    ep_ = std::exchange(other.ep_, nullptr);
    worker_ = other.worker_;
  }
  return *this;
}

endpoint::~endpoint() { close(); }

void endpoint::close() noexcept {
  if (!ep_) return;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t req = ucp_ep_close_nbx(ep_, &param);
  if (UCS_PTR_IS_PTR(req)) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS) worker_->progress();
    ucp_request_free(req);
  }
  ep_ = nullptr;
}

namespace {

caf::expected<ucp_ep_h> create_endpoint(const worker& w, ucp_ep_params_t& params) {
  params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = on_endpoint_error;
  params.err_handler.arg = nullptr;
  ucp_ep_h ep = nullptr;
  if (auto s = ucp_ep_create(w.get(), &params, &ep); s != UCS_OK)
    return status_error(s, ucx_errc::connect_failed, "ucp_ep_create");
  return ep;
}

}  // namespace

caf::expected<endpoint> endpoint::connect(const worker& w, const std::string& host,
                                          uint16_t port) {
  auto addr = make_sockaddr(host, port);
  if (!addr) return addr.error();
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
  params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*addr);
  params.sockaddr.addrlen = sizeof(sockaddr_in);
  auto ep = create_endpoint(w, params);
  if (!ep) return ep.error();
  endpoint out;
  out.ep_ = *ep;
  out.worker_ = &w;
  return out;
}

caf::expected<endpoint> endpoint::accept(const worker& w, ucp_conn_request_h req) {
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  params.conn_request = req;
  auto ep = create_endpoint(w, params);
  if (!ep) return ep.error();
  endpoint out;
  out.ep_ = *ep;
  out.worker_ = &w;
  return out;
}

caf::expected<request> endpoint::tag_send(std::span<const std::byte> data, ucp_tag_t tag) {
  ucp_request_param_t param{};
  ucs_status_ptr_t r = ucp_tag_send_nbx(ep_, data.data(), data.size(), tag, &param);
  if (UCS_PTR_IS_ERR(r))
    return status_error(UCS_PTR_STATUS(r), ucx_errc::transfer_failed, "ucp_tag_send_nbx");
  if (r == nullptr) return request{};  // completed in place
  return request{r, worker_};
}

caf::expected<request> tag_recv(const worker& w, std::span<std::byte> buffer, ucp_tag_t tag,
                                ucp_tag_t tag_mask) {
  ucp_request_param_t param{};
  ucs_status_ptr_t r = ucp_tag_recv_nbx(w.get(), buffer.data(), buffer.size(), tag, tag_mask,
                                        &param);
  if (UCS_PTR_IS_ERR(r))
    return status_error(UCS_PTR_STATUS(r), ucx_errc::transfer_failed, "ucp_tag_recv_nbx");
  if (r == nullptr) return request{};
  return request{r, &w};
}

// --- listener -----------------------------------------------------------------------------------

void listener::on_connection(ucp_conn_request_h req, void* self) noexcept {
  static_cast<listener*>(self)->pending_.push_back(req);
}

caf::expected<std::unique_ptr<listener>> listener::listen(const worker& w, const std::string& host,
                                                          uint16_t port) {
  auto addr = make_sockaddr(host, port);
  if (!addr) return addr.error();
  // Heap-allocated: UCX keeps the callback argument, so the object must not move.
  auto out = std::unique_ptr<listener>(new listener());
  ucp_listener_params_t params{};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*addr);
  params.sockaddr.addrlen = sizeof(sockaddr_in);
  params.conn_handler.cb = &listener::on_connection;
  params.conn_handler.arg = out.get();
  ucp_listener_h raw = nullptr;
  if (auto s = ucp_listener_create(w.get(), &params, &raw); s != UCS_OK)
    return status_error(s, ucx_errc::unavailable, "ucp_listener_create");
  out->listener_.reset(raw);
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (auto s = ucp_listener_query(raw, &attr); s != UCS_OK)
    return status_error(s, ucx_errc::unavailable, "ucp_listener_query");
  out->port_ = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
  return out;
}

ucp_conn_request_h listener::take_request() noexcept {
  if (pending_.empty()) return nullptr;
  auto* r = pending_.front();
  pending_.pop_front();
  return r;
}

}  // namespace moe::runtime::ucx
