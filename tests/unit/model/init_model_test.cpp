#include "model/init_model.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "model/dequantize.hpp"
#include "model/weights.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

using testing::error_of;
using testing::scratch_dir;

const std::filesystem::path data_dir = MOE_TEST_DATA_DIR;

TEST(init_model, presets_are_valid_and_sized) {
  for (auto name : preset_names()) {
    auto c = model_preset(name);
    ASSERT_TRUE(c) << name << ": " << error_of(c);
    EXPECT_TRUE(validate_config(*c)) << name;
    // Presets survive config.json.
    auto again = parse_config(to_json(*c));
    ASSERT_TRUE(again) << name << ": " << error_of(again);
    EXPECT_EQ(to_json(*again), to_json(*c)) << name;
    std::cout << name << ": " << count_parameters(*c) << " parameters ("
              << count_parameters(*c, false) << " without MTP), "
              << count_active_parameters(*c) << " active\n";
  }
  auto tiny = model_preset("tiny");
  auto fixture = load_config(data_dir / "tiny-v3");
  ASSERT_TRUE(fixture);
  EXPECT_EQ(to_json(*tiny), to_json(*fixture));  // tiny is tiny-v3's config

  auto small = model_preset("small");
  EXPECT_GE(count_parameters(*small), 100'000'000);
  EXPECT_LE(count_parameters(*small), 200'000'000);

  auto v2lite = model_preset("v2lite-8L");
  EXPECT_FALSE(v2lite->q_lora_rank);
  EXPECT_NEAR(static_cast<double>(count_parameters(*v2lite)), 4.59e9, 0.01e9);

  auto unknown = model_preset("huge");
  ASSERT_FALSE(unknown);
  EXPECT_EQ(error_of(unknown), "unknown model preset 'huge' (known: tiny, small, v2lite-8L)");
}

TEST(init_model, tiny_round_trips_through_the_loader) {
  scratch_dir dir;
  auto config = model_preset("tiny");
  ASSERT_TRUE(config);
  init_options options;
  options.seed = 7;
  auto files = init_model(dir.path(), *config, options);
  ASSERT_TRUE(files) << error_of(files);
  ASSERT_EQ(files->size(), 2u);
  EXPECT_EQ(files->at(0).filename(), "config.json");
  EXPECT_EQ(files->at(1).filename(), "model.safetensors");

  auto loaded_config = load_config(dir.path());
  ASSERT_TRUE(loaded_config) << error_of(loaded_config);
  EXPECT_EQ(to_json(*loaded_config), to_json(*config));
  auto ckpt = load_checkpoint(dir.path(), *loaded_config);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), expected_weights(*config).size());

  const double bound = std::sqrt(3.0) * config->initializer_range;
  for (const auto& w : expected_weights(*config)) {
    const host_tensor* t = ckpt->find(w.name);
    ASSERT_NE(t, nullptr) << w.name;
    if (w.kind == weight_kind::norm) {
      for (float v : t->data()) ASSERT_EQ(v, 1.0f) << w.name;
    } else if (w.kind == weight_kind::router_bias) {
      for (float v : t->data()) ASSERT_EQ(v, 0.0f) << w.name;
    } else {
      double sum = 0, sum_sq = 0;
      for (float v : t->data()) {
        ASSERT_LE(std::fabs(v), bound) << w.name;
        sum += v;
        sum_sq += static_cast<double>(v) * v;
      }
      const double n = static_cast<double>(t->num_elements());
      const double mean = sum / n;
      const double std_dev = std::sqrt(sum_sq / n - mean * mean);
      // Standard error of the std estimate is ~ std / sqrt(n) (>= 16*32 elements here).
      EXPECT_NEAR(std_dev, config->initializer_range, 0.12 * config->initializer_range) << w.name;
      EXPECT_NEAR(mean, 0.0, 0.2 * config->initializer_range) << w.name;
    }
  }
}

TEST(init_model, config_only_writes_the_config_and_no_weights) {
  scratch_dir dir;
  auto config = model_preset("v2lite-8L");  // 9 GB of weights if they were written
  ASSERT_TRUE(config);
  init_options options;
  options.dtype = kernels::dtype::bf16;
  options.config_only = true;
  auto files = init_model(dir.path(), *config, options);
  ASSERT_TRUE(files) << error_of(files);
  ASSERT_EQ(files->size(), 1u);
  EXPECT_EQ(files->at(0).filename(), "config.json");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator{}), 1);
  auto loaded = load_config(dir.path());
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->torch_dtype, kernels::dtype::bf16);
  EXPECT_EQ(loaded->hidden_size, 2048);
  EXPECT_EQ(count_parameters(*loaded), count_parameters(*config));
}

TEST(init_model, deterministic_by_seed_and_independent_of_sharding) {
  scratch_dir a, b, c, sharded;
  auto config = model_preset("tiny");
  init_options options;
  options.seed = 42;
  ASSERT_TRUE(init_model(a.path(), *config, options));
  ASSERT_TRUE(init_model(b.path(), *config, options));
  EXPECT_EQ(testing::read_file(a / "model.safetensors"), testing::read_file(b / "model.safetensors"));
  options.seed = 43;
  ASSERT_TRUE(init_model(c.path(), *config, options));
  EXPECT_NE(testing::read_file(a / "model.safetensors"), testing::read_file(c / "model.safetensors"));

  options.seed = 42;
  options.max_shard_bytes = 256 * 1024;
  auto files = init_model(sharded.path(), *config, options);
  ASSERT_TRUE(files) << error_of(files);
  EXPECT_EQ(files->back().filename(), "model.safetensors.index.json");
  EXPECT_GE(files->size(), 7u);  // config, >= 5 shards of 256 KiB for 1.3 MB, index
  auto one = load_checkpoint(a.path(), *config);
  auto many = load_checkpoint(sharded.path(), *config);
  ASSERT_TRUE(one) << error_of(one);
  ASSERT_TRUE(many) << error_of(many);
  for (const auto& [name, t] : one->tensors) {
    const host_tensor* s = many->find(name);
    ASSERT_NE(s, nullptr) << name;
    ASSERT_TRUE(std::equal(t.data().begin(), t.data().end(), s->data().begin())) << name;
  }
}

TEST(init_model, bf16_with_mtp) {
  scratch_dir dir;
  auto config = model_preset("tiny");
  config->num_nextn_predict_layers = 1;
  config->tie_word_embeddings = true;
  init_options options;
  options.dtype = kernels::dtype::bf16;
  ASSERT_TRUE(init_model(dir.path(), *config, options));
  auto loaded = load_config(dir.path());
  ASSERT_TRUE(loaded) << error_of(loaded);
  EXPECT_EQ(loaded->torch_dtype, kernels::dtype::bf16);
  auto set = safetensors_set::open(dir.path());
  ASSERT_TRUE(set);
  EXPECT_EQ(set->find("model.embed_tokens.weight")->dtype, kernels::dtype::bf16);
  EXPECT_EQ(set->find("lm_head.weight"), nullptr);  // tied
  EXPECT_EQ(set->find("model.layers.3.shared_head.head.weight"), nullptr);  // optional: shared
  auto ckpt = load_checkpoint(*set, *loaded);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  const host_tensor* eh = ckpt->find("model.layers.3.eh_proj.weight");
  ASSERT_NE(eh, nullptr);
  EXPECT_EQ(eh->shape(), (std::vector<int64_t>{64, 128}));
  for (float v : eh->data()) ASSERT_EQ(bf16_to_float(float_to_bf16(v)), v);
  EXPECT_NE(ckpt->find("model.layers.3.mlp.gate.e_score_correction_bias"), nullptr);
}

TEST(init_model, rejects_bad_options) {
  scratch_dir dir;
  auto config = model_preset("tiny");
  init_options options;
  options.dtype = kernels::dtype::f16;
  auto r = init_model(dir.path(), *config, options);
  ASSERT_FALSE(r);
  EXPECT_EQ(error_of(r), "init_model: dtype f16 is not supported (expected f32 or bf16)");
  config->n_group = 3;
  r = init_model(dir.path(), *config);
  ASSERT_FALSE(r);
  EXPECT_EQ(testing::code_of(r), model_errc::bad_config);
}

TEST(init_model, random_checkpoint_is_what_loading_the_written_files_gives) {
  auto config = model_preset("tiny");
  ASSERT_TRUE(config);
  config->num_nextn_predict_layers = 1;  // MTP modules too
  for (const auto dt : {kernels::dtype::f32, kernels::dtype::bf16}) {
    scratch_dir dir;
    init_options options;
    options.seed = 11;
    options.dtype = dt;
    options.max_shard_bytes = 256 * 1024;  // sharding changes nothing either
    ASSERT_TRUE(init_model(dir.path(), *config, options));
    auto loaded_config = load_config(dir.path());
    ASSERT_TRUE(loaded_config) << error_of(loaded_config);
    auto loaded = load_checkpoint(dir.path(), *loaded_config);
    ASSERT_TRUE(loaded) << error_of(loaded);
    auto built = random_checkpoint(*config, options);
    ASSERT_TRUE(built) << error_of(built);
    EXPECT_EQ(to_json(built->config), to_json(loaded->config)) << kernels::to_string(dt);
    ASSERT_EQ(built->tensors.size(), loaded->tensors.size());
    for (const auto& [name, t] : loaded->tensors) {
      const host_tensor* b = built->find(name);
      ASSERT_NE(b, nullptr) << name;
      EXPECT_EQ(b->shape(), t.shape()) << name;
      ASSERT_TRUE(std::equal(t.data().begin(), t.data().end(), b->data().begin(), b->data().end()))
          << name << " (" << kernels::to_string(dt) << ")";
    }
    options.seed = 12;
    auto other = random_checkpoint(*config, options);
    ASSERT_TRUE(other);
    const auto& e = other->find("model.embed_tokens.weight")->data();
    const auto& f = built->find("model.embed_tokens.weight")->data();
    EXPECT_FALSE(std::equal(e.begin(), e.end(), f.begin(), f.end()));
  }
}

TEST(init_model, random_checkpoint_refuses_what_init_model_refuses) {
  auto config = model_preset("tiny");
  init_options options;
  options.dtype = kernels::dtype::f16;
  auto r = random_checkpoint(*config, options);
  ASSERT_FALSE(r);
  EXPECT_EQ(error_of(r), "random_checkpoint: dtype f16 is not supported (expected f32 or bf16)");
  config->n_group = 3;
  r = random_checkpoint(*config);
  ASSERT_FALSE(r);
  EXPECT_EQ(testing::code_of(r), model_errc::bad_config);
}

}  // namespace
}  // namespace moe::model
