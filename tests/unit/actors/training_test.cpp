// Training through the actors (actors/trainer.hpp) equals the single-process training_model:
// 1 and 2 attention shards, 1 and 3 expert groups, replicated experts; with clipping, the
// balance loss and the routing-bias update too. After training the cluster serves the trained
// weights, and the trainer refuses malformed batches.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "actors/actor_types.hpp"
#include "actors/local_cluster.hpp"
#include "actors/trainer.hpp"
#include "model/reference_engine.hpp"
#include "model/training_checkpoint.hpp"
#include "model/training_model.hpp"
#include "runtime/actor_system.hpp"
#include "tests/unit/model/tiny_training_data.hpp"

using namespace moe;
using model::testing::golden_batch;
using model::testing::load_tiny;
using model::testing::tiny_dir;

namespace {

nlohmann::json golden_adamw() {
  std::ifstream in(tiny_dir() / "golden.json");
  return nlohmann::json::parse(in)["adamw"];
}

actors::train_hyper golden_hyper() {
  const auto g = golden_adamw();
  actors::train_hyper h;
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

actors::train_batch pack(const std::vector<std::vector<int32_t>>& seqs, uint64_t step, const actors::train_hyper& h) {
  actors::train_batch b;
  b.step = step;
  b.hyper = h;
  b.cu_seqlens = {0};
  for (const auto& s : seqs) {
    b.tokens.insert(b.tokens.end(), s.begin(), s.end());
    b.cu_seqlens.push_back(static_cast<int32_t>(b.tokens.size()));
  }
  return b;
}

// The same steps on training_model: the losses before each.
std::vector<double> reference_losses(const actors::train_hyper& h, int steps,
                                     std::shared_ptr<model::checkpoint>* trained = nullptr) {
  auto weights = load_tiny();
  auto m = model::training_model::bind(weights);
  EXPECT_TRUE(m) << error_text(m.error());
  model::adamw opt({h.beta1, h.beta2, h.eps, h.weight_decay});
  std::vector<double> out;
  const auto batch = golden_batch();
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

runtime::actor_system_config make_config() {
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  o.num_worker_threads = 2;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  return cfg;
}

actors::expert_group_options group(int g, std::vector<int64_t> experts, bool shared = false) {
  actors::expert_group_options o;
  o.group = g;
  o.experts = std::move(experts);
  o.holds_shared_experts = shared;
  return o;
}

struct training_cluster {
  std::unique_ptr<actors::local_cluster> cluster;
  actors::trainer_actor trainer;
  ~training_cluster() {
    if (trainer) caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
    if (cluster) cluster->stop();
  }
};

training_cluster start(caf::actor_system& sys, const actors::cluster_layout& layout) {
  auto cluster = actors::local_cluster::start(sys, tiny_dir(), layout);
  EXPECT_TRUE(cluster) << error_text(cluster.error());
  actors::trainer_options o;
  o.shards = (*cluster)->shards();
  o.routers = (*cluster)->routers();
  o.groups = (*cluster)->groups();
  o.model = (*cluster)->config();
  std::vector<std::vector<int64_t>> experts;
  for (const auto& g : layout.groups) experts.push_back(g.experts);
  o.layout = actors::uniform_layout(o.model, experts);
  auto trainer = actors::spawn_trainer(sys, o);
  return {std::move(*cluster), trainer};
}

caf::expected<actors::train_step_report> step(caf::actor_system& sys, const actors::trainer_actor& trainer,
                                              const actors::train_batch& b) {
  caf::scoped_actor self{sys};
  caf::expected<actors::train_step_report> out{caf::error{}};
  self->request(trainer, caf::infinite, actors::train_step_atom::value, b)
      .receive([&](actors::train_step_report& r) { out = std::move(r); }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

std::vector<double> distributed_losses(const actors::cluster_layout& layout, const actors::train_hyper& h, int steps,
                                       std::vector<actors::train_step_report>* reports = nullptr) {
  auto cfg = make_config();
  caf::actor_system sys{cfg};
  auto c = start(sys, layout);
  std::vector<double> out;
  for (int s = 0; s < steps; ++s) {
    auto r = step(sys, c.trainer, pack(golden_batch(), static_cast<uint64_t>(s + 1), h));
    EXPECT_TRUE(r) << error_text(r.error());
    if (!r) break;
    out.push_back(r->loss);
    if (reports) reports->push_back(*r);
  }
  return out;
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
    EXPECT_NEAR(got[s], want[s], 1e-5) << "step " << s;
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
  for (size_t s = 0; s < got.size(); ++s) EXPECT_NEAR(got[s], want[s], 1e-5) << "step " << s;
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
  auto cfg = make_config();
  caf::actor_system sys{cfg};
  auto c = start(sys, actors::even_layout(2, 3, 16));
  for (uint64_t s = 1; s <= 2; ++s) ASSERT_TRUE(step(sys, c.trainer, pack(golden_batch(), s, h)));

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
  auto cfg = make_config();
  caf::actor_system sys{cfg};
  auto c = start(sys, actors::even_layout(2, 3, 16));
  auto expect_bad = [&](actors::train_batch b, const std::string& what) {
    auto r = step(sys, c.trainer, b);
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
  auto r = step(sys, c.trainer, pack(golden_batch(), 1, h));
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
    auto cfg = make_config();
    caf::actor_system sys{cfg};
    auto c = start(sys, layouts().back().layout);
    for (uint64_t s = 1; s <= 2; ++s) ASSERT_TRUE(step(sys, c.trainer, pack(golden_batch(), s, h)));
    caf::scoped_actor self{sys};
    caf::error failure;
    self->request(c.trainer, caf::infinite, actors::train_save_atom::value, dir.string())
        .receive([](const std::string&) {}, [&](caf::error& e) { failure = std::move(e); });
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
