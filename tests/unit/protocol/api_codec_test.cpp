// The job API's rebalance report on the wire (protocol/api_codec.hpp): every field survives a
// round trip through bytes, an empty message reads as the zero report, and validate() names
// the field of a malformed one.
#include "protocol/api_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

using namespace moe::protocol;
namespace wire = moe::protocol::capnp;

namespace {

api_rebalance_report sample_report() {
  api_rebalance_report r;
  r.changed = true;
  r.version_before = 1;
  r.version_after = 2;
  r.balance_before = 1.84;
  r.balance_after = 1.07;
  r.layer_balance_before = {1.5, 2.25, 1.77};
  r.layer_balance_after = {1.0, 1.125, 1.09};
  r.tokens_counted = 0x1234567890ull;
  r.replicas_moved = 12;
  r.bytes_moved = 3'250'585ull;
  r.duration_seconds = 0.42;
  r.trigger = "on_demand";
  return r;
}

// Builds `r` into a message, flattens it to words and reads it back, as the RPC layer does.
api_rebalance_report through_bytes(const api_rebalance_report& r) {
  ::capnp::MallocMessageBuilder builder;
  to_wire(r, builder.initRoot<wire::RebalanceReport>());
  auto words = ::capnp::messageToFlatArray(builder);
  ::capnp::FlatArrayMessageReader reader(words.asPtr());
  return from_wire(reader.getRoot<wire::RebalanceReport>());
}

std::string text_of(const caf::error& e) { return e ? moe::error_text(e) : "valid"; }

}  // namespace

TEST(api_codec, rebalance_report_round_trip_preserves_every_field) {
  const auto r = sample_report();
  const auto got = through_bytes(r);
  EXPECT_TRUE(got.changed);
  EXPECT_EQ(got.version_before, 1u);
  EXPECT_EQ(got.version_after, 2u);
  EXPECT_DOUBLE_EQ(got.balance_before, 1.84);
  EXPECT_DOUBLE_EQ(got.balance_after, 1.07);
  EXPECT_EQ(got.layer_balance_before, (std::vector<double>{1.5, 2.25, 1.77}));
  EXPECT_EQ(got.layer_balance_after, (std::vector<double>{1.0, 1.125, 1.09}));
  EXPECT_EQ(got.tokens_counted, 0x1234567890ull);
  EXPECT_EQ(got.replicas_moved, 12);
  EXPECT_EQ(got.bytes_moved, 3'250'585ull);
  EXPECT_DOUBLE_EQ(got.duration_seconds, 0.42);
  EXPECT_EQ(got.trigger, "on_demand");
  EXPECT_FALSE(validate(got)) << text_of(validate(got));
}

TEST(api_codec, rebalance_report_keeps_wide_values_and_an_unchanged_placement) {
  api_rebalance_report r;
  r.changed = false;
  r.version_before = r.version_after = (uint64_t{1} << 40) + 3;  // wider than 32 bits
  r.balance_before = r.balance_after = 1.03;
  r.bytes_moved = std::numeric_limits<uint64_t>::max();
  r.tokens_counted = std::numeric_limits<uint64_t>::max() - 1;
  r.trigger = "periodic";
  const auto got = through_bytes(r);
  EXPECT_FALSE(got.changed);
  EXPECT_EQ(got.version_before, (uint64_t{1} << 40) + 3);
  EXPECT_EQ(got.version_after, got.version_before);
  EXPECT_EQ(got.bytes_moved, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(got.tokens_counted, std::numeric_limits<uint64_t>::max() - 1);
  EXPECT_TRUE(got.layer_balance_before.empty());
  EXPECT_TRUE(got.layer_balance_after.empty());
  EXPECT_EQ(got.trigger, "periodic");
}

TEST(api_codec, an_empty_message_reads_as_the_zero_report) {
  ::capnp::MallocMessageBuilder builder;
  builder.initRoot<wire::RebalanceReport>();
  auto words = ::capnp::messageToFlatArray(builder);
  ::capnp::FlatArrayMessageReader reader(words.asPtr());
  const auto got = from_wire(reader.getRoot<wire::RebalanceReport>());
  EXPECT_FALSE(got.changed);
  EXPECT_EQ(got.version_before, 0u);
  EXPECT_EQ(got.version_after, 0u);
  EXPECT_EQ(got.balance_before, 0.0);
  EXPECT_EQ(got.replicas_moved, 0);
  EXPECT_EQ(got.trigger, "");
  EXPECT_FALSE(validate(got)) << text_of(validate(got));
}

TEST(api_codec, validate_names_the_field_of_a_malformed_report) {
  struct bad_case {
    void (*damage)(api_rebalance_report&);
    std::string field;
  };
  const std::vector<bad_case> cases = {
      {[](api_rebalance_report& r) { r.balance_before = std::nan(""); }, "balanceBefore"},
      {[](api_rebalance_report& r) { r.balance_after = -1.0; }, "balanceAfter"},
      {[](api_rebalance_report& r) { r.layer_balance_after.pop_back(); },
       "layerBalanceAfter: 2 layers"},
      {[](api_rebalance_report& r) {
         r.layer_balance_before[1] = std::numeric_limits<double>::infinity();
       },
       "layerBalanceBefore[1]"},
      {[](api_rebalance_report& r) { r.layer_balance_after[2] = -0.5; }, "layerBalanceAfter[2]"},
      {[](api_rebalance_report& r) { r.replicas_moved = -3; }, "replicasMoved: -3"},
      {[](api_rebalance_report& r) { r.duration_seconds = std::nan(""); }, "durationSeconds"},
  };
  for (const auto& c : cases) {
    auto r = sample_report();
    c.damage(r);
    auto err = validate(r);
    ASSERT_TRUE(err) << c.field;
    EXPECT_EQ(err.category(), caf::atom("api"));
    EXPECT_EQ(err.code(), static_cast<uint8_t>(api_errc::invalid_request));
    EXPECT_EQ(moe::error_text(err).rfind(c.field, 0), 0u) << moe::error_text(err);
  }
}

TEST(api_codec, api_exceptions_carry_their_code_and_retry_type) {
  auto busy = make_api_exception(api_errc::overloaded, "a rebalance is already running");
  EXPECT_EQ(busy.getType(), kj::Exception::Type::OVERLOADED);
  auto f = parse_api_exception(busy);
  ASSERT_TRUE(f.code);
  EXPECT_EQ(*f.code, api_errc::overloaded);
  EXPECT_EQ(f.text, "a rebalance is already running");

  auto off = make_api_exception(api_errc::unavailable, "rebalancing is not enabled");
  EXPECT_EQ(off.getType(), kj::Exception::Type::DISCONNECTED);
  EXPECT_EQ(parse_api_exception(off).code, api_errc::unavailable);

  auto bad = make_api_exception(api_errc::invalid_request, "groups hold unequal slots");
  EXPECT_EQ(bad.getType(), kj::Exception::Type::FAILED);
  EXPECT_EQ(parse_api_exception(bad).text, "groups hold unequal slots");
}
