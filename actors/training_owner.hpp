// What every owner of trainable parameters does between two training steps (the protocol is in
// actors/training_messages.hpp): report gradients as one flat tensor, take the summed gradients
// back, clip, and step its own AdamW. Attention shards, routers and expert groups each hold one.
//
// Ownership: owns the AdamW moments of the owner's parameters; borrows parameters and gradients
// for the duration of a call. Thread safety: confined to the owning actor.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <span>
#include <vector>

#include "actors/tensor_transport.hpp"
#include "actors/training_messages.hpp"
#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "model/optimizer.hpp"

namespace moe::actors {

/// grads laid end to end.
[[nodiscard]] std::vector<float> flatten_grads(std::span<const std::span<float>> grads);

/// Sum of every element squared, in double.
[[nodiscard]] double grads_norm_sq(std::span<const std::span<float>> grads);

/// Overwrites `grads` with `flat` (flatten_grads' layout). model_errc::bad_input, nothing
/// written, when the sizes differ.
[[nodiscard]] caf::error unflatten_grads(std::span<const float> flat, std::span<const std::span<float>> grads);

/// One parameter as a checkpoint sees it.
struct state_entry {
  std::string name;
  std::vector<int64_t> shape;
  std::span<const float> values;
};

/// Adds an owner_state's parameters to `weights` and their moments to `moments` (a name already
/// there is kept: the first owner reporting a replicated parameter wins). model_errc::bad_input
/// for a malformed state.
[[nodiscard]] caf::error unpack_owner_state(const owner_state& state, model::checkpoint& weights,
                                            std::map<std::string, model::adamw::moments, std::less<>>& moments);

/// The owner states of several owners as one (a trainer's snapshot of the whole model): every
/// name once, the first owner reporting a replicated parameter wins; optimizer_steps the first
/// state's. model_errc::bad_input for a malformed state. The tensors must be local.
[[nodiscard]] caf::expected<owner_state> merge_owner_states(const std::vector<owner_state>& states);

/// export_tensor (actors/tensor_transport.hpp) of both tensors of `s`, for `dest`'s process.
[[nodiscard]] caf::error export_owner_state(const tensor_transport& transport, const caf::node_id& here,
                                            const caf::node_id& dest, owner_state& s);

/// Answers train_grads: `r` readied for the requester's process (its gradients exported).
template <class Self>
caf::result<gradient_report> answer_gradients(Self* self, const tensor_transport& transport,
                                              caf::expected<gradient_report> r) {
  if (!r) return std::move(r.error());
  const runtime::tensor_frame_meta meta{protocol::frame_kind::gradients, 0, r->step, 0};
  if (auto err = export_tensor(transport, self->node(), reply_node(self), r->shared, meta)) return err;
  return std::move(*r);
}

/// Answers train_apply: apply(update) (returning caf::expected<uint64_t>) once the summed
/// gradients are local.
template <class Self, class Apply>
caf::result<uint64_t> receive_update(Self* self, const tensor_transport& transport, train_update& u, Apply apply) {
  auto shared = std::move(u.shared);
  return answer_when_local<uint64_t>(self, transport, std::move(shared),
                                     [u = std::move(u), apply = std::move(apply)](tensor_ref& landed) mutable {
                                       u.shared = std::move(landed);
                                       return apply(u);
                                     });
}

/// Answers train_restore: restore(snapshot) (returning caf::expected<int64_t>) once both of the
/// snapshot's tensors are local.
template <class Self, class Restore>
caf::result<int64_t> receive_restore(Self* self, const tensor_transport& transport, owner_state& snapshot,
                                     Restore restore) {
  auto held = std::make_shared<owner_state>(std::move(snapshot));
  auto rp = self->template make_response_promise<int64_t>();
  auto fail = [rp](caf::error& e) mutable { rp.deliver(std::move(e)); };
  with_local_tensor(
      self, transport, held->values,
      [self, transport, held, rp, fail, restore = std::move(restore)](tensor_ref& values) mutable {
        held->values = std::move(values);
        with_local_tensor(
            self, transport, held->moments,
            [held, rp, restore = std::move(restore)](tensor_ref& moments) mutable {
              held->moments = std::move(moments);
              auto r = restore(*held);
              if (r) rp.deliver(*r);
              else rp.deliver(std::move(r.error()));
            },
            fail);
      },
      fail);
  return rp;
}

/// A parameter an owner rolls back, and where its values live.
struct restore_target {
  std::string name;
  std::span<float> values;
};

class training_owner {
 public:
  /// The step's update: every gradient of `grads` (which must be those of `params`) scaled by
  /// update.grad_scale when it is below 1, then one AdamW step over `params` at update.lr with
  /// update's hyperparameters (fixed by the first update: a later change is refused). The caller
  /// has loaded the summed gradients already (unflatten_grads) and zeroes them afterwards.
  [[nodiscard]] caf::error apply(const train_update& update, std::span<const model::parameter_ref> params,
                                 std::span<const std::span<float>> grads);

  /// `entries` and their AdamW moments (where the optimizer has them), for a checkpoint.
  [[nodiscard]] owner_state state(std::span<const state_entry> entries) const;

  /// Rolls back to `snapshot` (a trainer's; its tensors local): every target takes the values of
  /// the snapshot's entry of its name and that entry's AdamW moments; the optimizer the snapshot's
  /// step count and `options` (no optimizer, as before the first update, when the snapshot counts
  /// no step). Errors (model_errc::bad_input, nothing changed): a malformed snapshot, a target it
  /// lacks or holds with another number of values.
  [[nodiscard]] caf::error restore(const owner_state& snapshot, std::span<const restore_target> targets,
                                   const model::adamw_options& options);

  /// Takes the moments of parameters that arrived from another owner (a moved replica); false
  /// (nothing taken) before this owner's first update, when it has no optimizer to put them in.
  bool adopt(std::map<std::string, model::adamw::moments, std::less<>> moments);

  /// The moments so far (empty before the first update), for checkpoints.
  [[nodiscard]] const std::optional<model::adamw>& optimizer() const noexcept { return optimizer_; }

 private:
  std::optional<model::adamw> optimizer_;
};

}  // namespace moe::actors
