#include "protocol/load_report_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>
#include <string>
#include <unordered_set>

#include "protocol/load_report.capnp.h"
#include "protocol/flat_message.hpp"
#include "protocol/protocol_errc.hpp"

namespace moe::protocol {

namespace {

namespace schema = moe::protocol::capnp;

template <class List>
void copy_list(List in, std::vector<uint64_t>& out) {
  out.reserve(in.size());
  for (auto v : in) out.push_back(v);
}

template <class List>
void fill_list(List out, const std::vector<uint64_t>& in) {
  for (size_t i = 0; i < in.size(); ++i) out.set(static_cast<unsigned>(i), in[i]);
}

caf::expected<expert_load_report> decode_checked(schema::LoadReport::Reader r,
                                                 const load_report_limits& limits) {
  expert_load_report out;
  out.version = r.getVersion();
  if (out.version != load_report_version()) {
    return make_error(protocol_errc::unsupported_version,
                      "load report: version " + std::to_string(out.version) +
                          ", this build speaks " + std::to_string(load_report_version()));
  }
  out.shard = r.getShard();
  out.placement_version = r.getPlacementVersion();
  out.first_step = r.getFirstStep();
  out.last_step = r.getLastStep();
  out.window_steps = r.getWindowSteps();
  if (out.first_step > out.last_step) {
    return make_error(protocol_errc::inconsistent,
                      "load report: firstStep " + std::to_string(out.first_step) +
                          " is after lastStep " + std::to_string(out.last_step));
  }
  if (out.window_steps == 0) {
    return make_error(protocol_errc::out_of_range, "load report: windowSteps is 0");
  }
  // The counts cover at most windowSteps steps; a wider range means the sender never let old
  // steps fall out, and the scheduler would weigh stale load as current.
  if (out.last_step - out.first_step >= out.window_steps) {
    return make_error(protocol_errc::inconsistent,
                      "load report: steps " + std::to_string(out.first_step) + ".." +
                          std::to_string(out.last_step) + " span more than windowSteps " +
                          std::to_string(out.window_steps));
  }
  auto layers = r.getLayers();
  // Check the counts before copying anything: the lengths are the sender's claim, and the
  // traversal limit alone would still let a report allocate up to max_message_bytes of counters.
  if (layers.size() > limits.max_layers) {
    return make_error(protocol_errc::out_of_range,
                      "load report: " + std::to_string(layers.size()) + " layers exceed " +
                          std::to_string(limits.max_layers));
  }
  std::unordered_set<uint32_t> seen;
  out.layers.reserve(layers.size());
  for (auto l : layers) {
    const uint32_t id = l.getLayer();
    auto logical = l.getLogical();
    auto physical = l.getPhysical();
    if (logical.size() > limits.max_experts_per_layer) {
      return make_error(protocol_errc::out_of_range,
                        "load report: layer " + std::to_string(id) + " has " +
                            std::to_string(logical.size()) + " logical experts, more than " +
                            std::to_string(limits.max_experts_per_layer));
    }
    if (physical.size() > limits.max_slots_per_layer) {
      return make_error(protocol_errc::out_of_range,
                        "load report: layer " + std::to_string(id) + " has " +
                            std::to_string(physical.size()) + " physical slots, more than " +
                            std::to_string(limits.max_slots_per_layer));
    }
    if (!seen.insert(id).second) {
      return make_error(protocol_errc::inconsistent,
                        "load report: layer " + std::to_string(id) + " appears twice");
    }
    // Every MoE layer has the same experts and, under one placement, the same slots; lists of
    // different lengths mean the sender mixed placements or models.
    if (!out.layers.empty()) {
      const auto& first = out.layers.front();
      if (logical.size() != first.logical.size()) {
        return make_error(protocol_errc::inconsistent,
                          "load report: layer " + std::to_string(id) + " has " +
                              std::to_string(logical.size()) + " logical experts, layer " +
                              std::to_string(first.layer) + " has " +
                              std::to_string(first.logical.size()));
      }
      if (physical.size() != first.physical.size()) {
        return make_error(protocol_errc::inconsistent,
                          "load report: layer " + std::to_string(id) + " has " +
                              std::to_string(physical.size()) + " physical slots, layer " +
                              std::to_string(first.layer) + " has " +
                              std::to_string(first.physical.size()));
      }
    }
    expert_load_report::layer dst;
    dst.layer = id;
    copy_list(logical, dst.logical);
    copy_list(physical, dst.physical);
    out.layers.push_back(std::move(dst));
  }
  return out;
}

}  // namespace

uint16_t load_report_version() noexcept { return schema::LOAD_REPORT_VERSION; }

std::vector<std::byte> encode_load_report(const expert_load_report& r) {
  ::capnp::MallocMessageBuilder message;
  auto b = message.initRoot<schema::LoadReport>();
  b.setVersion(load_report_version());
  b.setShard(r.shard);
  b.setPlacementVersion(r.placement_version);
  b.setFirstStep(r.first_step);
  b.setLastStep(r.last_step);
  b.setWindowSteps(r.window_steps);
  auto layers = b.initLayers(static_cast<unsigned>(r.layers.size()));
  for (size_t i = 0; i < r.layers.size(); ++i) {
    const auto& src = r.layers[i];
    auto dst = layers[static_cast<unsigned>(i)];
    dst.setLayer(src.layer);
    fill_list(dst.initLogical(static_cast<unsigned>(src.logical.size())), src.logical);
    fill_list(dst.initPhysical(static_cast<unsigned>(src.physical.size())), src.physical);
  }
  return detail::to_flat_bytes(message);
}

caf::expected<expert_load_report> decode_load_report(std::span<const std::byte> bytes,
                                                     const load_report_limits& limits) {
  return detail::read_flat_message<schema::LoadReport>(bytes, limits.max_message_bytes, "load report",
                                             [&](auto root) { return decode_checked(root, limits); });
}

}  // namespace moe::protocol
