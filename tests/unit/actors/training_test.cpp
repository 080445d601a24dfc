// Training through the actors (actors/trainer.hpp) equals the single-process training_model:
// 1 and 2 attention shards, 1 and 3 expert groups, replicated experts; with clipping, the
// balance loss and the routing-bias update too. After training the cluster serves the trained
// weights, and the trainer refuses malformed batches.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <unistd.h>

#include "actors/local_cluster.hpp"
#include "actors/trainer.hpp"
#include "model/reference_engine.hpp"
#include "model/training_checkpoint.hpp"
#include "model/training_model.hpp"
#include "runtime/actor_system.hpp"
#include "tests/unit/model/tiny_training_data.hpp"
#include "training_helpers.hpp"

using namespace moe;
using actors::testing::distributed_losses;
using actors::testing::golden_adamw;
using actors::testing::golden_hyper;
using actors::testing::loss_tolerance;
using actors::testing::pack;
using actors::testing::reference_losses;
using actors::testing::train_step;
using model::testing::golden_batch;
using model::testing::load_tiny;
using model::testing::tiny_dir;

namespace {

actors::expert_group_options group(int g, std::vector<int64_t> experts, bool shared = false) {
  actors::expert_group_options o;
  o.group = g;
  o.experts = std::move(experts);
  o.holds_shared_experts = shared;
  return o;
}

struct layout_case {
  std::string name;
  actors::cluster_layout layout;
  friend void PrintTo(const layout_case& c, std::ostream* os) { *os << c.name; }
};

std::vector<layout_case> layouts() {
  std::vector<layout_case> out;
  out.push_back({"one_shard_one_group", actors::even_layout(1, 1, 16)});
  out.push_back({"two_shards_one_group", actors::even_layout(2, 1, 16)});
  out.push_back({"one_shard_three_groups", actors::even_layout(1, 3, 16)});
  out.push_back({"two_shards_three_groups", actors::even_layout(2, 3, 16)});
  actors::cluster_layout replicas;  // experts 5..8 in both groups: their gradients are summed
  replicas.num_attention_shards = 2;
  replicas.groups = {group(0, {0, 1, 2, 3, 4, 5, 6, 7, 8}), group(1, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, true)};
  out.push_back({"two_shards_replicated_experts", replicas});
  return out;
}

class distributed_training : public ::testing::TestWithParam<layout_case> {};

}  // namespace

TEST_P(distributed_training, four_adamw_steps_give_the_single_process_losses) {
  const auto h = golden_hyper();
  const auto want = reference_losses(h, 4);
  const auto golden = golden_adamw()["losses_before_each_step"];
  const auto got = distributed_losses(GetParam().layout, h, 4);
  ASSERT_EQ(got.size(), want.size());
  double worst = 0;
  for (size_t s = 0; s < got.size(); ++s) {
    EXPECT_NEAR(got[s], want[s], loss_tolerance(static_cast<int64_t>(s) + 1)) << "step " << s;
    EXPECT_NEAR(got[s], golden[s].get<double>(), 1e-4) << "step " << s;
    worst = std::max(worst, std::abs(got[s] - want[s]));
  }
  std::printf("%s: largest loss difference from training_model %.3g\n", GetParam().name.c_str(), worst);
}

TEST_P(distributed_training, clipping_the_balance_loss_and_the_bias_update_match_too) {
  auto h = golden_hyper();
  h.grad_clip = 0.5;  // below the golden batch's gradient norm: every step is clipped
  h.balance_alpha = 0.01;
  h.bias_update_speed = 0.01;
  const auto want = reference_losses(h, 4);
  std::vector<actors::train_step_report> reports;
  const auto got = distributed_losses(GetParam().layout, h, 4, &reports);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < got.size(); ++s)
    EXPECT_NEAR(got[s], want[s], loss_tolerance(static_cast<int64_t>(s) + 1)) << "step " << s;
  ASSERT_FALSE(reports.empty());
  EXPECT_GT(reports[0].grad_norm, 0.5);
  EXPECT_GT(reports[0].balance_loss, 0.0);
  ASSERT_EQ(reports[0].load_balance.size(), 2u);  // tiny-v3's two MoE layers
  for (double b : reports[0].load_balance) EXPECT_GE(b, 1.0);
}

INSTANTIATE_TEST_SUITE_P(layouts, distributed_training, ::testing::ValuesIn(layouts()),
                         [](const auto& info) { return info.param.name; });

TEST(distributed_training, the_cluster_serves_the_trained_weights) {
  const auto h = golden_hyper();
  std::shared_ptr<model::checkpoint> trained;
  reference_losses(h, 2, &trained);
  auto cfg = actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  auto c = actors::testing::start_training_cluster(sys, actors::even_layout(2, 3, 16));
  for (uint64_t s = 1; s <= 2; ++s) ASSERT_TRUE(train_step(sys, c.trainer, pack(golden_batch(), s, h)));

  std::vector<model::generation_request> reqs(2);
  reqs[0].prompt = golden_batch()[0];
  reqs[0].max_new_tokens = 12;
  reqs[1].prompt = {5, 17, 42};
  reqs[1].max_new_tokens = 12;
  auto got = c.cluster->generate(reqs);
  ASSERT_TRUE(got) << error_text(got.error());
  auto engine = model::reference_engine::create(trained);
  ASSERT_TRUE(engine) << error_text(engine.error());
  auto want = model::generate(*engine, reqs);
  ASSERT_TRUE(want) << error_text(want.error());
  EXPECT_EQ(*got, *want);
  // Training changed what the model says: the untrained weights answer otherwise.
  auto untrained = model::reference_engine::create(load_tiny());
  ASSERT_TRUE(untrained);
  auto before = model::generate(*untrained, reqs);
  ASSERT_TRUE(before);
  EXPECT_NE(*got, *before);
}

TEST(distributed_training, malformed_batches_are_refused_and_change_nothing) {
  const auto h = golden_hyper();
  auto cfg = actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  auto c = actors::testing::start_training_cluster(sys, actors::even_layout(2, 3, 16));
  auto expect_bad = [&](actors::train_batch b, const std::string& what) {
    auto r = train_step(sys, c.trainer, b);
    ASSERT_FALSE(r) << what;
    EXPECT_EQ(r.error().code(), static_cast<uint8_t>(actors::trainer_errc::bad_batch)) << what;
  };
  auto bad_token = pack(golden_batch(), 1, h);
  bad_token.tokens[3] = 100000;
  expect_bad(bad_token, "a token outside the vocabulary");
  auto bad_cu = pack(golden_batch(), 1, h);
  bad_cu.cu_seqlens.back() += 1;
  expect_bad(bad_cu, "cu_seqlens past the tokens");
  expect_bad(pack({{1}, {2}}, 1, h), "nothing to predict");
  auto bad_lr = pack(golden_batch(), 1, h);
  bad_lr.hyper.lr = std::nan("");
  expect_bad(bad_lr, "a NaN learning rate");
  // The refusals touched nothing: the first real step has the golden first loss.
  auto r = train_step(sys, c.trainer, pack(golden_batch(), 1, h));
  ASSERT_TRUE(r) << error_text(r.error());
  EXPECT_NEAR(r->loss, golden_adamw()["losses_before_each_step"][0].get<double>(), 1e-4);
}

TEST(distributed_training, a_saved_checkpoint_resumes_with_the_losses_of_an_uninterrupted_run) {
  // Two steps through the actors (replicated experts, two shards), a checkpoint, then two more
  // steps on the single-process model from that checkpoint: the losses of four steps straight.
  const auto h = golden_hyper();
  const auto want = reference_losses(h, 4);
  const auto dir = std::filesystem::temp_directory_path() / ("moe-train-ckpt-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    auto cfg = actors::testing::local_system_config();
    caf::actor_system sys{cfg};
    auto c = actors::testing::start_training_cluster(sys, layouts().back().layout);
    for (uint64_t s = 1; s <= 2; ++s) ASSERT_TRUE(train_step(sys, c.trainer, pack(golden_batch(), s, h)));
    auto failure = actors::testing::save_checkpoint(sys, c.trainer, dir.string());
    ASSERT_FALSE(failure) << error_text(failure);
  }
  model::training_checkpoint_options lo;
  lo.progress = false;
  auto loaded = model::load_training_checkpoint(dir, lo);
  ASSERT_TRUE(loaded) << error_text(loaded.error());
  EXPECT_EQ(loaded->step, 2);
  EXPECT_EQ(loaded->optimizer.steps(), 2);
  auto weights = std::make_shared<model::checkpoint>(std::move(loaded->weights));
  auto m = model::training_model::bind(weights);
  ASSERT_TRUE(m) << error_text(m.error());
  model::adamw opt({h.beta1, h.beta2, h.eps, h.weight_decay});
  opt.restore(loaded->optimizer.steps(), loaded->optimizer.state());
  EXPECT_EQ(opt.state().size(), m->parameters().size());  // every parameter's moments came back
  for (size_t s = 2; s < 4; ++s) {
    m->zero_grads();
    auto loss = m->forward_backward(golden_batch());
    ASSERT_TRUE(loss) << error_text(loss.error());
    EXPECT_NEAR(*loss, want[s], 1e-5) << "step " << s;
    ASSERT_FALSE(opt.step(m->parameters(), h.lr));
  }
  std::filesystem::remove_all(dir);
}
