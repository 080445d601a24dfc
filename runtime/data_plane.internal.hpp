// Internals of the data plane (data_plane.hpp), shared by data_plane.cpp (set-up, the progress
// loop, shutdown, the public API) and data_plane.transfers.cpp (endpoints, sends, receives).
// Not for use outside those two files.
//
// Every member of data_plane::impl under "Confined to the progress thread" is touched only by
// that thread; UCX callbacks run inside ucp_worker_progress, on it too.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <netinet/in.h>
#include <optional>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "runtime/data_plane.hpp"
#include "runtime/ucx/ucx.hpp"

namespace prometheus {
class Counter;
class Histogram;
}  // namespace prometheus

namespace moe::runtime::data_plane_detail {

namespace tag = data_plane_tag;
using protocol::tensor_frame_header;
using steady = std::chrono::steady_clock;

inline constexpr std::string_view worker_address_prefix = "ucx-worker:";

[[nodiscard]] caf::error status_error(ucs_status_t s, const std::string& what);

class unique_fd {
 public:
  explicit unique_fd(int fd = -1) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  ~unique_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  [[nodiscard]] int get() const noexcept { return fd_; }

 private:
  int fd_;
};

// "host:port[/plane]" or "ucx-worker:<hex>[/plane]"; plane in hex, 0 when absent.
struct peer_address {
  bool is_worker = false;
  sockaddr_in sockaddr{};
  std::vector<std::byte> worker_address;
  uint32_t plane = 0;
};

[[nodiscard]] caf::expected<peer_address> parse_address(const std::string& text);
[[nodiscard]] std::string to_hex(std::span<const std::byte> bytes);

// Metrics of one plane (several planes in a process share the series); docs/metrics.md.
struct data_plane_metrics {
  explicit data_plane_metrics(prometheus::Registry& r);
  prometheus::Counter* bytes_total[2];  // {direction}
  prometheus::Counter* ok[2];           // transfers_total{direction, outcome="ok"}
  prometheus::Counter* failed[2];       // outcome="error"
  prometheus::Counter* rejected[2];     // outcome="rejected"
  prometheus::Histogram* transfer_seconds[2];
};

enum direction : int { sending = 0, receiving = 1 };
enum class outcome { ok, error, rejected };

}  // namespace moe::runtime::data_plane_detail

namespace moe::runtime {

struct data_plane::impl {
  using peer_address = data_plane_detail::peer_address;
  using tensor_frame_header = protocol::tensor_frame_header;
  using steady = data_plane_detail::steady;
  using unique_fd = data_plane_detail::unique_fd;
  using data_plane_metrics = data_plane_detail::data_plane_metrics;
  using direction = data_plane_detail::direction;
  using outcome = data_plane_detail::outcome;

  struct send_op;
  struct endpoint_state {
    impl* owner = nullptr;
    peer_id id = 0;
    std::string address;        // as given to connect(); empty for an accepted endpoint
    uint32_t remote_plane = 0;  // 0: unknown
    ucp_ep_h ep = nullptr;
    bool failed = false;
    // Client-server endpoints are wired up asynchronously: a flush tells when that is over
    // (see start_wire_up). Sends wait for `ready`; closing waits for `wiring_up` to clear.
    bool ready = false;
    bool wiring_up = false;
    void* flush_request = nullptr;
    std::vector<send_op*> waiting;
  };
  struct send_part {  // the header or the payload message of a send
    send_op* op = nullptr;
    void* request = nullptr;
    bool done = false;
  };
  struct send_op {
    impl* owner = nullptr;
    peer_id to = 0;
    uint64_t transfer_tag = 0;
    std::vector<std::byte> header_bytes;
    std::span<const std::byte> payload;
    send_callback done;
    steady::time_point submitted;
    send_part parts[2];
    int num_pending = 0;  // parts in flight, plus one while do_send is still submitting
    ucs_status_t status = UCS_OK;
    endpoint_state* endpoint = nullptr;
  };
  struct receive_op {
    impl* owner = nullptr;
    uint64_t transfer_tag = 0;
    std::span<std::byte> buffer;
    receive_callback done;
    std::optional<tensor_frame_header> header;  // set once matched
    steady::time_point matched;
    void* request = nullptr;  // the payload receive while it lands
  };
  struct discard_op {  // the payload of a refused frame, being dropped
    impl* owner = nullptr;
    void* request = nullptr;
  };
  struct header_op {  // one header being read out of UCX's unexpected queue
    impl* owner = nullptr;
    void* request = nullptr;
    uint64_t ucx_tag = 0;
    size_t length = 0;
    std::vector<std::byte> bytes;
  };
  struct connect_command {
    std::string text;
    peer_address where;
    std::promise<caf::expected<peer_id>> result;
  };
  struct cancel_command {
    uint64_t transfer_tag = 0;
  };
  struct peer_lost_command {
    uint32_t plane = 0;
  };
  using command = std::variant<connect_command, std::unique_ptr<send_op>,
                               std::unique_ptr<receive_op>, cancel_command, peer_lost_command>;

  // Immutable after start().
  data_plane_options opts;
  uint32_t plane_id = 0;
  std::string address;
  std::unique_ptr<std::remove_pointer_t<ucp_context_h>, ucx::context_deleter> context;
  std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, ucx::worker_deleter> worker;
  std::unique_ptr<std::remove_pointer_t<ucp_listener_h>, ucx::listener_deleter> listener;
  unique_fd epoll_fd, wake_fd;
  std::optional<data_plane_metrics> metrics;

  // Shared with callers.
  std::atomic<uint64_t> next_sequence{1};
  std::mutex mutex;
  std::vector<command> queue;   // guarded by mutex
  bool accepting = true;        // guarded by mutex
  bool stop_requested = false;  // guarded by mutex
  std::atomic<bool> sleeping{false};
  std::thread thread;
  std::thread::id thread_id;
  std::once_flag stop_once;
  struct {
    std::atomic<uint64_t> frames_sent{0}, frames_received{0}, send_failures{0}, receive_failures{0},
        frames_rejected{0}, bytes_sent{0}, bytes_received{0};
  } counters;

  // Confined to the progress thread.
  std::vector<std::unique_ptr<endpoint_state>> endpoints;  // peer_id = index + 1
  std::unordered_map<std::string, peer_id> by_address;
  std::vector<ucp_conn_request_h> conn_requests;
  std::unordered_map<uint64_t, std::unique_ptr<receive_op>> posted;  // awaiting their header
  std::unordered_map<uint64_t, caf::expected<tensor_frame_header>> unmatched;  // header first
  std::unordered_map<receive_op*, std::unique_ptr<receive_op>> landing;
  std::unordered_map<send_op*, std::unique_ptr<send_op>> in_flight;
  std::unordered_map<header_op*, std::unique_ptr<header_op>> headers;
  std::unordered_map<discard_op*, std::unique_ptr<discard_op>> discards;
  std::unordered_set<uint32_t> lost_planes;
  std::vector<void*> closing;  // ucp_ep_close_nbx requests
  bool worker_gone = false;

  static caf::expected<std::unique_ptr<impl>> create(data_plane_options o);
  caf::error submit(command c);
  void run();

  // Progress-thread steps.
  bool execute_commands();
  caf::expected<peer_id> do_connect(const std::string& text, const peer_address& where);
  void do_send(std::unique_ptr<send_op> op);
  void start_send(send_op* raw);
  void start_wire_up(endpoint_state* e);
  void endpoint_ready(endpoint_state* e, ucs_status_t status);
  void do_post(std::unique_ptr<receive_op> op);
  void do_cancel(uint64_t transfer_tag);
  bool accept_connections();
  bool receive_headers();
  void on_header(header_op* h, ucs_status_t status);
  void match(std::unique_ptr<receive_op> op, caf::expected<tensor_frame_header> header);
  void discard_payload(uint64_t transfer_tag);
  void on_payload(receive_op* op, ucs_status_t status, size_t length);
  void fail_receive(receive_op& op, caf::error e);
  void reject_frame();
  void finish_send(send_op* op);
  void endpoint_failed(endpoint_state* e, ucs_status_t status);
  void plane_gone(uint32_t plane, const std::string& why);
  bool reap_closing();
  [[nodiscard]] ucp_err_handling_mode_t error_handling_mode() const {
    // PEER: a lost peer fails its requests instead of leaving them hanging, but UCX 1.13 then
    // uses only transports that can tell, which here is tcp alone.
    return opts.detect_peer_failure ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  }
  void sleep_until_event();
  void shutdown();
  void record(direction d, outcome o, uint64_t bytes, steady::time_point since);
};

}  // namespace moe::runtime

namespace moe::runtime::data_plane_detail {

using impl = data_plane::impl;

// UCX callbacks (data_plane.transfers.cpp).
void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) noexcept;
void on_connection(ucp_conn_request_h req, void* arg) noexcept;

}  // namespace moe::runtime::data_plane_detail
