// Training across processes: this test process is the coordinator (scheduler, controller,
// trainer) and two `moe node` processes hold tiny-v3's actors: attention shard 0 and expert
// group 0 on n0, shard 1 and groups 1 and 2 on n1. So every router sends expert rows and their
// gradients to the other process, and every owner's gradients, update and state cross to and
// from the coordinator's trainer over UCX. Four AdamW steps give training_model's losses (and
// bit for bit those of the same layout in one process); the checkpoint the trainer gathers
// from the nodes loads and resumes on training_model; and both shards then generate what the
// reference engine generates from that checkpoint. With clipping, the balance loss and the
// routing-bias update, the step reports equal the in-process ones as well.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>
#include <unistd.h>

#include "actors/actor_types.hpp"
#include "actors/serving_cluster.hpp"
#include "cli/node_support.hpp"
#include "model/reference_engine.hpp"
#include "model/training_checkpoint.hpp"
#include "model/training_model.hpp"
#include "node_children.hpp"
#include "tests/unit/model/tiny_training_data.hpp"
#include "training_helpers.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;
using model::testing::golden_batch;
using model::testing::tiny_dir;
using moe::actors::testing::distributed_losses;
using moe::actors::testing::golden_adamw;
using moe::actors::testing::golden_hyper;
using moe::actors::testing::loss_tolerance;
using moe::actors::testing::pack;
using moe::actors::testing::reference_losses;
using moe::actors::testing::save_checkpoint;
using moe::actors::testing::train_step;
using moe::test::free_ports;
using moe::test::node_child;

namespace {

/// Two nodes of one CPU slot each: the scheduler puts shard 0 on n0 and shard 1 on n1, then
/// the expert groups largest first where they are fewest: group 0 (experts 0-5 and the shared
/// experts) on n0, groups 1 (6-10) and 2 (11-15) on n1.
/// No replicated experts: the in-process cluster of the same layout with experts 0 and 1
/// replicated lands 1.7e-5 from training_model at step 2, bit for bit as across processes (an
/// o_proj gradient of 2e-8, near AdamW's eps, makes the first update sensitive to summation
/// order); training_test.cpp covers replicas in one process.
struct two_nodes {
  std::filesystem::path dir;
  std::array<uint16_t, 4> ports = free_ports<4>();
  std::string yaml() const {
    auto node = [&](const char* name, int i) {
      return std::string("  - {name: ") + name + ", host: 127.0.0.1, control_port: " + std::to_string(ports[2 * i]) +
             ", metrics_port: " + std::to_string(ports[2 * i + 1]) + ", devices: {cpu_slots: 1}, memory: 2GiB}\n";
    };
    return "cluster:\n  name: multi-process-training-test\n  secret: training-secret\n"
           "  heartbeat_interval_ms: 100\n  failure_timeout_ms: 5000\nnodes:\n" +
           node("n0", 0) + node("n1", 1) + "model: {path: " + tiny_dir().string() +
           "}\nattention_shards: 2\nexpert_groups: {count: 3}\n" +
           "ports: {control: 0, api: 0, metrics: 0}\n";
  }
  two_nodes()
      : dir(std::filesystem::temp_directory_path() / ("moe_multi_process_training_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "cluster.yaml") << yaml();
  }
  ~two_nodes() { std::filesystem::remove_all(dir); }
  two_nodes(const two_nodes&) = delete;
  two_nodes& operator=(const two_nodes&) = delete;
  runtime::cluster_config config() const {
    auto c = runtime::parse_cluster_config(yaml(), file());
    if (!c) throw std::runtime_error(error_text(c.error()));
    return std::move(*c);
  }
  std::string file() const { return (dir / "cluster.yaml").string(); }
  std::string log(const char* name) const { return (dir / (std::string(name) + ".log")).string(); }
  std::string logs() const {
    std::string out;
    for (const char* n : {"n0", "n1"}) {
      std::ifstream in(log(n));
      out += std::string("--- ") + n + "\n" + std::string(std::istreambuf_iterator<char>(in), {});
    }
    return out;
  }
};

/// Greedy generation on one attention shard, stepped by hand as the controller would: every
/// prompt prefilled in one step, then one decode step per token for all of them together.
caf::expected<std::vector<std::vector<int32_t>>> greedy_on_shard(caf::scoped_actor& self, const attention_actor& shard,
                                                                 const std::vector<model::generation_request>& reqs,
                                                                 uint64_t first_sequence, uint64_t first_step) {
  std::vector<std::vector<int32_t>> out(reqs.size());
  std::vector<uint64_t> ids;
  step_request req;
  req.step = first_step;
  req.prefill = true;
  for (size_t i = 0; i < reqs.size(); ++i) {
    step_entry e;
    e.sequence = first_sequence + i;
    e.tokens = reqs[i].prompt;
    req.entries.push_back(std::move(e));
    ids.push_back(first_sequence + i);
  }
  caf::error failure;
  for (int64_t n = 0; n < reqs.front().max_new_tokens && !failure; ++n) {
    self->request(shard, 30s, step_atom::value, req)
        .receive(
            [&](step_result& r) {
              if (r.sequences != ids || r.tokens.size() != ids.size()) {
                failure = caf::make_error(caf::sec::unexpected_response);
                return;
              }
              for (size_t i = 0; i < ids.size(); ++i) out[i].push_back(r.tokens[i]);
            },
            [&](caf::error& e) { failure = std::move(e); });
    req.step += 1;
    req.prefill = false;
    for (size_t i = 0; i < req.entries.size(); ++i) {
      req.entries[i].tokens = {out[i].empty() ? 0 : out[i].back()};
      req.entries[i].sample_offset = out[i].size();
    }
  }
  self->send(shard, release_atom::value, ids);
  if (failure) return failure;
  return out;
}

double metric_value(const std::string& exposition, const std::string& series) {
  const auto at = exposition.find("\n" + series + " ");
  return at == std::string::npos ? -1 : std::stod(exposition.substr(at + series.size() + 2));
}

/// The layout the scheduler gives the config (its even split, docs/configuration.md; shared
/// experts in group 0), for the same cluster in one process.
cluster_layout config_layout() {
  cluster_layout layout;
  layout.num_attention_shards = 2;
  for (const auto& [experts, shared] : {std::pair{std::vector<int64_t>{0, 1, 2, 3, 4, 5}, true},
                                        std::pair{std::vector<int64_t>{6, 7, 8, 9, 10}, false},
                                        std::pair{std::vector<int64_t>{11, 12, 13, 14, 15}, false}}) {
    expert_group_options g;
    g.group = static_cast<int>(layout.groups.size());
    g.experts = experts;
    g.holds_shared_experts = shared;
    layout.groups.push_back(std::move(g));
  }
  return layout;
}

/// Two node processes and this process as their coordinator; the cluster ends before them.
struct coordinated_nodes {
  two_nodes env;
  node_child n0{env.file(), "n0", env.log("n0")};
  node_child n1{env.file(), "n1", env.log("n1")};
  runtime::cluster_config config = env.config();
  runtime::actor_system_config sys_cfg = cli::make_networked_system_config(config, 2);
  caf::actor_system sys{sys_cfg};
  std::unique_ptr<serving_cluster> cluster;

  /// Starts the cluster and checks the placement the file comment describes: the shards and
  /// the groups are split between the node processes (each router has a group in the other
  /// one), with config_layout()'s experts.
  void start() {
    serving_options so;
    so.join_nodes = true;
    so.api_port = 0;
    so.metrics_port = 0;
    so.join_timeout = 60s;
    auto c = serving_cluster::start(sys, config, so);
    ASSERT_TRUE(c) << error_text(c.error()) << "\n" << env.logs();
    cluster = std::move(*c);
    const auto& p = cluster->placement();
    ASSERT_EQ(p.attention.size(), 2u);
    ASSERT_EQ(p.expert_groups.size(), 3u);
    std::map<int, std::string> shard_node, group_node;
    for (const auto& a : p.attention) shard_node[a.shard] = a.device.node;
    for (const auto& g : p.expert_groups) group_node[g.group] = g.device.node;
    EXPECT_EQ(shard_node, (std::map<int, std::string>{{0, "n0"}, {1, "n1"}}));
    EXPECT_EQ(group_node, (std::map<int, std::string>{{0, "n0"}, {1, "n1"}, {2, "n1"}}));
    const auto layout = config_layout();
    for (const auto& g : p.expert_groups) {
      const auto& local = layout.groups.at(static_cast<size_t>(g.group));
      EXPECT_EQ(g.experts, local.experts) << "group " << g.group;
      EXPECT_EQ(g.holds_shared_experts, local.holds_shared_experts) << "group " << g.group;
    }
    ASSERT_TRUE(cluster->trainer());
    ASSERT_TRUE(cluster->transport());
  }

  /// `steps` steps on the golden batch through the cluster's trainer: their reports.
  std::vector<train_step_report> train(const train_hyper& h, int steps) {
    std::vector<train_step_report> out;
    for (int s = 1; s <= steps; ++s) {
      auto r = train_step(sys, cluster->trainer(), pack(golden_batch(), static_cast<uint64_t>(s), h));
      EXPECT_TRUE(r) << "step " << s << ": " << error_text(r.error()) << "\n" << env.logs();
      if (!r) break;
      out.push_back(std::move(*r));
    }
    return out;
  }

  ~coordinated_nodes() {
    if (cluster) cluster->stop();
  }
};

}  // namespace

TEST(multi_process_training, steps_checkpoint_and_serving_across_node_processes_match_training_model) {
  // What the steps must give: training_model's losses (the fifth for the resumed checkpoint),
  // and the same layout's in one process (local_cluster), which the data plane must not change.
  const auto h = golden_hyper();
  const auto want = reference_losses(h, 5);
  const auto golden = golden_adamw()["losses_before_each_step"];
  const auto in_process = distributed_losses(config_layout(), h, 4);
  ASSERT_EQ(in_process.size(), 4u);

  coordinated_nodes nodes;
  ASSERT_NO_FATAL_FAILURE(nodes.start());
  auto& c = *nodes.cluster;

  // Four steps of golden.json's AdamW on the golden batch.
  const auto reports = nodes.train(h, 4);
  ASSERT_EQ(reports.size(), 4u);
  double worst = 0, worst_golden = 0;
  for (size_t s = 0; s < reports.size(); ++s) {
    const double got = reports[s].loss, gold = golden[s].get<double>();
    EXPECT_NEAR(got, want[s], loss_tolerance(static_cast<int64_t>(s) + 1)) << "step " << s + 1;
    EXPECT_NEAR(got, gold, 1e-4) << "step " << s + 1;
    EXPECT_EQ(got, in_process[s]) << "step " << s + 1 << ": not what the same layout gives in one process";
    worst = std::max(worst, std::abs(got - want[s]));
    worst_golden = std::max(worst_golden, std::abs(got - gold));
    std::printf("step %zu: loss %.7f, training_model %.7f (diff %.3g), golden %.7f (diff %.3g)\n", s + 1, got,
                want[s], got - want[s], gold, got - gold);
  }
  std::printf("largest loss difference: from training_model %.3g, from golden.json %.3g\n", worst, worst_golden);
  // The owners' gradients and parameters came to this process over the data plane.
  const auto text = prometheus::TextSerializer().Serialize(c.registry()->Collect());
  EXPECT_GT(metric_value(text, "moe_data_plane_bytes_total{direction=\"receive\"}"), 0) << text;

  // A checkpoint gathered from the node processes: it loads, has every parameter's moments and
  // resumes with training_model's fifth loss.
  const auto ckpt = nodes.env.dir / "trained";
  auto saved = save_checkpoint(nodes.sys, c.trainer(), ckpt.string());
  ASSERT_FALSE(saved) << error_text(saved) << "\n" << nodes.env.logs();
  model::training_checkpoint_options lo;
  lo.progress = false;
  auto loaded = model::load_training_checkpoint(ckpt, lo);
  ASSERT_TRUE(loaded) << error_text(loaded.error());
  EXPECT_EQ(loaded->step, 4);
  EXPECT_EQ(loaded->optimizer.steps(), 4);
  auto weights = std::make_shared<model::checkpoint>(std::move(loaded->weights));
  {
    auto m = model::training_model::bind(weights);
    ASSERT_TRUE(m) << error_text(m.error());
    EXPECT_EQ(loaded->optimizer.state().size(), m->parameters().size());
    m->zero_grads();
    auto fifth = m->forward_backward(golden_batch());
    ASSERT_TRUE(fifth) << error_text(fifth.error());
    EXPECT_NEAR(*fifth, want[4], loss_tolerance(5));
    std::printf("checkpoint: loss %.7f, training_model's fifth %.7f (diff %.3g)\n", *fifth, want[4], *fifth - want[4]);
  }

  // Both shards (each with its router, and the groups of both nodes) serve the trained weights:
  // greedy tokens equal the reference engine's on the checkpoint, and differ from the untrained
  // model's.
  std::vector<model::generation_request> reqs(2);
  reqs[0].prompt = golden_batch()[0];
  reqs[0].max_new_tokens = 12;
  reqs[1].prompt = {5, 17, 42};
  reqs[1].max_new_tokens = 12;
  auto engine = model::reference_engine::create(weights);
  ASSERT_TRUE(engine) << error_text(engine.error());
  auto expected = model::generate(*engine, reqs);
  ASSERT_TRUE(expected) << error_text(expected.error());
  auto untrained_engine = model::reference_engine::create(model::testing::load_tiny());
  ASSERT_TRUE(untrained_engine);
  auto untrained = model::generate(*untrained_engine, reqs);
  ASSERT_TRUE(untrained);
  EXPECT_NE(*expected, *untrained);
  caf::scoped_actor self{nodes.sys};
  for (size_t i = 0; i < c.shards().size(); ++i) {
    auto tokens = greedy_on_shard(self, c.shards()[i], reqs, (uint64_t{1} << 40) + 16 * i, (uint64_t{1} << 30) + 64 * i);
    ASSERT_TRUE(tokens) << "shard " << i << ": " << error_text(tokens.error()) << "\n" << nodes.env.logs();
    EXPECT_EQ(*tokens, *expected) << "shard " << i;
  }
}

TEST(multi_process_training, clipping_the_balance_loss_and_the_bias_update_match_across_processes) {
  // The owners' norms, the routers' expert loads and the bias update cross processes too.
  auto h = golden_hyper();
  h.grad_clip = 0.5;  // below the golden batch's gradient norm: every step is clipped
  h.balance_alpha = 0.01;
  h.bias_update_speed = 0.01;
  const auto want = reference_losses(h, 4);
  std::vector<train_step_report> in_process;
  distributed_losses(config_layout(), h, 4, &in_process);
  ASSERT_EQ(in_process.size(), 4u);

  coordinated_nodes nodes;
  ASSERT_NO_FATAL_FAILURE(nodes.start());
  const auto reports = nodes.train(h, 4);
  ASSERT_EQ(reports.size(), 4u);
  double worst = 0;
  for (size_t s = 0; s < reports.size(); ++s) {
    const auto& r = reports[s];
    EXPECT_NEAR(r.loss, want[s], loss_tolerance(static_cast<int64_t>(s) + 1)) << "step " << s + 1;
    EXPECT_EQ(r.loss, in_process[s].loss) << "step " << s + 1;
    EXPECT_EQ(r.grad_norm, in_process[s].grad_norm) << "step " << s + 1;
    EXPECT_EQ(r.balance_loss, in_process[s].balance_loss) << "step " << s + 1;
    EXPECT_EQ(r.load_balance, in_process[s].load_balance) << "step " << s + 1;
    worst = std::max(worst, std::abs(r.loss - want[s]));
  }
  EXPECT_GT(reports[0].grad_norm, 0.5);
  EXPECT_GT(reports[0].balance_loss, 0.0);
  std::printf("clipped, balance loss, bias update: largest loss difference from training_model %.3g\n", worst);
}
