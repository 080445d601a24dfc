// Expert load reports on the wire: a report survives a round trip, and every damaged,
// oversized or self-contradicting report is refused with the right error code.
#include "protocol/load_report_codec.hpp"

#include <gtest/gtest.h>

#include "protocol/protocol_errc.hpp"

using namespace moe::protocol;

namespace {

expert_load_report sample_report() {
  expert_load_report r;
  r.shard = 3;
  r.placement_version = 9;
  r.first_step = 1000;
  r.last_step = 1002;
  r.window_steps = 3;
  r.layers.push_back({1, {5, 0, 7, 1}, {5, 0, 4, 3, 1}});
  r.layers.push_back({2, {2, 2, 2, 7}, {2, 2, 1, 1, 7}});
  r.layers.push_back({5, {0, 0, 0, 0x1234567890abull}, {0, 0, 0, 0, 0x1234567890abull}});
  return r;
}

caf::error code_of(protocol_errc c) { return make_error(c, ""); }

std::string text_of(const caf::expected<expert_load_report>& got) {
  return got ? std::string{"decoded"} : moe::error_text(got.error());
}

}  // namespace

TEST(load_report, round_trip_preserves_every_field) {
  const auto r = sample_report();
  const auto bytes = encode_load_report(r);
  ASSERT_FALSE(bytes.empty());
  auto got = decode_load_report(bytes);
  ASSERT_TRUE(got) << text_of(got);
  EXPECT_EQ(got->version, load_report_version());
  EXPECT_EQ(got->shard, r.shard);
  EXPECT_EQ(got->placement_version, r.placement_version);
  EXPECT_EQ(got->first_step, r.first_step);
  EXPECT_EQ(got->last_step, r.last_step);
  EXPECT_EQ(got->window_steps, r.window_steps);
  ASSERT_EQ(got->layers.size(), r.layers.size());
  for (size_t i = 0; i < r.layers.size(); ++i) {
    EXPECT_EQ(got->layers[i].layer, r.layers[i].layer);
    EXPECT_EQ(got->layers[i].logical, r.layers[i].logical);
    EXPECT_EQ(got->layers[i].physical, r.layers[i].physical);
  }
}

TEST(load_report, empty_report_round_trips_from_an_unaligned_buffer) {
  expert_load_report r;
  r.window_steps = 1;
  const auto bytes = encode_load_report(r);
  std::vector<std::byte> shifted(bytes.size() + 1);
  std::copy(bytes.begin(), bytes.end(), shifted.begin() + 1);
  auto got = decode_load_report(std::span(shifted).subspan(1));
  ASSERT_TRUE(got) << text_of(got);
  EXPECT_TRUE(got->layers.empty());
  EXPECT_EQ(got->window_steps, 1u);
}

TEST(load_report, truncated_reports_are_refused) {
  const auto bytes = encode_load_report(sample_report());
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    auto got = decode_load_report(std::span(bytes).first(cut));
    ASSERT_FALSE(got) << "cut at " << cut;
    EXPECT_TRUE(got.error() == code_of(protocol_errc::truncated) ||
                got.error() == code_of(protocol_errc::malformed))
        << text_of(got);
  }
}

TEST(load_report, oversized_reports_are_refused) {
  const auto bytes = encode_load_report(sample_report());
  load_report_limits limits;
  limits.max_message_bytes = 16;
  auto got = decode_load_report(bytes, limits);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::oversized));
}

TEST(load_report, too_many_layers_experts_or_slots_are_refused) {
  const auto bytes = encode_load_report(sample_report());
  {
    load_report_limits limits;
    limits.max_layers = 2;
    auto got = decode_load_report(bytes, limits);
    ASSERT_FALSE(got);
    EXPECT_EQ(got.error(), code_of(protocol_errc::out_of_range));
    EXPECT_NE(text_of(got).find("layers"), std::string::npos) << text_of(got);
  }
  {
    load_report_limits limits;
    limits.max_experts_per_layer = 3;
    auto got = decode_load_report(bytes, limits);
    ASSERT_FALSE(got);
    EXPECT_EQ(got.error(), code_of(protocol_errc::out_of_range));
    EXPECT_NE(text_of(got).find("logical experts"), std::string::npos) << text_of(got);
  }
  {
    load_report_limits limits;
    limits.max_slots_per_layer = 4;
    auto got = decode_load_report(bytes, limits);
    ASSERT_FALSE(got);
    EXPECT_EQ(got.error(), code_of(protocol_errc::out_of_range));
    EXPECT_NE(text_of(got).find("physical slots"), std::string::npos) << text_of(got);
  }
}

TEST(load_report, unknown_version_is_refused) {
  const auto bytes = encode_load_report(sample_report());
  // The version is the first field of the root struct's data section: the 16 bits right
  // after the 8-byte segment table and the 8-byte root pointer.
  auto damaged = bytes;
  damaged[16] = std::byte{0x63};
  auto got = decode_load_report(damaged);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::unsupported_version));
}

TEST(load_report, reversed_or_too_wide_step_ranges_are_refused) {
  auto r = sample_report();
  r.first_step = r.last_step + 1;
  auto got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
  EXPECT_NE(text_of(got).find("firstStep"), std::string::npos) << text_of(got);

  r = sample_report();
  r.first_step = r.last_step - r.window_steps;  // window_steps + 1 steps
  got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));

  r = sample_report();
  r.window_steps = 0;
  got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::out_of_range));
}

TEST(load_report, duplicate_layers_are_refused) {
  auto r = sample_report();
  r.layers[2].layer = r.layers[0].layer;
  auto got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
  EXPECT_NE(text_of(got).find("twice"), std::string::npos) << text_of(got);
}

TEST(load_report, list_lengths_that_differ_across_layers_are_refused) {
  auto r = sample_report();
  r.layers[1].logical.pop_back();
  auto got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
  EXPECT_NE(text_of(got).find("logical experts"), std::string::npos) << text_of(got);

  r = sample_report();
  r.layers[2].physical.push_back(1);
  got = decode_load_report(encode_load_report(r));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
  EXPECT_NE(text_of(got).find("physical slots"), std::string::npos) << text_of(got);
}

TEST(load_report, garbage_is_refused_without_throwing) {
  std::vector<std::byte> garbage(64);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = std::byte(0xA5 ^ (i * 37));
  auto got = decode_load_report(garbage);
  EXPECT_FALSE(got);
}
