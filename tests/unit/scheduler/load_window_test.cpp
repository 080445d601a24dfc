// The load window behind expert load balancing: counts over the last window_steps steps slide
// exactly, repeated steps add up, old steps fall out, and bad input is refused with nothing
// counted. Snapshots pass the load report decoder.
#include "scheduler/load_window.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <vector>

#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {
namespace {

using counts = std::vector<uint64_t>;

// Layers 1 and 3 are MoE layers; 4 logical experts on 6 physical slots; a window of 3 steps.
load_window make_window() {
  auto w = load_window::make({1, 3}, 4, 6, 3, 7);
  EXPECT_TRUE(w) << error_text(w.error());
  return std::move(*w);
}

void record_ok(load_window& w, uint64_t step, int64_t layer, std::vector<int32_t> logical,
               std::vector<int32_t> physical) {
  auto err = w.record(step, layer, logical, physical);
  ASSERT_FALSE(err) << error_text(err);
}

const protocol::expert_load_report::layer& layer_of(const protocol::expert_load_report& r,
                                                    uint32_t id) {
  for (const auto& l : r.layers) {
    if (l.layer == id) return l;
  }
  ADD_FAILURE() << "layer " << id << " missing";
  return r.layers.front();
}

caf::error code_of(scheduler_errc c) { return make_error(c, ""); }

TEST(load_window, counts_slide_over_a_window_of_three_steps) {
  auto w = make_window();
  record_ok(w, 10, 1, {0, 1}, {0, 1});
  record_ok(w, 11, 1, {1, 2}, {1, 2});
  record_ok(w, 12, 1, {2, 3}, {2, 3});
  auto r = w.snapshot(5);
  EXPECT_EQ(r.shard, 5u);
  EXPECT_EQ(r.placement_version, 7u);
  EXPECT_EQ(r.window_steps, 3u);
  EXPECT_EQ(r.first_step, 10u);
  EXPECT_EQ(r.last_step, 12u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{1, 2, 2, 1}));
  EXPECT_EQ(layer_of(r, 1).physical, (counts{1, 2, 2, 1, 0, 0}));
  EXPECT_EQ(layer_of(r, 3).logical, (counts{0, 0, 0, 0}));

  // Step 13 pushes step 10 out.
  record_ok(w, 13, 1, {3}, {5});
  r = w.snapshot(5);
  EXPECT_EQ(r.first_step, 11u);
  EXPECT_EQ(r.last_step, 13u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 1, 2, 2}));
  EXPECT_EQ(layer_of(r, 1).physical, (counts{0, 1, 2, 1, 0, 1}));
}

TEST(load_window, repeated_steps_accumulate_across_layers_and_calls) {
  auto w = make_window();
  record_ok(w, 4, 1, {0, 0}, {0, 4});
  record_ok(w, 4, 1, {0}, {4});
  record_ok(w, 4, 3, {2, 2, 2}, {3, 3, 3});
  auto r = w.snapshot(0);
  EXPECT_EQ(r.first_step, 4u);
  EXPECT_EQ(r.last_step, 4u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{3, 0, 0, 0}));
  EXPECT_EQ(layer_of(r, 1).physical, (counts{1, 0, 0, 0, 2, 0}));
  EXPECT_EQ(layer_of(r, 3).logical, (counts{0, 0, 3, 0}));
  EXPECT_EQ(layer_of(r, 3).physical, (counts{0, 0, 0, 3, 0, 0}));

  // A late call for a step still inside the window adds to that step, and leaves with it.
  record_ok(w, 5, 1, {1}, {1});
  record_ok(w, 4, 1, {0}, {0});
  r = w.snapshot(0);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{4, 1, 0, 0}));
  record_ok(w, 7, 1, {}, {});
  r = w.snapshot(0);
  EXPECT_EQ(r.first_step, 5u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 1, 0, 0}));
  EXPECT_EQ(layer_of(r, 1).physical, (counts{0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(layer_of(r, 3).logical, (counts{0, 0, 0, 0}));
}

TEST(load_window, old_steps_fall_out_after_a_jump) {
  auto w = make_window();
  record_ok(w, 1, 1, {0, 1, 2, 3}, {0, 1, 2, 3});
  record_ok(w, 2, 3, {3}, {5});
  // A jump of a whole window or more empties it.
  record_ok(w, 100, 3, {1}, {1});
  auto r = w.snapshot(0);
  EXPECT_EQ(r.first_step, 100u);
  EXPECT_EQ(r.last_step, 100u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 0, 0, 0}));
  EXPECT_EQ(layer_of(r, 3).logical, (counts{0, 1, 0, 0}));
  EXPECT_EQ(layer_of(r, 3).physical, (counts{0, 1, 0, 0, 0, 0}));
  // A step that already slid out is refused; one at the window's edge is not.
  auto err = w.record(97, 1, std::vector<int32_t>{0}, std::vector<int32_t>{0});
  ASSERT_TRUE(err);
  EXPECT_EQ(err, code_of(scheduler_errc::bad_assignment));
  EXPECT_NE(error_text(err).find("slid out"), std::string::npos) << error_text(err);
  record_ok(w, 98, 1, {2}, {2});
  r = w.snapshot(0);
  EXPECT_EQ(r.first_step, 98u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 0, 1, 0}));
}

TEST(load_window, steps_near_the_top_of_the_range_slide_without_wrapping) {
  auto w = make_window();
  const uint64_t top = std::numeric_limits<uint64_t>::max();
  record_ok(w, top - 1, 1, {0}, {0});
  record_ok(w, top, 1, {1}, {1});
  auto r = w.snapshot(0);
  EXPECT_EQ(r.first_step, top - 1);
  EXPECT_EQ(r.last_step, top);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{1, 1, 0, 0}));
}

TEST(load_window, bad_inputs_are_refused_and_count_nothing) {
  auto w = make_window();
  record_ok(w, 0, 1, {0}, {0});
  const auto before = w.snapshot(0);
  struct bad_call {
    int64_t layer;
    std::vector<int32_t> logical, physical;
    const char* text;
  };
  const std::vector<bad_call> calls = {
      {2, {0}, {0}, "not a MoE layer"},
      {1, {0, 4}, {0}, "expert 4"},
      {1, {-1}, {0}, "expert -1"},
      {1, {0}, {0, 6}, "slot 6"},
      {3, {0}, {-2}, "slot -2"},
  };
  for (const auto& c : calls) {
    auto err = w.record(0, c.layer, c.logical, c.physical);
    ASSERT_TRUE(err) << c.text;
    EXPECT_EQ(err, code_of(scheduler_errc::bad_assignment));
    EXPECT_NE(error_text(err).find(c.text), std::string::npos) << error_text(err);
  }
  const auto after = w.snapshot(0);
  ASSERT_EQ(after.layers.size(), before.layers.size());
  for (size_t i = 0; i < after.layers.size(); ++i) {
    EXPECT_EQ(after.layers[i].logical, before.layers[i].logical);
    EXPECT_EQ(after.layers[i].physical, before.layers[i].physical);
  }
}

TEST(load_window, make_validates_its_arguments) {
  auto refused = [](caf::expected<load_window> w) {
    return !w && w.error() == code_of(scheduler_errc::bad_assignment);
  };
  EXPECT_TRUE(refused(load_window::make({}, 4, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({1, 1}, 4, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({-1}, 4, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({int64_t{1} << 32}, 4, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({1}, 0, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({1}, load_window::max_experts + 1, 6, 3)));
  EXPECT_TRUE(refused(load_window::make({1}, 4, 0, 3)));
  EXPECT_TRUE(refused(load_window::make({1}, 4, load_window::max_slots + 1, 3)));
  EXPECT_TRUE(refused(load_window::make({1}, 4, 6, 0)));
  EXPECT_TRUE(refused(load_window::make({1}, 4, 6, -3)));
  // 1024 layers of 2^16 experts and 2^17 slots over 1000 steps would be ~1.6 TB of counters.
  std::vector<int64_t> many(1024);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<int64_t>(i);
  EXPECT_TRUE(refused(load_window::make(many, load_window::max_experts, load_window::max_slots, 1000)));
  EXPECT_TRUE(load_window::make({1}, 4, 6, 1));
}

TEST(load_window, reset_forgets_counts_and_a_placement_change_resizes_slots) {
  auto w = make_window();
  record_ok(w, 3, 1, {0}, {5});
  w.reset();
  auto r = w.snapshot(0);
  EXPECT_EQ(r.first_step, 0u);
  EXPECT_EQ(r.last_step, 0u);
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 0, 0, 0}));
  // After a reset the window starts afresh, even at an earlier step.
  record_ok(w, 1, 1, {1}, {1});
  EXPECT_EQ(layer_of(w.snapshot(0), 1).logical, (counts{0, 1, 0, 0}));

  ASSERT_FALSE(w.reset(8, 8));
  EXPECT_EQ(w.placement_version(), 8u);
  r = w.snapshot(0);
  EXPECT_EQ(r.placement_version, 8u);
  EXPECT_EQ(layer_of(r, 1).physical, (counts(8, 0)));
  EXPECT_EQ(layer_of(r, 1).logical, (counts{0, 0, 0, 0}));
  record_ok(w, 2, 3, {3}, {7});
  EXPECT_EQ(layer_of(w.snapshot(0), 3).physical, (counts{0, 0, 0, 0, 0, 0, 0, 1}));

  EXPECT_TRUE(w.reset(9, 0));
  EXPECT_EQ(w.placement_version(), 8u);  // refused: nothing changed
  EXPECT_EQ(w.num_slots(), 8);
}

TEST(load_window, snapshots_pass_the_load_report_decoder) {
  auto w = make_window();
  record_ok(w, 20, 1, {0, 3}, {0, 5});
  record_ok(w, 22, 3, {2}, {2});
  const auto r = w.snapshot(2);
  auto got = protocol::decode_load_report(protocol::encode_load_report(r));
  ASSERT_TRUE(got) << error_text(got.error());
  EXPECT_EQ(got->first_step, 20u);
  EXPECT_EQ(got->last_step, 22u);
  EXPECT_EQ(got->shard, 2u);
  ASSERT_EQ(got->layers.size(), 2u);
  EXPECT_EQ(got->layers[0].logical, r.layers[0].logical);
  EXPECT_EQ(got->layers[1].physical, r.layers[1].physical);

  // So does the empty window.
  auto empty = protocol::decode_load_report(protocol::encode_load_report(make_window().snapshot(0)));
  EXPECT_TRUE(empty) << error_text(empty.error());
}

}  // namespace
}  // namespace moe::scheduler
