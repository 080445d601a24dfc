// Recovery while serving, in one process with real actors: a node that held an attention shard,
// or expert groups, goes down while many requests are generating. Every request still finishes
// with exactly the tokens of a run without the failure (the lost shard's requests are replayed
// from their prompt and the tokens so far; lost experts are served by replicas or reloaded from
// the checkpoint); deadlines fail requests that cannot finish in time, with a clear error.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include <map>
#include <thread>

#include "actors/actor_types.hpp"
#include "actors/controller.hpp"
#include "actors/local_cluster.hpp"
#include "actors/rebalancer.hpp"
#include "actors/trainer.hpp"
#include "runtime/actor_system.hpp"
#include "runtime/data_plane.hpp"
#include "system_config.hpp"
#include "tests/unit/actors/failover_fixture.hpp"
#include "tiny_fixture.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;

using moe::actors::testing::tiny;

namespace {

using fail_steps_atom = caf::atom_constant<caf::atom("fail_steps")>;
using failed_atom = caf::atom_constant<caf::atom("failed")>;
using peer_lost_atom = caf::atom_constant<caf::atom("peer_lost")>;

// Stands in front of a real shard. Told (fail_steps, n), it answers the next n steps (n < 0:
// every later one) as a dropped connection does, request_receiver_down, without passing them
// on; (failed) answers how many it failed.
caf::behavior flaky_shard(caf::event_based_actor* self, attention_actor real) {
  struct counts {
    int to_fail = 0;
    int failed = 0;
    bool peer_lost = false;
  };
  auto c = std::make_shared<counts>();
  return {
      [=](step_atom a, step_request& r) -> caf::result<step_result> {
        if (c->to_fail == 0) return self->delegate(real, a, std::move(r));
        if (c->to_fail > 0) --c->to_fail;
        ++c->failed;
        if (c->peer_lost)
          return runtime::make_error(runtime::data_plane_errc::peer_lost, "payload transfer broke off: Endpoint timeout");
        return caf::make_error(caf::sec::request_receiver_down);
      },
      [=](release_atom a, std::vector<uint64_t>& ids) { self->send(real, a, std::move(ids)); },
      [=](fail_steps_atom, int n) {
        c->to_fail = n;
        c->peer_lost = false;
      },
      // As a data-plane receive from a dead peer fails: when UCX gives up on its endpoint.
      [=](fail_steps_atom, int n, peer_lost_atom) {
        c->to_fail = n;
        c->peer_lost = true;
      },
      [=](failed_atom) { return c->failed; },
  };
}

struct harness_options {
  controller_limits limits;
  std::chrono::milliseconds request_timeout = 0ms;
  bool flaky_shards = false;  // each shard behind a flaky_shard
  std::chrono::milliseconds failure_grace = 3s;
};

// Shards 0 and 1 run on nodes "a0" and "a1"; expert group g runs on node "g<g>".
struct harness {
  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::unique_ptr<local_cluster> cluster;
  controller_actor controller;
  rebalancer_actor rebalancer;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();

  std::vector<caf::actor> flaky;  // in front of shard s, with harness_options::flaky_shards

  harness(cluster_layout layout, bool with_failover, controller_limits limits = {},
          std::chrono::milliseconds request_timeout = 0ms)
      : harness(std::move(layout), with_failover, harness_options{limits, request_timeout}) {}

  harness(cluster_layout layout, bool with_failover, const harness_options& ho) {
    layout.metrics = registry;
    auto c = local_cluster::start(sys, tiny(), layout);
    EXPECT_TRUE(c) << error_text(c.error());
    cluster = std::move(*c);
    auto o = actors::testing::failover_controller_options(*cluster, layout, registry);
    if (ho.flaky_shards) {
      for (auto& shard : o.shards) {
        flaky.push_back(sys.spawn(flaky_shard, shard));
        shard = caf::actor_cast<attention_actor>(flaky.back());
      }
    }
    o.limits = ho.limits;
    o.request_timeout = ho.request_timeout;
    o.failure_grace = ho.failure_grace;
    controller = spawn_controller(sys, o);
    if (with_failover) rebalancer = actors::testing::spawn_failover(sys, *cluster, layout, controller, registry);
  }
  ~harness() {
    caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (rebalancer) caf::anon_send_exit(rebalancer, caf::exit_reason::user_shutdown);
    for (auto& f : flaky) caf::anon_send_exit(f, caf::exit_reason::user_shutdown);
  }

  // Waits (bounded) until the flaky shard has failed a step: the fault has surely happened.
  void await_failed_step(size_t shard) {
    for (int i = 0; i < 600 && failed_steps(shard) < 1; ++i) std::this_thread::sleep_for(50ms);
    EXPECT_GE(failed_steps(shard), 1) << "shard " << shard << " got no step to fail";
  }

  int failed_steps(size_t shard) {
    caf::scoped_actor self{sys};
    int n = -1;
    self->request(flaky.at(shard), caf::infinite, failed_atom::value)
        .receive([&](int x) { n = x; }, [](const caf::error& e) { ADD_FAILURE() << error_text(e); });
    return n;
  }

  std::string metrics() const { return actors::testing::metrics_text(*registry); }
};

std::vector<generation_job> workload(int n, int64_t max_new_tokens = 10) {
  std::vector<generation_job> jobs;
  for (int i = 0; i < n; ++i) {
    generation_job j;
    for (int t = 0; t < 3 + i % 5; ++t) j.prompt.push_back((i * 37 + t * 11) % 500 + 1);
    j.max_new_tokens = max_new_tokens + i % 4;
    jobs.push_back(std::move(j));
  }
  return jobs;
}

struct outcome {
  std::vector<int32_t> tokens;  // as streamed
  job_event last;
};

// Submits every job, calls fault() once `after_tokens` tokens have streamed in all, and collects
// until each job has ended.
std::vector<outcome> run(harness& h, const std::vector<generation_job>& jobs, size_t after_tokens = 0,
                         const std::function<void()>& fault = {}) {
  caf::scoped_actor self{h.sys};
  std::map<uint64_t, size_t> index;
  for (size_t i = 0; i < jobs.size(); ++i) {
    self->request(h.controller, caf::infinite, submit_atom::value, jobs[i], caf::actor{self})
        .receive([&](uint64_t id) { index[id] = i; }, [&](const caf::error& e) { ADD_FAILURE() << error_text(e); });
  }
  std::vector<outcome> out(jobs.size());
  size_t ended = 0, streamed = 0;
  bool faulted = !fault;
  while (ended < index.size()) {
    bool timed_out = false;
    self->receive(
        [&](job_event_atom, const job_event& ev) {
          auto& o = out[index.at(ev.job)];
          o.tokens.insert(o.tokens.end(), ev.tokens.begin(), ev.tokens.end());
          streamed += ev.tokens.size();
          if (ev.finished) {
            o.last = ev;
            ++ended;
          }
        },
        caf::after(120s) >> [&] { timed_out = true; });
    if (timed_out) {
      ADD_FAILURE() << "requests hang: " << ended << " of " << index.size() << " ended";
      break;
    }
    if (!faulted && streamed >= after_tokens) {
      faulted = true;
      fault();
    }
  }
  return out;
}

// The outcomes of `jobs` on a fresh cluster of `layout` (with a failover) when nothing fails.
std::vector<outcome> fault_free(const cluster_layout& layout, const std::vector<generation_job>& jobs,
                                controller_limits limits = {}) {
  harness h(layout, true, limits);
  return run(h, jobs);
}

void down(harness& h, const std::string& node) { caf::anon_send(h.controller, actors::testing::node_down(node)); }

void expect_same(const std::vector<outcome>& baseline, const std::vector<outcome>& faulted) {
  ASSERT_EQ(baseline.size(), faulted.size());
  for (size_t i = 0; i < baseline.size(); ++i) {
    EXPECT_EQ(faulted[i].last.state, job_state::finished) << "request " << i << ": " << faulted[i].last.error;
    EXPECT_EQ(faulted[i].tokens, baseline[i].tokens) << "request " << i;
  }
}

using actors::testing::counter;

}  // namespace

TEST(recovery, a_lost_attention_shard_loses_no_request_and_changes_no_token) {
  // 200-token requests: the fault comes after 24 tokens have reached this test, and with 30
  // (a whole run took 0.2 s) a CI run once saw every request finished before the down event
  // reached the controller (none to replay).
  const auto jobs = workload(24, 200);
  // At most 12 running per shard: shard 1 surely holds requests when it is lost.
  controller_limits lim;
  lim.max_running_requests = 12;
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs, lim);
  harness h(even_layout(2, 3, 16), true, lim);
  const auto faulted = run(h, jobs, 24, [&] {
    // The down event first, as the membership sends it before anyone notices the silence;
    // then the shard really goes.
    down(h, "a1");
    caf::anon_send_exit(h.cluster->shards()[1], caf::exit_reason::kill);
  });
  expect_same(baseline, faulted);
  const auto m = h.metrics();
  EXPECT_GT(counter(m, "moe_controller_requests_replayed_total"), 0) << m;
  EXPECT_EQ(counter(m, "moe_controller_attention_shards_up"), 1);
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"shards\",outcome=\"ok\"}"), 1) << m;
  EXPECT_EQ(counter(m, "moe_recovery_seconds_count"), 1);
}

// A killed node's connection drops before the membership's down event arrives: a step sent to
// its shard meanwhile fails at once with request_receiver_down. Its requests wait for the event
// and are replayed then, like those of the shard's other steps.
TEST(recovery, a_shard_step_failing_before_the_down_event_is_replayed_when_it_comes) {
  const auto jobs = workload(24, 200);  // long enough to be in flight at the fault (above)
  controller_limits lim;
  lim.max_running_requests = 12;
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs, lim);
  harness h(even_layout(2, 3, 16), true, harness_options{lim, 0ms, true, 30s});
  const auto faulted = run(h, jobs, 24, [&] {
    caf::anon_send(h.flaky[1], fail_steps_atom::value, -1);
    h.await_failed_step(1);
    std::this_thread::sleep_for(300ms);  // the membership is slow to notice
    down(h, "a1");
  });
  expect_same(baseline, faulted);
  EXPECT_GE(h.failed_steps(1), 1);
  const auto m = h.metrics();
  EXPECT_GT(counter(m, "moe_controller_requests_replayed_total"), 0) << m;
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"shards\",outcome=\"ok\"}"), 1) << m;
}

// The same race through a live shard: its router's request to a killed expert group fails before
// the group's node is reported down. The step runs again after the failover.
TEST(recovery, a_step_failing_before_a_groups_down_event_is_replayed_after_the_failover) {
  const auto jobs = workload(24, 30);
  controller_limits lim;
  lim.max_running_requests = 12;  // both shards hold requests, shard 0 surely takes steps
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs, lim);
  harness h(even_layout(2, 3, 16), true, harness_options{lim, 0ms, true, 30s});
  const auto faulted = run(h, jobs, 24, [&] {
    caf::anon_send(h.flaky[0], fail_steps_atom::value, 1);
    h.await_failed_step(0);
    std::this_thread::sleep_for(300ms);
    down(h, "g2");
    caf::anon_send_exit(h.cluster->groups()[2], caf::exit_reason::kill);
  });
  expect_same(baseline, faulted);
  EXPECT_EQ(h.failed_steps(0), 1);
  const auto m = h.metrics();
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"experts\",outcome=\"ok\"}"), 1) << m;
}

// A data-plane receive from the dead node's peer fails only when UCX gives up on the endpoint,
// which can be after the failover is done: that failure is still the node's, and replayed.
TEST(recovery, a_lost_peers_error_after_the_failover_is_replayed) {
  // Long requests: shard 0 must still be taking steps when the failover is done and the failure
  // is armed (with 30 tokens, a loaded CI machine once finished them all while the test polled
  // for the recovery, and no step was left to fail).
  const auto jobs = workload(24, 200);
  controller_limits lim;
  lim.max_running_requests = 12;
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs, lim);
  harness h(even_layout(2, 3, 16), true, harness_options{lim, 0ms, true, 30s});
  const auto faulted = run(h, jobs, 24, [&] {
    down(h, "g2");
    caf::anon_send_exit(h.cluster->groups()[2], caf::exit_reason::kill);
    for (int i = 0; i < 600 && counter(h.metrics(), "moe_recovery_seconds_count") < 1; ++i)
      std::this_thread::sleep_for(10ms);
    caf::anon_send(h.flaky[0], fail_steps_atom::value, 1, peer_lost_atom::value);
    h.await_failed_step(0);
  });
  expect_same(baseline, faulted);
  EXPECT_EQ(h.failed_steps(0), 1);
  EXPECT_EQ(counter(h.metrics(), "moe_recoveries_total{kind=\"experts\",outcome=\"ok\"}"), 1);
}

// Without a down event to explain it, such a failure is reported once the grace has passed:
// the requests of the failed steps fail with the reason, the others finish unchanged, none hang.
TEST(recovery, a_step_failure_no_node_explains_fails_its_requests_after_the_grace) {
  const auto jobs = workload(16, 30);
  controller_limits lim;
  lim.max_running_requests = 8;  // both shards hold requests
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs, lim);
  harness h(even_layout(2, 3, 16), true, harness_options{lim, 0ms, true, 200ms});
  const auto out = run(h, jobs, 16, [&] { caf::anon_send(h.flaky[1], fail_steps_atom::value, -1); });
  size_t failed = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].last.state == job_state::finished) {
      EXPECT_EQ(out[i].tokens, baseline[i].tokens) << "request " << i;
      continue;
    }
    ++failed;
    EXPECT_EQ(out[i].last.state, job_state::failed) << "request " << i;
    EXPECT_NE(out[i].last.error.find("request_receiver_down"), std::string::npos) << out[i].last.error;
    EXPECT_NE(out[i].last.error.find("no node went down within 200 ms"), std::string::npos) << out[i].last.error;
  }
  EXPECT_GT(failed, 0u);
}

TEST(recovery, lost_expert_groups_fail_over_and_change_no_token) {
  const auto jobs = workload(24, 30);
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs);
  // Group 2 holds experts 11-15 and nothing else does: survivors load them from the checkpoint.
  harness h(even_layout(2, 3, 16), true);
  const auto faulted = run(h, jobs, 24, [&] {
    down(h, "g2");
    caf::anon_send_exit(h.cluster->groups()[2], caf::exit_reason::kill);
  });
  expect_same(baseline, faulted);
  const auto m = h.metrics();
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"experts\",outcome=\"ok\"}"), 1) << m;
  EXPECT_EQ(counter(m, "moe_controller_recovering"), 0);
  EXPECT_EQ(counter(m, "moe_placement_version"), 2) << m;

  // Later requests are served by the survivors alone, still exactly.
  const auto later = run(h, std::vector<generation_job>(jobs.begin(), jobs.begin() + 6));
  for (size_t i = 0; i < later.size(); ++i) {
    EXPECT_EQ(later[i].last.state, job_state::finished) << later[i].last.error;
    EXPECT_EQ(later[i].tokens, baseline[i].tokens);
  }
}

TEST(recovery, replicated_experts_keep_serving_from_their_replicas) {
  // Group 2 holds only replicas (experts 0-4, also in group 0): nothing needs loading.
  auto layout = even_layout(2, 3, 16);
  auto& g = layout.groups;
  g[0].experts = {0, 1, 2, 3, 4, 5, 6, 7};
  g[1].experts = {8, 9, 10, 11, 12, 13, 14, 15};
  g[2].experts = {0, 1, 2, 3, 4};
  g[2].holds_shared_experts = false;
  const auto jobs = workload(16, 30);
  const auto baseline = fault_free(layout, jobs);
  harness h(layout, true);
  const auto faulted = run(h, jobs, 16, [&] {
    down(h, "g2");
    caf::anon_send_exit(h.cluster->groups()[2], caf::exit_reason::kill);
  });
  expect_same(baseline, faulted);
  const auto m = h.metrics();
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"experts\",outcome=\"ok\"}"), 1) << m;
  EXPECT_EQ(counter(m, "moe_rebalance_replicas_moved_total"), 0) << m;
}

TEST(recovery, lost_shared_experts_move_to_a_survivor_and_change_no_token) {
  const auto jobs = workload(16, 30);
  const auto baseline = fault_free(even_layout(2, 3, 16), jobs);
  // Group 0 holds the shared experts and experts 0-4: a survivor loads both from the checkpoint
  // and the routers send the shared rows there from the new placement on.
  harness h(even_layout(2, 3, 16), true);
  const auto faulted = run(h, jobs, 16, [&] {
    down(h, "g0");
    caf::anon_send_exit(h.cluster->groups()[0], caf::exit_reason::kill);
  });
  expect_same(baseline, faulted);
  const auto m = h.metrics();
  EXPECT_EQ(counter(m, "moe_recoveries_total{kind=\"experts\",outcome=\"ok\"}"), 1) << m;
  const auto later = run(h, std::vector<generation_job>(jobs.begin(), jobs.begin() + 4));
  for (size_t i = 0; i < later.size(); ++i) {
    EXPECT_EQ(later[i].last.state, job_state::finished) << later[i].last.error;
    EXPECT_EQ(later[i].tokens, baseline[i].tokens);
  }
}

TEST(recovery, when_no_group_survives_requests_fail_with_the_reason_not_a_hang) {
  harness h(even_layout(1, 1, 16), true);
  // Long requests, the failure at the first token: none can finish before it.
  const auto out = run(h, workload(6, 200), 1, [&] {
    down(h, "g0");
    caf::anon_send_exit(h.cluster->groups()[0], caf::exit_reason::kill);
  });
  for (const auto& o : out) {
    EXPECT_EQ(o.last.state, job_state::failed);
    EXPECT_NE(o.last.error.find("every expert group is lost"), std::string::npos) << o.last.error;
  }
}

TEST(recovery, without_a_failover_a_lost_group_fails_requests_with_the_reason) {
  harness h(even_layout(1, 2, 16), false);
  const auto out = run(h, workload(6, 200), 1, [&] { down(h, "g1"); });
  for (const auto& o : out) {
    EXPECT_EQ(o.last.state, job_state::failed);
    EXPECT_NE(o.last.error.find("node g1 is down"), std::string::npos) << o.last.error;
  }
  caf::scoped_actor self{h.sys};
  self->request(h.controller, caf::infinite, submit_atom::value, workload(1)[0], caf::actor{})
      .receive([](uint64_t) { ADD_FAILURE() << "a cluster without its experts accepted a request"; },
               [](const caf::error& e) { EXPECT_NE(error_text(e).find("cluster unavailable"), std::string::npos); });
}

TEST(recovery, requests_past_their_deadline_fail_with_a_clear_error_and_free_their_place) {
  harness h(even_layout(1, 2, 16), true, {}, 200ms);
  caf::scoped_actor self{h.sys};
  // Steps held (as a stalled cluster would): nothing can finish, so the deadline decides.
  uint64_t hold = 0;
  self->request(h.controller, caf::infinite, hold_steps_atom::value)
      .receive([&](uint64_t id) { hold = id; }, [](const caf::error& e) { FAIL() << error_text(e); });
  auto jobs = workload(4);
  jobs[0].deadline_ms = 600'000;  // its own deadline wins over the default
  std::map<uint64_t, size_t> index;
  for (size_t i = 0; i < jobs.size(); ++i)
    self->request(h.controller, caf::infinite, submit_atom::value, jobs[i], caf::actor{self})
        .receive([&](uint64_t id) { index[id] = i; }, [](const caf::error& e) { FAIL() << error_text(e); });
  std::map<size_t, job_event> ended;
  while (ended.size() < 3) {
    self->receive([&](job_event_atom, const job_event& ev) { if (ev.finished) ended[index.at(ev.job)] = ev; },
                  caf::after(60s) >> [&] { FAIL() << "requests past their deadline hang"; });
  }
  EXPECT_FALSE(ended.count(0));
  for (const auto& [i, ev] : ended) {
    EXPECT_EQ(ev.state, job_state::failed);
    EXPECT_NE(ev.error.find("deadline exceeded: not finished within 200 ms (waiting for a shard, 0 tokens generated)"),
              std::string::npos)
        << ev.error;
  }
  EXPECT_EQ(counter(h.metrics(), "moe_controller_deadlines_exceeded_total"), 3);
  // Released, the one with time left finishes exactly as it would have.
  self->send(h.controller, resume_steps_atom::value, hold);
  job_event last;
  std::vector<int32_t> tokens;
  while (!last.finished) {
    self->receive([&](job_event_atom, const job_event& ev) {
                    tokens.insert(tokens.end(), ev.tokens.begin(), ev.tokens.end());
                    if (ev.finished) last = ev;
                  },
                  caf::after(60s) >> [&] { FAIL() << "the request with time left did not finish"; });
  }
  EXPECT_EQ(last.state, job_state::finished) << last.error;
  harness fresh(even_layout(1, 2, 16), true);
  EXPECT_EQ(tokens, run(fresh, {jobs[0]})[0].tokens);
}
