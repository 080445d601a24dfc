// UCX wired for real: two workers connect through a listener on 127.0.0.1 and exchange tagged
// messages in both directions, small (eager) and large (rendezvous), bytes checked exactly.
#include "runtime/ucx/ucx.hpp"

#include <gtest/gtest.h>

#include <numeric>

using namespace moe::runtime::ucx;

namespace {

std::vector<std::byte> pattern(size_t n, uint8_t seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(seed + i * 131 + (i >> 8)));
  return v;
}

struct connected_pair {
  context ctx;
  worker server_worker;
  worker client_worker;
  std::unique_ptr<listener> lst;
  endpoint client_ep;
  endpoint server_ep;
};

std::unique_ptr<connected_pair> connect_pair() {
  auto ctx = context::create();
  if (!ctx) {
    ADD_FAILURE() << moe::error_text(ctx.error());
    return nullptr;
  }
  auto p = std::make_unique<connected_pair>();
  p->ctx = std::move(*ctx);
  auto sw = worker::create(p->ctx);
  auto cw = worker::create(p->ctx);
  EXPECT_TRUE(sw && cw);
  p->server_worker = std::move(*sw);
  p->client_worker = std::move(*cw);
  auto lst = listener::listen(p->server_worker, "127.0.0.1", 0);
  EXPECT_TRUE(lst) << moe::error_text(lst.error());
  p->lst = std::move(*lst);
  EXPECT_NE(p->lst->port(), 0);
  auto cep = endpoint::connect(p->client_worker, "127.0.0.1", p->lst->port());
  EXPECT_TRUE(cep) << moe::error_text(cep.error());
  p->client_ep = std::move(*cep);
  ucp_conn_request_h req = nullptr;
  for (int spin = 0; spin < 50'000'000 && !req; ++spin) {
    p->server_worker.progress();
    p->client_worker.progress();
    req = p->lst->take_request();
  }
  EXPECT_NE(req, nullptr) << "no connection request arrived";
  auto sep = endpoint::accept(p->server_worker, req);
  EXPECT_TRUE(sep) << moe::error_text(sep.error());
  p->server_ep = std::move(*sep);
  return p;
}

}  // namespace

TEST(ucx, version_is_reported) { EXPECT_FALSE(version_string().empty()); }

TEST(ucx, tagged_transfers_between_two_workers_over_loopback) {
  auto p = connect_pair();
  ASSERT_TRUE(p);
  for (size_t bytes : {size_t{64}, size_t{1} << 20, size_t{8} << 20}) {
    SCOPED_TRACE(bytes);
    const auto sent = pattern(bytes, static_cast<uint8_t>(bytes));
    std::vector<std::byte> received(bytes);
    auto rr = tag_recv(p->server_worker, received, /*tag=*/bytes);
    ASSERT_TRUE(rr) << moe::error_text(rr.error());
    auto sr = p->client_ep.tag_send(sent, /*tag=*/bytes);
    ASSERT_TRUE(sr) << moe::error_text(sr.error());
    ASSERT_FALSE(sr->wait({&p->client_worker, &p->server_worker}));
    ASSERT_FALSE(rr->wait({&p->client_worker, &p->server_worker}));
    EXPECT_EQ(received, sent);

    // And back, so both endpoints carry data.
    std::vector<std::byte> echoed(bytes);
    auto rr2 = tag_recv(p->client_worker, echoed, /*tag=*/bytes + 1);
    ASSERT_TRUE(rr2);
    auto sr2 = p->server_ep.tag_send(received, /*tag=*/bytes + 1);
    ASSERT_TRUE(sr2);
    ASSERT_FALSE(sr2->wait({&p->client_worker, &p->server_worker}));
    ASSERT_FALSE(rr2->wait({&p->client_worker, &p->server_worker}));
    EXPECT_EQ(echoed, sent);
  }
}

TEST(ucx, a_message_larger_than_the_receive_buffer_fails_cleanly) {
  auto p = connect_pair();
  ASSERT_TRUE(p);
  const auto sent = pattern(4096, 7);
  std::vector<std::byte> small(1024);
  auto rr = tag_recv(p->server_worker, small, 99);
  ASSERT_TRUE(rr);
  auto sr = p->client_ep.tag_send(sent, 99);
  ASSERT_TRUE(sr);
  auto recv_err = rr->wait({&p->client_worker, &p->server_worker});
  EXPECT_TRUE(recv_err) << "truncation must be reported";
  sr->wait({&p->client_worker, &p->server_worker});
}

TEST(ucx, connecting_to_a_bad_address_is_an_error) {
  auto ctx = context::create();
  ASSERT_TRUE(ctx);
  auto w = worker::create(*ctx);
  ASSERT_TRUE(w);
  auto ep = endpoint::connect(*w, "not-an-address", 1);
  ASSERT_FALSE(ep);
  EXPECT_NE(moe::error_text(ep.error()).find("not-an-address"), std::string::npos);
}
