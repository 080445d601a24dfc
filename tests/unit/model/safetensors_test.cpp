#include "model/safetensors.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include <nlohmann/json.hpp>

#include "model/safetensors_writer.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

using testing::error_of;
using testing::raw_safetensors;
using testing::scratch_dir;
using testing::write_file;

template <class T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

template <class T>
std::vector<T> values_of(const tensor_view& t) {
  std::vector<T> out(t.data.size() / sizeof(T));
  std::memcpy(out.data(), t.data.data(), t.data.size());
  return out;
}

TEST(safetensors, round_trip) {
  scratch_dir dir;
  std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-8f, -7.0f};
  std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7fc0};
  std::vector<int64_t> i64 = {-1, 0, 1ll << 40};
  std::vector<uint8_t> u8 = {1, 2, 3, 4, 5};  // odd size: the next tensor is unaligned
  std::vector<int32_t> i32 = {7, -7};
  std::vector<tensor_to_write> tensors = {
      {"a.weight", kernels::dtype::f32, {2, 3}, bytes_of(f32), {}},
      {"b", kernels::dtype::bf16, {3}, bytes_of(bf16), {}},
      {"ids", kernels::dtype::i64, {1, 3}, bytes_of(i64), {}},
      {"bytes", kernels::dtype::u8, {5}, bytes_of(u8), {}},
      {"z", kernels::dtype::i32, {2}, bytes_of(i32), {}},
      {"empty", kernels::dtype::f32, {0, 4}, {}, {}},
  };
  ASSERT_TRUE(save_safetensors(dir / "t.safetensors", tensors));
  EXPECT_FALSE(std::filesystem::exists(dir / "t.safetensors.tmp"));

  auto f = safetensors_file::open(dir / "t.safetensors");
  ASSERT_TRUE(f) << error_of(f);
  EXPECT_EQ(f->metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ(f->tensors().size(), 6u);
  const tensor_view* a = f->find("a.weight");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, kernels::dtype::f32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->num_elements(), 6);
  EXPECT_EQ(values_of<float>(*a), f32);
  // The header is padded so the data section (a.weight is first in it) is 8-byte aligned.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data.data()) % 8, 0u);
  std::string raw = testing::read_file(dir / "t.safetensors");
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, raw.data(), 8);
  EXPECT_EQ(header_bytes % 8, 0u);
  EXPECT_EQ(values_of<uint16_t>(*f->find("b")), bf16);
  EXPECT_EQ(values_of<int64_t>(*f->find("ids")), i64);
  EXPECT_EQ(values_of<uint8_t>(*f->find("bytes")), u8);
  EXPECT_EQ(values_of<int32_t>(*f->find("z")), i32);
  EXPECT_EQ(f->find("empty")->num_elements(), 0);
  EXPECT_EQ(f->find("missing"), nullptr);
  // tensors() is sorted by name
  for (size_t i = 1; i < f->tensors().size(); ++i) {
    EXPECT_LT(f->tensors()[i - 1].name, f->tensors()[i].name);
  }
}

TEST(safetensors, producer_chunks_cover_the_tensor_in_order) {
  scratch_dir dir;
  const int64_t n = 5'000'000;  // 20 MB: more than one 16 MiB chunk
  uint64_t expected_offset = 0;
  tensor_to_write t{"big", kernels::dtype::f32, {n}, {}, {}};
  t.produce = [&](uint64_t offset, std::span<std::byte> chunk) {
    EXPECT_EQ(offset, expected_offset);
    expected_offset += chunk.size();
    for (size_t i = 0; i < chunk.size() / 4; ++i) {
      float v = static_cast<float>(offset / 4 + i);
      std::memcpy(chunk.data() + 4 * i, &v, 4);
    }
  };
  ASSERT_TRUE(save_safetensors(dir / "big.safetensors", std::span(&t, 1)));
  EXPECT_EQ(expected_offset, static_cast<uint64_t>(n) * 4);
  auto f = safetensors_file::open(dir / "big.safetensors");
  ASSERT_TRUE(f) << error_of(f);
  auto values = values_of<float>(*f->find("big"));
  EXPECT_EQ(values[0], 0.0f);
  EXPECT_EQ(values[4'194'304], 4'194'304.0f);
  EXPECT_EQ(values[n - 1], static_cast<float>(n - 1));
}

TEST(safetensors, writer_rejects_inconsistent_input) {
  scratch_dir dir;
  std::vector<float> v = {1, 2, 3};
  tensor_to_write wrong_size{"w", kernels::dtype::f32, {2, 2}, bytes_of(v), {}};
  auto r = save_safetensors(dir / "x.safetensors", std::span(&wrong_size, 1));
  ASSERT_FALSE(r);
  EXPECT_NE(error_of(r).find("tensor 'w': 12 bytes given"), std::string::npos) << error_of(r);
  std::vector<tensor_to_write> twice = {{"w", kernels::dtype::f32, {3}, bytes_of(v), {}},
                                        {"w", kernels::dtype::f32, {3}, bytes_of(v), {}}};
  r = save_safetensors(dir / "x.safetensors", twice);
  ASSERT_FALSE(r);
  EXPECT_NE(error_of(r).find("duplicate"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
}

struct broken_file {
  const char* what;
  std::string bytes;
  const char* message;
};

std::string header_for(const std::string& entries) { return "{" + entries + "}"; }

TEST(safetensors, malformed_files_are_clear_errors) {
  const std::string eight(8, '\0');
  const broken_file cases[] = {
      {"truncated length", std::string("\x10\x00\x00", 3),
       "truncated: 3 bytes, shorter than the 8-byte header length"},
      {"header length beyond file", raw_safetensors("{}", "", 1000),
       "header length 1000 exceeds the 2 bytes after it"},
      {"header length near 2^64", raw_safetensors("{}", "", ~uint64_t{0} - 4),
       "exceeds the 2 bytes after it"},
      {"not json", raw_safetensors("{\"a\":", ""), "header is not valid JSON"},
      {"not an object", raw_safetensors("[1]", ""), "header is not a JSON object"},
      {"offsets out of range",
       raw_safetensors(header_for(R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})"),
                       "1234"),
       "tensor 'w': data_offsets [0,8] are out of range: the data section holds 4 bytes"},
      {"offsets reversed",
       raw_safetensors(header_for(R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]})"),
                       "1234"),
       "tensor 'w': data_offsets [4,0] are reversed"},
      {"offsets vs shape",
       raw_safetensors(header_for(R"("w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]})"),
                       eight),
       "tensor 'w': data_offsets [0,8] span 8 bytes, but F32 [3] needs 12"},
      {"overlap",
       raw_safetensors(header_for(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]})"),
                       eight),
       "tensors 'a' [0, 8) and 'b' [4, 8) overlap"},
      {"hole",
       raw_safetensors(header_for(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]})"),
                       eight),
       "bytes [0, 4) of the data section belong to no tensor (before 'a')"},
      {"trailing bytes",
       raw_safetensors(header_for(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})"),
                       eight),
       "bytes [4, 8) of the data section belong to no tensor (trailing data)"},
      {"unknown dtype",
       raw_safetensors(header_for(R"("w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]})"), "x"),
       "tensor 'w': unknown dtype 'F7'"},
      {"spec dtype we lack",
       raw_safetensors(header_for(R"("w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]})"),
                       eight),
       "tensor 'w': unsupported dtype 'F64'"},
      {"negative extent",
       raw_safetensors(header_for(R"("w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]})"), ""),
       "tensor 'w': shape [-1]: expected non-negative integers"},
      {"missing offsets", raw_safetensors(header_for(R"("w":{"dtype":"U8","shape":[1]})"), "x"),
       "tensor 'w': data_offsets: expected [begin, end]"},
      {"extra key",
       raw_safetensors(
           header_for(R"("w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"crc":1})"), "x"),
       "tensor 'w': unknown key 'crc'"},
      {"duplicate name",
       raw_safetensors(header_for(R"("w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                  R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]})"),
                       "xy"),
       "tensor 'w' appears twice"},
      {"metadata value", raw_safetensors(R"({"__metadata__":{"format":1}})", ""),
       "__metadata__.format: expected a string"},
      // Found by fuzzing: reporting the shape printed it recursively, one stack frame per level.
      {"deep nesting",
       raw_safetensors(header_for(R"("w":{"dtype":"U8","shape":)" + std::string(100000, '[') +
                                  std::string(100000, ']') + R"(,"data_offsets":[0,0]})"),
                       ""),
       "header nests deeper than 64 levels"},
  };
  scratch_dir dir;
  for (const auto& c : cases) {
    auto file = dir / "broken.safetensors";
    write_file(file, c.bytes);
    auto f = safetensors_file::open(file);
    ASSERT_FALSE(f) << c.what;
    EXPECT_EQ(testing::code_of(f), model_errc::bad_checkpoint) << c.what;
    EXPECT_EQ(error_of(f).rfind(file.string() + ": ", 0), 0u) << c.what << ": " << error_of(f);
    EXPECT_NE(error_of(f).find(c.message), std::string::npos) << c.what << ": " << error_of(f);
  }
}

TEST(safetensors, truncated_copy_of_a_good_file) {
  scratch_dir dir;
  std::vector<float> v(64, 1.0f);
  tensor_to_write t{"w", kernels::dtype::f32, {8, 8}, bytes_of(v), {}};
  ASSERT_TRUE(save_safetensors(dir / "good.safetensors", std::span(&t, 1)));
  std::string bytes = testing::read_file(dir / "good.safetensors");
  write_file(dir / "cut.safetensors", bytes.substr(0, bytes.size() - 10));
  auto f = safetensors_file::open(dir / "cut.safetensors");
  ASSERT_FALSE(f);
  EXPECT_NE(error_of(f).find("tensor 'w': data_offsets [0,256] are out of range"),
            std::string::npos)
      << error_of(f);
  write_file(dir / "cut.safetensors", bytes.substr(0, 20));
  f = safetensors_file::open(dir / "cut.safetensors");
  ASSERT_FALSE(f);
  EXPECT_NE(error_of(f).find("exceeds the 12 bytes after it"), std::string::npos) << error_of(f);
}

TEST(safetensors, missing_file_is_an_io_error) {
  scratch_dir dir;
  auto f = safetensors_file::open(dir / "nope.safetensors");
  ASSERT_FALSE(f);
  EXPECT_EQ(testing::code_of(f), model_errc::io_error);
  EXPECT_NE(error_of(f).find("nope.safetensors: cannot open"), std::string::npos);
  auto s = safetensors_set::open(dir.path());
  ASSERT_FALSE(s);
  EXPECT_NE(error_of(s).find("holds neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
}

// 10 tensors of 1 KiB each, named t0..t9, tensor i filled with the value i.
struct ten_tensors {
  std::vector<std::vector<float>> data;
  std::vector<tensor_to_write> tensors;
  ten_tensors() {
    for (int i = 0; i < 10; ++i) data.emplace_back(256, static_cast<float>(i));
    for (int i = 0; i < 10; ++i) {
      tensors.push_back({"t" + std::to_string(i), kernels::dtype::f32, {16, 16},
                         bytes_of(data[i]), {}});
    }
  }
};

TEST(safetensors, sharded_write_and_read) {
  scratch_dir dir;
  ten_tensors ten;
  shard_options options;
  options.max_shard_bytes = 3 * 1024;  // three tensors per shard -> 4 shards
  auto files = save_sharded_safetensors(dir.path(), ten.tensors, options);
  ASSERT_TRUE(files) << error_of(files);
  ASSERT_EQ(files->size(), 5u);
  EXPECT_EQ(files->front().filename(), "model-00001-of-00004.safetensors");
  EXPECT_EQ(files->back().filename(), "model.safetensors.index.json");
  auto index = nlohmann::json::parse(testing::read_file(dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 10 * 1024);
  EXPECT_EQ(index["weight_map"]["t9"], "model-00004-of-00004.safetensors");

  auto set = safetensors_set::open(dir.path());
  ASSERT_TRUE(set) << error_of(set);
  EXPECT_EQ(set->files().size(), 4u);
  EXPECT_EQ(set->num_tensors(), 10u);
  for (int i = 0; i < 10; ++i) {
    std::string name = "t" + std::to_string(i);
    const tensor_view* t = set->find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(values_of<float>(*t), ten.data[i]);
    EXPECT_EQ(set->file_of(name).filename(),
              "model-0000" + std::to_string(i / 3 + 1) + "-of-00004.safetensors");
  }
  // The index path itself opens the same set.
  auto by_index = safetensors_set::open(dir / "model.safetensors.index.json");
  ASSERT_TRUE(by_index) << error_of(by_index);
  EXPECT_EQ(by_index->num_tensors(), 10u);

  // Everything fits: one model.safetensors, and the old shards and index are gone.
  options.max_shard_bytes = 1 << 20;
  files = save_sharded_safetensors(dir.path(), ten.tensors, options);
  ASSERT_TRUE(files) << error_of(files);
  ASSERT_EQ(files->size(), 1u);
  EXPECT_EQ(files->front().filename(), "model.safetensors");
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(dir / "model-00001-of-00004.safetensors"));
  set = safetensors_set::open(dir.path());
  ASSERT_TRUE(set) << error_of(set);
  EXPECT_EQ(set->num_tensors(), 10u);
}

TEST(safetensors, index_and_shards_must_agree) {
  scratch_dir dir;
  ten_tensors ten;
  shard_options options;
  options.max_shard_bytes = 5 * 1024;
  ASSERT_TRUE(save_sharded_safetensors(dir.path(), ten.tensors, options));
  const auto index_path = dir / "model.safetensors.index.json";
  const auto good = nlohmann::json::parse(testing::read_file(index_path));
  struct index_case {
    const char* what;
    std::function<void(nlohmann::json&)> mutate;
    const char* message;
  };
  const index_case cases[] = {
      {"tensor left out", [](auto& j) { j["weight_map"].erase("t3"); },
       "tensor 't3' in "},
      {"wrong shard", [](auto& j) { j["weight_map"]["t0"] = "model-00002-of-00002.safetensors"; },
       "weight_map.t0: shard model-00002-of-00002.safetensors does not hold this tensor"},
      {"escaping path", [](auto& j) { j["weight_map"]["t0"] = "../model-00001-of-00002.safetensors"; },
       "weight_map.t0: expected a shard file name inside the directory"},
      {"missing shard", [](auto& j) { j["weight_map"]["t11"] = "model-00009-of-00009.safetensors"; },
       "model-00009-of-00009.safetensors: cannot open"},
      {"no weight_map", [](auto& j) { j.erase("weight_map"); }, "weight_map: missing"},
  };
  for (const auto& c : cases) {
    auto j = good;
    c.mutate(j);
    write_file(index_path, j.dump());
    auto set = safetensors_set::open(dir.path());
    ASSERT_FALSE(set) << c.what;
    EXPECT_NE(error_of(set).find(c.message), std::string::npos) << c.what << ": " << error_of(set);
  }
  write_file(index_path, "{");
  auto set = safetensors_set::open(dir.path());
  ASSERT_FALSE(set);
  EXPECT_NE(error_of(set).find("model.safetensors.index.json: not valid JSON"), std::string::npos);
}

TEST(safetensors, header_parser_reports_offsets) {
  std::string bytes = raw_safetensors(
      header_for(R"("b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                 R"("a":{"dtype":"I32","shape":[],"data_offsets":[2,6]})"),
      "xyzzyx");
  auto h = parse_safetensors_header(std::as_bytes(std::span(bytes.data(), bytes.size())), "mem");
  ASSERT_TRUE(h) << error_of(h);
  ASSERT_EQ(h->tensors.size(), 2u);
  EXPECT_EQ(h->tensors[0].name, "a");  // sorted by name
  EXPECT_TRUE(h->tensors[0].shape.empty());
  EXPECT_EQ(h->tensors[0].begin, 2u);
  EXPECT_EQ(h->tensors[1].end, 2u);
  EXPECT_EQ(h->data_offset, bytes.size() - 6);
}

}  // namespace
}  // namespace moe::model
