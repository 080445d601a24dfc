// Every message type the actors exchange is registered with the actor system and survives
// CAF's binary serialisation, which is what crosses a process boundary. A type missing from the
// ID blocks compiles and fails only at run time, so each is checked here.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include "actors/actor_types.hpp"
#include "actors/cluster_messages.hpp"
#include "actors/controller.hpp"
#include "actors/messages.hpp"
#include "actors/node_agent.hpp"
#include "runtime/actor_system.hpp"
#include "scheduler/scheduler_actor.hpp"
#include "system_config.hpp"

using namespace moe;
using namespace moe::actors;

namespace {

template <class T>
T round_trip(caf::actor_system& sys, T value) {
  std::vector<char> buf;
  caf::binary_serializer sink{sys, buf};
  EXPECT_FALSE(sink(value));
  T out;
  caf::binary_deserializer source{sys, buf};
  EXPECT_FALSE(source(out));
  return out;
}

}  // namespace

TEST(message_types, every_type_is_registered_by_name) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  for (const char* name :
       {"moe::actors::tensor_ref", "moe::actors::expert_batch", "moe::actors::expert_result",
        "moe::actors::route_request", "moe::actors::route_result", "moe::actors::sampling_spec",
        "moe::actors::step_entry", "moe::actors::step_request", "moe::actors::step_result",
        "moe::actors::generation_job", "moe::actors::job_event", "moe::actors::job_status",
        "moe::actors::group_handles", "moe::actors::shard_handles", "moe::scheduler::placement",
        "moe::runtime::node_heartbeat",
        "moe::actors::node_credentials", "moe::actors::node_info", "moe::actors::node_join_reply",
        "moe::actors::node_status", "moe::actors::member_event", "moe::actors::member_status",
        "moe::actors::member_list"}) {
    EXPECT_TRUE(sys.types().make_value(name) != nullptr) << name << " is not registered";
  }
}

TEST(message_types, data_plane_handles_carry_shape_and_id_but_never_the_bytes) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  expert_batch b;
  b.layer = 3;
  b.step = 99;
  b.placement_version = 2;
  b.rows = tensor_ref::wrap(std::vector<float>(6, 1.5f), {2, 3});
  b.rows.transfer_id = 4242;
  b.experts = {5, shared_expert_row};
  b.weights = {0.25f, 1.0f};
  auto got = round_trip(sys, b);
  EXPECT_EQ(got.layer, 3);
  EXPECT_EQ(got.step, 99u);
  EXPECT_EQ(got.placement_version, 2u);
  EXPECT_EQ(got.rows.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(got.rows.transfer_id, 4242u);
  EXPECT_EQ(got.rows.local, nullptr);  // bulk data goes over the data plane, not CAF
  EXPECT_EQ(got.experts, b.experts);
  EXPECT_EQ(got.weights, b.weights);
}

TEST(message_types, control_messages_round_trip) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  step_request req;
  req.step = 7;
  req.prefill = true;
  req.want_logits = true;
  req.entries.push_back({11, {1, 2, 3}, {0.7f, 40, 0.9f, 1234}, 5});
  auto r = round_trip(sys, req);
  ASSERT_EQ(r.entries.size(), 1u);
  EXPECT_EQ(r.entries[0].sequence, 11u);
  EXPECT_EQ(r.entries[0].tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(r.entries[0].sampling.top_k, 40u);
  EXPECT_EQ(r.entries[0].sampling.seed, 1234u);
  EXPECT_EQ(r.entries[0].sample_offset, 5u);
  EXPECT_TRUE(r.prefill && r.want_logits);

  job_event ev{9, {4, 5}, true, job_state::finished, "stop", ""};
  auto e = round_trip(sys, ev);
  EXPECT_EQ(e.job, 9u);
  EXPECT_EQ(e.tokens, (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(e.state, job_state::finished);
  EXPECT_EQ(e.finish_reason, "stop");

  scheduler::placement p;
  p.version = 3;
  p.num_logical_experts = 16;
  p.attention.push_back({0, {"n1", true, 2}, 1000});
  p.expert_groups.push_back({1, {"n2", false, 0}, {0, 1, 5}, true, 77});
  p.devices.push_back({{"n1", true, 2}, 5000, 1000});
  EXPECT_EQ(round_trip(sys, p), p);
}

TEST(message_types, cluster_control_messages_round_trip) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  node_status st;
  st.info = {"n1", "10.0.0.2", 7110, 7122, 8, 0, 4242, "10.0.0.2:40001/2"};
  st.uptime_ms = 1234;
  st.actors = {"node_gatekeeper", "node_agent"};
  st.heartbeats_answered = 9;
  st.refused_joins = 2;
  auto s = round_trip(sys, st);
  EXPECT_EQ(s.info.name, "n1");
  EXPECT_EQ(s.info.control_port, 7110);
  EXPECT_EQ(s.info.pid, 4242);
  EXPECT_EQ(s.info.data_address, "10.0.0.2:40001/2");
  EXPECT_EQ(s.actors, st.actors);
  EXPECT_EQ(s.refused_joins, 2u);

  auto ev = round_trip(sys, member_event{"n0", member_state::up, member_state::down, "node agent down"});
  EXPECT_EQ(ev.to, member_state::down);
  EXPECT_EQ(ev.from, member_state::up);
  EXPECT_EQ(ev.reason, "node agent down");

  auto creds = round_trip(sys, node_credentials{"c", "the-credentials-secret", "peer"});
  EXPECT_EQ(creds.secret, "the-credentials-secret");
  // As text (what a log line or CAF's unexpected-message warning would show) it is redacted.
  const auto text = caf::deep_to_string(caf::make_message(creds));
  EXPECT_EQ(text.find("the-credentials-secret"), std::string::npos) << text;
  EXPECT_NE(text.find("<redacted>"), std::string::npos) << text;
  member_list l;
  l.members.push_back({"n0", "127.0.0.1", 7100, member_state::refused, "wrong cluster secret", {}, {}});
  auto lr = round_trip(sys, l);
  ASSERT_EQ(lr.members.size(), 1u);
  EXPECT_EQ(lr.members[0].state, member_state::refused);

  // A coordinator's session: every process's node id and data plane, the checkpoint, the cache.
  cluster_session session;
  session.peers.push_back({sys.node(), "127.0.0.1:40000/7f", "127.0.0.1", 7100});
  session.model_dir = "/models/tiny";
  session.cache_block_size = 16;
  session.cache_num_blocks = 300;
  auto sr = round_trip(sys, session);
  ASSERT_EQ(sr.peers.size(), 1u);
  EXPECT_EQ(sr.peers[0].node, sys.node());
  EXPECT_EQ(sr.peers[0].address, "127.0.0.1:40000/7f");
  EXPECT_EQ(sr.peers[0].control_port, 7100);
  EXPECT_EQ(sr.model_dir, "/models/tiny");
  EXPECT_EQ(sr.cache_num_blocks, 300);
}

// The training protocol's requests as whole messages, the way the middleman serialises them
// between processes: every element needs a type ID (the expert groups' train_grads carries a
// std::vector<int64_t> of replicated (layer, expert) pairs, which once had none).
TEST(message_types, training_requests_serialise_as_whole_messages) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  train_update u;
  u.expert_loads = {1, 2};
  for (auto msg : {caf::make_message(train_grads_atom::value, uint64_t{3}, std::vector<int64_t>{1, 5}),
                   caf::make_message(train_grads_atom::value, uint64_t{3}),
                   caf::make_message(train_apply_atom::value, u),
                   caf::make_message(train_step_atom::value, train_request{}),
                   caf::make_message(train_forward_atom::value, train_expert_batch{}),
                   caf::make_message(train_backward_atom::value, train_expert_grad{}),
                   caf::make_message(train_state_atom::value), caf::make_message(owner_state{}),
                   caf::make_message(gradient_report{}), caf::make_message(train_result{})}) {
    std::vector<char> buf;
    caf::binary_serializer sink{sys, buf};
    EXPECT_FALSE(sink(msg)) << caf::to_string(msg);
    caf::message back;
    caf::binary_deserializer source{sys, buf};
    EXPECT_FALSE(source(back)) << caf::to_string(msg);
    EXPECT_EQ(back.size(), msg.size()) << caf::to_string(msg);
  }
}
