// Reading safetensors checkpoints: one file, or a sharded set behind model.safetensors.index.json.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
// then the data section; offsets are relative to its start. Opening validates everything the
// data access relies on, each failure an error naming the file and the tensor: truncated file,
// header length beyond the file, malformed or duplicate entries, unknown dtype, offsets out of
// range, reversed, overlapping, leaving holes (the spec forbids them) or not matching
// dtype x shape. After open, every tensor_view's span lies inside the mapping.
//
// Ownership: a safetensors_file owns its mapping (mapped_file); tensor_views borrow from it and
// stay valid while the safetensors_file (or the safetensors_set holding it) lives, across moves.
// Thread safety: immutable after open; concurrent readers are fine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "kernels/dtype.hpp"
#include "model/mapped_file.hpp"

namespace moe::model {

/// One tensor's header entry; offsets are relative to the data section.
struct safetensors_entry {
  std::string name;
  kernels::dtype dtype = kernels::dtype::f32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

struct safetensors_header {
  uint64_t data_offset = 0;  ///< 8 + header length: where the data section starts in the file.
  std::map<std::string, std::string> metadata;
  std::vector<safetensors_entry> tensors;  ///< Sorted by name.
};

/// Parses and validates the header of a whole file's bytes; `source` names the file in errors.
[[nodiscard]] caf::expected<safetensors_header> parse_safetensors_header(
    std::span<const std::byte> file_bytes, const std::string& source);

/// A tensor inside a mapped file.
struct tensor_view {
  std::string name;
  kernels::dtype dtype = kernels::dtype::f32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;

  [[nodiscard]] int64_t num_elements() const noexcept;
};

/// "[16, 64]" for messages.
[[nodiscard]] std::string shape_string(std::span<const int64_t> shape);

class safetensors_file {
 public:
  [[nodiscard]] static caf::expected<safetensors_file> open(const std::filesystem::path& file);

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return file_.path(); }
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept {
    return metadata_;
  }
  /// Sorted by name.
  [[nodiscard]] std::span<const tensor_view> tensors() const noexcept { return tensors_; }
  [[nodiscard]] const tensor_view* find(std::string_view name) const noexcept;
  [[nodiscard]] uint64_t size_bytes() const noexcept { return file_.size_bytes(); }

 private:
  mapped_file file_;
  std::map<std::string, std::string> metadata_;
  std::vector<tensor_view> tensors_;
};

/// The tensors of a checkpoint, across its shards.
class safetensors_set {
 public:
  /// `dir_or_file` is a directory holding model.safetensors (preferred when present, as
  /// transformers does) or model.safetensors.index.json; or a .safetensors file; or an index.
  /// With an index, every shard it names is opened, and the index and the shards must agree
  /// exactly: each mapped tensor in its shard, no tensor in two shards, none outside the index.
  [[nodiscard]] static caf::expected<safetensors_set> open(
      const std::filesystem::path& dir_or_file);

  [[nodiscard]] const tensor_view* find(std::string_view name) const noexcept;
  /// The file holding tensor `name`; requires find(name) != nullptr.
  [[nodiscard]] const std::filesystem::path& file_of(std::string_view name) const;
  /// Every tensor name, sorted.
  [[nodiscard]] std::vector<std::string_view> names() const;
  [[nodiscard]] std::span<const safetensors_file> files() const noexcept { return files_; }
  [[nodiscard]] size_t num_tensors() const noexcept { return index_.size(); }

 private:
  struct located {
    const tensor_view* view;
    size_t file;
  };

  caf::expected<void> add(safetensors_file file);

  std::vector<safetensors_file> files_;
  std::map<std::string, located, std::less<>> index_;
};

}  // namespace moe::model
