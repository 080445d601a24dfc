#include "scheduler/load_window.hpp"

#include <algorithm>
#include <limits>
#include <string>

#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

namespace {

caf::error bad(std::string text) {
  return make_error(scheduler_errc::bad_assignment, "load window: " + std::move(text));
}

caf::error check_slots(int64_t num_slots) {
  if (num_slots < 1 || num_slots > load_window::max_slots) {
    return bad(std::to_string(num_slots) + " physical slots, expected 1.." +
               std::to_string(load_window::max_slots));
  }
  return {};
}

caf::error check_counters(int64_t window_steps, size_t layers, int64_t experts, int64_t slots) {
  // Each factor is already bounded (window by max_counters, layers, experts, slots by their
  // limits), so the product of the last three fits; divide instead of multiplying the window.
  const int64_t per_step = static_cast<int64_t>(layers) * (experts + slots);
  if (per_step > 0 && window_steps > load_window::max_counters / per_step) {
    return bad(std::to_string(window_steps) + " steps of " + std::to_string(per_step) +
               " counters exceed " + std::to_string(load_window::max_counters) + " counters");
  }
  return {};
}

}  // namespace

caf::expected<load_window> load_window::make(std::vector<int64_t> moe_layers, int64_t num_experts,
                                             int64_t num_slots, int64_t window_steps,
                                             uint32_t placement_version) {
  if (moe_layers.empty()) return bad("no MoE layers");
  if (static_cast<int64_t>(moe_layers.size()) > max_layers) {
    return bad(std::to_string(moe_layers.size()) + " MoE layers exceed " +
               std::to_string(max_layers));
  }
  load_window w;
  for (size_t i = 0; i < moe_layers.size(); ++i) {
    const int64_t id = moe_layers[i];
    // Layer ids travel as UInt32 in the load report.
    if (id < 0 || id > static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
      return bad("layer id " + std::to_string(id) + " out of range");
    }
    if (!w.layer_index_.emplace(id, i).second) {
      return bad("layer " + std::to_string(id) + " given twice");
    }
  }
  if (num_experts < 1 || num_experts > max_experts) {
    return bad(std::to_string(num_experts) + " logical experts, expected 1.." +
               std::to_string(max_experts));
  }
  if (auto err = check_slots(num_slots)) return err;
  if (window_steps < 1 || window_steps > max_counters) {
    return bad("window of " + std::to_string(window_steps) + " steps, expected 1.." +
               std::to_string(max_counters));
  }
  if (auto err = check_counters(window_steps, moe_layers.size(), num_experts, num_slots)) {
    return err;
  }
  w.layers_ = std::move(moe_layers);
  w.num_experts_ = num_experts;
  w.num_slots_ = num_slots;
  w.window_steps_ = window_steps;
  w.placement_version_ = placement_version;
  w.allocate();
  return w;
}

void load_window::allocate() {
  const size_t logical = layers_.size() * static_cast<size_t>(num_experts_);
  const size_t physical = layers_.size() * static_cast<size_t>(num_slots_);
  ring_.assign(static_cast<size_t>(window_steps_), step_counts{});
  for (auto& entry : ring_) {
    entry.logical.assign(logical, 0);
    entry.physical.assign(physical, 0);
  }
  sum_logical_.assign(logical, 0);
  sum_physical_.assign(physical, 0);
  newest_.reset();
}

void load_window::evict(step_counts& entry) {
  if (!entry.step) return;
  for (size_t i = 0; i < entry.logical.size(); ++i) sum_logical_[i] -= entry.logical[i];
  for (size_t i = 0; i < entry.physical.size(); ++i) sum_physical_[i] -= entry.physical[i];
  std::fill(entry.logical.begin(), entry.logical.end(), 0);
  std::fill(entry.physical.begin(), entry.physical.end(), 0);
  entry.step.reset();
}

caf::error load_window::record(uint64_t step, int64_t layer,
                               std::span<const int32_t> logical_choices,
                               std::span<const int32_t> physical_slots) {
  // Validate everything before counting anything, so a refused call leaves the window as it was.
  auto it = layer_index_.find(layer);
  if (it == layer_index_.end()) {
    return bad("layer " + std::to_string(layer) + " is not a MoE layer of this window");
  }
  const auto w = static_cast<uint64_t>(window_steps_);
  if (newest_ && step < *newest_ && *newest_ - step >= w) {
    return bad("step " + std::to_string(step) + " already slid out of the window ending at step " +
               std::to_string(*newest_));
  }
  for (int32_t e : logical_choices) {
    if (e < 0 || e >= num_experts_) {
      return bad("layer " + std::to_string(layer) + ": expert " + std::to_string(e) +
                 " out of range 0.." + std::to_string(num_experts_ - 1));
    }
  }
  for (int32_t s : physical_slots) {
    if (s < 0 || s >= num_slots_) {
      return bad("layer " + std::to_string(layer) + ": slot " + std::to_string(s) +
                 " out of range 0.." + std::to_string(num_slots_ - 1));
    }
  }
  if (newest_ && step > *newest_) {
    // Slide: every step after the old newest up to `step` takes over its ring entry. When the
    // jump is a whole window or more, every entry goes, so loop at most window_steps times.
    // Count down from `step` so that a step near 2^64 cannot wrap the loop.
    const uint64_t n = std::min(step - *newest_, w);
    for (uint64_t i = 0; i < n; ++i) evict(ring_[(step - i) % w]);
  }
  // The ring is empty after make and reset, so a first step needs no eviction.
  if (!newest_ || step > *newest_) newest_ = step;
  auto& entry = ring_[step % w];
  entry.step = step;
  const size_t l = it->second;
  const size_t logical_base = l * static_cast<size_t>(num_experts_);
  const size_t physical_base = l * static_cast<size_t>(num_slots_);
  for (int32_t e : logical_choices) {
    ++entry.logical[logical_base + static_cast<size_t>(e)];
    ++sum_logical_[logical_base + static_cast<size_t>(e)];
  }
  for (int32_t s : physical_slots) {
    ++entry.physical[physical_base + static_cast<size_t>(s)];
    ++sum_physical_[physical_base + static_cast<size_t>(s)];
  }
  return {};
}

protocol::expert_load_report load_window::snapshot(uint32_t shard) const {
  protocol::expert_load_report r;
  r.version = protocol::load_report_version();
  r.shard = shard;
  r.placement_version = placement_version_;
  r.window_steps = static_cast<uint32_t>(
      std::min<int64_t>(window_steps_, std::numeric_limits<uint32_t>::max()));
  if (newest_) {
    r.last_step = *newest_;
    r.first_step = *newest_;
    for (const auto& entry : ring_) {
      if (entry.step) r.first_step = std::min(r.first_step, *entry.step);
    }
  }
  const auto experts = static_cast<size_t>(num_experts_);
  const auto slots = static_cast<size_t>(num_slots_);
  r.layers.reserve(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    protocol::expert_load_report::layer out;
    out.layer = static_cast<uint32_t>(layers_[l]);
    out.logical.assign(sum_logical_.begin() + static_cast<std::ptrdiff_t>(l * experts),
                       sum_logical_.begin() + static_cast<std::ptrdiff_t>((l + 1) * experts));
    out.physical.assign(sum_physical_.begin() + static_cast<std::ptrdiff_t>(l * slots),
                        sum_physical_.begin() + static_cast<std::ptrdiff_t>((l + 1) * slots));
    r.layers.push_back(std::move(out));
  }
  return r;
}

void load_window::reset() {
  for (auto& entry : ring_) evict(entry);
  newest_.reset();
}

caf::error load_window::reset(uint32_t placement_version, int64_t num_slots) {
  if (auto err = check_slots(num_slots)) return err;
  if (auto err = check_counters(window_steps_, layers_.size(), num_experts_, num_slots)) {
    return err;
  }
  placement_version_ = placement_version;
  if (num_slots == num_slots_) {
    reset();
  } else {
    num_slots_ = num_slots;
    allocate();
  }
  return {};
}

}  // namespace moe::scheduler
