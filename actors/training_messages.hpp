// Training through the serving actors, the messages (actors/trainer.hpp drives them).
//
// One training step over a batch of sequences:
//  1. forward and backward: every attention shard gets its share of the sequences
//     (train_request) and runs the trunk (model/trunk_training.hpp) layer by layer; each MoE
//     layer goes to its router (train_route_request), which gates, sends the rows to the
//     expert groups (train_expert_batch: unweighted outputs back, activations kept per
//     (router, layer)) and combines. After the loss the shard walks back: each MoE layer's dL/dy
//     to the router (layer_gradient), which sends w * dL/dy per row to the groups
//     (train_expert_grad: dL/d(rows) back; the groups keep their experts' weight gradients),
//     adds the gate's path and answers dL/dx.
//  2. gradients: the trainer asks every owner for its gradients (train_grads): the shards' trunk
//     gradients and the routers' gate gradients and expert loads are summed over the data-
//     parallel shards; the expert groups keep theirs, except the experts held by several groups,
//     whose replicas' gradients are summed. Each owner also reports the squared norm of what
//     only it holds, for clipping by global norm.
//  3. update: every owner gets the summed gradients it shares, the clip factor and the learning
//     rate (train_update) and steps its own AdamW; routers move e_score_correction_bias by the
//     summed loads. Owners of the same values apply the same update to the same numbers, so the
//     shards' copies (and an expert's replicas) stay identical.
// The gradients of a shard's loss are scaled by its share of the batch's predicted positions
// (train_request::loss_scale), so the sum over the shards is the gradient of the batch's mean.
#pragma once

#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "actors/tensor_ref.hpp"

namespace moe::actors {

/// One attention shard's share of a training step: packed sequences.
struct train_request {
  uint64_t step = 0;
  std::vector<int32_t> tokens;
  std::vector<int32_t> cu_seqlens;  ///< (S + 1) boundaries into tokens, from 0 to tokens.size()
  double loss_scale = 1.0;          ///< this share's predicted positions / the batch's
  double balance_alpha = 0.0;       ///< alpha * this share's sequences / the batch's
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_request& x) {
  return f(caf::meta::type_name("train_request"), x.step, x.tokens, x.cu_seqlens, x.loss_scale, x.balance_alpha);
}

struct train_result {
  uint64_t step = 0;
  double loss = 0;                  ///< mean next-token cross-entropy over this share
  int64_t predicted_positions = 0;
  double balance_loss = 0;          ///< summed over the MoE layers, with this share's alpha
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_result& x) {
  return f(caf::meta::type_name("train_result"), x.step, x.loss, x.predicted_positions, x.balance_loss);
}

/// An MoE layer's input in training, for the router: as route_request, plus what the balance
/// loss needs.
struct train_route_request {
  int64_t layer = 0;
  uint64_t step = 0;
  tensor_ref x;                     ///< (T, hidden)
  std::vector<int32_t> cu_seqlens;  ///< (S + 1)
  double balance_alpha = 0.0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_route_request& x) {
  return f(caf::meta::type_name("train_route_request"), x.layer, x.step, x.x, x.cu_seqlens, x.balance_alpha);
}

/// A layer's gradient in the backward: dL/dy of an MoE layer to the router, dL/dx back.
struct layer_gradient {
  int64_t layer = 0;
  uint64_t step = 0;
  tensor_ref grad;  ///< (T, hidden)
  double balance_loss = 0;  ///< in the router's answer: the layer's balance loss of the forward
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, layer_gradient& x) {
  return f(caf::meta::type_name("layer_gradient"), x.layer, x.step, x.grad, x.balance_loss);
}

/// Rows for an expert group in training. The group answers each row's expert output,
/// unweighted (the router needs it for the routing weights' gradient), and keeps what the
/// backward needs under (source, layer) until the next forward of that pair.
struct train_expert_batch {
  int64_t layer = 0;
  uint64_t step = 0;
  int32_t source = 0;            ///< the router's shard
  uint32_t placement_version = 0;
  tensor_ref rows;               ///< (n, hidden)
  std::vector<int32_t> experts;  ///< (n) logical expert per row; shared_expert_row for shared
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_expert_batch& x) {
  return f(caf::meta::type_name("train_expert_batch"), x.layer, x.step, x.source, x.placement_version, x.rows,
           x.experts);
}

/// dL/d(output) of a train_expert_batch's rows, in its row order; answered with dL/d(rows).
struct train_expert_grad {
  int64_t layer = 0;
  uint64_t step = 0;
  int32_t source = 0;
  tensor_ref d_rows;  ///< (n, hidden)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_expert_grad& x) {
  return f(caf::meta::type_name("train_expert_grad"), x.layer, x.step, x.source, x.d_rows);
}

/// An owner's gradients after a step (see the file comment).
struct gradient_report {
  uint64_t step = 0;
  /// The gradients summed across owners, flat in the owner's fixed order: a shard's whole
  /// trunk, a router's gates, an expert group's replicated experts (in the order asked).
  tensor_ref shared;
  /// Squared norm of the gradients only this owner holds (an expert group's other experts).
  double own_norm_sq = 0;
  /// Routers: the step's load per (MoE layer ascending, routed expert).
  std::vector<int64_t> expert_loads;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, gradient_report& x) {
  return f(caf::meta::type_name("gradient_report"), x.step, x.shared, x.own_norm_sq, x.expert_loads);
}

/// The update every owner applies after a step.
struct train_update {
  uint64_t step = 0;
  tensor_ref shared;        ///< the sums of gradient_report::shared, in the same order
  double grad_scale = 1.0;  ///< clipping: every gradient is multiplied by this first
  double lr = 0;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  /// Routers: the load summed over the shards, per (MoE layer, expert), and the bias speed gamma
  /// (b_i += gamma * sign(mean load - load_i); 0: no change).
  std::vector<int64_t> expert_loads;
  double bias_update_speed = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_update& x) {
  return f(caf::meta::type_name("train_update"), x.step, x.shared, x.grad_scale, x.lr, x.beta1, x.beta2, x.eps,
           x.weight_decay, x.expert_loads, x.bias_update_speed);
}

/// A training step's hyperparameters (the trainer passes them to every owner).
struct train_hyper {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  double grad_clip = 1.0;              ///< max global gradient norm; <= 0: no clipping
  double balance_alpha = 0.0001;       ///< the sequence-wise balance loss weight; 0: none
  double bias_update_speed = 0.001;    ///< gamma of the routing-bias update; 0: none
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_hyper& x) {
  return f(caf::meta::type_name("train_hyper"), x.lr, x.beta1, x.beta2, x.eps, x.weight_decay, x.grad_clip,
           x.balance_alpha, x.bias_update_speed);
}

/// One step's batch for the trainer: packed sequences, split over the attention shards.
struct train_batch {
  uint64_t step = 0;
  std::vector<int32_t> tokens;
  std::vector<int32_t> cu_seqlens;  ///< (S + 1) boundaries into tokens, from 0 to tokens.size()
  train_hyper hyper;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_batch& x) {
  return f(caf::meta::type_name("train_batch"), x.step, x.tokens, x.cu_seqlens, x.hyper);
}

/// What one step did.
struct train_step_report {
  uint64_t step = 0;
  double loss = 0;          ///< mean next-token cross-entropy over the batch, before the update
  double balance_loss = 0;  ///< the sequence-wise balance loss (0 with alpha 0)
  int64_t tokens = 0;
  int64_t predicted_positions = 0;
  double grad_norm = 0;     ///< global gradient norm before clipping
  double seconds = 0;       ///< wall time of the whole step (forward, backward, all-reduce, update)
  std::vector<double> load_balance;  ///< per MoE layer (ascending): max / mean expert load of the step
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, train_step_report& x) {
  return f(caf::meta::type_name("train_step_report"), x.step, x.loss, x.balance_loss, x.tokens,
           x.predicted_positions, x.grad_norm, x.seconds, x.load_balance);
}

/// An owner's parameters and AdamW state, for a checkpoint (train_state).
struct owner_state {
  std::vector<std::string> names;             ///< hub names
  std::vector<std::vector<int64_t>> shapes;
  tensor_ref values;                          ///< every parameter laid end to end, in names' order
  /// AdamW's moments of the parameters that have them (has_moments), in names' order: m then v
  /// of each, float64 values carried as their bit patterns in two float32 slots each (the data
  /// plane moves float32 tensors; the bits arrive unchanged).
  tensor_ref moments;
  std::vector<uint8_t> has_moments;           ///< per name
  int64_t optimizer_steps = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, owner_state& x) {
  return f(caf::meta::type_name("owner_state"), x.names, x.shapes, x.values, x.moments, x.has_moments,
           x.optimizer_steps);
}

/// A training job: a tokenised corpus cut into sequences, and how to train on it.
struct training_job {
  std::vector<int32_t> tokens;     ///< the corpus
  int64_t sequence_length = 64;    ///< tokens per sequence (windows of the corpus, no overlap)
  int64_t batch_sequences = 8;     ///< sequences per step
  int64_t steps = 100;
  train_hyper hyper;               ///< hyper.lr is the peak learning rate
  int64_t warmup_steps = 0;        ///< linear warmup, then cosine decay to min_lr at the last step
  double min_lr = 0;
  uint64_t seed = 0;               ///< the order in which windows are visited (reshuffled each epoch)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, training_job& x) {
  return f(caf::meta::type_name("training_job"), x.tokens, x.sequence_length, x.batch_sequences, x.steps, x.hyper,
           x.warmup_steps, x.min_lr, x.seed);
}

/// A training job's progress, sent to its subscriber after every step and once at the end.
struct training_event {
  uint64_t job = 0;
  int64_t step = 0;    ///< steps done
  int64_t steps = 0;   ///< steps asked for
  double loss = 0;     ///< the last step's
  double lr = 0;       ///< the last step's learning rate
  double grad_norm = 0;
  double tokens_per_second = 0;      ///< since the job started
  std::vector<double> load_balance;  ///< the last step's max/mean expert load per MoE layer
  bool finished = false;
  uint8_t state = 0;                 ///< a job_state (actors/messages.hpp)
  std::string error;                 ///< set when the job failed
  std::string checkpoint;            ///< set on the event after a checkpoint was written there
  uint32_t rollbacks = 0;            ///< node failures survived by rolling back to a snapshot
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, training_event& x) {
  return f(caf::meta::type_name("training_event"), x.job, x.step, x.steps, x.loss, x.lr, x.grad_norm,
           x.tokens_per_second, x.load_balance, x.finished, x.state, x.error, x.checkpoint, x.rollbacks);
}

using train_step_atom = caf::atom_constant<caf::atom("train_step")>;
using train_forward_atom = caf::atom_constant<caf::atom("train_fwd")>;
using train_backward_atom = caf::atom_constant<caf::atom("train_bwd")>;
using train_grads_atom = caf::atom_constant<caf::atom("train_grad")>;
using train_apply_atom = caf::atom_constant<caf::atom("train_appl")>;
using train_state_atom = caf::atom_constant<caf::atom("train_stat")>;
using train_save_atom = caf::atom_constant<caf::atom("train_save")>;
/// (train_restore_atom, owner_state snapshot, train_hyper): an owner rolls back to the trainer's
/// snapshot (actors/trainer.hpp, recovery): every parameter it holds takes the snapshot's values
/// and AdamW moments of its name, its optimizer the snapshot's step count and the hyper's betas,
/// eps and weight decay; its gradients and passes in flight are dropped. Answers the optimizer
/// steps restored.
using train_restore_atom = caf::atom_constant<caf::atom("train_rest")>;

}  // namespace moe::actors
