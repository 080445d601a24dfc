#include "actors/tensor_transport.hpp"

#include <caf/all.hpp>

#include <unordered_map>

#include "model/model_errc.hpp"

namespace moe::actors {

namespace {

// Written by the exchange's callback (progress thread) before it sends tensor_landed; read by
// the fetcher after it receives that message, so the mailbox orders the two.
struct landing {
  caf::expected<std::shared_ptr<std::vector<float>>> result{caf::error{}};
};

struct pending_fetch {
  caf::typed_response_promise<tensor_ref> promise;
  tensor_ref ref;
  std::shared_ptr<landing> slot;
  bool expired = false;
};

struct fetcher_state {
  std::shared_ptr<runtime::tensor_exchange> exchange;
  std::chrono::milliseconds timeout{0};
  std::unordered_map<uint64_t, pending_fetch> pending;
  static inline const char* name = "tensor_fetcher";
};

using pointer = tensor_fetcher_actor::stateful_pointer<fetcher_state>;

caf::result<tensor_ref> fetch(pointer self, tensor_ref& t) {
  auto& st = self->state;
  if (!is_remote(t)) return t;
  if (t.transfer_id == 0)
    return model::make_error(model::model_errc::bad_input, "a remote tensor without a transfer tag");
  if (st.pending.count(t.transfer_id))
    return runtime::make_error(runtime::data_plane_errc::invalid_argument,
                               "tensor " + std::to_string(t.transfer_id) + " is fetched twice");
  auto slot = std::make_shared<landing>();
  const uint64_t tag = t.transfer_id;
  auto handle = caf::actor_cast<caf::actor>(self);
  auto err = st.exchange->pull(tag, t.shape, [slot, handle, tag](auto result) {
    slot->result = std::move(result);
    caf::anon_send(handle, tensor_landed_atom::value, tag);
  });
  if (err) return err;
  pending_fetch p{self->make_response_promise<tensor_ref>(), t, slot, false};
  auto promise = p.promise;
  st.pending.emplace(tag, std::move(p));
  self->delayed_send(self, st.timeout, tensor_expired_atom::value, tag);
  return promise;
}

void landed(pointer self, uint64_t tag) {
  auto& st = self->state;
  auto it = st.pending.find(tag);
  if (it == st.pending.end()) return;
  auto p = std::move(it->second);
  st.pending.erase(it);
  if (!p.slot->result) {
    if (p.expired)
      p.promise.deliver(runtime::make_error(
          runtime::data_plane_errc::peer_lost,
          "tensor " + std::to_string(tag) + " from data plane " +
              std::to_string(runtime::data_plane_tag::plane_of(tag)) + " did not arrive within " +
              std::to_string(st.timeout.count()) + " ms"));
    else
      p.promise.deliver(p.slot->result.error());
    return;
  }
  p.ref.local = std::move(*p.slot->result);
  p.promise.deliver(std::move(p.ref));
}

}  // namespace

tensor_fetcher_actor spawn_tensor_fetcher(caf::actor_system& sys, std::shared_ptr<runtime::tensor_exchange> exchange,
                                          std::chrono::milliseconds timeout) {
  auto impl = [](pointer self, std::shared_ptr<runtime::tensor_exchange> ex,
                 std::chrono::milliseconds t) -> tensor_fetcher_actor::behavior_type {
    self->state.exchange = std::move(ex);
    self->state.timeout = t;
    return {
        [self](fetch_tensor_atom, tensor_ref& t) { return fetch(self, t); },
        [self](tensor_landed_atom, uint64_t tag) { landed(self, tag); },
        [self](tensor_expired_atom, uint64_t tag) {
          auto it = self->state.pending.find(tag);
          if (it == self->state.pending.end()) return;
          it->second.expired = true;
          // The cancel's callback (or the frame landing after all) ends the fetch.
          self->state.exchange->cancel(tag);
        },
    };
  };
  return sys.spawn(impl, std::move(exchange), timeout);
}

tensor_transport make_tensor_transport(caf::actor_system& sys, std::shared_ptr<runtime::tensor_exchange> exchange) {
  tensor_transport t;
  if (!exchange) return t;
  t.fetcher = spawn_tensor_fetcher(sys, exchange);
  t.exchange = std::move(exchange);
  return t;
}

void end_tensor_fetcher(caf::actor_system& sys, tensor_transport& transport) {
  if (!transport.fetcher) return;
  caf::scoped_actor self{sys};
  caf::anon_send_exit(transport.fetcher, caf::exit_reason::user_shutdown);
  self->wait_for(transport.fetcher);
  transport.fetcher = nullptr;
}

caf::error no_transport_error() {
  return runtime::make_error(runtime::data_plane_errc::invalid_argument,
                             "received a tensor from another process, but this process has no data plane");
}

caf::error export_tensor(const tensor_transport& transport, const caf::node_id& here, const caf::node_id& dest,
                         tensor_ref& t, const runtime::tensor_frame_meta& meta) {
  if (dest == here || t.num_elements() == 0) return {};
  if (!t.local) return model::make_error(model::model_errc::bad_input, "export of a tensor whose bytes are elsewhere");
  if (!transport)
    return runtime::make_error(runtime::data_plane_errc::invalid_argument,
                               "a tensor for another process, but this process has no data plane");
  auto tag = transport.exchange->push(dest, t.local, t.shape, meta);
  if (!tag) return tag.error();
  t.transfer_id = *tag;
  return {};
}

}  // namespace moe::actors
