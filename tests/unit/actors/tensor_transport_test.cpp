// Tensors between processes (runtime/tensor_exchange.hpp, actors/tensor_transport.hpp): two
// exchanges in one process stand for two processes (each its own UCX worker and listener), so
// every transfer below really crosses UCX; the fetcher is the actor side.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <future>
#include <numeric>

#include "actors/actor_types.hpp"
#include "actors/tensor_transport.hpp"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"

using namespace moe;
using namespace std::chrono_literals;

namespace {

caf::node_id fake_node(uint32_t pid) {
  caf::node_id::default_data::host_id_type host{};
  host[0] = static_cast<uint8_t>(pid);
  return caf::make_node_id(pid, host);
}

std::shared_ptr<runtime::tensor_exchange> start_exchange(uint32_t plane) {
  runtime::data_plane_options o;
  o.plane_id = plane;
  o.drain_timeout = 2s;
  auto ex = runtime::tensor_exchange::start(o);
  EXPECT_TRUE(ex) << error_text(ex.error());
  return ex ? *ex : nullptr;
}

using pulled = caf::expected<std::shared_ptr<std::vector<float>>>;

pulled pull_now(runtime::tensor_exchange& ex, uint64_t tag, const std::vector<int64_t>& shape) {
  auto done = std::make_shared<std::promise<pulled>>();
  auto f = done->get_future();
  if (auto err = ex.pull(tag, shape, [done](pulled r) { done->set_value(std::move(r)); })) return err;
  if (f.wait_for(20s) != std::future_status::ready)
    return runtime::make_error(runtime::data_plane_errc::peer_lost, "test: no answer in 20 s");
  return f.get();
}

std::shared_ptr<const std::vector<float>> iota(size_t n) {
  auto v = std::make_shared<std::vector<float>>(n);
  std::iota(v->begin(), v->end(), 0.5f);
  return v;
}

}  // namespace

TEST(tensor_exchange, pushed_tensor_lands_in_the_receivers_buffer_whether_pulled_before_or_after) {
  auto a = start_exchange(1), b = start_exchange(2);
  ASSERT_TRUE(a && b);
  const auto node_b = fake_node(2);
  a->add_peer(node_b, b->address());
  EXPECT_TRUE(a->knows(node_b));
  EXPECT_FALSE(a->knows(fake_node(3)));
  // Pushed first: the header waits for its pull (a large tensor goes by rendezvous).
  const std::vector<int64_t> shape{64, 1024};
  auto values = iota(64 * 1024);
  auto tag = a->push(node_b, values, shape, {protocol::frame_kind::activations, 3, 7, 1});
  ASSERT_TRUE(tag) << error_text(tag.error());
  auto got = pull_now(*b, *tag, shape);
  ASSERT_TRUE(got) << error_text(got.error());
  EXPECT_EQ(**got, *values);
  // Pulled first: the receive is posted before anything is sent (a small, eager tensor).
  auto small = iota(16);
  auto done = std::make_shared<std::promise<pulled>>();
  auto f = done->get_future();
  // The tag a's next push will use: the next sequence number of plane 1.
  const uint64_t next = *tag + 1;
  ASSERT_FALSE(b->pull(next, {4, 4}, [done](pulled r) { done->set_value(std::move(r)); }));
  auto tag2 = a->push(node_b, small, {4, 4}, {});
  ASSERT_TRUE(tag2);
  ASSERT_EQ(*tag2, next);
  ASSERT_EQ(f.wait_for(20s), std::future_status::ready);
  auto r = f.get();
  ASSERT_TRUE(r) << error_text(r.error());
  EXPECT_EQ(**r, *small);
}

TEST(tensor_exchange, a_frame_of_another_shape_is_rejected_and_bad_pushes_are_refused) {
  auto a = start_exchange(1), b = start_exchange(2);
  ASSERT_TRUE(a && b);
  const auto node_b = fake_node(2);
  a->add_peer(node_b, b->address());
  auto tag = a->push(node_b, iota(12), {3, 4}, {});
  ASSERT_TRUE(tag);
  // Same byte count, other shape: the message and the frame disagree.
  auto got = pull_now(*b, *tag, {4, 3});
  ASSERT_FALSE(got);
  EXPECT_NE(error_text(got.error()).find("does not match"), std::string::npos) << error_text(got.error());
  // Unknown process, empty tensor, buffer and shape that disagree.
  EXPECT_FALSE(a->push(fake_node(9), iota(4), {4}, {}));
  EXPECT_FALSE(a->push(node_b, iota(0), {0}, {}));
  EXPECT_FALSE(a->push(node_b, iota(4), {5}, {}));
  EXPECT_TRUE(b->pull(12345, {-1, 4}, [](pulled) {}));  // negative dimension
  EXPECT_TRUE(b->pull(12346, {int64_t{1} << 40, int64_t{1} << 30}, [](pulled) {}));  // nothing allocated
}

TEST(tensor_fetcher, fetches_remote_tensors_and_times_out_on_missing_ones) {
  auto cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  auto a = start_exchange(1), b = start_exchange(2);
  ASSERT_TRUE(a && b);
  const auto node_b = fake_node(2);
  a->add_peer(node_b, b->address());
  actors::tensor_transport ta{a, {}};
  auto fetcher = actors::spawn_tensor_fetcher(sys, b, 500ms);
  caf::scoped_actor self{sys};

  // Export to another process stamps a tag; the receiver's fetcher makes the bytes local.
  auto t = actors::tensor_ref::wrap(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  ASSERT_FALSE(actors::export_tensor(ta, fake_node(1), node_b, t, {}));
  ASSERT_NE(t.transfer_id, 0u);
  actors::tensor_ref as_received;  // what deserialisation yields: shape and tag, no bytes
  as_received.shape = t.shape;
  as_received.transfer_id = t.transfer_id;
  EXPECT_TRUE(actors::is_remote(as_received));
  self->request(fetcher, 10s, actors::fetch_tensor_atom::value, as_received)
      .receive([&](const actors::tensor_ref& r) { EXPECT_EQ(*r.local, *t.local); },
               [&](const caf::error& e) { FAIL() << error_text(e); });

  // In-process export is a no-op: the receiver shares the buffer.
  auto local = actors::tensor_ref::wrap(std::vector<float>{1, 2}, {2});
  ASSERT_FALSE(actors::export_tensor(ta, fake_node(1), fake_node(1), local, {}));
  EXPECT_EQ(local.transfer_id, 0u);
  // To another process without a transport: refused with a reason.
  EXPECT_TRUE(actors::export_tensor({}, fake_node(1), node_b, local, {}));

  // Nothing was sent for this tag: the fetch fails after the timeout, naming the plane.
  actors::tensor_ref missing;
  missing.shape = {4};
  missing.transfer_id = runtime::data_plane_tag::make(1, 999);
  self->request(fetcher, 10s, actors::fetch_tensor_atom::value, missing)
      .receive([&](const actors::tensor_ref&) { FAIL() << "a tensor nobody sent arrived"; },
               [&](const caf::error& e) {
                 EXPECT_NE(error_text(e).find("did not arrive within 500 ms"), std::string::npos) << error_text(e);
               });
  caf::anon_send_exit(fetcher, caf::exit_reason::user_shutdown);
}
