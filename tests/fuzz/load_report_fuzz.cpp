// libFuzzer target: expert load reports (protocol/load_report_codec.hpp) as the rebalancer
// receives them from the routers (actors/rebalancer.cpp decodes them with the default limits).
// Properties: decode_load_report returns a report or a protocol error, never anything else; a
// decoded report satisfies what the codec promises (version, step window, layer count and
// uniqueness, equal list lengths within the limits); and it survives encode/decode unchanged.
#include <cstddef>
#include <cstdint>
#include <set>

#include "protocol/load_report_codec.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using moe::protocol::expert_load_report;

bool same(const expert_load_report& a, const expert_load_report& b) {
  if (a.version != b.version || a.shard != b.shard || a.placement_version != b.placement_version ||
      a.first_step != b.first_step || a.last_step != b.last_step || a.window_steps != b.window_steps ||
      a.layers.size() != b.layers.size()) {
    return false;
  }
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const auto& x = a.layers[i];
    const auto& y = b.layers[i];
    if (x.layer != y.layer || x.logical != y.logical || x.physical != y.physical) return false;
  }
  return true;
}

void check_report(const expert_load_report& r, const moe::protocol::load_report_limits& limits) {
  MOE_FUZZ_CHECK(r.version == moe::protocol::load_report_version());
  MOE_FUZZ_CHECK(r.first_step <= r.last_step);
  MOE_FUZZ_CHECK(r.window_steps >= 1);
  MOE_FUZZ_CHECK(r.last_step - r.first_step < r.window_steps);
  MOE_FUZZ_CHECK(r.layers.size() <= limits.max_layers);
  std::set<uint32_t> ids;
  for (const auto& l : r.layers) {
    MOE_FUZZ_CHECK(ids.insert(l.layer).second);
    MOE_FUZZ_CHECK(l.logical.size() <= limits.max_experts_per_layer);
    MOE_FUZZ_CHECK(l.physical.size() <= limits.max_slots_per_layer);
    MOE_FUZZ_CHECK(l.logical.size() == r.layers.front().logical.size());
    MOE_FUZZ_CHECK(l.physical.size() == r.layers.front().physical.size());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const moe::protocol::load_report_limits limits;
  auto r = moe::protocol::decode_load_report(moe::fuzz::as_bytes(data, size), limits);
  if (!r) {
    moe::fuzz::check_rejection(r.error(), "protocol");
    return 0;
  }
  check_report(*r, limits);
  auto again = moe::protocol::decode_load_report(moe::protocol::encode_load_report(*r), limits);
  MOE_FUZZ_CHECK(static_cast<bool>(again));
  MOE_FUZZ_CHECK(same(*r, *again));
  return 0;
}
