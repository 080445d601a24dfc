// Writing safetensors checkpoints: one file, or shards plus model.safetensors.index.json.
//
// A tensor to write either has its bytes in memory or a producer that fills consecutive chunks,
// so generating a multi-GiB checkpoint never needs a whole tensor (let alone a whole model) in
// memory. Files appear atomically: each is written to "<name>.tmp" and renamed when complete,
// so a crashed write never leaves a plausible-looking truncated checkpoint.
// The header is padded with spaces to a multiple of 8 bytes, as the reference implementation
// does, so every tensor's data is 8-byte aligned.
//
// Ownership: the caller owns the tensors' bytes and producers for the duration of the call.
// Thread safety: calls on different files are independent; producers run on the caller's thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "kernels/dtype.hpp"
#include "model/progress_bar.hpp"

namespace moe::model {

struct tensor_to_write {
  std::string name;
  kernels::dtype dtype = kernels::dtype::f32;
  std::vector<int64_t> shape;
  /// In-memory data: exactly dtype_bytes(dtype) x product(shape) bytes. Used when produce is empty.
  std::span<const std::byte> bytes;
  /// Else called with consecutive chunks covering the tensor in order: (byte offset, chunk).
  std::function<void(uint64_t offset_bytes, std::span<std::byte> chunk)> produce;

  [[nodiscard]] uint64_t size_bytes() const noexcept;
};

using safetensors_metadata = std::map<std::string, std::string>;

/// Writes one file. Errors: bad_input for a size mismatch or a duplicate name (named), io_error
/// for the file system. `progress`, when given, advances by each tensor's bytes.
[[nodiscard]] caf::expected<void> save_safetensors(const std::filesystem::path& file,
                                                   std::span<const tensor_to_write> tensors,
                                                   const safetensors_metadata& metadata = {{"format", "pt"}},
                                                   progress_bar* progress = nullptr);

struct shard_options {
  /// A shard closes before a tensor that would take it past this size (data bytes); a tensor
  /// larger than the limit gets a shard of its own.
  uint64_t max_shard_bytes = uint64_t{2} << 30;
  safetensors_metadata metadata = {{"format", "pt"}};
  progress_bar* progress = nullptr;
};

/// Writes `tensors`, in order, into `dir`: model.safetensors when they fit one shard, else
/// model-0000k-of-0000n.safetensors and model.safetensors.index.json (metadata.total_size and
/// weight_map, as transformers writes them). Returns the files written, the index last.
[[nodiscard]] caf::expected<std::vector<std::filesystem::path>> save_sharded_safetensors(
    const std::filesystem::path& dir, std::span<const tensor_to_write> tensors,
    const shard_options& options = {});

}  // namespace moe::model
