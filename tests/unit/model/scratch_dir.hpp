// Test support for model/ tests: a temporary directory removed on destruction, and raw file
// writing for hand-made (often deliberately broken) safetensors files.
// Thread safety: one scratch_dir per test.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "base/error.hpp"
#include "model/model_errc.hpp"

namespace moe::model::testing {

class scratch_dir {
 public:
  scratch_dir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("moe_model_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] std::filesystem::path operator/(std::string_view name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& file, std::string_view bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A safetensors file from its parts: the 8-byte length (header.size() unless overridden),
/// the header text and the data section.
inline std::string raw_safetensors(std::string_view header, std::string_view data,
                                   uint64_t header_length = UINT64_MAX) {
  if (header_length == UINT64_MAX) header_length = header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header_length >> (8 * i)) & 0xff);
  out.append(header);
  out.append(data);
  return out;
}

/// The reason text of an expected's error, or "" when it holds a value.
template <class T>
std::string error_of(const caf::expected<T>& e) {
  return e ? std::string() : moe::error_text(e.error());
}

/// The model_errc of an expected's error (only meaningful when it holds one).
template <class T>
model_errc code_of(const caf::expected<T>& e) {
  return static_cast<model_errc>(e.error().code());
}

}  // namespace moe::model::testing
