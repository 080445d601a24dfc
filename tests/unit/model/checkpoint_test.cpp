#include "model/checkpoint.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "model/dequantize.hpp"
#include "model/safetensors_writer.hpp"
#include "model/weight_lookup.hpp"
#include "model/model_errc.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

using testing::error_of;
using testing::scratch_dir;

const std::filesystem::path data_dir = MOE_TEST_DATA_DIR;
const std::filesystem::path tiny_dir = data_dir / "tiny-v3";
const std::filesystem::path fp8_dir = data_dir / "small-v3-fp8";

model_config config_of(const std::filesystem::path& dir) {
  auto c = load_config(dir);
  EXPECT_TRUE(c) << error_of(c);
  return c ? *c : model_config{};
}

// A copy of a fixture checkpoint with edits: tensors dropped, replaced or added.
struct checkpoint_copy {
  safetensors_file source;
  std::vector<tensor_to_write> tensors;
  std::vector<std::vector<std::byte>> owned;  // bytes of added tensors

  explicit checkpoint_copy(const std::filesystem::path& dir)
      : source(std::move(*safetensors_file::open(dir / "model.safetensors"))) {
    for (const auto& t : source.tensors()) {
      tensors.push_back({t.name, t.dtype, t.shape, t.data, {}});
    }
  }
  void drop(std::string_view name) {
    std::erase_if(tensors, [&](const auto& t) { return t.name == name; });
  }
  void put(std::string name, kernels::dtype dtype, std::vector<int64_t> shape) {
    drop(name);
    tensor_to_write t{std::move(name), dtype, std::move(shape), {}, {}};
    owned.emplace_back(t.size_bytes(), std::byte{0});
    t.bytes = owned.back();
    tensors.push_back(std::move(t));
  }
  void save(const std::filesystem::path& dir, uint64_t max_shard_bytes = uint64_t{1} << 40) {
    shard_options options;
    options.max_shard_bytes = max_shard_bytes;
    auto files = save_sharded_safetensors(dir, tensors, options);
    ASSERT_TRUE(files) << error_of(files);
  }
};

std::set<std::string> names_in(const std::filesystem::path& dir) {
  auto set = safetensors_set::open(dir);
  EXPECT_TRUE(set) << error_of(set);
  std::set<std::string> out;
  for (auto n : set->names()) out.emplace(n);
  return out;
}

TEST(checkpoint, expected_weights_match_the_fixtures_exactly) {
  for (const auto& dir : {tiny_dir, fp8_dir}) {
    auto config = config_of(dir);
    std::set<std::string> want;
    for (const auto& w : expected_weights(config)) {
      want.insert(w.name);
      if (dir == fp8_dir && w.kind == weight_kind::projection) want.insert(scale_name(w.name));
    }
    EXPECT_EQ(names_in(dir), want) << dir;
  }
  auto config = config_of(tiny_dir);
  auto raw = safetensors_file::open(tiny_dir / "model.safetensors");
  ASSERT_TRUE(raw);
  int64_t stored = 0;
  for (const auto& t : raw->tensors()) stored += t.num_elements();
  EXPECT_EQ(count_parameters(config), stored);
  EXPECT_EQ(stored, 340'080);
}

TEST(checkpoint, tiny_v3_loads_as_stored) {
  auto config = config_of(tiny_dir);
  auto ckpt = load_checkpoint(tiny_dir, config);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), expected_weights(config).size());
  auto raw = safetensors_file::open(tiny_dir / "model.safetensors");
  ASSERT_TRUE(raw);
  for (const auto& t : raw->tensors()) {
    const host_tensor* loaded = ckpt->find(t.name);
    ASSERT_NE(loaded, nullptr) << t.name;
    ASSERT_EQ(loaded->shape(), t.shape) << t.name;
    ASSERT_EQ(std::memcmp(loaded->data().data(), t.data.data(), t.data.size()), 0) << t.name;
  }
  const host_tensor* gate = ckpt->find("model.layers.1.mlp.gate.weight");
  ASSERT_NE(gate, nullptr);
  EXPECT_EQ(gate->shape(), (std::vector<int64_t>{16, 64}));
}

// The stored bytes of one tensor, read with nothing but the format's definition.
std::string raw_tensor_bytes(const std::filesystem::path& file, const std::string& name,
                             nlohmann::json* entry) {
  std::string bytes = testing::read_file(file);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  *entry = header.at(name);
  uint64_t begin = (*entry)["data_offsets"][0], end = (*entry)["data_offsets"][1];
  return bytes.substr(8 + n + begin, end - begin);
}

TEST(checkpoint, small_v3_fp8_dequantises_by_block) {
  auto config = config_of(fp8_dir);
  auto ckpt = load_checkpoint(fp8_dir, config);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), expected_weights(config).size());
  EXPECT_EQ(ckpt->find("model.layers.0.mlp.down_proj.weight_scale_inv"), nullptr);

  // By hand: element (200, 300) of the [256, 512] down projection is in block (1, 2) of its
  // [2, 4] scale. e4m3 byte b = S EEEE MMM: value = (-1)^S (1 + M/8) 2^(E-7) (E > 0).
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  nlohmann::json entry, scale_entry;
  std::string q = raw_tensor_bytes(fp8_dir / "model.safetensors", name, &entry);
  std::string s = raw_tensor_bytes(fp8_dir / "model.safetensors", name + "_scale_inv", &scale_entry);
  ASSERT_EQ(entry["dtype"], "F8_E4M3");
  ASSERT_EQ(entry["shape"], nlohmann::json({256, 512}));
  ASSERT_EQ(scale_entry["shape"], nlohmann::json({2, 4}));
  const int r = 200, c = 300;
  auto b = static_cast<uint8_t>(q[r * 512 + c]);
  int e = (b >> 3) & 0xf, m = b & 7;
  ASSERT_FALSE(e == 0xf && m == 7);  // not NaN
  double value = (e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7)) *
                 ((b & 0x80) ? -1.0 : 1.0);
  float scale = 0;
  std::memcpy(&scale, s.data() + (1 * 4 + 2) * 4, 4);
  const float want = static_cast<float>(value) * scale;
  const host_tensor* w = ckpt->find(name);
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->data()[r * 512 + c], want);
  EXPECT_NE(want, 0.0f);
  // A partial edge block: kv_a_proj_with_mqa is [144, 256], its rows 128..143 use scale row 1.
  const std::string kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight";
  q = raw_tensor_bytes(fp8_dir / "model.safetensors", kv, &entry);
  s = raw_tensor_bytes(fp8_dir / "model.safetensors", kv + "_scale_inv", &scale_entry);
  ASSERT_EQ(scale_entry["shape"], nlohmann::json({2, 2}));
  std::memcpy(&scale, s.data() + (1 * 2 + 1) * 4, 4);
  const int er = 143, ec = 255;
  EXPECT_EQ(ckpt->find(kv)->data()[er * 256 + ec],
            e4m3_to_float(static_cast<uint8_t>(q[er * 256 + ec])) * scale);
  // Unquantised tensors pass through.
  EXPECT_EQ(ckpt->find("model.embed_tokens.weight")->shape(), (std::vector<int64_t>{1024, 256}));
  for (const auto& [n, t] : ckpt->tensors) {
    for (float v : t.data()) ASSERT_TRUE(std::isfinite(v)) << n;
  }
}

TEST(checkpoint, keep_fp8_keeps_the_stored_bytes_and_scales) {
  auto config = config_of(fp8_dir);
  auto plain = load_checkpoint(fp8_dir, config);
  ASSERT_TRUE(plain) << error_of(plain);
  load_options keep;
  keep.keep_fp8 = true;
  auto kept = load_checkpoint(fp8_dir, config, keep);
  ASSERT_TRUE(kept) << error_of(kept);
  // Every weight is in exactly one of the maps; the FP8 ones are exactly the F8_E4M3 tensors.
  auto files = safetensors_set::open(fp8_dir);
  ASSERT_TRUE(files) << error_of(files);
  EXPECT_EQ(kept->tensors.size() + kept->fp8.size(), plain->tensors.size());
  size_t stored_fp8 = 0;
  for (const auto& [name, t] : plain->tensors) {
    const bool is_fp8 = files->find(name)->dtype == kernels::dtype::f8_e4m3;
    stored_fp8 += is_fp8;
    ASSERT_EQ(kept->find(name) == nullptr, is_fp8) << name;
    ASSERT_EQ(kept->find_fp8(name) != nullptr, is_fp8) << name;
    if (!is_fp8) continue;
    // Dequantising the kept bytes gives the float32 load, bit for bit.
    const fp8_tensor& f = *kept->find_fp8(name);
    EXPECT_EQ(std::vector<int64_t>({f.rows, f.cols}), t.shape()) << name;
    const host_tensor d = f.dequantize();
    ASSERT_EQ(d.num_elements(), t.num_elements());
    EXPECT_EQ(std::memcmp(d.data().data(), t.data().data(), t.data().size_bytes()), 0) << name;
  }
  EXPECT_EQ(kept->fp8.size(), stored_fp8);
  EXPECT_GT(stored_fp8, 0u);
  // The raw bytes and the scale grid, by hand, for a weight with partial edge blocks.
  const std::string kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight";
  nlohmann::json entry, scale_entry;
  const std::string q = raw_tensor_bytes(fp8_dir / "model.safetensors", kv, &entry);
  const std::string s = raw_tensor_bytes(fp8_dir / "model.safetensors", kv + "_scale_inv", &scale_entry);
  const fp8_tensor& f = *kept->find_fp8(kv);
  EXPECT_EQ(f.block_rows, 128);
  EXPECT_EQ(f.block_cols, 128);
  EXPECT_EQ(f.scale_rows(), 2);
  EXPECT_EQ(f.scale_cols(), 2);
  ASSERT_EQ(f.values.size(), q.size());
  EXPECT_EQ(std::memcmp(f.values.data(), q.data(), q.size()), 0);
  ASSERT_EQ(f.scales.size() * 4, s.size());
  EXPECT_EQ(std::memcmp(f.scales.data(), s.data(), s.size()), 0);
  // A float32 consumer bound to the kept checkpoint is told why it cannot have the weight.
  const weight_lookup lookup = lookup_in(*kept);
  const std::vector<int64_t> shape{f.rows, f.cols};
  auto p = lookup(kv, shape);
  ASSERT_FALSE(p);
  EXPECT_EQ(testing::code_of(p), model_errc::bad_tensor);
  EXPECT_NE(error_of(p).find("kept as FP8"), std::string::npos) << error_of(p);
  // A float tensor of the same checkpoint still binds.
  EXPECT_TRUE(lookup("model.embed_tokens.weight", std::vector<int64_t>{1024, 256}));
  // read_fp8_weight refuses a tensor that is not stored as FP8.
  for (const auto& spec : expected_weights(config)) {
    if (spec.name != "model.embed_tokens.weight") continue;
    auto r = read_fp8_weight(*files, spec, config);
    ASSERT_FALSE(r);
    EXPECT_NE(error_of(r).find("expected F8_E4M3"), std::string::npos) << error_of(r);
  }
}

// quantize_fp8 on tiny-v3 (float32): every projection moves to checkpoint::fp8, nothing else.
// Each block's largest |w| becomes +-448 exactly (its scale is amax / 448); every value comes
// back within e4m3's rounding: half a step of 3 significant bits, 2^-4 of |w| in the normal
// range, and 2^-10 of the scale below it (subnormal steps are 2^-9 x scale).
TEST(checkpoint, quantize_fp8_keeps_each_block_within_e4m3_rounding) {
  auto config = config_of(tiny_dir);
  auto plain = load_checkpoint(tiny_dir, config);
  ASSERT_TRUE(plain) << error_of(plain);
  checkpoint q = *plain;
  ASSERT_FALSE(quantize_fp8(q, 32, 16));
  ASSERT_TRUE(q.config.quantization);
  EXPECT_EQ(q.config.quantization->block_rows, 32);
  EXPECT_EQ(q.config.quantization->block_cols, 16);
  EXPECT_EQ(q.tensors.size() + q.fp8.size(), plain->tensors.size());
  size_t projections = 0;
  for (const auto& spec : expected_weights(config))
    if (spec.kind == weight_kind::projection) {
      ++projections;
      ASSERT_NE(q.find_fp8(spec.name), nullptr) << spec.name;
    }
  EXPECT_EQ(q.fp8.size(), projections);
  EXPECT_NE(q.find("model.embed_tokens.weight"), nullptr);
  EXPECT_NE(q.find("model.norm.weight"), nullptr);
  for (const auto& [name, f] : q.fp8) {
    const host_tensor& w = *plain->find(name);
    const host_tensor back = f.dequantize();
    for (int64_t br = 0; br < f.scale_rows(); ++br)
      for (int64_t bc = 0; bc < f.scale_cols(); ++bc) {
        const float scale = f.scales[static_cast<size_t>(br * f.scale_cols() + bc)];
        float amax = 0.0f, back_amax = 0.0f;
        for (int64_t r = br * 32; r < std::min(f.rows, (br + 1) * 32); ++r)
          for (int64_t c = bc * 16; c < std::min(f.cols, (bc + 1) * 16); ++c) {
            const auto i = static_cast<size_t>(r * f.cols + c);
            const float x = w.data()[i], y = back.data()[i];
            amax = std::max(amax, std::fabs(x));
            back_amax = std::max(back_amax, std::fabs(y));
            ASSERT_LE(std::fabs(y - x), 0x1.0p-4f * std::fabs(x) + 0x1.0p-10f * scale)
                << name << " (" << r << ", " << c << ")";
          }
        ASSERT_EQ(scale, amax > 0 ? amax / 448.0f : 1.0f) << name;
        ASSERT_EQ(back_amax, 448.0f * scale) << name;
      }
  }
  // Refusals change nothing.
  checkpoint again = q;
  caf::error err = quantize_fp8(again);
  EXPECT_EQ(static_cast<model_errc>(err.code()), model_errc::bad_input);
  EXPECT_EQ(again.fp8.size(), q.fp8.size());
  checkpoint bad = *plain;
  EXPECT_EQ(static_cast<model_errc>(quantize_fp8(bad, 0, 128).code()), model_errc::bad_input);
  const std::string victim = "model.layers.1.self_attn.o_proj.weight";
  bad.find(victim)->data()[7] = std::nanf("");
  err = quantize_fp8(bad);
  EXPECT_EQ(static_cast<model_errc>(err.code()), model_errc::bad_input);
  EXPECT_NE(error_text(err).find(victim), std::string::npos) << error_text(err);
  EXPECT_TRUE(bad.fp8.empty());
  EXPECT_EQ(bad.tensors.size(), plain->tensors.size());
  EXPECT_FALSE(bad.config.quantization);
}

TEST(checkpoint, subset_by_filter) {
  auto config = config_of(tiny_dir);
  load_options only_expert;
  only_expert.filter = [](std::string_view n) {
    return n.find("layers.2.mlp.experts.7.") != std::string_view::npos;
  };
  auto ckpt = load_checkpoint(tiny_dir, config, only_expert);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), 3u);
  EXPECT_NE(ckpt->find(expert_weight_name(2, 7, "down_proj")), nullptr);

  load_options attention;
  attention.filter = [](std::string_view n) { return n.find(".self_attn.") != n.npos; };
  ckpt = load_checkpoint(tiny_dir, config, attention);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), 3u * 7u);  // q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o

  // FP8 weights bring their scales along without naming them.
  auto fp8 = config_of(fp8_dir);
  ckpt = load_checkpoint(fp8_dir, fp8, attention);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->tensors.size(), 2u * 7u);
}

struct broken_case {
  const char* what;
  std::function<void(checkpoint_copy&)> edit;
  model_errc code;
  const char* message;
};

TEST(checkpoint, broken_copies_name_the_tensor) {
  const broken_case cases[] = {
      {"missing", [](auto& c) { c.drop("model.layers.1.mlp.gate.weight"); },
       model_errc::missing_tensor, "missing tensor 'model.layers.1.mlp.gate.weight'"},
      {"missing several",
       [](auto& c) {
         c.drop("model.norm.weight");
         c.drop("lm_head.weight");
       },
       model_errc::missing_tensor, "missing tensor 'model.norm.weight' (and 1 more)"},
      {"unexpected",
       [](auto& c) { c.put("model.layers.1.mlp.foo.weight", kernels::dtype::f32, {4}); },
       model_errc::unexpected_tensor,
       "unexpected tensor 'model.layers.1.mlp.foo.weight': not a tensor of this model config"},
      {"extra layer",
       [](auto& c) { c.put("model.layers.3.input_layernorm.weight", kernels::dtype::f32, {64}); },
       model_errc::unexpected_tensor, "unexpected tensor 'model.layers.3.input_layernorm.weight'"},
      {"stray scale",
       [](auto& c) { c.put("model.layers.0.mlp.down_proj.weight_scale_inv", kernels::dtype::f32, {1, 1}); },
       model_errc::unexpected_tensor,
       "unexpected tensor 'model.layers.0.mlp.down_proj.weight_scale_inv': a block scale, but "
       "'model.layers.0.mlp.down_proj.weight' is not stored as F8_E4M3"},
      {"wrong shape",
       [](auto& c) { c.put("model.layers.1.mlp.gate.weight", kernels::dtype::f32, {16, 63}); },
       model_errc::bad_tensor, "model.layers.1.mlp.gate.weight: shape [16,63], expected [16,64]"},
      {"wrong dtype",
       [](auto& c) { c.put("model.norm.weight", kernels::dtype::i32, {64}); },
       model_errc::bad_tensor, "model.norm.weight: dtype I32, expected F32, BF16 or F16"},
      {"fp8 norm",
       [](auto& c) { c.put("model.norm.weight", kernels::dtype::f8_e4m3, {64}); },
       model_errc::bad_tensor, "model.norm.weight: dtype F8_E4M3, expected F32, BF16 or F16"},
      {"fp8 without quantization_config",
       [](auto& c) {
         c.put("model.layers.0.mlp.up_proj.weight", kernels::dtype::f8_e4m3, {128, 64});
         c.put("model.layers.0.mlp.up_proj.weight_scale_inv", kernels::dtype::f32, {1, 1});
       },
       model_errc::bad_tensor,
       "model.layers.0.mlp.up_proj.weight: dtype F8_E4M3, but config.json has no "
       "quantization_config"},
  };
  auto config = config_of(tiny_dir);
  for (const auto& c : cases) {
    scratch_dir dir;
    checkpoint_copy copy(tiny_dir);
    c.edit(copy);
    copy.save(dir.path());
    auto ckpt = load_checkpoint(dir.path(), config);
    ASSERT_FALSE(ckpt) << c.what;
    EXPECT_EQ(testing::code_of(ckpt), c.code) << c.what << ": " << error_of(ckpt);
    EXPECT_NE(error_of(ckpt).find(c.message), std::string::npos) << c.what << ": "
                                                                 << error_of(ckpt);
  }
}

TEST(checkpoint, broken_fp8_scales) {
  auto config = config_of(fp8_dir);
  const std::string w = "model.layers.1.self_attn.o_proj.weight";
  {
    scratch_dir dir;
    checkpoint_copy copy(fp8_dir);
    copy.drop(w + "_scale_inv");
    copy.save(dir.path());
    auto ckpt = load_checkpoint(dir.path(), config);
    ASSERT_FALSE(ckpt);
    EXPECT_EQ(testing::code_of(ckpt), model_errc::missing_tensor);
    EXPECT_NE(error_of(ckpt).find("missing tensor '" + w + "_scale_inv'"), std::string::npos)
        << error_of(ckpt);
  }
  {
    scratch_dir dir;
    checkpoint_copy copy(fp8_dir);
    copy.put(w + "_scale_inv", kernels::dtype::f32, {2, 2});  // o_proj is [256, 128]: [2, 1]
    copy.save(dir.path());
    auto ckpt = load_checkpoint(dir.path(), config);
    ASSERT_FALSE(ckpt);
    EXPECT_EQ(testing::code_of(ckpt), model_errc::bad_tensor);
    EXPECT_NE(error_of(ckpt).find(w + "_scale_inv: shape [2,2], expected [2,1]"),
              std::string::npos)
        << error_of(ckpt);
  }
  {
    scratch_dir dir;
    checkpoint_copy copy(fp8_dir);
    copy.put(w + "_scale_inv", kernels::dtype::i64, {2, 1});
    copy.save(dir.path());
    auto ckpt = load_checkpoint(dir.path(), config);
    ASSERT_FALSE(ckpt);
    EXPECT_NE(error_of(ckpt).find(w + "_scale_inv: dtype I64"), std::string::npos)
        << error_of(ckpt);
  }
}

TEST(checkpoint, sharded_checkpoint_loads_the_same_tensors) {
  scratch_dir dir;
  checkpoint_copy copy(tiny_dir);
  copy.save(dir.path(), 200 * 1024);
  ASSERT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  auto set = safetensors_set::open(dir.path());
  ASSERT_TRUE(set) << error_of(set);
  EXPECT_GE(set->files().size(), 6u);
  auto config = config_of(tiny_dir);
  auto sharded = load_checkpoint(*set, config);
  ASSERT_TRUE(sharded) << error_of(sharded);
  auto single = load_checkpoint(tiny_dir, config);
  ASSERT_TRUE(single);
  ASSERT_EQ(sharded->tensors.size(), single->tensors.size());
  for (const auto& [name, t] : single->tensors) {
    const host_tensor* s = sharded->find(name);
    ASSERT_NE(s, nullptr) << name;
    EXPECT_TRUE(std::equal(t.data().begin(), t.data().end(), s->data().begin())) << name;
  }
}

TEST(checkpoint, bf16_and_f16_convert_exactly) {
  scratch_dir dir;
  checkpoint_copy copy(tiny_dir);
  // model.norm.weight as BF16 and lm_head as F16, values chosen by hand.
  copy.put("model.norm.weight", kernels::dtype::bf16, {64});
  for (int i = 0; i < 64; ++i) {
    uint16_t v = float_to_bf16(static_cast<float>(i) * 0.25f - 3.0f);
    std::memcpy(copy.owned.back().data() + 2 * i, &v, 2);
  }
  copy.put("lm_head.weight", kernels::dtype::f16, {512, 64});
  const uint16_t half_one_and_half = 0x3e00;  // 1.5
  for (int i = 0; i < 512 * 64; ++i) std::memcpy(copy.owned.back().data() + 2 * i, &half_one_and_half, 2);
  copy.save(dir.path());
  auto ckpt = load_checkpoint(dir.path(), config_of(tiny_dir));
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(ckpt->find("model.norm.weight")->data()[i], static_cast<float>(i) * 0.25f - 3.0f);
  }
  EXPECT_EQ(ckpt->find("lm_head.weight")->data()[12345], 1.5f);
}

TEST(checkpoint, mtp_modules_load_when_present) {
  auto config = config_of(tiny_dir);
  config.num_nextn_predict_layers = 1;
  // tiny-v3 has no MTP module: fine unless required.
  auto ckpt = load_checkpoint(tiny_dir, config);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->find("model.layers.3.eh_proj.weight"), nullptr);
  load_options require;
  require.mtp = mtp_policy::require;
  ckpt = load_checkpoint(tiny_dir, config, require);
  ASSERT_FALSE(ckpt);
  EXPECT_NE(error_of(ckpt).find("missing tensor 'model.layers.3.enorm.weight'"),
            std::string::npos)
      << error_of(ckpt);

  // A partial module is an error; a full one (without its optional embedding/head) loads.
  scratch_dir dir;
  checkpoint_copy copy(tiny_dir);
  copy.put("model.layers.3.eh_proj.weight", kernels::dtype::f32, {64, 128});
  copy.save(dir.path());
  ckpt = load_checkpoint(dir.path(), config);
  ASSERT_FALSE(ckpt);
  EXPECT_EQ(testing::code_of(ckpt), model_errc::missing_tensor);
  for (const auto& w : expected_weights(config)) {
    if (w.mtp && !w.optional) copy.put(w.name, kernels::dtype::f32, w.shape);
  }
  copy.save(dir.path());
  ckpt = load_checkpoint(dir.path(), config);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_NE(ckpt->find("model.layers.3.mlp.experts.15.up_proj.weight"), nullptr);
  EXPECT_NE(ckpt->find("model.layers.3.shared_head.norm.weight"), nullptr);
  EXPECT_EQ(ckpt->find("model.layers.3.shared_head.head.weight"), nullptr);
  load_options skip;
  skip.mtp = mtp_policy::skip;
  ckpt = load_checkpoint(dir.path(), config, skip);
  ASSERT_TRUE(ckpt) << error_of(ckpt);
  EXPECT_EQ(ckpt->find("model.layers.3.eh_proj.weight"), nullptr);
  // The same tensors under a config without MTP are unexpected.
  config.num_nextn_predict_layers = 0;
  ckpt = load_checkpoint(dir.path(), config);
  ASSERT_FALSE(ckpt);
  EXPECT_EQ(testing::code_of(ckpt), model_errc::unexpected_tensor);
}

TEST(checkpoint, config_and_checkpoint_mismatch_is_reported) {
  auto config = config_of(tiny_dir);
  config.n_routed_experts = 8;
  config.n_group = 4;
  auto ckpt = load_checkpoint(tiny_dir, config);
  ASSERT_FALSE(ckpt);
  EXPECT_NE(error_of(ckpt).find("unexpected tensor 'model.layers.1.mlp.experts.10.down_proj.weight'"),
            std::string::npos)
      << error_of(ckpt);
}

}  // namespace
}  // namespace moe::model
