// The data plane between processes: tensor frames (a Cap'n Proto header and a payload) over UCX.
//
// A frame travels as two UCX tag messages: its tensor_frame_header, encoded by
// protocol/frame_codec, in the header tag space, and its payload bytes in the payload tag
// space (layout below, docs/data_plane.md for the rest). The receiver posts a preallocated
// buffer for a transfer tag; the header is decoded and validated, its byte_length checked against
// the buffer, and only then is the payload received, straight into that buffer (rendezvous
// transfers land without any intermediate copy; eager ones, below UCX's rendezvous threshold,
// are copied once out of UCX's bounce buffers, as UCX always does).
//
// Ownership: a data_plane owns its UCX context, worker, listener, endpoints and progress thread.
// Buffers belong to the caller: a payload passed to send() and a buffer passed to post_receive()
// must stay valid (and, for a receive, unread and unwritten) until their callback has run.
// Only host memory: GPU tensors are staged through pinned host buffers (Debian's UCX has no CUDA).
//
// Thread safety: every member function may be called from any thread. The UCX worker is
// confined to one progress thread; send, post_receive, cancel_receive, mark_peer_lost and
// connect hand it a command through a mutex-protected queue. Completion callbacks run on that
// progress thread: they must be short and must not block or throw (an actor's callback sends
// the actor a message); they may call send, post_receive, cancel_receive and mark_peer_lost,
// but not connect (it returns invalid_argument there: connect first) and never stop().
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "base/error.hpp"
#include "protocol/frame_codec.hpp"

namespace prometheus {
class Registry;
}

namespace moe::runtime {

enum class data_plane_errc : uint8_t {
  stopped = 1,       ///< Permanent for this plane: stop() has begun; nothing new is accepted.
  peer_lost,         ///< Transient: the peer stopped or its endpoint failed; reconnect, resend.
  size_mismatch,     ///< Permanent for this frame: header byte_length != posted buffer size.
  rejected_frame,    ///< Permanent for this frame: bad header, or payload length != byte_length.
  cancelled,         ///< Caller's choice: cancel_receive() withdrew the receive.
  invalid_argument,  ///< Permanent: a caller bug (tag out of range, duplicate tag, bad length).
  bad_address,       ///< Permanent: the address string cannot be parsed.
};

/// The IPv4 address peers should use for `host` (a DNS name in Kubernetes, an address
/// elsewhere): for data_plane_options::advertise_host. Errors: bad_address.
[[nodiscard]] caf::expected<std::string> resolve_ipv4(const std::string& host);

/// Errors of UCX itself come as ucx::ucx_errc (runtime/ucx/ucx.hpp): connect_failed and
/// transfer_failed (transient), unavailable (permanent, from start()).
[[nodiscard]] caf::error make_error(data_plane_errc code, std::string text);

/// 64-bit UCX tag layout. The transfer tag a caller sees (tensor_frame_header::transfer_tag,
/// actors' tensor_ref::transfer_id) is the low 63 bits; the top bit picks the tag space.
///
///   bit 63      1: header space (tensor_frame_header, or a control message), 0: payload space
///   bits 62..40 sending plane id (23 bits, never 0): one sender's tags never collide with
///               another's, and a receiver knows whose transfers to fail when a peer is lost
///   bits 39..0  sequence number chosen by the sender (2^40 - 1 is reserved for control)
namespace data_plane_tag {
inline constexpr uint64_t header_bit = uint64_t{1} << 63;
inline constexpr int sequence_bits = 40;
inline constexpr uint64_t sequence_mask = (uint64_t{1} << sequence_bits) - 1;
inline constexpr uint32_t max_plane_id = (uint32_t{1} << 23) - 1;
/// Sequence of the "goodbye" control message a plane sends each peer as it stops.
inline constexpr uint64_t control_sequence = sequence_mask;

[[nodiscard]] constexpr uint64_t make(uint32_t plane_id, uint64_t sequence) noexcept {
  return (uint64_t{plane_id & max_plane_id} << sequence_bits) | (sequence & sequence_mask);
}
[[nodiscard]] constexpr uint32_t plane_of(uint64_t transfer_tag) noexcept {
  return static_cast<uint32_t>((transfer_tag >> sequence_bits) & max_plane_id);
}
[[nodiscard]] constexpr uint64_t sequence_of(uint64_t transfer_tag) noexcept {
  return transfer_tag & sequence_mask;
}
/// A tag a caller may use for a frame: top bit clear, a plane id, not the control sequence.
[[nodiscard]] constexpr bool is_valid_transfer(uint64_t transfer_tag) noexcept {
  return (transfer_tag & header_bit) == 0 && plane_of(transfer_tag) != 0 &&
         sequence_of(transfer_tag) != control_sequence;
}
}  // namespace data_plane_tag

struct data_plane_options {
  /// IPv4 address the listener binds to and advertises.
  std::string host = "127.0.0.1";
  uint16_t port = 0;  ///< 0: an ephemeral port.
  /// The IPv4 address address() names instead of `host` (for a listener on 0.0.0.0).
  std::string advertise_host;
  /// true: client-server mode through a listener (needs tcp in tls); address() is host:port.
  /// false: no listener; address() carries the UCX worker address, which a peer passes to
  /// connect() over a side channel. This works with any transport, pure shared memory included.
  bool listen = true;
  /// UCX_TLS for this plane's context. Empty: $UCX_TLS when set, else "tcp,sm".
  std::string tls;
  /// true: UCX reports a failed peer (connection reset, keepalive), failing its transfers at
  /// once. UCX 1.13 can only do so over tcp, so then even peers on one host talk over tcp.
  /// false: shared memory between processes of a host (and rendezvous through cma); a crashed
  /// peer is then noticed only through mark_peer_lost() (the control plane saw its node go
  /// down) or stop()'s drain timeout. A stopping peer says goodbye either way. Every plane of
  /// a cluster must use the same setting.
  bool detect_peer_failure = true;
  /// This plane's id in transfer tags (1 .. data_plane_tag::max_plane_id); 0: a random one.
  /// A cluster should assign unique ids (the node index + 1): two planes sharing an id can
  /// confuse each other's transfers at a common receiver.
  uint32_t plane_id = 0;
  /// Optional: registers moe_data_plane_* metrics here. Must outlive the plane (hence shared).
  std::shared_ptr<prometheus::Registry> metrics;
  /// stop() waits this long for in-flight transfers before cancelling them.
  std::chrono::milliseconds drain_timeout{10'000};
  /// The progress thread keeps polling (yielding the core between polls) this long after its
  /// last event before it sleeps on the worker's event fd: short enough not to burn a core
  /// while idle, long enough that a reply in a ping-pong usually finds it awake.
  std::chrono::microseconds idle_spin{100};
  /// Headers above this size are rejected without being read.
  size_t max_header_bytes = size_t{1} << 20;
  /// Headers that arrived before their receive was posted wait here; beyond it they are rejected.
  size_t max_unmatched_headers = 4096;
};

/// Counters since start(); a consistent-enough snapshot for tests and logs.
struct data_plane_stats {
  uint64_t num_frames_sent = 0;
  uint64_t num_frames_received = 0;
  uint64_t num_send_failures = 0;
  uint64_t num_receive_failures = 0;  ///< Includes rejected frames, cancels and lost peers.
  uint64_t num_frames_rejected = 0;   ///< Undecodable, oversized, mismatched or truncated frames.
  uint64_t bytes_sent = 0;            ///< Payload bytes.
  uint64_t bytes_received = 0;
};

/// A service; see the file comment for threading and ownership.
class data_plane {
 public:
  using peer_id = uint32_t;
  /// Runs once per accepted send: empty error on success (the payload has left the caller's
  /// buffer, which may be reused).
  using send_callback = std::function<void(caf::error)>;
  /// Runs once per accepted receive: the validated header once the payload is in the buffer.
  using receive_callback = std::function<void(caf::expected<protocol::tensor_frame_header>)>;

  /// Creates the context, worker and (with options.listen) listener, and starts progressing.
  [[nodiscard]] static caf::expected<std::unique_ptr<data_plane>> start(data_plane_options opts);

  data_plane(const data_plane&) = delete;
  data_plane& operator=(const data_plane&) = delete;
  ~data_plane();  ///< stop().

  /// Where peers connect(): "host:port/plane" or "ucx-worker:<hex>/plane". Immutable.
  [[nodiscard]] const std::string& address() const noexcept;
  [[nodiscard]] uint32_t plane_id() const noexcept;
  /// A fresh transfer tag of this plane (sequence numbers wrap after 2^40 - 1).
  [[nodiscard]] uint64_t next_transfer_tag() noexcept;

  /// An endpoint to the plane at `address`. Idempotent: the same address yields the same peer
  /// until that peer is lost; then a new endpoint (and peer id) is made. Waits for the progress
  /// thread (microseconds); endpoint wire-up itself completes lazily with the first send.
  [[nodiscard]] caf::expected<peer_id> connect(const std::string& address);

  /// Sends `header` and then `payload` to `to`. header.transfer_tag must come from this plane
  /// (next_transfer_tag()), header.byte_length must equal payload.size(), and
  /// header.inline_payload must be empty. Returns an error (and never calls `done`) when the
  /// send is refused; otherwise `done` runs exactly once.
  [[nodiscard]] caf::error send(peer_id to, const protocol::tensor_frame_header& header,
                                std::span<const std::byte> payload, send_callback done);

  /// Receives the frame with `transfer_tag` into `buffer`, which must be exactly the frame's
  /// byte_length. A header that does not decode, or whose byte_length differs from
  /// buffer.size(), fails the receive without writing to `buffer` (its payload is discarded).
  /// Returns an error (and never calls `done`) when refused; otherwise `done` runs exactly once.
  [[nodiscard]] caf::error post_receive(uint64_t transfer_tag, std::span<std::byte> buffer,
                                        receive_callback done);

  /// Withdraws a receive whose header has not arrived: its callback gets `cancelled`. A
  /// receive already landing completes as it would have. Unknown tags are ignored.
  void cancel_receive(uint64_t transfer_tag);

  /// The control plane's word that the plane `plane_id` is gone (its node went down): receives
  /// still waiting for its frames fail with peer_lost, and endpoints to it are closed (their
  /// sends fail). Needed where UCX cannot tell by itself (detect_peer_failure = false).
  void mark_peer_lost(uint32_t plane_id);

  [[nodiscard]] data_plane_stats stats() const noexcept;

  /// Refuses new work, fails receives still waiting for a header (`stopped`), waits up to
  /// drain_timeout for sends and landing receives, tells connected peers it is going, closes
  /// endpoints and joins the progress thread. Idempotent; not from a callback.
  void stop();

  struct impl;

 private:
  explicit data_plane(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace moe::runtime

MOE_ERROR_ENUM(moe::runtime::data_plane_errc, "data_plane")
