#include "model/json_reader.hpp"

#include <cmath>
#include <limits>

namespace moe::model {

parsed_json parse_json_file_text(std::string_view text, const nlohmann::json::parser_callback_t& on_event) {
  parsed_json out;
  auto bounded = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    const bool opens = event == nlohmann::json::parse_event_t::object_start ||
                       event == nlohmann::json::parse_event_t::array_start;
    if (opens && depth >= max_json_depth) {
      out.too_deep = true;
      return false;  // the parser skips the container instead of building it
    }
    return on_event ? on_event(depth, event, parsed) : true;
  };
  out.value = nlohmann::json::parse(text.begin(), text.end(), bounded, /*allow_exceptions=*/false);
  if (out.too_deep) out.value = nlohmann::json(nlohmann::json::value_t::discarded);
  return out;
}

json_object_reader::json_object_reader(const nlohmann::json& object, std::string source,
                                       std::string path_prefix, model_errc code)
    : object_(object),
      source_(std::move(source)),
      path_prefix_(std::move(path_prefix)),
      code_(code) {}

bool json_object_reader::has(std::string_view key) const {
  return object_.is_object() && object_.find(key) != object_.end();
}

bool json_object_reader::has_non_null(std::string_view key) const {
  if (!object_.is_object()) return false;
  auto it = object_.find(key);
  return it != object_.end() && !it->is_null();
}

const nlohmann::json* json_object_reader::find(std::string_view key) {
  if (!object_.is_object()) return nullptr;
  auto it = object_.find(key);
  if (it == object_.end()) return nullptr;
  read_.emplace(key);
  return &*it;
}

const nlohmann::json* json_object_reader::find_non_null(std::string_view key) {
  const nlohmann::json* v = find(key);
  return v != nullptr && !v->is_null() ? v : nullptr;
}

std::string json_object_reader::describe(const nlohmann::json& value) {
  // Long values (a whole nested object) would swamp the message; the key already locates it.
  std::string text = value.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  switch (value.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::boolean: return "boolean " + text;
    case nlohmann::json::value_t::string: return "string " + text;
    case nlohmann::json::value_t::array: return "array " + text;
    case nlohmann::json::value_t::object: return "object " + text;
    default: return "number " + text;
  }
}

void json_object_reader::fail(std::string_view key, const std::string& message) {
  if (error_) return;
  std::string where = source_ + ": " + path_prefix_;
  where.append(key);
  error_ = make_error(code_, where + ": " + message);
}

void json_object_reader::absorb(const json_object_reader& nested) {
  if (!error_ && nested.error_) error_ = nested.error_;
}

std::optional<int64_t> json_object_reader::as_integer(std::string_view key,
                                                      const nlohmann::json& v) {
  if (v.is_number_unsigned()) {
    auto u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(u);
    }
  } else if (v.is_number_integer()) {
    return v.get<int64_t>();
  } else if (v.is_number_float()) {
    // Some writers emit 4096.0 for an integer; accept it only when nothing is lost.
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
      return static_cast<int64_t>(d);
    }
  }
  fail(key, "expected an integer, got " + describe(v));
  return std::nullopt;
}

std::optional<double> json_object_reader::as_number(std::string_view key,
                                                    const nlohmann::json& v) {
  if (v.is_number()) return v.get<double>();
  fail(key, "expected a number, got " + describe(v));
  return std::nullopt;
}

int64_t json_object_reader::integer(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) {
    fail(key, has(key) ? "is null, expected an integer" : "missing");
    return 0;
  }
  return as_integer(key, *v).value_or(0);
}

double json_object_reader::number(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) {
    fail(key, has(key) ? "is null, expected a number" : "missing");
    return 0.0;
  }
  return as_number(key, *v).value_or(0.0);
}

bool json_object_reader::boolean(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) {
    fail(key, has(key) ? "is null, expected true or false" : "missing");
    return false;
  }
  if (!v->is_boolean()) {
    fail(key, "expected true or false, got " + describe(*v));
    return false;
  }
  return v->get<bool>();
}

std::string json_object_reader::string(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) {
    fail(key, has(key) ? "is null, expected a string" : "missing");
    return {};
  }
  if (!v->is_string()) {
    fail(key, "expected a string, got " + describe(*v));
    return {};
  }
  return v->get<std::string>();
}

int64_t json_object_reader::integer_or(std::string_view key, int64_t fallback) {
  return optional_integer(key).value_or(fallback);
}

double json_object_reader::number_or(std::string_view key, double fallback) {
  return optional_number(key).value_or(fallback);
}

bool json_object_reader::boolean_or(std::string_view key, bool fallback) {
  if (has_non_null(key)) return boolean(key);
  skip(key);
  return fallback;
}

std::string json_object_reader::string_or(std::string_view key, std::string fallback) {
  if (has_non_null(key)) return string(key);
  skip(key);
  return fallback;
}

std::optional<int64_t> json_object_reader::optional_integer(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) return std::nullopt;
  auto out = as_integer(key, *v);
  return out ? out : std::optional<int64_t>{0};
}

std::optional<double> json_object_reader::optional_number(std::string_view key) {
  const nlohmann::json* v = find_non_null(key);
  if (v == nullptr) return std::nullopt;
  auto out = as_number(key, *v);
  return out ? out : std::optional<double>{0.0};
}

const nlohmann::json* json_object_reader::child(std::string_view key) { return find(key); }

void json_object_reader::skip(std::string_view key) {
  if (has(key)) read_.emplace(key);
}

std::vector<std::string> json_object_reader::unread_keys() const {
  std::vector<std::string> out;
  if (!object_.is_object()) return out;
  for (auto it = object_.begin(); it != object_.end(); ++it) {
    if (read_.find(it.key()) == read_.end()) out.push_back(it.key());
  }
  return out;
}

}  // namespace moe::model
