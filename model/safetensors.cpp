#include "model/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/json_reader.hpp"
#include "model/model_errc.hpp"

namespace moe::model {

namespace {

// Valid in the safetensors spec but without a kernels::dtype: reported as unsupported, which
// tells the user the file is fine and this runtime is the limit.
constexpr std::string_view spec_only_dtypes[] = {"BOOL", "U16",     "U32",     "U64",
                                                 "I8",   "I16",     "F64",     "F8_E5M2",
                                                 "C64",  "F8_E8M0", "F6_E2M3", "F6_E3M2",
                                                 "F4"};

caf::error bad_file(const std::string& source, const std::string& message) {
  return make_error(model_errc::bad_checkpoint, source + ": " + message);
}

caf::error bad_tensor_entry(const std::string& source, const std::string& name,
                            const std::string& message) {
  return bad_file(source, "tensor '" + name + "': " + message);
}

std::string range_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + ")";
}

caf::expected<safetensors_entry> parse_entry(const std::string& source, const std::string& name,
                                             const nlohmann::json& v, uint64_t data_bytes) {
  if (!v.is_object()) {
    return bad_tensor_entry(source, name, "expected an object, got " +
                                              json_object_reader::describe(v));
  }
  safetensors_entry e;
  e.name = name;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
      return bad_tensor_entry(source, name, "unknown key '" + it.key() + "'");
    }
  }
  auto dtype_it = v.find("dtype");
  if (dtype_it == v.end() || !dtype_it->is_string()) {
    return bad_tensor_entry(source, name, "dtype: missing or not a string");
  }
  auto dtype_name = dtype_it->get<std::string>();
  auto dtype = kernels::dtype_from_safetensors(dtype_name);
  if (!dtype) {
    bool in_spec = std::find(std::begin(spec_only_dtypes), std::end(spec_only_dtypes),
                             dtype_name) != std::end(spec_only_dtypes);
    return bad_tensor_entry(source, name,
                            (in_spec ? "unsupported dtype '" : "unknown dtype '") + dtype_name +
                                "'");
  }
  e.dtype = *dtype;
  auto shape_it = v.find("shape");
  if (shape_it == v.end() || !shape_it->is_array()) {
    return bad_tensor_entry(source, name, "shape: missing or not a list");
  }
  uint64_t num_bytes = kernels::dtype_bytes(e.dtype);
  bool overflow = false;
  for (const auto& d : *shape_it) {
    if (!d.is_number_unsigned()) {
      return bad_tensor_entry(source, name, "shape " + shape_it->dump() +
                                                ": expected non-negative integers");
    }
    auto extent = d.get<uint64_t>();
    if (extent > static_cast<uint64_t>(INT64_MAX)) overflow = true;
    e.shape.push_back(static_cast<int64_t>(extent));
    overflow = overflow || __builtin_mul_overflow(num_bytes, extent, &num_bytes);
  }
  if (overflow) return bad_tensor_entry(source, name, "shape " + shape_it->dump() + " overflows");
  auto offsets_it = v.find("data_offsets");
  if (offsets_it == v.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    return bad_tensor_entry(source, name, "data_offsets: expected [begin, end]");
  }
  e.begin = (*offsets_it)[0].get<uint64_t>();
  e.end = (*offsets_it)[1].get<uint64_t>();
  if (e.begin > e.end) {
    return bad_tensor_entry(source, name, "data_offsets " + offsets_it->dump() + " are reversed");
  }
  if (e.end > data_bytes) {
    return bad_tensor_entry(source, name, "data_offsets " + offsets_it->dump() +
                                              " are out of range: the data section holds " +
                                              std::to_string(data_bytes) + " bytes");
  }
  if (e.end - e.begin != num_bytes) {
    return bad_tensor_entry(source, name,
                            "data_offsets " + offsets_it->dump() + " span " +
                                std::to_string(e.end - e.begin) + " bytes, but " + dtype_name +
                                " " + shape_string(e.shape) + " needs " +
                                std::to_string(num_bytes));
  }
  return e;
}

}  // namespace

std::string shape_string(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t tensor_view::num_elements() const noexcept {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

caf::expected<safetensors_header> parse_safetensors_header(std::span<const std::byte> bytes,
                                                           const std::string& source) {
  if (bytes.size() < 8) {
    return bad_file(source, "truncated: " + std::to_string(bytes.size()) +
                                " bytes, shorter than the 8-byte header length");
  }
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes.data(), 8);  // little-endian, asserted in dequantize.cpp
  if (header_bytes > bytes.size() - 8) {
    return bad_file(source, "header length " + std::to_string(header_bytes) + " exceeds the " +
                                std::to_string(bytes.size() - 8) +
                                " bytes after it (truncated, or not a safetensors file)");
  }
  const char* text = reinterpret_cast<const char*>(bytes.data()) + 8;
  // nlohmann keeps the last of duplicate keys; a duplicate tensor name is a broken file.
  std::set<std::string, std::less<>> seen;
  std::string duplicate;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 &&
        !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  parsed_json parsed = parse_json_file_text(std::string_view(text, header_bytes), on_event);
  if (parsed.too_deep) {
    return bad_file(source, "header nests deeper than " + std::to_string(max_json_depth) + " levels");
  }
  if (!parsed.ok()) return bad_file(source, "header is not valid JSON");
  const nlohmann::json& header = parsed.value;
  if (!header.is_object()) return bad_file(source, "header is not a JSON object");
  if (!duplicate.empty()) return bad_file(source, "tensor '" + duplicate + "' appears twice");

  safetensors_header out;
  out.data_offset = 8 + header_bytes;
  const uint64_t data_bytes = bytes.size() - out.data_offset;
  // nlohmann::json objects are std::maps: iteration is by name, so out.tensors comes sorted.
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return bad_file(source, "__metadata__: expected an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return bad_file(source, "__metadata__." + m.key() + ": expected a string, got " +
                                      json_object_reader::describe(*m));
        }
        out.metadata.emplace(m.key(), m->get<std::string>());
      }
      continue;
    }
    auto entry = parse_entry(source, it.key(), *it, data_bytes);
    if (!entry) return entry.error();
    out.tensors.push_back(std::move(*entry));
  }
  // The spec requires the data section to be covered exactly: no overlaps, no holes, no tail.
  std::vector<const safetensors_entry*> by_offset;
  for (const auto& e : out.tensors) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  const safetensors_entry* previous = nullptr;
  for (const auto* e : by_offset) {
    if (e->begin < covered) {
      return bad_file(source, "tensors '" + previous->name + "' " +
                                  range_string(previous->begin, previous->end) + " and '" +
                                  e->name + "' " + range_string(e->begin, e->end) + " overlap");
    }
    if (e->begin > covered) {
      return bad_file(source, "bytes " + range_string(covered, e->begin) +
                                  " of the data section belong to no tensor (before '" +
                                  e->name + "')");
    }
    covered = e->end;
    previous = e;
  }
  if (covered != data_bytes) {
    return bad_file(source, "bytes " + range_string(covered, data_bytes) +
                                " of the data section belong to no tensor (trailing data)");
  }
  return out;
}

caf::expected<safetensors_file> safetensors_file::open(const std::filesystem::path& file) {
  auto mapped = mapped_file::open(file);
  if (!mapped) return mapped.error();
  auto header = parse_safetensors_header(mapped->bytes(), file.string());
  if (!header) return header.error();
  safetensors_file out;
  out.file_ = std::move(*mapped);
  out.metadata_ = std::move(header->metadata);
  auto data = out.file_.bytes().subspan(header->data_offset);
  out.tensors_.reserve(header->tensors.size());
  for (auto& e : header->tensors) {
    out.tensors_.push_back(tensor_view{std::move(e.name), e.dtype, std::move(e.shape),
                                       data.subspan(e.begin, e.end - e.begin)});
  }
  return out;
}

const tensor_view* safetensors_file::find(std::string_view name) const noexcept {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const tensor_view& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

namespace {

constexpr std::string_view single_file_name = "model.safetensors";
constexpr std::string_view index_file_name = "model.safetensors.index.json";

caf::expected<nlohmann::json> read_json_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return make_error(model_errc::io_error, file.string() + ": cannot open for reading");
  std::ostringstream text;
  text << in.rdbuf();
  parsed_json parsed = parse_json_file_text(text.str());
  if (parsed.too_deep) {
    return bad_file(file.string(), "nests deeper than " + std::to_string(max_json_depth) + " levels");
  }
  if (!parsed.ok()) return bad_file(file.string(), "not valid JSON");
  return std::move(parsed.value);
}

// Shard names come from a file we did not write: keep them inside the checkpoint directory.
bool is_plain_relative(const std::filesystem::path& p) {
  if (p.empty() || p.is_absolute()) return false;
  return std::none_of(p.begin(), p.end(), [](const auto& part) { return part == ".."; });
}

}  // namespace

caf::expected<void> safetensors_set::add(safetensors_file file) {
  size_t file_index = files_.size();
  files_.push_back(std::move(file));
  const safetensors_file& f = files_.back();
  for (const auto& t : f.tensors()) {
    auto [it, inserted] = index_.emplace(t.name, located{&t, file_index});
    if (!inserted) {
      return bad_file(f.path().string(), "tensor '" + t.name + "' is also in " +
                                             files_[it->second.file].path().string());
    }
  }
  return {};
}

caf::expected<safetensors_set> safetensors_set::open(const std::filesystem::path& dir_or_file) {
  std::error_code ec;
  std::filesystem::path index_path;
  std::filesystem::path single_path;
  if (std::filesystem::is_directory(dir_or_file, ec)) {
    if (std::filesystem::exists(dir_or_file / single_file_name, ec)) {
      single_path = dir_or_file / single_file_name;
    } else if (std::filesystem::exists(dir_or_file / index_file_name, ec)) {
      index_path = dir_or_file / index_file_name;
    } else {
      return make_error(model_errc::io_error,
                        dir_or_file.string() + ": holds neither " + std::string(single_file_name) +
                            " nor " + std::string(index_file_name));
    }
  } else if (dir_or_file.extension() == ".json") {
    index_path = dir_or_file;
  } else {
    single_path = dir_or_file;
  }

  safetensors_set out;
  if (!single_path.empty()) {
    auto file = safetensors_file::open(single_path);
    if (!file) return file.error();
    if (auto ok = out.add(std::move(*file)); !ok) return ok.error();
    return out;
  }

  auto index = read_json_file(index_path);
  if (!index) return index.error();
  const std::string source = index_path.string();
  if (!index->is_object()) return bad_file(source, "expected a JSON object");
  auto map_it = index->find("weight_map");
  if (map_it == index->end() || !map_it->is_object()) {
    return bad_file(source, "weight_map: missing or not an object");
  }
  std::map<std::string, std::string> weight_map;
  std::set<std::string> shard_names;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it->is_string() || !is_plain_relative(it->get<std::string>())) {
      return bad_file(source, "weight_map." + it.key() +
                                  ": expected a shard file name inside the directory, got " +
                                  json_object_reader::describe(*it));
    }
    weight_map.emplace(it.key(), it->get<std::string>());
    shard_names.insert(it->get<std::string>());
  }
  const std::filesystem::path dir = index_path.parent_path();
  for (const auto& shard : shard_names) {
    auto file = safetensors_file::open(dir / shard);
    if (!file) return file.error();
    if (auto ok = out.add(std::move(*file)); !ok) return ok.error();
  }
  for (const auto& [name, shard] : weight_map) {
    auto it = out.index_.find(name);
    if (it == out.index_.end() || out.files_[it->second.file].path() != dir / shard) {
      return bad_file(source, "weight_map." + name + ": shard " + shard +
                                  " does not hold this tensor");
    }
  }
  for (const auto& [name, where] : out.index_) {
    if (weight_map.find(name) == weight_map.end()) {
      return bad_file(source, "tensor '" + name + "' in " +
                                  out.files_[where.file].path().string() +
                                  " is missing from weight_map");
    }
  }
  return out;
}

const tensor_view* safetensors_set::find(std::string_view name) const noexcept {
  auto it = index_.find(name);
  return it != index_.end() ? it->second.view : nullptr;
}

const std::filesystem::path& safetensors_set::file_of(std::string_view name) const {
  auto it = index_.find(name);
  return files_[it->second.file].path();
}

std::vector<std::string_view> safetensors_set::names() const {
  std::vector<std::string_view> out;
  out.reserve(index_.size());
  for (const auto& [name, where] : index_) out.push_back(name);
  return out;
}

}  // namespace moe::model
