// Training checkpoints on tiny-v3: a resumed run continues bit for bit, sharded saves load back
// identically, a saved directory is an ordinary hub checkpoint, and broken training state is
// refused with an error naming the problem.
#include "model/training_checkpoint.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

#include "model/init_model.hpp"
#include "model/model_errc.hpp"
#include "model/safetensors_writer.hpp"
#include "model/training_model.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/model/tiny_training_data.hpp"
#include "tests/unit/model/scratch_dir.hpp"

using namespace moe;
using namespace moe::model;
using moe::model::testing::golden_batch;
using moe::model::testing::load_tiny;
using moe::model::testing::tiny_dir;
using moe::model::testing::code_of;
using moe::model::testing::error_of;
using moe::model::testing::scratch_dir;

namespace {

constexpr double lr = 1e-3;

// `num_steps` AdamW steps on the golden batch; the loss before each.
std::vector<double> train(training_model& m, adamw& opt, int num_steps) {
  const auto batch = golden_batch();
  std::vector<double> losses;
  for (int i = 0; i < num_steps; ++i) {
    m.zero_grads();
    auto loss = m.forward_backward(batch);
    EXPECT_TRUE(loss) << error_text(loss.error());
    if (!loss) return losses;
    losses.push_back(*loss);
    EXPECT_FALSE(opt.step(m.parameters(), lr));
  }
  return losses;
}

struct trained {
  std::shared_ptr<checkpoint> weights;
  adamw opt;
};

trained train_tiny(int num_steps) {
  trained t{load_tiny(), adamw()};
  auto m = training_model::bind(t.weights);
  EXPECT_TRUE(m) << error_text(m.error());
  if (m) train(*m, t.opt, num_steps);
  return t;
}

void expect_same_tensors(const checkpoint& got, const checkpoint& want) {
  ASSERT_EQ(got.tensors.size(), want.tensors.size());
  for (const auto& [name, w] : want.tensors) {
    const host_tensor* g = got.find(name);
    ASSERT_NE(g, nullptr) << name;
    ASSERT_EQ(g->shape(), w.shape()) << name;
    EXPECT_EQ(std::memcmp(g->data().data(), w.data().data(), w.data().size_bytes()), 0) << name;
  }
}

void expect_same_state(const adamw& got, const adamw& want) {
  EXPECT_EQ(got.steps(), want.steps());
  EXPECT_EQ(got.options().beta1, want.options().beta1);
  EXPECT_EQ(got.options().beta2, want.options().beta2);
  EXPECT_EQ(got.options().eps, want.options().eps);
  EXPECT_EQ(got.options().weight_decay, want.options().weight_decay);
  ASSERT_EQ(got.state().size(), want.state().size());
  for (const auto& [name, w] : want.state()) {
    auto g = got.state().find(name);
    ASSERT_NE(g, got.state().end()) << name;
    // Bit-identical doubles compare equal; == on vectors would also accept -0.0 for 0.0.
    ASSERT_EQ(g->second.m.size(), w.m.size()) << name;
    ASSERT_EQ(g->second.v.size(), w.v.size()) << name;
    EXPECT_EQ(std::memcmp(g->second.m.data(), w.m.data(), w.m.size() * sizeof(double)), 0) << name;
    EXPECT_EQ(std::memcmp(g->second.v.data(), w.v.data(), w.v.size() * sizeof(double)), 0) << name;
  }
}

size_t count_shards(const std::filesystem::path& dir) {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    n += name.starts_with("model-") && name.ends_with(".safetensors") ? 1 : 0;
  }
  return n;
}

training_checkpoint_options quiet() {
  training_checkpoint_options o;
  o.progress = false;
  return o;
}

caf::expected<training_checkpoint> load_quiet(const std::filesystem::path& dir) {
  return load_training_checkpoint(dir, quiet());
}

}  // namespace

TEST(training_checkpoint, resumed_run_continues_bit_for_bit) {
  // Straight: 4 steps.
  auto straight_weights = load_tiny();
  auto straight = training_model::bind(straight_weights);
  ASSERT_TRUE(straight) << error_text(straight.error());
  adamw straight_opt;
  const auto want = train(*straight, straight_opt, 4);
  ASSERT_EQ(want.size(), 4u);

  // 2 steps, save, load into fresh objects, 2 more.
  scratch_dir scratch;
  const auto dir = scratch / "step-2";
  {
    auto weights = load_tiny();
    auto first = training_model::bind(weights);
    ASSERT_TRUE(first) << error_text(first.error());
    adamw opt;
    const auto losses = train(*first, opt, 2);
    ASSERT_EQ(losses.size(), 2u);
    EXPECT_EQ(losses[0], want[0]);
    EXPECT_EQ(losses[1], want[1]);
    ASSERT_TRUE(save_training_checkpoint(dir, *weights, opt, 2, quiet())) << "save";
  }
  auto loaded = load_quiet(dir);
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->step, 2);
  EXPECT_EQ(loaded->optimizer.steps(), 2);
  auto resumed_weights = std::make_shared<checkpoint>(std::move(loaded->weights));
  auto resumed = training_model::bind(resumed_weights);
  ASSERT_TRUE(resumed) << error_text(resumed.error());
  const auto losses = train(*resumed, loaded->optimizer, 2);
  ASSERT_EQ(losses.size(), 2u);
  EXPECT_EQ(losses[0], want[2]);
  EXPECT_EQ(losses[1], want[3]);
  // And the parameters and moments after step 4 are the straight run's, bit for bit.
  expect_same_tensors(*resumed_weights, *straight_weights);
  expect_same_state(loaded->optimizer, straight_opt);
}

TEST(training_checkpoint, saved_state_round_trips_exactly) {
  auto t = train_tiny(1);
  scratch_dir scratch;
  adamw_options o;
  o.beta1 = 0.8;
  o.beta2 = 0.999;
  o.eps = 1e-12;
  o.weight_decay = 0.0123456789;
  adamw opt(o);
  opt.restore(t.opt.steps(), t.opt.state());
  // A trailing separator names the same directory (and the staging sibling beside it).
  ASSERT_TRUE(save_training_checkpoint((scratch / "c").string() + "/", *t.weights, opt, 17, quiet()));
  EXPECT_FALSE(std::filesystem::exists(scratch / "c.saving"));
  auto loaded = load_quiet(scratch / "c");
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->step, 17);
  expect_same_state(loaded->optimizer, opt);
  expect_same_tensors(loaded->weights, *t.weights);
}

TEST(training_checkpoint, large_checkpoints_are_sharded_with_an_index) {
  auto t = train_tiny(1);
  scratch_dir scratch;
  const auto dir = scratch / "sharded";
  auto options = quiet();
  options.max_shard_bytes = 64 << 10;  // tiny-v3 is 1.36 MB of float32
  ASSERT_TRUE(save_training_checkpoint(dir, *t.weights, t.opt, 1, options));
  EXPECT_GT(count_shards(dir), 2u);
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors"));
  EXPECT_GT(count_shards(dir / "optimizer"), 2u);
  EXPECT_TRUE(std::filesystem::exists(dir / "optimizer" / "model.safetensors.index.json"));

  auto config = load_config(dir);
  ASSERT_TRUE(config) << error_of(config);
  load_options lo;
  lo.progress = false;
  auto model = load_checkpoint(dir, *config, lo);
  ASSERT_TRUE(model) << error_of(model);
  expect_same_tensors(*model, *t.weights);
  auto loaded = load_quiet(dir);
  ASSERT_TRUE(loaded) << error_of(loaded);
  expect_same_state(loaded->optimizer, t.opt);
}

TEST(training_checkpoint, a_saved_directory_is_a_hub_checkpoint) {
  auto t = train_tiny(2);
  scratch_dir scratch;
  const auto dir = scratch / "serve";
  ASSERT_TRUE(save_training_checkpoint(dir, *t.weights, t.opt, 2, quiet()));
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  auto config = load_config(dir);
  ASSERT_TRUE(config) << error_of(config);
  EXPECT_EQ(to_json(*config), to_json(t.weights->config));
  load_options lo;
  lo.progress = false;
  auto model = load_checkpoint(dir, *config, lo);
  ASSERT_TRUE(model) << error_of(model);
  expect_same_tensors(*model, *t.weights);
  EXPECT_NE(model->find("model.layers.1.mlp.gate.e_score_correction_bias"), nullptr);
  // The trained weights, not the fixture's.
  auto original = load_tiny();
  EXPECT_NE(std::memcmp(model->find("model.embed_tokens.weight")->data().data(),
                        original->find("model.embed_tokens.weight")->data().data(),
                        original->find("model.embed_tokens.weight")->data().size_bytes()),
            0);
}

TEST(training_checkpoint, mtp_modules_are_saved) {
  auto config = model_preset("tiny");
  ASSERT_TRUE(config);
  config->num_nextn_predict_layers = 1;
  scratch_dir scratch;
  init_options io;
  io.progress = false;
  ASSERT_TRUE(init_model(scratch / "init", *config, io));
  load_options lo;
  lo.progress = false;
  lo.mtp = mtp_policy::require;
  auto weights = load_checkpoint(scratch / "init", *config, lo);
  ASSERT_TRUE(weights) << error_of(weights);
  ASSERT_TRUE(save_training_checkpoint(scratch / "saved", *weights, adamw(), 0, quiet()));
  auto loaded = load_checkpoint(scratch / "saved", *config, lo);
  ASSERT_TRUE(loaded) << error_of(loaded);
  expect_same_tensors(*loaded, *weights);
  EXPECT_NE(loaded->find("model.layers.3.eh_proj.weight"), nullptr);
}

TEST(training_checkpoint, a_model_only_directory_starts_at_step_zero) {
  auto loaded = load_quiet(tiny_dir());
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->step, 0);
  EXPECT_EQ(loaded->optimizer.steps(), 0);
  EXPECT_TRUE(loaded->optimizer.state().empty());
  EXPECT_EQ(loaded->optimizer.options().beta2, adamw_options{}.beta2);
  expect_same_tensors(loaded->weights, *load_tiny());
}

TEST(training_checkpoint, saving_again_replaces_the_checkpoint_and_keeps_other_files) {
  auto t = train_tiny(1);
  scratch_dir scratch;
  const auto dir = scratch / "c";
  auto sharded = quiet();
  sharded.max_shard_bytes = 64 << 10;
  ASSERT_TRUE(save_training_checkpoint(dir, *t.weights, t.opt, 1, sharded));
  moe::model::testing::write_file(dir / "tokenizer.json", "{}");
  std::filesystem::create_directories(scratch / "c.saving");  // as a crashed save leaves it
  moe::model::testing::write_file(scratch / "c.saving" / "junk", "x");

  auto m = training_model::bind(t.weights);
  ASSERT_TRUE(m);
  train(*m, t.opt, 1);
  ASSERT_TRUE(save_training_checkpoint(dir, *t.weights, t.opt, 2, quiet()));
  EXPECT_EQ(count_shards(dir), 0u);
  EXPECT_EQ(count_shards(dir / "optimizer"), 0u);
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors"));
  EXPECT_EQ(moe::model::testing::read_file(dir / "tokenizer.json"), "{}");
  EXPECT_FALSE(std::filesystem::exists(scratch / "c.saving"));
  EXPECT_FALSE(std::filesystem::exists(scratch / "c.replaced"));
  auto loaded = load_quiet(dir);
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->step, 2);
  expect_same_state(loaded->optimizer, t.opt);
  expect_same_tensors(loaded->weights, *t.weights);
}

TEST(training_checkpoint, a_refused_save_leaves_the_previous_checkpoint) {
  auto t = train_tiny(1);
  scratch_dir scratch;
  const auto dir = scratch / "c";
  ASSERT_TRUE(save_training_checkpoint(dir, *t.weights, t.opt, 1, quiet()));

  auto state = t.opt.state();
  state.begin()->second.m.pop_back();  // a moment one value short of its parameter
  adamw bad;
  bad.restore(2, state);
  auto saved = save_training_checkpoint(dir, *t.weights, bad, 2, quiet());
  ASSERT_FALSE(saved);
  EXPECT_EQ(code_of(saved), model_errc::bad_input);

  adamw stray;
  stray.restore(1, {{"model.layers.0.no_such.weight", {{1.0}, {1.0}}}});
  EXPECT_EQ(code_of(save_training_checkpoint(scratch / "other", *t.weights, stray, 1, quiet())),
            model_errc::bad_input);
  EXPECT_FALSE(std::filesystem::exists(scratch / "other"));

  auto partial = *t.weights;
  partial.tensors.erase("model.norm.weight");
  EXPECT_EQ(code_of(save_training_checkpoint(scratch / "other", partial, t.opt, 1, quiet())),
            model_errc::bad_input);
  EXPECT_EQ(code_of(save_training_checkpoint(scratch / "other", *t.weights, t.opt, -1, quiet())),
            model_errc::bad_input);

  auto loaded = load_quiet(dir);
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->step, 1);
  expect_same_state(loaded->optimizer, t.opt);
}

class training_checkpoint_errors : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = train_tiny(1);
    ASSERT_TRUE(save_training_checkpoint(dir_, *t.weights, t.opt, 1, quiet()));
    ASSERT_TRUE(load_quiet(dir_));
  }

  void rewrite_moments(std::vector<tensor_to_write> tensors) {
    ASSERT_TRUE(
        save_safetensors(dir_ / "optimizer" / "model.safetensors", tensors,
                         {{"format", "moe-adamw"}, {"moment_encoding", "f64_bits_as_i64"}}));
  }

  void rewrite_state(const std::function<void(nlohmann::json&)>& edit) {
    auto state =
        nlohmann::json::parse(moe::model::testing::read_file(dir_ / "training_state.json"));
    edit(state);
    moe::model::testing::write_file(dir_ / "training_state.json", state.dump());
  }

  scratch_dir scratch_;
  std::filesystem::path dir_ = scratch_ / "c";
};

TEST_F(training_checkpoint_errors, truncated_optimizer_file) {
  const auto file = dir_ / "optimizer" / "model.safetensors";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) / 2);
  auto loaded = load_quiet(dir_);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(code_of(loaded), model_errc::bad_checkpoint) << error_of(loaded);
  EXPECT_NE(error_of(loaded).find("optimizer"), std::string::npos) << error_of(loaded);
}

TEST_F(training_checkpoint_errors, moment_of_another_size_than_its_parameter) {
  std::vector<double> three(3, 0.5);
  tensor_to_write m{
      "model.norm.weight.exp_avg", kernels::dtype::i64, {3}, std::as_bytes(std::span(three)), {}};
  tensor_to_write v{"model.norm.weight.exp_avg_sq",
                    kernels::dtype::i64,
                    {3},
                    std::as_bytes(std::span(three)),
                    {}};
  rewrite_moments({m, v});
  auto loaded = load_quiet(dir_);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(code_of(loaded), model_errc::bad_tensor) << error_of(loaded);
  EXPECT_NE(error_of(loaded).find("model.norm.weight.exp_avg"), std::string::npos)
      << error_of(loaded);
}

TEST_F(training_checkpoint_errors, moment_without_its_pair_or_parameter) {
  std::vector<double> values(64, 0.5);
  tensor_to_write m{
      "model.norm.weight.exp_avg", kernels::dtype::i64, {64}, std::as_bytes(std::span(values)), {}};
  rewrite_moments({m});
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::missing_tensor);
  m.name = "model.no_such.weight.exp_avg";
  rewrite_moments({m});
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::unexpected_tensor);
  std::vector<float> floats(64, 0.5f);
  tensor_to_write f{
      "model.norm.weight.exp_avg", kernels::dtype::f32, {64}, std::as_bytes(std::span(floats)), {}};
  rewrite_moments({f});
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::bad_tensor);
}

TEST_F(training_checkpoint_errors, unknown_format_version) {
  rewrite_state([](nlohmann::json& s) { s["format_version"] = 99; });
  auto loaded = load_quiet(dir_);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(code_of(loaded), model_errc::bad_checkpoint);
  EXPECT_NE(error_of(loaded).find("format_version 99"), std::string::npos) << error_of(loaded);
}

TEST_F(training_checkpoint_errors, malformed_training_state) {
  rewrite_state([](nlohmann::json& s) { s["optimizer"]["kind"] = "sgd"; });
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::bad_checkpoint);
  rewrite_state([](nlohmann::json& s) {
    s["optimizer"]["kind"] = "adamw";
    s["optimizer"].erase("eps");
  });
  auto loaded = load_quiet(dir_);
  EXPECT_EQ(code_of(loaded), model_errc::bad_checkpoint);
  EXPECT_NE(error_of(loaded).find("optimizer.eps"), std::string::npos) << error_of(loaded);
  moe::model::testing::write_file(dir_ / "training_state.json",
                                  "{\"format_version\": 1, \"step\": ");
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::bad_checkpoint);
}

TEST_F(training_checkpoint_errors, optimizer_state_and_training_state_come_together) {
  std::filesystem::remove_all(dir_ / "optimizer");
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::bad_checkpoint);
  std::filesystem::create_directories(dir_ / "optimizer");
  std::filesystem::remove(dir_ / "training_state.json");
  EXPECT_EQ(code_of(load_quiet(dir_)), model_errc::bad_checkpoint);
}
