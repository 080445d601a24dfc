#include "protocol/frame_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <limits>

#include "protocol/flat_message.hpp"
#include "protocol/protocol_errc.hpp"
#include "protocol/tensor_frame.capnp.h"

namespace moe::protocol {

caf::error make_error(protocol_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("protocol"),
                    caf::make_message(std::move(text))};
}

namespace {

namespace schema = moe::protocol::capnp;

// The wire enum is declared in the schema; the mapping is explicit so that reordering either
// enum can never silently change what a frame means.
schema::DType to_wire(kernels::dtype t) {
  switch (t) {
    case kernels::dtype::f32: return schema::DType::F32;
    case kernels::dtype::f16: return schema::DType::F16;
    case kernels::dtype::bf16: return schema::DType::BF16;
    case kernels::dtype::f8_e4m3: return schema::DType::F8_E4M3;
    case kernels::dtype::i64: return schema::DType::I64;
    case kernels::dtype::i32: return schema::DType::I32;
    case kernels::dtype::u8: return schema::DType::U8;
  }
  return schema::DType::F32;
}

caf::expected<kernels::dtype> from_wire(schema::DType t) {
  switch (t) {
    case schema::DType::F32: return kernels::dtype::f32;
    case schema::DType::F16: return kernels::dtype::f16;
    case schema::DType::BF16: return kernels::dtype::bf16;
    case schema::DType::F8_E4M3: return kernels::dtype::f8_e4m3;
    case schema::DType::I64: return kernels::dtype::i64;
    case schema::DType::I32: return kernels::dtype::i32;
    case schema::DType::U8: return kernels::dtype::u8;
  }
  return make_error(protocol_errc::out_of_range,
                    "tensor frame: dtype " + std::to_string(static_cast<int>(t)) + " is unknown");
}

schema::FrameKind to_wire(frame_kind k) {
  switch (k) {
    case frame_kind::activations: return schema::FrameKind::ACTIVATIONS;
    case frame_kind::expert_output: return schema::FrameKind::EXPERT_OUTPUT;
    case frame_kind::kv_block: return schema::FrameKind::KV_BLOCK;
    case frame_kind::expert_weights: return schema::FrameKind::EXPERT_WEIGHTS;
    case frame_kind::gradients: return schema::FrameKind::GRADIENTS;
    case frame_kind::parameters: return schema::FrameKind::PARAMETERS;
  }
  return schema::FrameKind::ACTIVATIONS;
}

caf::expected<frame_kind> from_wire(schema::FrameKind k) {
  switch (k) {
    case schema::FrameKind::ACTIVATIONS: return frame_kind::activations;
    case schema::FrameKind::EXPERT_OUTPUT: return frame_kind::expert_output;
    case schema::FrameKind::KV_BLOCK: return frame_kind::kv_block;
    case schema::FrameKind::EXPERT_WEIGHTS: return frame_kind::expert_weights;
    case schema::FrameKind::GRADIENTS: return frame_kind::gradients;
    case schema::FrameKind::PARAMETERS: return frame_kind::parameters;
  }
  return make_error(protocol_errc::out_of_range,
                    "tensor frame: kind " + std::to_string(static_cast<int>(k)) + " is unknown");
}

// Product of the shape times the element size, or nullopt on overflow.
std::optional<uint64_t> shape_bytes(const std::vector<uint64_t>& shape, kernels::dtype t) {
  uint64_t n = kernels::dtype_bytes(t);
  for (uint64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

caf::expected<tensor_frame_header> decode_checked(schema::TensorFrame::Reader r,
                                                  const frame_limits& limits) {
  tensor_frame_header h;
  h.version = r.getVersion();
  if (h.version != tensor_frame_version()) {
    return make_error(protocol_errc::unsupported_version,
                      "tensor frame: version " + std::to_string(h.version) + ", this build speaks " +
                          std::to_string(tensor_frame_version()));
  }
  auto kind = from_wire(r.getKind());
  if (!kind) return kind.error();
  h.kind = *kind;
  auto dt = from_wire(r.getDtype());
  if (!dt) return dt.error();
  h.dt = *dt;
  auto shape = r.getShape();
  if (shape.size() > limits.max_rank) {
    return make_error(protocol_errc::out_of_range,
                      "tensor frame: rank " + std::to_string(shape.size()) + " exceeds " +
                          std::to_string(limits.max_rank));
  }
  for (auto d : shape) h.shape.push_back(d);
  h.layer = r.getLayer();
  h.step = r.getStep();
  h.placement_version = r.getPlacementVersion();
  auto tokens = r.getTokenIndices();
  auto experts = r.getExpertIndices();
  if (tokens.size() > limits.max_indices || experts.size() > limits.max_indices) {
    return make_error(protocol_errc::out_of_range, "tensor frame: too many indices");
  }
  if (experts.size() != 0 && experts.size() != tokens.size()) {
    return make_error(protocol_errc::inconsistent,
                      "tensor frame: " + std::to_string(experts.size()) + " expert indices for " +
                          std::to_string(tokens.size()) + " token indices");
  }
  h.token_indices.reserve(tokens.size());
  for (auto t : tokens) h.token_indices.push_back(t);
  h.expert_indices.reserve(experts.size());
  for (auto e : experts) h.expert_indices.push_back(e);
  auto transfer = r.getTransfer();
  h.transfer_tag = transfer.getTag();
  h.byte_length = transfer.getByteLength();
  h.offset = transfer.getOffset();
  auto expected_bytes = shape_bytes(h.shape, h.dt);
  if (!expected_bytes || *expected_bytes != h.byte_length) {
    return make_error(protocol_errc::inconsistent,
                      "tensor frame: byteLength " + std::to_string(h.byte_length) +
                          " does not match its shape and dtype");
  }
  if (r.hasInline()) {
    auto data = r.getInline();
    if (data.size() != h.byte_length) {
      return make_error(protocol_errc::inconsistent,
                        "tensor frame: inline payload of " + std::to_string(data.size()) +
                            " bytes for byteLength " + std::to_string(h.byte_length));
    }
    // Not memcpy: an empty Data field may have a null begin(), which memcpy may not be given.
    const auto* first = reinterpret_cast<const std::byte*>(data.begin());
    h.inline_payload.assign(first, first + data.size());
  }
  return h;
}

}  // namespace

uint16_t tensor_frame_version() noexcept { return schema::TENSOR_FRAME_VERSION; }

std::vector<std::byte> encode_frame_header(const tensor_frame_header& h) {
  ::capnp::MallocMessageBuilder message;
  auto b = message.initRoot<schema::TensorFrame>();
  b.setVersion(tensor_frame_version());
  b.setKind(to_wire(h.kind));
  b.setDtype(to_wire(h.dt));
  auto shape = b.initShape(static_cast<unsigned>(h.shape.size()));
  for (size_t i = 0; i < h.shape.size(); ++i) shape.set(static_cast<unsigned>(i), h.shape[i]);
  b.setLayer(h.layer);
  b.setStep(h.step);
  b.setPlacementVersion(h.placement_version);
  auto tokens = b.initTokenIndices(static_cast<unsigned>(h.token_indices.size()));
  for (size_t i = 0; i < h.token_indices.size(); ++i)
    tokens.set(static_cast<unsigned>(i), h.token_indices[i]);
  auto experts = b.initExpertIndices(static_cast<unsigned>(h.expert_indices.size()));
  for (size_t i = 0; i < h.expert_indices.size(); ++i)
    experts.set(static_cast<unsigned>(i), h.expert_indices[i]);
  auto transfer = b.initTransfer();
  transfer.setTag(h.transfer_tag);
  transfer.setByteLength(h.byte_length);
  transfer.setOffset(h.offset);
  if (!h.inline_payload.empty()) {
    b.setInline(kj::arrayPtr(reinterpret_cast<const kj::byte*>(h.inline_payload.data()),
                             h.inline_payload.size()));
  }
  return detail::to_flat_bytes(message);
}

caf::expected<tensor_frame_header> decode_frame_header(std::span<const std::byte> bytes,
                                                       const frame_limits& limits) {
  return detail::read_flat_message<schema::TensorFrame>(bytes, limits.max_message_bytes, "tensor frame",
                                             [&](auto root) { return decode_checked(root, limits); });
}

}  // namespace moe::protocol
