// The serving cluster across processes: this test process is the coordinator (scheduler,
// controller, job API) and two `moe node` processes hold the model's actors (the attention
// shard with its router on n0, expert groups on n0 and n1), so activations cross process
// boundaries over UCX and control messages over CAF's middleman, both on loopback.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <httplib.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <array>
#include <chrono>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/rebalancer.hpp"
#include "actors/serving_cluster.hpp"
#include "node_children.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/golden/golden_data.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;
using moe::test::free_ports;
using moe::test::node_child;

using moe::actors::testing::golden_ids;
using moe::actors::testing::tiny;

namespace {

std::vector<float> golden_floats(const std::string& name) {
  return moe::testing::golden_file::open(tiny() / "golden.safetensors").floats(name);
}

/// Two nodes of two CPU slots each: the scheduler puts the attention shard on n0/cpu0 and
/// spreads the three expert groups (six slots each: 16 experts and 2 replicas) over n0/cpu1,
/// n1/cpu0 and n1/cpu1.
struct two_nodes {
  std::filesystem::path dir;
  std::array<uint16_t, 4> ports = free_ports<4>();
  std::string yaml(const std::string& secret) const {
    auto node = [&](const char* name, int i) {
      return std::string("  - {name: ") + name + ", host: 127.0.0.1, control_port: " + std::to_string(ports[2 * i]) +
             ", metrics_port: " + std::to_string(ports[2 * i + 1]) + ", devices: {cpu_slots: 2}, memory: 2GiB}\n";
    };
    return "cluster:\n  name: multi-process-test\n  secret: " + secret +
           "\n  heartbeat_interval_ms: 100\n  failure_timeout_ms: 2000\nnodes:\n" + node("n0", 0) + node("n1", 1) +
           "model: {path: " + tiny().string() + "}\nattention_shards: 1\nexpert_groups: {count: 3}\nredundant_expert_slots: 2\n" +
           "ports: {control: 0, api: 0, metrics: 0}\n";
  }
  two_nodes() : dir(std::filesystem::temp_directory_path() / ("moe_multi_process_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "cluster.yaml") << yaml("right-secret");
  }
  ~two_nodes() { std::filesystem::remove_all(dir); }
  runtime::cluster_config config(const std::string& secret = "right-secret") const {
    auto c = runtime::parse_cluster_config(yaml(secret), (dir / "cluster.yaml").string());
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

serving_options join_options() {
  serving_options o;
  o.join_nodes = true;
  o.api_port = 0;
  o.metrics_port = 0;
  o.join_timeout = 60s;
  return o;
}

/// Submits one job and collects its events until it ends (bounded).
struct job_outcome {
  std::vector<int32_t> tokens;
  job_event last;
  caf::error submit_error;
};

job_outcome run_job(caf::scoped_actor& self, const controller_actor& controller, generation_job job,
                    const std::function<void(const std::vector<int32_t>&)>& on_tokens = {}) {
  job_outcome out;
  self->request(controller, 30s, submit_atom::value, std::move(job), caf::actor_cast<caf::actor>(self))
      .receive([](uint64_t) {}, [&](caf::error& e) { out.submit_error = std::move(e); });
  if (out.submit_error) return out;
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  while (!out.last.finished && std::chrono::steady_clock::now() < deadline) {
    self->receive(
        [&](job_event_atom, const job_event& ev) {
          out.tokens.insert(out.tokens.end(), ev.tokens.begin(), ev.tokens.end());
          out.last = ev;
          if (on_tokens) on_tokens(out.tokens);
        },
        caf::after(200ms) >> [] {});
  }
  return out;
}

double metric_value(const std::string& exposition, const std::string& series) {
  const auto at = exposition.find("\n" + series + " ");
  return at == std::string::npos ? -1 : std::stod(exposition.substr(at + series.size() + 2));
}

}  // namespace

TEST(multi_process, two_node_processes_reproduce_golden_tokens_and_logits) {
  two_nodes env;
  node_child n0(env.file(), "n0", env.log("n0"));
  node_child n1(env.file(), "n1", env.log("n1"));
  auto sys_cfg = moe::actors::testing::networked_system_config();
  caf::actor_system sys{sys_cfg};
  caf::scoped_actor self{sys};
  const auto cfg = env.config();

  // A coordinator with the wrong secret is refused by the nodes, and says so.
  {
    auto wrong = serving_cluster::start(sys, env.config("wrong-secret"), join_options());
    ASSERT_FALSE(wrong);
    EXPECT_NE(error_text(wrong.error()).find("wrong cluster secret"), std::string::npos) << error_text(wrong.error());
  }

  const auto prompt = golden_ids("greedy_prompt");
  const auto expected = golden_ids("greedy_tokens");
  // Twice: a coordinator's session ends with it, and the same node processes serve the next.
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("coordinator " + std::to_string(round));
    auto cluster = serving_cluster::start(sys, cfg, join_options());
    ASSERT_TRUE(cluster) << error_text(cluster.error()) << "\n" << env.logs();
    const auto& p = (*cluster)->placement();
    ASSERT_EQ(p.attention.size(), 1u);
    EXPECT_EQ(p.attention[0].device.node, "n0");
    std::set<std::string> group_nodes;
    for (const auto& g : p.expert_groups) group_nodes.insert(g.device.node);
    EXPECT_EQ(group_nodes, (std::set<std::string>{"n0", "n1"}));

    generation_job job;
    job.prompt = prompt;
    job.max_new_tokens = static_cast<int64_t>(expected.size());
    auto got = run_job(self, (*cluster)->controller(), job);
    ASSERT_FALSE(got.submit_error) << error_text(got.submit_error);
    EXPECT_EQ(got.last.state, job_state::finished) << got.last.error;
    EXPECT_EQ(got.tokens, expected);

    if (round == 0) {
      // Online rebalancing across processes: the groups in the node processes load their new
      // replicas from their checkpoint, the router (in n0) switches, and the tokens stay golden.
      ASSERT_TRUE((*cluster)->rebalancer()) << (*cluster)->rebalance_unavailable();
      rebalance_report report;
      self->request((*cluster)->rebalancer(), 60s, rebalance_atom::value)
          .receive([&](rebalance_report& r) { report = std::move(r); },
                   [&](caf::error& err) { FAIL() << error_text(err) << "\n" << env.logs(); });
      EXPECT_TRUE(report.changed);
      EXPECT_EQ(report.version_after, 2u);
      EXPECT_GT(report.replicas_moved, 0);
      EXPECT_LT(report.balance_after, report.balance_before);
      auto again = run_job(self, (*cluster)->controller(), job);
      EXPECT_EQ(again.last.state, job_state::finished) << again.last.error;
      EXPECT_EQ(again.tokens, expected);
    }

    // Logits asked of the remote shard come back over the coordinator's data plane.
    const auto ids = golden_ids("input_ids");
    const auto logits = golden_floats("logits");
    const size_t V = 512;
    step_request req;
    req.step = 1u << 30;
    req.prefill = true;
    req.want_logits = true;
    step_entry e;
    e.sequence = uint64_t{1} << 40;
    e.tokens = {ids.begin(), ids.begin() + 16};
    req.entries.push_back(e);
    tensor_ref remote;
    self->request((*cluster)->shards().at(0), 30s, step_atom::value, req)
        .receive([&](step_result& r) { remote = r.logits; }, [&](caf::error& err) { FAIL() << error_text(err); });
    ASSERT_TRUE(is_remote(remote));
    self->request((*cluster)->transport().fetcher, 30s, fetch_tensor_atom::value, remote)
        .receive(
            [&](const tensor_ref& r) {
              ASSERT_EQ(r.num_elements(), static_cast<int64_t>(V));
              float worst = 0;
              for (size_t v = 0; v < V; ++v) worst = std::max(worst, std::abs(r.data()[v] - logits[15 * V + v]));
              EXPECT_LE(worst, 1e-4f);
            },
            [&](const caf::error& err) { FAIL() << error_text(err); });
    self->send((*cluster)->shards().at(0), release_atom::value, std::vector<uint64_t>{e.sequence});

    // Activations crossed between the node processes: n1 (expert groups only) moved bytes.
    httplib::Client scraper("127.0.0.1", env.ports[3]);
    auto res = scraper.Get("/metrics");
    ASSERT_TRUE(res && res->status == 200);
    EXPECT_GT(metric_value(res->body, "moe_data_plane_bytes_total{direction=\"receive\"}"), 0) << res->body;
    (*cluster)->stop();
  }
}

TEST(multi_process, a_killed_node_loses_no_job_and_changes_no_token) {
  two_nodes env;
  node_child n0(env.file(), "n0", env.log("n0"));
  node_child n1(env.file(), "n1", env.log("n1"));
  auto sys_cfg = moe::actors::testing::networked_system_config();
  caf::actor_system sys{sys_cfg};
  caf::scoped_actor self{sys};
  auto cluster = serving_cluster::start(sys, env.config(), join_options());
  ASSERT_TRUE(cluster) << error_text(cluster.error()) << "\n" << env.logs();

  generation_job job;
  job.prompt = {5, 17, 42};
  job.max_new_tokens = 300;
  auto baseline = run_job(self, (*cluster)->controller(), job);
  ASSERT_EQ(baseline.last.state, job_state::finished) << baseline.last.error;

  // The same generation; n1 (expert groups) is killed once tokens flow. Its groups fail over to
  // n0 (replicas, and the rest loaded from the checkpoint) and the job goes on.
  bool killed = false;
  auto got = run_job(self, (*cluster)->controller(), job, [&](const std::vector<int32_t>& tokens) {
    if (!killed && tokens.size() >= 3) {
      n1.kill_and_reap();
      killed = true;
    }
  });
  ASSERT_FALSE(got.submit_error) << error_text(got.submit_error);
  ASSERT_TRUE(killed) << "state " << to_string(got.last.state) << ": " << got.last.error << ", " << got.tokens.size() << " tokens";
  ASSERT_TRUE(got.last.finished) << "the job hung after its node died";
  EXPECT_EQ(got.last.state, job_state::finished) << got.last.error;
  EXPECT_EQ(got.tokens, baseline.tokens);

  // New work runs on the survivor alone, exactly; the membership reports the node down.
  auto again = run_job(self, (*cluster)->controller(), job);
  EXPECT_EQ(again.last.state, job_state::finished) << again.last.error;
  EXPECT_EQ(again.tokens, baseline.tokens);
  self->request((*cluster)->membership(), 10s, members_atom::value)
      .receive(
          [&](const member_list& l) {
            for (const auto& m : l.members)
              EXPECT_EQ(m.state, m.node == "n1" ? member_state::down : member_state::up) << m.node << ": " << m.reason;
          },
          [&](const caf::error& e) { FAIL() << error_text(e); });
  const auto text = prometheus::TextSerializer().Serialize((*cluster)->registry()->Collect());
  EXPECT_NE(text.find("moe_cluster_node_failures_total{cause=\"exit\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("moe_recoveries_total{kind=\"experts\",outcome=\"ok\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("moe_placement_version 2"), std::string::npos) << text;
  (*cluster)->stop();
}
