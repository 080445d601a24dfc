#include "model/safetensors_writer.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "model/model_errc.hpp"
#include "model/safetensors.hpp"

namespace moe::model {

namespace {

constexpr uint64_t chunk_bytes = uint64_t{16} << 20;

struct file_closer {
  void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};
using file_ptr = std::unique_ptr<std::FILE, file_closer>;

caf::error io_failure(const std::filesystem::path& path, const std::string& what) {
  return make_error(model_errc::io_error, path.string() + ": " + what + ": " + std::strerror(errno));
}

// Removes the temporary file unless the write completed and renamed it.
struct temp_file_guard {
  std::filesystem::path path;
  bool keep = false;
  ~temp_file_guard() {
    if (!keep) {
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
  }
};

caf::expected<std::string> build_header(const std::filesystem::path& file,
                                        std::span<const tensor_to_write> tensors,
                                        const safetensors_metadata& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || header.contains(t.name)) {
      return make_error(model_errc::bad_input,
                        file.string() + ": tensor '" + t.name + "': empty, reserved or duplicate name");
    }
    if (std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d < 0; })) {
      return make_error(model_errc::bad_input, file.string() + ": tensor '" + t.name +
                                                   "': negative extent in shape " +
                                                   shape_string(t.shape));
    }
    if (!t.produce && t.bytes.size() != t.size_bytes()) {
      return make_error(model_errc::bad_input,
                        file.string() + ": tensor '" + t.name + "': " +
                            std::to_string(t.bytes.size()) + " bytes given, dtype " +
                            std::string(kernels::safetensors_name(t.dtype)) + " and shape " +
                            shape_string(t.shape) + " need " + std::to_string(t.size_bytes()));
    }
    header[t.name] = {{"dtype", kernels::safetensors_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.size_bytes()}}};
    offset += t.size_bytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

caf::expected<void> write_tensor(std::FILE* out, const std::filesystem::path& tmp,
                                 const tensor_to_write& t, std::vector<std::byte>& buffer) {
  const uint64_t total = t.size_bytes();
  if (!t.produce) {
    if (total > 0 && std::fwrite(t.bytes.data(), 1, total, out) != total) {
      return io_failure(tmp, "write failed");
    }
    return {};
  }
  buffer.resize(std::min(total, chunk_bytes));
  for (uint64_t offset = 0; offset < total; offset += chunk_bytes) {
    uint64_t n = std::min(chunk_bytes, total - offset);
    std::span<std::byte> chunk(buffer.data(), n);
    t.produce(offset, chunk);
    if (std::fwrite(chunk.data(), 1, n, out) != n) return io_failure(tmp, "write failed");
  }
  return {};
}

std::string shard_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

// Leftovers of an earlier save into the same directory would make the checkpoint ambiguous
// (model.safetensors shadows an index), so the files of the previous layout go.
void remove_stale_files(const std::filesystem::path& dir,
                        const std::vector<std::filesystem::path>& written) {
  static const std::regex shard_pattern(R"(model-\d{5}-of-\d{5}\.safetensors)");
  std::set<std::filesystem::path> keep(written.begin(), written.end());
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    auto name = entry.path().filename().string();
    bool ours = name == "model.safetensors" || name == "model.safetensors.index.json" ||
                std::regex_match(name, shard_pattern);
    if (ours && keep.find(entry.path()) == keep.end()) std::filesystem::remove(entry.path(), ec);
  }
}

}  // namespace

uint64_t tensor_to_write::size_bytes() const noexcept {
  uint64_t n = kernels::dtype_bytes(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

caf::expected<void> save_safetensors(const std::filesystem::path& file,
                                     std::span<const tensor_to_write> tensors,
                                     const safetensors_metadata& metadata,
                                     progress_bar* progress) {
  auto header = build_header(file, tensors, metadata);
  if (!header) return header.error();
  temp_file_guard tmp{file.string() + ".tmp"};
  file_ptr out(std::fopen(tmp.path.c_str(), "wb"));
  if (!out) return io_failure(tmp.path, "cannot open for writing");
  const uint64_t header_bytes = header->size();
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(header_bytes >> (8 * i));
  if (std::fwrite(length, 1, 8, out.get()) != 8 ||
      std::fwrite(header->data(), 1, header_bytes, out.get()) != header_bytes) {
    return io_failure(tmp.path, "write failed");
  }
  std::vector<std::byte> buffer;
  for (const auto& t : tensors) {
    if (auto ok = write_tensor(out.get(), tmp.path, t, buffer); !ok) return ok;
    if (progress != nullptr) progress->advance(t.size_bytes());
  }
  if (std::fclose(out.release()) != 0) return io_failure(tmp.path, "close failed");
  std::error_code ec;
  std::filesystem::rename(tmp.path, file, ec);
  if (ec) {
    return make_error(model_errc::io_error,
                      file.string() + ": cannot rename from " + tmp.path.string() + ": " +
                          ec.message());
  }
  tmp.keep = true;
  return {};
}

caf::expected<std::vector<std::filesystem::path>> save_sharded_safetensors(
    const std::filesystem::path& dir, std::span<const tensor_to_write> tensors,
    const shard_options& options) {
  std::vector<std::pair<size_t, size_t>> shards;  // [first, last) tensor indices
  uint64_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = tensors[i].size_bytes();
    if (shards.empty() || (shard_bytes > 0 && shard_bytes + n > options.max_shard_bytes)) {
      shards.emplace_back(i, i);
      shard_bytes = 0;
    }
    shards.back().second = i + 1;
    shard_bytes += n;
    total_bytes += n;
  }
  std::vector<std::filesystem::path> written;
  if (shards.size() <= 1) {
    auto file = dir / "model.safetensors";
    if (auto ok = save_safetensors(file, tensors, options.metadata, options.progress); !ok) {
      return ok.error();
    }
    written.push_back(file);
    remove_stale_files(dir, written);
    return written;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    auto name = shard_name(s, shards.size());
    auto part = tensors.subspan(shards[s].first, shards[s].second - shards[s].first);
    if (auto ok = save_safetensors(dir / name, part, options.metadata, options.progress); !ok) {
      return ok.error();
    }
    for (const auto& t : part) weight_map[t.name] = name;
    written.push_back(dir / name);
  }
  nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                          {"weight_map", weight_map}};
  std::string text = index.dump(2) + "\n";
  auto index_path = dir / "model.safetensors.index.json";
  temp_file_guard tmp{index_path.string() + ".tmp"};
  {
    file_ptr out(std::fopen(tmp.path.c_str(), "wb"));
    if (!out) return io_failure(tmp.path, "cannot open for writing");
    if (std::fwrite(text.data(), 1, text.size(), out.get()) != text.size()) {
      return io_failure(tmp.path, "write failed");
    }
    if (std::fclose(out.release()) != 0) return io_failure(tmp.path, "close failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp.path, index_path, ec);
  if (ec) return make_error(model_errc::io_error, index_path.string() + ": " + ec.message());
  tmp.keep = true;
  written.push_back(index_path);
  remove_stale_files(dir, written);
  return written;
}

}  // namespace moe::model
