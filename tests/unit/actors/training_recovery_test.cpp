// Recovery while training, in one process with real actors: a training job runs on tiny-v3
// (2 attention shards on nodes "a0" and "a1", 4 expert groups on "g0".."g3", the shared experts
// in group 0) while a node's actors are killed and the membership's member_event for it reaches
// the controller (which fails over, through the rebalancer) and the trainer. The job rolls back
// to its last snapshot and finishes; its losses equal those of a run without the failure.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include <map>

#include "actors/actor_types.hpp"
#include "actors/controller.hpp"
#include "actors/local_cluster.hpp"
#include "actors/rebalancer.hpp"
#include "actors/trainer.hpp"
#include "actors/training_jobs.hpp"
#include "actors/training_owner.hpp"
#include "runtime/actor_system.hpp"
#include "tests/unit/actors/failover_fixture.hpp"
#include "tests/unit/actors/training_helpers.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;

namespace {

struct harness {
  runtime::actor_system_config cfg = actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::unique_ptr<local_cluster> cluster;
  controller_actor controller;
  rebalancer_actor rebalancer;
  trainer_actor trainer;
  training_jobs_actor jobs;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();

  explicit harness(int64_t snapshot_every) {
    auto layout = even_layout(2, 4, 16);
    layout.metrics = registry;
    auto c = local_cluster::start(sys, model::testing::tiny_dir(), layout);
    EXPECT_TRUE(c) << error_text(c.error());
    cluster = std::move(*c);
    controller = spawn_controller(sys, actors::testing::failover_controller_options(*cluster, layout, registry));

    trainer_options to;
    to.shards = cluster->shards();
    to.routers = cluster->routers();
    to.groups = cluster->groups();
    to.model = cluster->config();
    to.layout = uniform_layout(to.model, actors::testing::group_experts(layout), 1);
    to.metrics = registry;
    to.shard_nodes = {"a0", "a1"};
    for (size_t g = 0; g < layout.groups.size(); ++g) to.group_nodes.push_back("g" + std::to_string(g));
    to.recovery_timeout = 60s;
    to.shared_experts_group = actors::testing::shared_experts_group(layout);
    trainer = spawn_trainer(sys, to);
    rebalancer = actors::testing::spawn_failover(sys, *cluster, layout, controller, registry, trainer);

    training_jobs_options jo;
    jo.trainer = trainer;
    jo.vocab_size = cluster->config().vocab_size;
    jo.max_position_embeddings = cluster->config().max_position_embeddings;
    jo.snapshot_every = snapshot_every;
    jobs = spawn_training_jobs(sys, jo);
  }
  ~harness() {
    for (const caf::actor& a : {caf::actor_cast<caf::actor>(jobs), caf::actor_cast<caf::actor>(trainer),
                                caf::actor_cast<caf::actor>(controller), caf::actor_cast<caf::actor>(rebalancer)})
      if (a) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  }

  // What the membership sends when a node goes down, to both who act on it.
  void down(const std::string& node) {
    caf::anon_send(controller, actors::testing::node_down(node));
    caf::anon_send(trainer, actors::testing::node_down(node));
  }

  std::string metrics() const { return actors::testing::metrics_text(*registry); }
};

training_job make_job() {
  training_job j;
  for (int i = 0; i < 3000; ++i) j.tokens.push_back((i * 37 + (i / 7) * 11) % 500 + 1);
  j.sequence_length = 16;
  j.batch_sequences = 6;
  j.steps = 10;
  j.hyper.lr = 3e-3;
  j.hyper.grad_clip = 1.0;
  j.hyper.balance_alpha = 1e-3;
  j.hyper.bias_update_speed = 1e-3;
  j.warmup_steps = 2;
  j.seed = 5;
  return j;
}

struct run_result {
  std::map<int64_t, double> losses;  // by step, the last report of each
  training_event last;
};

// Runs the job; fault() once step `fault_after` is reported.
run_result run(harness& h, int64_t fault_after = 0, const std::function<void()>& fault = {}) {
  caf::scoped_actor self{h.sys};
  uint64_t id = 0;
  self->request(h.jobs, caf::infinite, train_submit_atom::value, make_job(), caf::actor{self})
      .receive([&](uint64_t j) { id = j; }, [&](const caf::error& e) { ADD_FAILURE() << error_text(e); });
  run_result out;
  for (bool done = false; !done;) {
    self->receive(
        [&](train_event_atom, const training_event& e) {
          if (e.job != id) return;
          if (e.step > 0) out.losses[e.step] = e.loss;  // the finished event repeats the last step's
          if (fault && e.step == fault_after && !e.finished) {
            fault();
            fault_after = -1;
          }
          if (e.finished) {
            out.last = e;
            done = true;
          }
        },
        caf::after(180s) >> [&] {
          ADD_FAILURE() << "the training job hangs";
          done = true;
        });
  }
  return out;
}

using actors::testing::counter;

const run_result& baseline() {
  static const run_result r = [] {
    harness h(3);
    return run(h);
  }();
  return r;
}

}  // namespace

TEST(training_recovery, a_lost_expert_group_rolls_back_and_the_losses_do_not_change) {
  const auto& base = baseline();
  ASSERT_EQ(base.last.state, static_cast<uint8_t>(job_state::finished)) << base.last.error;
  ASSERT_EQ(base.losses.size(), 10u);
  harness h(3);
  // Step 5 is two steps past the snapshot taken before step 4: those run again.
  auto r = run(h, 5, [&] {
    caf::anon_send_exit(h.cluster->groups()[2], caf::exit_reason::kill);
    h.down("g2");
  });
  ASSERT_EQ(r.last.state, static_cast<uint8_t>(job_state::finished)) << r.last.error;
  EXPECT_EQ(r.last.rollbacks, 1u);
  EXPECT_EQ(r.last.step, 10);
  // The experts of group 2 moved to survivors with the snapshot's values and moments: every
  // step computes what it computed without the failure.
  for (const auto& [step, loss] : base.losses) EXPECT_DOUBLE_EQ(r.losses.at(step), loss) << "step " << step;
  const auto m = h.metrics();
  EXPECT_EQ(counter(m, "moe_training_recoveries_total{outcome=\"rolled_back\"}"), 1) << m;
  EXPECT_EQ(counter(m, "moe_training_recoveries_total{outcome=\"stopped\"}"), 0) << m;
}

TEST(training_recovery, a_lost_attention_shard_rolls_back_and_its_share_goes_to_the_other) {
  const auto& base = baseline();
  harness h(3);
  auto r = run(h, 7, [&] {
    caf::anon_send_exit(h.cluster->shards()[1], caf::exit_reason::kill);
    caf::anon_send_exit(h.cluster->routers()[1], caf::exit_reason::kill);
    h.down("a1");
  });
  ASSERT_EQ(r.last.state, static_cast<uint8_t>(job_state::finished)) << r.last.error;
  EXPECT_EQ(r.last.rollbacks, 1u);
  // One shard now sums what two did: the same math, in another order of float additions.
  for (const auto& [step, loss] : base.losses) EXPECT_NEAR(r.losses.at(step), loss, 1e-5 * loss) << "step " << step;
}

TEST(training_recovery, without_a_snapshot_a_node_failure_stops_the_job_with_the_reason) {
  harness h(0);
  auto r = run(h, 2, [&] {
    caf::anon_send_exit(h.cluster->groups()[3], caf::exit_reason::kill);
    h.down("g3");
  });
  EXPECT_EQ(r.last.state, static_cast<uint8_t>(job_state::failed));
  EXPECT_NE(r.last.error.find("node g3 is down"), std::string::npos) << r.last.error;
  EXPECT_NE(r.last.error.find("training stops; restart the cluster and continue from the last checkpoint"),
            std::string::npos)
      << r.last.error;
  EXPECT_EQ(counter(h.metrics(), "moe_training_recoveries_total{outcome=\"stopped\"}"), 1);
  // And training stays stopped, with the reason, instead of hanging.
  auto step = actors::testing::train_step(h.sys, h.trainer, actors::testing::pack({{1, 2, 3, 4}}, 1, actors::testing::golden_hyper()));
  ASSERT_FALSE(step);
  EXPECT_NE(error_text(step.error()).find("node g3 is down"), std::string::npos);
}

TEST(training_recovery, lost_shared_experts_move_to_a_survivor_and_the_losses_do_not_change) {
  const auto& base = baseline();
  harness h(3);
  // Group 0 holds the shared experts (and experts 0-3): a survivor loads them from the model
  // checkpoint, stale until the rollback gives them their trained values and moments.
  auto r = run(h, 4, [&] {
    caf::anon_send_exit(h.cluster->groups()[0], caf::exit_reason::kill);
    h.down("g0");
  });
  ASSERT_EQ(r.last.state, static_cast<uint8_t>(job_state::finished)) << r.last.error;
  EXPECT_EQ(r.last.rollbacks, 1u);
  for (const auto& [step, loss] : base.losses) EXPECT_DOUBLE_EQ(r.losses.at(step), loss) << "step " << step;
}

TEST(training_recovery, a_failover_that_fails_stops_training_at_once_with_the_reason) {
  harness h(3);
  // Every expert group lost: no survivor can take their experts, the failover fails and tells the
  // trainer, which stops training with the reason instead of waiting for a layout that will not
  // come (its recovery_timeout is a minute).
  auto r = run(h, 4, [&] {
    for (size_t g = 0; g < 4; ++g) {
      caf::anon_send_exit(h.cluster->groups()[g], caf::exit_reason::kill);
      h.down("g" + std::to_string(g));
    }
  });
  EXPECT_EQ(r.last.state, static_cast<uint8_t>(job_state::failed));
  EXPECT_NE(r.last.error.find("could not be re-placed"), std::string::npos) << r.last.error;
}

TEST(training_recovery, an_owner_rolls_back_only_to_a_snapshot_that_has_all_it_holds) {
  // training_owner::restore takes values by name and changes nothing when one is missing.
  owner_state snap;
  snap.names = {"a", "b"};
  snap.shapes = {{2}, {1}};
  snap.has_moments = {1, 0};
  snap.values = tensor_ref::wrap({1, 2, 3}, {3});
  std::vector<double> m = {0.5, 0.25}, v = {0.125, 0.0625};
  std::vector<float> packed(8);
  std::memcpy(packed.data(), m.data(), 16);
  std::memcpy(packed.data() + 4, v.data(), 16);
  snap.moments = tensor_ref::wrap(std::move(packed), {8});
  snap.optimizer_steps = 7;
  std::vector<float> a(2, 0), b(1, 0), c(4, 0);
  training_owner owner;
  std::vector<restore_target> missing = {{"a", a}, {"c", c}};
  auto err = owner.restore(snap, missing, {});
  ASSERT_TRUE(err);
  EXPECT_NE(error_text(err).find("the snapshot has no c"), std::string::npos) << error_text(err);
  EXPECT_EQ(a, std::vector<float>(2, 0));
  EXPECT_FALSE(owner.optimizer());
  std::vector<restore_target> wrong = {{"b", a}};
  EXPECT_TRUE(owner.restore(snap, wrong, {}));
  std::vector<restore_target> all = {{"a", a}, {"b", b}};
  ASSERT_FALSE(owner.restore(snap, all, {0.8, 0.9, 1e-6, 0.1}));
  EXPECT_EQ(a, (std::vector<float>{1, 2}));
  EXPECT_EQ(b, (std::vector<float>{3}));
  ASSERT_TRUE(owner.optimizer());
  EXPECT_EQ(owner.optimizer()->steps(), 7);
  EXPECT_EQ(owner.optimizer()->options().beta1, 0.8);
  EXPECT_EQ(owner.optimizer()->state().at("a").m, m);
  EXPECT_EQ(owner.optimizer()->state().at("a").v, v);
  EXPECT_EQ(owner.optimizer()->state().count("b"), 0u);
}
