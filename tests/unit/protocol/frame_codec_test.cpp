// Cap'n Proto wired for real: a tensor frame header survives a round trip through the wire
// format, and every damaged or inconsistent frame is refused with the right error code.
#include "protocol/frame_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <span>

#include "protocol/protocol_errc.hpp"
#include "protocol/tensor_frame.capnp.h"

using namespace moe::protocol;
using moe::kernels::dtype;

namespace {

tensor_frame_header sample_header() {
  tensor_frame_header h;
  h.kind = frame_kind::expert_output;
  h.dt = dtype::bf16;
  h.shape = {3, 64};
  h.layer = 7;
  h.step = 123456789012ull;
  h.placement_version = 4;
  h.token_indices = {0, 5, 9};
  h.expert_indices = {17, 200, 3};
  h.transfer_tag = 0xfeedbeefcafeull;
  h.byte_length = 3 * 64 * 2;
  h.offset = 4096;
  return h;
}

caf::error code_of(protocol_errc c) { return make_error(c, ""); }

}  // namespace

TEST(frame_codec, round_trip_preserves_every_field) {
  const auto h = sample_header();
  const auto bytes = encode_frame_header(h);
  ASSERT_FALSE(bytes.empty());
  auto got = decode_frame_header(bytes);
  ASSERT_TRUE(got) << moe::error_text(got.error());
  EXPECT_EQ(got->version, tensor_frame_version());
  EXPECT_EQ(got->kind, h.kind);
  EXPECT_EQ(got->dt, h.dt);
  EXPECT_EQ(got->shape, h.shape);
  EXPECT_EQ(got->layer, h.layer);
  EXPECT_EQ(got->step, h.step);
  EXPECT_EQ(got->placement_version, h.placement_version);
  EXPECT_EQ(got->token_indices, h.token_indices);
  EXPECT_EQ(got->expert_indices, h.expert_indices);
  EXPECT_EQ(got->transfer_tag, h.transfer_tag);
  EXPECT_EQ(got->byte_length, h.byte_length);
  EXPECT_EQ(got->offset, h.offset);
  EXPECT_TRUE(got->inline_payload.empty());
}

TEST(frame_codec, inline_payload_round_trips_from_an_unaligned_buffer) {
  auto h = sample_header();
  h.shape = {2, 3};
  h.dt = dtype::u8;
  h.byte_length = 6;
  h.token_indices = {1, 2};
  h.expert_indices = {};
  h.inline_payload = {std::byte{1}, std::byte{2}, std::byte{3},
                      std::byte{4}, std::byte{5}, std::byte{6}};
  const auto bytes = encode_frame_header(h);
  std::vector<std::byte> shifted(bytes.size() + 1);
  std::copy(bytes.begin(), bytes.end(), shifted.begin() + 1);
  auto got = decode_frame_header(std::span(shifted).subspan(1));
  ASSERT_TRUE(got) << moe::error_text(got.error());
  EXPECT_EQ(got->inline_payload, h.inline_payload);
}

TEST(frame_codec, truncated_frames_are_refused) {
  const auto bytes = encode_frame_header(sample_header());
  for (size_t cut = 0; cut < bytes.size(); cut += 8) {
    auto got = decode_frame_header(std::span(bytes).first(cut));
    ASSERT_FALSE(got) << "cut at " << cut;
    EXPECT_TRUE(got.error() == code_of(protocol_errc::truncated) ||
                got.error() == code_of(protocol_errc::malformed))
        << moe::error_text(got.error());
  }
}

TEST(frame_codec, oversized_frames_are_refused) {
  const auto bytes = encode_frame_header(sample_header());
  frame_limits limits;
  limits.max_message_bytes = 16;
  auto got = decode_frame_header(bytes, limits);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::oversized));
}

TEST(frame_codec, inconsistent_byte_length_is_refused) {
  auto h = sample_header();
  h.byte_length += 1;
  auto got = decode_frame_header(encode_frame_header(h));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
  EXPECT_NE(moe::error_text(got.error()).find("byteLength"), std::string::npos);
}

TEST(frame_codec, mismatched_index_lists_are_refused) {
  auto h = sample_header();
  h.expert_indices.pop_back();
  auto got = decode_frame_header(encode_frame_header(h));
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::inconsistent));
}

TEST(frame_codec, garbage_is_refused_without_throwing) {
  std::vector<std::byte> garbage(64);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = std::byte(0xA5 ^ (i * 37));
  auto got = decode_frame_header(garbage);
  EXPECT_FALSE(got);
}

TEST(frame_codec, unknown_version_is_refused) {
  const auto bytes = encode_frame_header(sample_header());
  // The version is the first field of the root struct's data section: the 16 bits right
  // after the 8-byte segment table and the 8-byte root pointer.
  auto damaged = bytes;
  damaged[16] = std::byte{0x63};
  auto got = decode_frame_header(damaged);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error(), code_of(protocol_errc::unsupported_version));
}

// Found by tests/fuzz/tensor_frame_fuzz: a frame of zero bytes whose inline payload is present
// but empty was copied with memcpy from a null pointer (undefined behaviour, which the sanitizer
// build reports).
TEST(frame_codec, an_empty_inline_payload_decodes) {
  ::capnp::MallocMessageBuilder message;
  auto b = message.initRoot<moe::protocol::capnp::TensorFrame>();
  b.setVersion(tensor_frame_version());
  b.initShape(1).set(0, 0);
  b.initInline(0);
  const auto words = ::capnp::messageToFlatArray(message);
  const auto bytes = words.asBytes();
  auto got = decode_frame_header(std::as_bytes(std::span(bytes.begin(), bytes.size())));
  ASSERT_TRUE(got) << moe::error_text(got.error());
  EXPECT_EQ(got->byte_length, 0u);
  EXPECT_TRUE(got->inline_payload.empty());
}
