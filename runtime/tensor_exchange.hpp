// Moves float tensors between the processes of a cluster over the UCX data plane, for actors
// whose messages carry tensor handles (actors/messages.hpp, tensor_ref) instead of the bytes.
//
// Push, then pull: the sender pushes the bytes to the receiving process as soon as it knows
// where the message goes (push() returns the transfer tag the message carries), then sends its
// control message; the receiver, holding the message, pulls the tag into a buffer it allocates
// for the tensor's shape (pull()). The payload lands straight in that buffer, which becomes the
// tensor the actor works on: no copy beyond UCX's own. Headers that arrive before their pull
// wait in the data plane (data_plane_options::max_unmatched_headers).
//
// Where each process's plane is: a directory from CAF node id (what a remote actor handle
// carries) to data plane address, filled by whoever assembles the cluster (add_peer()).
//
// Ownership: owns its data plane. A pushed buffer is kept alive (shared) until UCX has sent it.
// Thread safety: every member function may be called from any thread; pull callbacks run on the
// data plane's progress thread (short, non-blocking: an actor callback sends a message).
#pragma once

#include <caf/node_id.hpp>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "runtime/data_plane.hpp"

namespace moe::runtime {

/// What a frame's header says about the tensor besides its shape (for logs, checks, metrics).
struct tensor_frame_meta {
  protocol::frame_kind kind = protocol::frame_kind::activations;
  uint32_t layer = 0;
  uint64_t step = 0;
  uint32_t placement_version = 0;
};

class tensor_exchange {
 public:
  using buffer = std::vector<float>;
  /// The landed tensor (its own buffer), or why it did not land.
  using pull_callback = std::function<void(caf::expected<std::shared_ptr<buffer>>)>;

  /// Starts the exchange's data plane (see data_plane_options).
  [[nodiscard]] static caf::expected<std::shared_ptr<tensor_exchange>> start(data_plane_options options);

  tensor_exchange(const tensor_exchange&) = delete;
  tensor_exchange& operator=(const tensor_exchange&) = delete;
  ~tensor_exchange();  ///< Stops the data plane.

  /// Where peers reach this process's plane.
  [[nodiscard]] const std::string& address() const noexcept;
  [[nodiscard]] data_plane& plane() noexcept { return *plane_; }

  /// Records where the process `node` receives; replaces an older address (a restarted node).
  void add_peer(const caf::node_id& node, std::string address);
  [[nodiscard]] bool knows(const caf::node_id& node) const;

  /// Sends `values` (shape `shape`) to the process `to` and returns the transfer tag that the
  /// control message must carry. Errors: `to` is not in the directory (invalid_argument), the
  /// plane refuses (stopped, connect failure). A send that fails later is logged and counted by
  /// the plane; the receiver's pull then fails (peer_lost) or times out.
  [[nodiscard]] caf::expected<uint64_t> push(const caf::node_id& to, std::shared_ptr<const buffer> values,
                                             const std::vector<int64_t>& shape, const tensor_frame_meta& meta);

  /// Receives the tensor with `transfer_tag` and shape `shape` into a fresh buffer; `done` runs
  /// once (on the progress thread) unless an error is returned here. A frame whose header
  /// describes another shape or dtype is rejected (size_mismatch / rejected_frame).
  [[nodiscard]] caf::error pull(uint64_t transfer_tag, const std::vector<int64_t>& shape, pull_callback done);

  /// Withdraws a pull whose header has not arrived; its callback gets `cancelled`.
  void cancel(uint64_t transfer_tag) { plane_->cancel_receive(transfer_tag); }

 private:
  explicit tensor_exchange(std::unique_ptr<data_plane> plane) : plane_(std::move(plane)) {}
  std::unique_ptr<data_plane> plane_;
  mutable std::mutex mutex_;
  std::map<caf::node_id, std::string> peers_;
};

}  // namespace moe::runtime
