// Tensors in messages between processes: the actor side of runtime/tensor_exchange.hpp.
//
// A sender calls export_tensor() on each tensor_ref of a message before sending it: within the
// process it does nothing (the receiver shares the buffer), to another process it pushes the
// bytes over the data plane and stamps the ref with the transfer tag. A receiver that finds a
// ref without a local buffer calls with_local_tensor(): the process's tensor fetcher pulls the
// tag into a fresh buffer and the continuation runs in the receiving actor, as any response
// does. A transfer that does not land within the fetch timeout (its sender died without UCX
// noticing, or its control message outran a send that then failed) fails with a clear error.
//
// Ownership: a tensor_transport is a pair of shared handles (the process's exchange and its
// fetcher); copying it is cheap. An empty transport (single process) rejects remote tensors.
// Thread safety: the fetcher is an actor; export_tensor may be called from any actor.
#pragma once

#include <caf/fwd.hpp>
#include <caf/node_id.hpp>

#include <chrono>
#include <memory>

#include "actors/messages.hpp"
#include "base/error.hpp"
#include "runtime/tensor_exchange.hpp"

namespace moe::actors {

using fetch_tensor_atom = caf::atom_constant<caf::atom("fetch_tsr")>;
using tensor_landed_atom = caf::atom_constant<caf::atom("tsr_land")>;
using tensor_expired_atom = caf::atom_constant<caf::atom("tsr_expire")>;

/// fetch: the same tensor with its bytes local. landed/expired: internal (the exchange's
/// callback and the fetch timeout).
using tensor_fetcher_actor =
    caf::typed_actor<caf::replies_to<fetch_tensor_atom, tensor_ref>::with<tensor_ref>,
                     caf::reacts_to<tensor_landed_atom, uint64_t>,
                     caf::reacts_to<tensor_expired_atom, uint64_t>>;

struct tensor_transport {
  std::shared_ptr<runtime::tensor_exchange> exchange;  ///< null: this process talks to no other
  tensor_fetcher_actor fetcher;
  [[nodiscard]] explicit operator bool() const noexcept { return exchange != nullptr; }
};

/// The process's fetcher for `exchange`.
[[nodiscard]] tensor_fetcher_actor spawn_tensor_fetcher(caf::actor_system& sys,
                                                        std::shared_ptr<runtime::tensor_exchange> exchange,
                                                        std::chrono::milliseconds timeout = std::chrono::seconds(60));

/// A transport with a fresh fetcher, or an empty one for a null exchange.
[[nodiscard]] tensor_transport make_tensor_transport(caf::actor_system& sys,
                                                     std::shared_ptr<runtime::tensor_exchange> exchange);

/// Ends `transport`'s fetcher and waits until it has terminated; the exchange stays. Its state
/// shares the exchange, so once this returns, dropping the owner's last reference
/// (`transport = {}`) stops the data plane there and then, not whenever the fetcher's state
/// happens to go. The fetcher is ended, not released: its fetch timers hold it for up to the
/// fetch timeout, which is harmless as it is not detached. No fetcher: nothing to do.
void end_tensor_fetcher(caf::actor_system& sys, tensor_transport& transport);

/// True when `t` names bytes in another process that have to be fetched.
[[nodiscard]] inline bool is_remote(const tensor_ref& t) noexcept { return !t.local && t.num_elements() > 0; }

/// Readies `t` for a message to an actor in the process `dest` (`here`: this process). Errors:
/// another process but no transport, or the push is refused.
[[nodiscard]] caf::error export_tensor(const tensor_transport& transport, const caf::node_id& here,
                                       const caf::node_id& dest, tensor_ref& t,
                                       const runtime::tensor_frame_meta& meta);

/// An error for a remote tensor that cannot be fetched (no transport).
[[nodiscard]] caf::error no_transport_error();

/// Runs ok(tensor_ref) in `self` once `t`'s bytes are local (at once when they are), or
/// fail(caf::error). The fetcher's answer arrives as a response, so `self` keeps serving other
/// messages meanwhile.
template <class Self, class Ok, class Fail>
void with_local_tensor(Self* self, const tensor_transport& transport, tensor_ref t, Ok ok, Fail fail) {
  if (!is_remote(t)) {
    if (!t.local) t.local = std::make_shared<const std::vector<float>>();
    ok(t);
    return;
  }
  if (!transport) {
    auto err = no_transport_error();
    fail(err);
    return;
  }
  self->request(transport.fetcher, caf::infinite, fetch_tensor_atom::value, std::move(t))
      .then(std::move(ok), std::move(fail));
}

/// Answers a request whose input tensor may be in another process: compute(tensor_ref& local)
/// (returning caf::expected<R>) runs at once when `input` is local, else once it landed, and its
/// value or error is the answer. The sender's process, where an output tensor must go, is
/// `reply_node(self)`, captured before any fetch.
template <class R, class Self, class Compute>
caf::result<R> answer_when_local(Self* self, const tensor_transport& transport, tensor_ref input, Compute compute) {
  if (!is_remote(input)) {
    caf::expected<R> r = compute(input);
    if (!r) return std::move(r.error());
    return std::move(*r);
  }
  auto rp = self->template make_response_promise<R>();
  with_local_tensor(
      self, transport, std::move(input),
      [rp, compute = std::move(compute)](tensor_ref& landed) mutable {
        caf::expected<R> r = compute(landed);
        if (r) rp.deliver(std::move(*r));
        else rp.deliver(std::move(r.error()));
      },
      [rp](caf::error& e) mutable { rp.deliver(std::move(e)); });
  return rp;
}

/// The process of the current message's sender (this one when it has none).
template <class Self>
caf::node_id reply_node(Self* self) {
  const auto& sender = self->current_sender();
  return sender ? sender->node() : self->node();
}

}  // namespace moe::actors
