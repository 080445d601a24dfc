// Expert load over a sliding window of steps: the input of load balancing (EPLB-style
// replication and rebalancing decides from where tokens actually went, not from a guess).
//
// A router records, for each MoE layer and step, the logical expert each routed token chose and
// the physical slot (replica, in placement order) each dispatched row went to. The window keeps
// one count vector per step in a ring of `window_steps` entries, so a step that slides out is
// subtracted exactly, and snapshot() reports the sums as an expert_load_report ready for
// protocol::encode_load_report.
//
// Memory: window_steps * layers * (experts + slots) counters of 8 bytes, allocated up front
// (make refuses more than max_counters).
// Thread safety: not thread-safe. A load_window is owned by one router actor and used only
// from its handlers; other actors see it only through snapshot() values sent as messages.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/error.hpp"
#include "protocol/load_report_codec.hpp"

namespace moe::scheduler {

class load_window {
 public:
  /// The same bounds the load report decoder enforces, so every snapshot decodes.
  static constexpr int64_t max_layers = 1024;
  static constexpr int64_t max_experts = int64_t{1} << 16;
  static constexpr int64_t max_slots = int64_t{1} << 17;
  /// Upper bound on window_steps * layers * (experts + slots): 1 GiB of counters.
  static constexpr int64_t max_counters = int64_t{1} << 27;

  /// `moe_layers`: the model's MoE layer ids (unique, in [0, 2^32)); `num_experts`: logical
  /// experts per layer; `num_slots`: physical slots of the current placement; `window_steps`:
  /// how many recent steps the counts cover (>= 1). Errors: scheduler_errc::bad_assignment.
  [[nodiscard]] static caf::expected<load_window> make(std::vector<int64_t> moe_layers,
                                                       int64_t num_experts, int64_t num_slots,
                                                       int64_t window_steps,
                                                       uint32_t placement_version = 0);

  /// Counts one batch of layer `layer` at `step`: each entry of `logical_choices` is one token's
  /// choice of logical expert (top-k gives k entries per token), each entry of `physical_slots`
  /// one row dispatched to that slot. The two are counted independently (a token dropped for
  /// capacity has a choice but no row). Several calls may share a step; their counts add up. A
  /// newer step slides the window; an older step is accepted while still inside the window.
  /// Errors (scheduler_errc::bad_assignment, nothing counted): unknown layer, expert or slot id
  /// out of range, step already slid out of the window.
  [[nodiscard]] caf::error record(uint64_t step, int64_t layer,
                                  std::span<const int32_t> logical_choices,
                                  std::span<const int32_t> physical_slots);

  /// The sums over the window, layers in the order given to make. first_step is the oldest step
  /// with counts still in the window and last_step the newest (both 0 when nothing is counted).
  [[nodiscard]] protocol::expert_load_report snapshot(uint32_t shard) const;

  /// Forgets every count (same layers, experts and slots).
  void reset();

  /// Forgets every count because the placement changed: physical slot ids now mean other
  /// replicas, and their number may differ. Errors as make's for `num_slots`; on error nothing
  /// changes.
  [[nodiscard]] caf::error reset(uint32_t placement_version, int64_t num_slots);

  [[nodiscard]] int64_t window_steps() const noexcept { return window_steps_; }
  [[nodiscard]] int64_t num_experts() const noexcept { return num_experts_; }
  [[nodiscard]] int64_t num_slots() const noexcept { return num_slots_; }
  [[nodiscard]] uint32_t placement_version() const noexcept { return placement_version_; }

 private:
  // Counts of one step, layers flattened: logical[l * experts + e], physical[l * slots + s].
  struct step_counts {
    std::optional<uint64_t> step;  ///< nullopt while the entry holds no step.
    std::vector<uint64_t> logical;
    std::vector<uint64_t> physical;
  };

  load_window() = default;
  void allocate();
  void evict(step_counts& entry);

  std::vector<int64_t> layers_;
  std::unordered_map<int64_t, size_t> layer_index_;
  int64_t num_experts_ = 0;
  int64_t num_slots_ = 0;
  int64_t window_steps_ = 1;
  uint32_t placement_version_ = 0;
  std::vector<step_counts> ring_;  ///< Entry step % window_steps holds that step.
  std::vector<uint64_t> sum_logical_;   ///< Sum of the ring, kept so snapshot is O(counters).
  std::vector<uint64_t> sum_physical_;
  std::optional<uint64_t> newest_;  ///< Newest step recorded since the last reset.
};

}  // namespace moe::scheduler
