// The job API's values on the wire (protocol/api_codec.hpp): the rebalance report and the
// training job and event survive a round trip through bytes, an empty message reads as the zero
// report, and validate() names the field of a malformed one; queued training events merge to
// the newest.
#include "protocol/api_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <variant>

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

// --- training ----------------------------------------------------------------------------

namespace {

template <class Wire, class T>
T round_trip(const T& value) {
  ::capnp::MallocMessageBuilder builder;
  to_wire(value, builder.initRoot<Wire>());
  auto words = ::capnp::messageToFlatArray(builder);
  ::capnp::FlatArrayMessageReader reader(words.asPtr());
  return from_wire(reader.getRoot<Wire>());
}

api_training_spec sample_spec() {
  api_training_spec s;
  s.corpus = std::vector<int32_t>{5, 17, 42, 0, 511, 3, 3, 9};
  s.sequence_length = 4;
  s.batch_sequences = 3;
  s.steps = 1234567890123;
  s.learning_rate = 0.0125;
  s.warmup_steps = 7;
  s.min_learning_rate = 1e-5;
  s.beta1 = 0.85;
  s.beta2 = 0.99;
  s.eps = 1e-7;
  s.weight_decay = 0.0;
  s.grad_clip = -1;
  s.balance_loss_weight = 0.003;
  s.bias_update_speed = 0.0;
  s.seed = 0xfedcba9876543210ull;
  return s;
}

}  // namespace

TEST(api_codec, training_spec_round_trip_preserves_every_field_and_either_corpus) {
  const auto s = sample_spec();
  const auto got = round_trip<wire::TrainingJob>(s);
  EXPECT_EQ(std::get<std::vector<int32_t>>(got.corpus), std::get<std::vector<int32_t>>(s.corpus));
  EXPECT_EQ(got.sequence_length, 4);
  EXPECT_EQ(got.batch_sequences, 3);
  EXPECT_EQ(got.steps, 1234567890123);
  EXPECT_EQ(got.learning_rate, 0.0125);
  EXPECT_EQ(got.warmup_steps, 7);
  EXPECT_EQ(got.min_learning_rate, 1e-5);
  EXPECT_EQ(got.beta1, 0.85);
  EXPECT_EQ(got.beta2, 0.99);
  EXPECT_EQ(got.eps, 1e-7);
  EXPECT_EQ(got.weight_decay, 0.0);
  EXPECT_EQ(got.grad_clip, -1);
  EXPECT_EQ(got.balance_loss_weight, 0.003);
  EXPECT_EQ(got.bias_update_speed, 0.0);
  EXPECT_EQ(got.seed, 0xfedcba9876543210ull);

  auto text = s;
  static constexpr char bytes[] = "caf\xc3\xa9 au lait, \0 and all";  // UTF-8, a NUL inside
  text.corpus = std::string(bytes, sizeof(bytes) - 1);
  const auto got_text = round_trip<wire::TrainingJob>(text);
  ASSERT_TRUE(std::holds_alternative<std::string>(got_text.corpus));
  EXPECT_EQ(std::get<std::string>(got_text.corpus), std::get<std::string>(text.corpus));
}

TEST(api_codec, training_event_round_trip_preserves_every_field) {
  api_training_event e;
  e.job_id = 0x1234567890ull;
  e.step = 41;
  e.steps = 100;
  e.loss = 3.25;
  e.learning_rate = 2.5e-4;
  e.grad_norm = 0.75;
  e.tokens_per_second = 12345.5;
  e.load_balance = {1.5, 1.0, 2.25};
  e.finished = true;
  e.state = api_job_state::cancelled;
  e.error = "";
  e.checkpoint = "/ckpt/41";
  const auto got = round_trip<wire::TrainingEvent>(e);
  EXPECT_EQ(got.job_id, e.job_id);
  EXPECT_EQ(got.step, 41);
  EXPECT_EQ(got.steps, 100);
  EXPECT_EQ(got.loss, 3.25);
  EXPECT_EQ(got.learning_rate, 2.5e-4);
  EXPECT_EQ(got.grad_norm, 0.75);
  EXPECT_EQ(got.tokens_per_second, 12345.5);
  EXPECT_EQ(got.load_balance, e.load_balance);
  EXPECT_TRUE(got.finished);
  EXPECT_EQ(got.state, api_job_state::cancelled);
  EXPECT_EQ(got.checkpoint, "/ckpt/41");
  e.state = api_job_state::failed;
  e.error = "step 42 failed in expert group 1";
  EXPECT_EQ(round_trip<wire::TrainingEvent>(e).error, e.error);
}

TEST(api_codec, validate_training_spec_names_the_field) {
  EXPECT_FALSE(validate(sample_spec())) << text_of(validate(sample_spec()));
  api_limits small;
  small.max_corpus_tokens = 4;
  small.max_training_batch_tokens = 8;
  auto err = validate(sample_spec(), small);
  EXPECT_EQ(moe::error_text(err).rfind("corpus.tokens: 8 tokens exceed the limit of 4", 0), 0u) << text_of(err);
  small.max_corpus_tokens = 100;
  err = validate(sample_spec(), small);  // 3 sequences of 4 tokens
  EXPECT_EQ(moe::error_text(err).rfind("batchSequences: 3 sequences of 4 tokens exceed", 0), 0u) << text_of(err);
  auto huge = sample_spec();
  huge.sequence_length = int64_t{1} << 40;  // the product would overflow without the guard
  huge.batch_sequences = int64_t{1} << 40;
  EXPECT_NE(text_of(validate(huge)).find("tokens per step"), std::string::npos) << text_of(validate(huge));
  auto text = sample_spec();
  text.corpus = std::string("ab");  // shorter than a sequence: only the server's tokenizer knows
  EXPECT_FALSE(validate(text)) << text_of(validate(text));
  auto clip_off = sample_spec();
  clip_off.grad_clip = 0;
  EXPECT_FALSE(validate(clip_off));
}

TEST(api_codec, checkpoint_directories_must_be_absolute) {
  EXPECT_FALSE(validate_checkpoint_directory("/var/lib/moe/ckpt-7"));
  for (const auto& bad : std::vector<std::string>{"", "ckpt", "./ckpt", "~/ckpt", std::string("/a\0b", 4),
                                                  "/" + std::string(5000, 'x')}) {
    auto err = validate_checkpoint_directory(bad);
    ASSERT_TRUE(err) << bad;
    EXPECT_EQ(err.code(), static_cast<uint8_t>(api_errc::invalid_request));
    EXPECT_EQ(moe::error_text(err).rfind("directory: ", 0), 0u) << moe::error_text(err);
  }
}

TEST(api_codec, merged_training_events_keep_the_newest_and_its_checkpoint) {
  auto event = [](int64_t step, std::string checkpoint = "", bool finished = false) {
    api_training_event e;
    e.step = step;
    e.checkpoint = std::move(checkpoint);
    e.finished = finished;
    return e;
  };
  auto merged = merge_training_events({event(3), event(4, "/a"), event(5, "/b"), event(6)});
  EXPECT_EQ(merged.step, 6);
  EXPECT_EQ(merged.checkpoint, "/b");
  merged = merge_training_events({event(3, "/a"), event(4), event(5, "", true)});
  EXPECT_TRUE(merged.finished);
  EXPECT_EQ(merged.step, 5);
  EXPECT_EQ(merged.checkpoint, "/a");
  merged = merge_training_events({event(3, "/a"), event(4, "/c")});
  EXPECT_EQ(merged.checkpoint, "/c");
  EXPECT_EQ(merge_training_events({event(9)}).step, 9);
}
