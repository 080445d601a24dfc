// Typed, error-collecting access to one JSON object, for the parsers of config.json, safetensors
// headers and shard indexes.
//
// A parser reads a whole object in straight-line code (`c.vocab_size = r.integer("vocab_size")`)
// and checks `r.error()` once at the end: the reader keeps the first failure, with a message that
// names the source and the key path ("config.json: rope_scaling.factor: expected a number, got
// string \"x\""), and remembers which keys were read so unread ones can be reported.
// Null counts as absent for the *_or / optional_* accessors (the hub writes null for "default"),
// and as missing for the required ones.
//
// Thread safety: a reader is confined to one thread; it borrows `object`, which must outlive it.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model_errc.hpp"

namespace moe::model {

/// Nesting deeper than this is refused in JSON from files (config.json, safetensors headers and
/// indexes, training state; theirs is at most 3). nlohmann's parser is iterative, but dump(),
/// copies and comparisons of what it returns recurse once per level: a few hundred KiB of
/// brackets would overflow the stack of the process that reports the file as malformed.
inline constexpr int max_json_depth = 64;

/// The outcome of parse_json_file_text: a value, or why there is none.
struct parsed_json {
  nlohmann::json value;       ///< Discarded unless ok().
  bool too_deep = false;      ///< Valid JSON until it nested deeper than max_json_depth.
  [[nodiscard]] bool ok() const noexcept { return !value.is_discarded(); }
};

/// Parses JSON text from a file, never throwing: discarded when it is not JSON or nests deeper
/// than max_json_depth. `on_event`, when given, sees the parse events as nlohmann's parser
/// callback does (and may discard values the same way).
[[nodiscard]] parsed_json parse_json_file_text(
    std::string_view text, const nlohmann::json::parser_callback_t& on_event = nullptr);

class json_object_reader {
 public:
  /// `source` names the file ("config.json"), `path_prefix` the enclosing key path with its
  /// trailing dot ("rope_scaling."), `code` the error code every failure carries.
  json_object_reader(const nlohmann::json& object, std::string source, std::string path_prefix,
                     model_errc code);

  [[nodiscard]] bool has(std::string_view key) const;
  [[nodiscard]] bool has_non_null(std::string_view key) const;

  /// Required values: a failure records an error and returns a zero value.
  int64_t integer(std::string_view key);
  double number(std::string_view key);
  bool boolean(std::string_view key);
  std::string string(std::string_view key);

  /// Absent or null -> `fallback`.
  int64_t integer_or(std::string_view key, int64_t fallback);
  double number_or(std::string_view key, double fallback);
  bool boolean_or(std::string_view key, bool fallback);
  std::string string_or(std::string_view key, std::string fallback);

  /// Absent or null -> nullopt.
  std::optional<int64_t> optional_integer(std::string_view key);
  std::optional<double> optional_number(std::string_view key);

  /// The raw value (nullptr when absent); marks the key read.
  const nlohmann::json* child(std::string_view key);

  /// Marks a key read without looking at its value (known keys with no effect).
  void skip(std::string_view key);

  /// Records "source: prefix.key: message" unless an earlier failure is already kept.
  void fail(std::string_view key, const std::string& message);

  /// Keeps `nested`'s failure (a reader of a child object) unless one is already kept.
  void absorb(const json_object_reader& nested);

  /// Keys of the object that no accessor has read, sorted.
  [[nodiscard]] std::vector<std::string> unread_keys() const;

  [[nodiscard]] bool ok() const noexcept { return !error_; }
  [[nodiscard]] const caf::error& error() const noexcept { return error_; }
  [[nodiscard]] const std::string& source() const noexcept { return source_; }
  [[nodiscard]] const std::string& path_prefix() const noexcept { return path_prefix_; }

  /// "string \"abc\"", "number 3", "null", ... for messages.
  [[nodiscard]] static std::string describe(const nlohmann::json& value);

 private:
  const nlohmann::json* find(std::string_view key);
  const nlohmann::json* find_non_null(std::string_view key);
  std::optional<int64_t> as_integer(std::string_view key, const nlohmann::json& v);
  std::optional<double> as_number(std::string_view key, const nlohmann::json& v);

  const nlohmann::json& object_;
  std::string source_;
  std::string path_prefix_;
  model_errc code_;
  std::set<std::string, std::less<>> read_;
  caf::error error_;
};

}  // namespace moe::model
