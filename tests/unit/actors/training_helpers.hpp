// What the tests of training through the actors share (training_test.cpp in one process,
// multi_process_training_test.cpp across processes): golden.json's AdamW hyperparameters, the
// golden batch packed for the trainer, the same steps on the single-process training_model, a
// trainer's step and checkpoint asked for synchronously, and a trainer over a cluster in this
// process.
#pragma once

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "actors/trainer.hpp"
#include "actors/training_messages.hpp"
#include "model/optimizer.hpp"
#include "model/training_model.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/unit/model/tiny_training_data.hpp"

namespace moe::actors::testing {

/// golden.json's "adamw": lr, betas, eps, weight_decay and the losses before each of 4 steps.
inline nlohmann::json golden_adamw() {
  std::ifstream in(model::testing::tiny_dir() / "golden.json");
  return nlohmann::json::parse(in)["adamw"];
}

/// golden.json's AdamW, without clipping, balance loss or routing-bias update.
inline train_hyper golden_hyper() {
  const auto g = golden_adamw();
  train_hyper h;
  h.lr = g["lr"].get<double>();
  h.beta1 = g["betas"][0].get<double>();
  h.beta2 = g["betas"][1].get<double>();
  h.eps = g["eps"].get<double>();
  h.weight_decay = g["weight_decay"].get<double>();
  h.grad_clip = 0;
  h.balance_alpha = 0;
  h.bias_update_speed = 0;
  return h;
}

/// The sequences as one packed batch for the trainer.
inline train_batch pack(const std::vector<std::vector<int32_t>>& seqs, uint64_t step, const train_hyper& h) {
  train_batch b;
  b.step = step;
  b.hyper = h;
  b.cu_seqlens = {0};
  for (const auto& s : seqs) {
    b.tokens.insert(b.tokens.end(), s.begin(), s.end());
    b.cu_seqlens.push_back(static_cast<int32_t>(b.tokens.size()));
  }
  return b;
}

/// How far the loss of a distributed run may be from training_model's at step `step` (1-based).
/// The first is one forward pass over the same weights, its sums in another order (3e-8 apart).
/// Every later one follows AdamW updates, which carry the gradients' rounding into the weights
/// (see multi_process_training_test.cpp's two_nodes on an o_proj gradient near eps), so there the
/// gap depends on how the batch is split and on which OpenBLAS kernels the CPU gets: for two
/// attention shards, 3.7e-5 with OpenBLAS's Haswell and Zen kernels (AVX2), 4.9e-7 with its
/// Sandybridge ones and 1.2e-7 with Nehalem's (OPENBLAS_CORETYPE), under 1e-5 on the AVX-512
/// machines CI ran on before. golden.json's own tolerance covers them all; what a layout must
/// not change is checked exactly (multi_process_training_test.cpp: node processes against the
/// same layout in one process, bit for bit).
inline double loss_tolerance(int64_t step) {
  return step <= 1 ? 1e-6 : 1e-4;
}

/// The same steps on training_model over the golden batch: the losses before each; `trained`
/// (when given) receives the weights after the last step.
inline std::vector<double> reference_losses(const train_hyper& h, int steps,
                                            std::shared_ptr<model::checkpoint>* trained = nullptr) {
  auto weights = model::testing::load_tiny();
  auto m = model::training_model::bind(weights);
  EXPECT_TRUE(m) << error_text(m.error());
  model::adamw opt({h.beta1, h.beta2, h.eps, h.weight_decay});
  std::vector<double> out;
  const auto batch = model::testing::golden_batch();
  for (int s = 0; s < steps; ++s) {
    m->zero_grads();
    auto loss = m->forward_backward(batch, h.balance_alpha);
    EXPECT_TRUE(loss) << error_text(loss.error());
    out.push_back(*loss);
    m->clip_gradients(h.grad_clip);
    EXPECT_FALSE(opt.step(m->parameters(), h.lr));
    m->update_routing_bias(h.bias_update_speed);
  }
  if (trained) *trained = weights;
  return out;
}

/// One step through the trainer: its report or its error.
inline caf::expected<train_step_report> train_step(caf::actor_system& sys, const trainer_actor& trainer,
                                                   const train_batch& b) {
  caf::scoped_actor self{sys};
  caf::expected<train_step_report> out{caf::error{}};
  self->request(trainer, caf::infinite, train_step_atom::value, b)
      .receive([&](train_step_report& r) { out = std::move(r); }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

/// A training checkpoint of the trainer's cluster written to `dir`: none, or the error.
inline caf::error save_checkpoint(caf::actor_system& sys, const trainer_actor& trainer, const std::string& dir) {
  caf::scoped_actor self{sys};
  caf::error failure;
  self->request(trainer, caf::infinite, train_save_atom::value, dir)
      .receive([](const std::string&) {}, [&](caf::error& e) { failure = std::move(e); });
  return failure;
}

/// An actor system for a cluster in this process (no middleman).
/// tiny-v3 as a local_cluster of `layout` with a trainer; both end with it.
struct training_cluster {
  std::unique_ptr<local_cluster> cluster;
  trainer_actor trainer;
  training_cluster() = default;
  training_cluster(training_cluster&&) = default;
  ~training_cluster() {
    if (trainer) caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
    if (cluster) cluster->stop();
  }
};

inline training_cluster start_training_cluster(caf::actor_system& sys, const cluster_layout& layout) {
  auto cluster = local_cluster::start(sys, model::testing::tiny_dir(), layout);
  EXPECT_TRUE(cluster) << error_text(cluster.error());
  if (!cluster) return {};
  trainer_options o;
  o.shards = (*cluster)->shards();
  o.routers = (*cluster)->routers();
  o.groups = (*cluster)->groups();
  o.model = (*cluster)->config();
  std::vector<std::vector<int64_t>> experts;
  for (const auto& g : layout.groups) experts.push_back(g.experts);
  o.layout = uniform_layout(o.model, experts);
  training_cluster out;
  out.trainer = spawn_trainer(sys, o);
  out.cluster = std::move(*cluster);
  return out;
}

/// The losses of `steps` steps on the golden batch through a cluster of `layout` in this process.
inline std::vector<double> distributed_losses(const cluster_layout& layout, const train_hyper& h, int steps,
                                              std::vector<train_step_report>* reports = nullptr) {
  auto cfg = local_system_config();
  caf::actor_system sys{cfg};
  auto c = start_training_cluster(sys, layout);
  std::vector<double> out;
  for (int s = 0; s < steps && c.trainer; ++s) {
    auto r = train_step(sys, c.trainer, pack(model::testing::golden_batch(), static_cast<uint64_t>(s + 1), h));
    EXPECT_TRUE(r) << error_text(r.error());
    if (!r) break;
    out.push_back(r->loss);
    if (reports) reports->push_back(*r);
  }
  return out;
}

}  // namespace moe::actors::testing
