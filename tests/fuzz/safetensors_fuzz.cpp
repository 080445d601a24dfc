// libFuzzer target: safetensors files (model/safetensors.hpp), the checkpoint format every
// process that loads weights maps from disk: whole-file bytes as parse_safetensors_header sees
// them.
// Properties: the parser returns a header or a model error with a text, whatever the bytes; a
// parsed header keeps every promise the loader relies on (each tensor's bytes inside the data
// section and matching dtype x shape, the section covered exactly, names sorted and unique);
// and writing the tensors back (save_safetensors, into a scratch directory) gives a file that parses
// to the same tensors and metadata.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "kernels/dtype.hpp"
#include "model/mapped_file.hpp"
#include "model/safetensors.hpp"
#include "model/safetensors_writer.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using moe::model::safetensors_header;

void check_header(const safetensors_header& h, size_t file_bytes) {
  MOE_FUZZ_CHECK(h.data_offset >= 8 && h.data_offset <= file_bytes);
  const uint64_t data_bytes = file_bytes - h.data_offset;
  uint64_t covered = 0;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& e = h.tensors[i];
    if (i > 0) MOE_FUZZ_CHECK(h.tensors[i - 1].name < e.name);
    MOE_FUZZ_CHECK(e.begin <= e.end && e.end <= data_bytes);
    unsigned __int128 bytes = moe::kernels::dtype_bytes(e.dtype);
    for (int64_t d : e.shape) {
      MOE_FUZZ_CHECK(d >= 0);
      bytes *= static_cast<uint64_t>(d);
      if (bytes > data_bytes) bytes = static_cast<unsigned __int128>(data_bytes) + 1;  // saturate
    }
    MOE_FUZZ_CHECK(bytes == e.end - e.begin);
    covered += e.end - e.begin;
  }
  MOE_FUZZ_CHECK(covered == data_bytes);
}

// Where the writer writes: a private directory (the writer renames a temporary file into place,
// so a memory file cannot stand in), removed when the process exits.
struct scratch_directory {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("moe_safetensors_fuzz." + std::to_string(::getpid()));
  scratch_directory() { std::filesystem::create_directories(path); }
  ~scratch_directory() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

void check_round_trip(const safetensors_header& h, std::span<const std::byte> file) {
  std::vector<moe::model::tensor_to_write> tensors;
  for (const auto& e : h.tensors) {
    tensors.push_back({e.name, e.dtype, e.shape, file.subspan(h.data_offset + e.begin, e.end - e.begin), {}});
  }
  static const scratch_directory scratch;
  const auto path = scratch.path / "model.safetensors";
  auto saved = moe::model::save_safetensors(path, tensors, h.metadata);
  if (!saved) {
    // The writer refuses only what the reader must have refused too.
    std::fprintf(stderr, "save_safetensors: %s\n", moe::error_text(saved.error()).c_str());
    MOE_FUZZ_CHECK(false);
  }
  auto mapped = moe::model::mapped_file::open(path);
  MOE_FUZZ_CHECK(static_cast<bool>(mapped));
  auto again = moe::model::parse_safetensors_header(mapped->bytes(), "written");
  MOE_FUZZ_CHECK(static_cast<bool>(again));
  MOE_FUZZ_CHECK(again->metadata == h.metadata);
  MOE_FUZZ_CHECK(again->tensors.size() == h.tensors.size());
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& a = h.tensors[i];
    const auto& b = again->tensors[i];
    MOE_FUZZ_CHECK(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape);
    const auto written = mapped->bytes().subspan(again->data_offset + b.begin, b.end - b.begin);
    const auto read = file.subspan(h.data_offset + a.begin, a.end - a.begin);
    MOE_FUZZ_CHECK(std::equal(written.begin(), written.end(), read.begin(), read.end()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto file = moe::fuzz::as_bytes(data, size);
  auto header = moe::model::parse_safetensors_header(file, "fuzz.safetensors");
  if (!header) {
    moe::fuzz::check_rejection(header.error(), "model");
    return 0;
  }
  check_header(*header, size);
  check_round_trip(*header, file);
  return 0;
}
