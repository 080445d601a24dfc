// A read-only memory mapping of a whole file, owned: unmapped when the owner is destroyed.
//
// The file descriptor is closed as soon as the mapping exists (the mapping keeps the file's
// pages reachable), so an open checkpoint holds one mapping per shard and no descriptors.
// The mapped address never changes, also across moves, so spans taken from bytes() stay valid
// for as long as some mapped_file owns the mapping.
// Thread safety: immutable after open; bytes() may be read from any thread.
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>

#include "base/error.hpp"

namespace moe::model {

class mapped_file {
 public:
  /// Maps `path` read-only. An empty file maps to an empty span.
  [[nodiscard]] static caf::expected<mapped_file> open(const std::filesystem::path& path);

  mapped_file() = default;

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(mapping_.get()), size_bytes_};
  }
  [[nodiscard]] size_t size_bytes() const noexcept { return size_bytes_; }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  struct unmapper {
    size_t size_bytes;  // no initializer: keeps the deleter default-constructible in-class
    void operator()(void* address) const noexcept;
  };

  std::filesystem::path path_;
  std::unique_ptr<void, unmapper> mapping_;
  size_t size_bytes_ = 0;
};

}  // namespace moe::model
