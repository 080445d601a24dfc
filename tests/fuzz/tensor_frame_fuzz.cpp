// libFuzzer target: tensor frame headers (protocol/frame_codec.hpp) as the data plane receives
// them from another process (runtime/data_plane.transfers.cpp decodes every header with the
// plane's max_header_bytes as the message limit).
// Properties: decode_frame_header returns a header or a protocol error, never anything else; a
// decoded header satisfies every check the decoder promises (version, rank, index counts,
// byteLength against shape and dtype, inline payload size); and it survives encode/decode
// unchanged.
#include <cstddef>
#include <cstdint>

#include "kernels/dtype.hpp"
#include "protocol/frame_codec.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using moe::protocol::tensor_frame_header;

bool same(const tensor_frame_header& a, const tensor_frame_header& b) {
  return a.version == b.version && a.kind == b.kind && a.dt == b.dt && a.shape == b.shape &&
         a.layer == b.layer && a.step == b.step && a.placement_version == b.placement_version &&
         a.token_indices == b.token_indices && a.expert_indices == b.expert_indices &&
         a.transfer_tag == b.transfer_tag && a.byte_length == b.byte_length && a.offset == b.offset &&
         a.inline_payload == b.inline_payload;
}

void check_header(const tensor_frame_header& h, const moe::protocol::frame_limits& limits) {
  MOE_FUZZ_CHECK(h.version == moe::protocol::tensor_frame_version());
  MOE_FUZZ_CHECK(h.shape.size() <= limits.max_rank);
  MOE_FUZZ_CHECK(h.token_indices.size() <= limits.max_indices);
  MOE_FUZZ_CHECK(h.expert_indices.empty() || h.expert_indices.size() == h.token_indices.size());
  unsigned __int128 bytes = moe::kernels::dtype_bytes(h.dt);
  for (uint64_t d : h.shape) {
    bytes *= d;
    if (bytes > UINT64_MAX) bytes = static_cast<unsigned __int128>(UINT64_MAX) + 1;  // saturate
  }
  MOE_FUZZ_CHECK(bytes == h.byte_length);
  MOE_FUZZ_CHECK(h.inline_payload.empty() || h.inline_payload.size() == h.byte_length);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::protocol::frame_limits limits;
  limits.max_message_bytes = size_t{1} << 20;  // data_plane_options::max_header_bytes
  auto h = moe::protocol::decode_frame_header(moe::fuzz::as_bytes(data, size), limits);
  if (!h) {
    moe::fuzz::check_rejection(h.error(), "protocol");
    return 0;
  }
  check_header(*h, limits);
  // Decoded under the default limits: a canonical encoding may be larger than a compact input.
  const auto encoded = moe::protocol::encode_frame_header(*h);
  auto again = moe::protocol::decode_frame_header(encoded);
  MOE_FUZZ_CHECK(static_cast<bool>(again));
  MOE_FUZZ_CHECK(same(*h, *again));
  return 0;
}
