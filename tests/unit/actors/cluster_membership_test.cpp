// cluster_membership against real `moe node` processes: it joins both nodes, notices a
// SIGKILLed node at once (down message), a SIGSTOPped one after the failure timeout
// (heartbeats), and a coordinator with the wrong secret ends up refused. Every child is a
// session leader and is killed and reaped, whatever the test's outcome. With the coordinator's
// worker pool held, a stopped node is still called down on time and a live one is not.
#include "actors/cluster_membership.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "actors/actor_types.hpp"
#include "busy_worker.hpp"
#include "node_children.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "watchdog.hpp"

using namespace moe;
using namespace moe::actors;
using namespace std::chrono_literals;
using moe::test::free_ports;
using moe::test::node_child;
using moe::test::watchdog;

namespace {

/// The failure timeout (3 s) is not short: a node process of the sanitizer build on a loaded
/// 2-core machine may stall for a second, and a node declared down by a stall fails the tests
/// (the stopped one is still found within their 30 s waits).
std::string yaml(const std::string& secret, uint16_t p0, uint16_t m0, uint16_t p1, uint16_t m1) {
  auto node = [](const char* name, uint16_t p, uint16_t m) {
    return std::string("  - {name: ") + name + ", host: 127.0.0.1, control_port: " + std::to_string(p) +
           ", metrics_port: " + std::to_string(m) + ", devices: {cpu_slots: 1}, memory: 1GiB}\n";
  };
  return "cluster:\n  name: membership-test\n  secret: " + secret +
         "\n  heartbeat_interval_ms: 100\n  failure_timeout_ms: 3000\nnodes:\n" + node("n0", p0, m0) +
         node("n1", p1, m1) + "model: {preset: tiny}\nports: {control: 0, api: 0, metrics: 0}\n";
}

/// One line of a test's event log: "n1: up -> down (reason)".
std::string describe(const member_event& ev) {
  return ev.node + ": " + to_string(ev.from) + " -> " + to_string(ev.to) + " (" + ev.reason + ")\n";
}

/// Waits (bounded) for the event that moves `node` to `state`; the events seen go to `log`.
std::optional<member_event> await_state(caf::scoped_actor& self, const std::string& node, member_state state,
                                        std::chrono::seconds bound, std::string& log) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    std::optional<member_event> got;
    self->receive([&](const member_event& ev) { got = ev; },
                  caf::after(std::chrono::milliseconds(200)) >> [] {});
    if (!got) continue;
    log += describe(*got);
    if (got->node == node && got->to == state) return got;
  }
  return std::nullopt;
}

/// Takes every event already in the mailbox, without waiting; logged unless `log` is null.
void drain_events(caf::scoped_actor& self, std::string* log) {
  for (bool more = true; more;)
    self->receive(
        [&](const member_event& ev) {
          if (log != nullptr) *log += describe(ev);
        },
        caf::after(std::chrono::milliseconds(0)) >> [&] { more = false; });
}

/// Ends a membership and waits until it is released. It is a detached actor the nodes hold
/// proxies of: were it still referenced when the system goes, the system's destructor would wait
/// for it forever (runtime::await_released says why). The events it sent `self` hold it as well,
/// so they are drained while waiting.
void stop_membership(caf::scoped_actor& self, cluster_membership_actor& membership) {
  const auto addr = membership.address();
  caf::anon_send_exit(membership, caf::exit_reason::user_shutdown);
  membership = nullptr;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  bool released = false;
  while (!(released = runtime::await_released(addr, 100ms)) && std::chrono::steady_clock::now() < deadline)
    drain_events(self, nullptr);
  EXPECT_TRUE(released) << "the membership is still referenced 30 s after it was told to stop";
}

/// Stops a membership when the test leaves the scope, however it leaves it: an ASSERT that
/// fails returns at once, and a membership left running would hang the system's destructor
/// (stop_membership), turning the failure into a silent timeout.
class stop_at_exit {
 public:
  stop_at_exit(caf::scoped_actor& self, cluster_membership_actor& membership)
      : self_(self), membership_(membership) {}
  stop_at_exit(const stop_at_exit&) = delete;
  stop_at_exit& operator=(const stop_at_exit&) = delete;
  ~stop_at_exit() {
    if (membership_) stop_membership(self_, membership_);
  }

 private:
  caf::scoped_actor& self_;
  cluster_membership_actor& membership_;
};

/// Below ctest's 300 s, so that a hang says where it was (watchdog.hpp). A run takes about 2 s,
/// under the sanitizers too.
constexpr std::chrono::seconds test_limit{240};
constexpr const char* teardown_phase =
    "teardown: the scoped actor, the actor system (waits for every detached actor), the nodes";

/// Two `moe node` processes (n0, n1) of one good config in a directory of their own, removed at
/// the end.
struct two_nodes {
  std::filesystem::path dir;
  std::string yaml_text;
  std::unique_ptr<node_child> n0, n1;
  explicit two_nodes(const std::string& tag)
      : dir(std::filesystem::temp_directory_path() / (tag + std::to_string(::getpid()))) {
    std::filesystem::create_directories(dir);
    const auto [p0, m0, p1, m1] = free_ports<4>();
    yaml_text = yaml("right-secret", p0, m0, p1, m1);
    std::ofstream(dir / "good.yaml") << yaml_text;
    n0 = std::make_unique<node_child>((dir / "good.yaml").string(), "n0", (dir / "n0.log").string());
    n1 = std::make_unique<node_child>((dir / "good.yaml").string(), "n1", (dir / "n1.log").string());
  }
  ~two_nodes() {
    n0.reset();
    n1.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

TEST(cluster_membership, detects_a_killed_and_a_stopped_node_and_refuses_a_wrong_secret) {
  watchdog dog{test_limit};
  dog.phase("the nodes join");
  two_nodes nodes("moe_membership_");
  node_child& n0 = *nodes.n0;
  node_child& n1 = *nodes.n1;
  auto cfg = runtime::parse_cluster_config(nodes.yaml_text, "good.yaml");
  ASSERT_TRUE(cfg) << error_text(cfg.error());
  auto sys_cfg = moe::actors::testing::networked_system_config();
  caf::actor_system sys{sys_cfg};
  caf::scoped_actor self{sys};
  auto registry = std::make_shared<prometheus::Registry>();
  cluster_membership_options o;
  o.config = *cfg;
  o.metrics = registry;
  o.join_retry = 100ms;  // the nodes may still be starting
  auto membership = spawn_cluster_membership(sys, o);
  stop_at_exit stop_membership_at_exit{self, membership};
  self->send(membership, member_subscribe_atom::value, caf::actor_cast<caf::actor>(self));

  // Both come up (whichever joins first); bounded by the nodes' start-up.
  std::string log;
  bool up0 = false, up1 = false;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!(up0 && up1) && std::chrono::steady_clock::now() < deadline) {
    self->receive(
        [&](const member_event& ev) {
          log += describe(ev);
          if (ev.to == member_state::up) (ev.node == "n0" ? up0 : up1) = true;
        },
        caf::after(200ms) >> [] {});
  }
  ASSERT_TRUE(up0 && up1) << "events:\n" << log;

  // A second coordinator with the wrong secret: both nodes refuse it, and it does not retry.
  dog.phase("a coordinator with the wrong secret");
  {
    auto wrong = o;
    wrong.config.secret = "wrong-secret";
    wrong.metrics = nullptr;
    auto other = spawn_cluster_membership(sys, wrong);
    stop_at_exit stop_other_at_exit{self, other};
    std::optional<member_list> members;
    for (int i = 0; i < 100; ++i) {
      self->request(other, 5s, members_atom::value).receive([&](member_list& l) { members = l; },
                                                               [&](caf::error& e) { FAIL() << sys.render(e); });
      if (members && std::all_of(members->members.begin(), members->members.end(),
                                 [](const member_status& m) { return m.state == member_state::refused; })) {
        break;
      }
      std::this_thread::sleep_for(100ms);
    }
    ASSERT_TRUE(members);
    for (const auto& m : members->members) {
      EXPECT_EQ(m.state, member_state::refused) << m.node << ": " << m.reason;
      EXPECT_NE(m.reason.find("wrong cluster secret"), std::string::npos) << m.reason;
    }
    stop_membership(self, other);
  }

  // SIGKILL: the connection drops and the monitor reports the agent down at once.
  dog.phase("n0 killed");
  n0.signal(SIGKILL);
  auto down0 = await_state(self, "n0", member_state::down, 30s, log);
  ASSERT_TRUE(down0) << "events:\n" << log;
  EXPECT_NE(down0->reason.find("node agent down"), std::string::npos) << down0->reason;
  n0.kill_and_reap();

  // SIGSTOP: the connection stays open; only the missing heartbeats tell.
  dog.phase("n1 stopped");
  n1.signal(SIGSTOP);
  auto down1 = await_state(self, "n1", member_state::down, 30s, log);
  n1.kill_and_reap();
  ASSERT_TRUE(down1) << "events:\n" << log;
  EXPECT_NE(down1->reason.find("no heartbeat answered"), std::string::npos) << down1->reason;

  // Counted by cause, with the detection time observed from the last good heartbeat.
  const auto text = prometheus::TextSerializer().Serialize(registry->Collect());
  EXPECT_NE(text.find("moe_cluster_node_failures_total{cause=\"exit\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("moe_cluster_node_failures_total{cause=\"timeout\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("moe_cluster_failure_detection_seconds_count 2"), std::string::npos) << text;
  EXPECT_NE(text.find("moe_cluster_nodes{state=\"down\"} 2"), std::string::npos) << text;

  dog.phase("the membership stops");
  stop_membership(self, membership);
  dog.phase(teardown_phase);
}

// The coordinator's actors share CAF's worker pool with the membership (the controller, the API,
// in a small cluster attention and expert groups too). While that pool is held, a node that stops
// is still called down on time, and a live one is not: the membership has a thread of its own and
// heartbeat answers are read off the wire without a pool worker. Here the coordinator has one
// worker, held throughout.
TEST(cluster_membership, a_busy_coordinator_pool_still_detects_failures_and_only_them) {
  watchdog dog{test_limit};
  dog.phase("the nodes join");
  two_nodes nodes("moe_membership_busy_");
  auto cfg = runtime::parse_cluster_config(nodes.yaml_text, "good.yaml");
  ASSERT_TRUE(cfg) << error_text(cfg.error());
  auto sys_cfg = moe::actors::testing::networked_system_config(1);
  caf::actor_system sys{sys_cfg};
  caf::scoped_actor self{sys};
  cluster_membership_options o;
  o.config = *cfg;
  o.join_retry = 100ms;
  auto membership = spawn_cluster_membership(sys, o);
  stop_at_exit stop_membership_at_exit{self, membership};
  self->send(membership, member_subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  auto states = [&] {
    std::map<std::string, member_state> out;
    self->request(membership, 10s, members_atom::value)
        .receive(
            [&](member_list& l) {
              for (const auto& m : l.members) out[m.node] = m.state;
            },
            [&](caf::error& e) { ADD_FAILURE() << sys.render(e); });
    return out;
  };
  const std::map<std::string, member_state> both_up{{"n0", member_state::up},
                                                    {"n1", member_state::up}};
  const auto up_by = std::chrono::steady_clock::now() + 60s;
  while (states() != both_up && std::chrono::steady_clock::now() < up_by)
    std::this_thread::sleep_for(100ms);
  ASSERT_EQ(states(), both_up);
  drain_events(self, nullptr);  // the joins' events are not the test's

  dog.phase("n1 stopped with the pool held");
  moe::test::busy_worker busy{sys};
  ASSERT_TRUE(busy.held());

  // n1 stops answering; the event arrives while the pool is still held.
  nodes.n1->signal(SIGSTOP);
  std::string log;
  auto down1 = await_state(self, "n1", member_state::down, 30s, log);
  // n0 meanwhile stays up: another failure timeout with the pool held changes nothing.
  std::this_thread::sleep_for(std::chrono::milliseconds(cfg->failure_timeout_ms));
  drain_events(self, &log);
  busy.release();
  nodes.n1->kill_and_reap();
  ASSERT_TRUE(down1) << "events:\n" << log;
  EXPECT_EQ(log.find("n0:"), std::string::npos) << "events:\n" << log;
  EXPECT_EQ(states().at("n0"), member_state::up);

  dog.phase("the membership stops");
  stop_membership(self, membership);
  dog.phase(teardown_phase);
}
