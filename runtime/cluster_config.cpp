#include "runtime/cluster_config.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <set>
#include <memory>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

namespace moe::runtime {

const char* to_string(cluster_config_errc e) noexcept {
  switch (e) {
    case cluster_config_errc::bad_config: return "bad_config";
    case cluster_config_errc::io_error: return "io_error";
  }
  return "unknown";
}

caf::error make_error(cluster_config_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("clustercfg"),
                    caf::make_message(std::move(text))};
}

namespace {

constexpr const char* redacted = "<redacted>";

// ---- the parse context: records the first error, in "source:line: field: what" form ----

struct context {
  std::string source;
  std::optional<std::string> error;

  bool fail(int line, const std::string& field, const std::string& what) {
    if (error) return false;
    std::string at = line > 0 ? source + ":" + std::to_string(line) : source;
    error = at + ": " + (field.empty() ? what : field + ": " + what);
    return false;
  }
};

// yaml-cpp marks are 0-based; a null value (`key:` with nothing after it) may carry no mark.
int line_of(const YAML::Node& node) {
  const YAML::Mark m = node.Mark();
  return m.is_null() ? 0 : m.line + 1;
}

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar: return "'" + node.Scalar() + "'";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Null: return "nothing";
    case YAML::NodeType::Undefined: return "nothing";
  }
  return "nothing";
}

std::string join_path(const std::string& prefix, std::string_view key) {
  return prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
}

/// A value in the file: the node, its field path, and the line of its key (of its item in a list).
struct value_ref {
  YAML::Node node;
  std::string field;
  int line = 0;
};

/// A YAML mapping whose keys are checked against the schema: unknown and duplicate keys are
/// errors naming the key's line.
class mapping {
 public:
  mapping(context& ctx, const value_ref& at, std::initializer_list<std::string_view> keys)
      : ctx_(ctx), at_(at) {
    if (!at.node.IsMap()) {
      ok_ = ctx.fail(at.line, at.field, "expected a mapping, got " + describe(at.node));
      return;
    }
    std::set<std::string> seen;
    for (const auto& kv : at.node) {
      const std::string key = kv.first.IsScalar() ? kv.first.Scalar() : std::string{};
      const int key_line = line_of(kv.first);
      const std::string field = join_path(at.field, key);
      if (key.empty() || std::find(keys.begin(), keys.end(), key) == keys.end()) {
        ok_ = ctx.fail(key_line, kv.first.IsScalar() ? field : at.field,
                       kv.first.IsScalar() ? "unknown key" : "expected a key name");
        return;
      }
      if (!seen.insert(key).second) {
        ok_ = ctx.fail(key_line, field, "duplicate key");
        return;
      }
      // The key's line: a block mapping or list as value starts on the next line, and a null
      // value has no mark; people look for the key.
      entries_.push_back({kv.second, field, key_line});
    }
  }

  [[nodiscard]] bool ok() const noexcept { return ok_; }
  [[nodiscard]] const value_ref& where() const noexcept { return at_; }

  /// The value of `key`, or nullptr when absent.
  [[nodiscard]] const value_ref* find(std::string_view key) const {
    const std::string field = join_path(at_.field, key);
    for (const auto& e : entries_) {
      if (e.field == field) return &e;
    }
    return nullptr;
  }

  /// The value of a required key; records "required" at the mapping's line when absent.
  [[nodiscard]] const value_ref* require(std::string_view key, std::string_view hint) {
    const value_ref* v = find(key);
    if (v == nullptr) ctx_.fail(at_.line, join_path(at_.field, key), "required (" + std::string(hint) + ")");
    return v;
  }

 private:
  context& ctx_;
  value_ref at_;
  std::vector<value_ref> entries_;
  bool ok_ = true;
};

std::optional<int64_t> to_int(const std::string& text) {
  int64_t v = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first != last && *first == '+') ++first;
  auto [ptr, ec] = std::from_chars(first, last, v);
  if (ec != std::errc{} || ptr != last || first == last) return std::nullopt;
  return v;
}

// `max` of INT32_MAX or more is a sanity cap, not part of the schema: the message states `min`.
bool read_int(context& ctx, const value_ref& v, int64_t min, int64_t max, int64_t& out) {
  const bool capped = max >= INT32_MAX;
  std::string expected;
  if (min == 0 && capped) {
    expected = "expected a non-negative integer";
  } else if (capped) {
    expected = "expected an integer >= " + std::to_string(min);
  } else {
    expected = "expected an integer in " + std::to_string(min) + ".." + std::to_string(max);
  }
  if (!v.node.IsScalar()) return ctx.fail(v.line, v.field, expected + ", got " + describe(v.node));
  const auto parsed = to_int(v.node.Scalar());
  if (!parsed || *parsed < min) return ctx.fail(v.line, v.field, expected + ", got " + describe(v.node));
  if (*parsed > max) {
    return ctx.fail(v.line, v.field,
                    expected + ", got " + describe(v.node) + (capped ? " (at most " + std::to_string(max) + ")" : ""));
  }
  out = *parsed;
  return true;
}

bool read_string(context& ctx, const value_ref& v, std::string& out) {
  if (!v.node.IsScalar() || v.node.Scalar().empty()) {
    return ctx.fail(v.line, v.field, "expected a non-empty string, got " + describe(v.node));
  }
  out = v.node.Scalar();
  return true;
}

bool read_size(context& ctx, const value_ref& v, uint64_t& out) {
  const auto size = v.node.IsScalar() ? parse_size(v.node.Scalar()) : std::nullopt;
  if (!size) {
    return ctx.fail(v.line, v.field,
                    "expected a size like 8GiB, 512MiB or a byte count, got " + describe(v.node));
  }
  out = *size;
  return true;
}

bool valid_node_name(const std::string& name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
  });
}

// ---- sections ----

bool parse_tls(context& ctx, const value_ref& at, tls_config& out) {
  mapping m(ctx, at, {"certificate", "key", "ca_file", "passphrase"});
  if (!m.ok()) return false;
  out.line = at.line;
  const std::tuple<std::string_view, std::string_view, std::filesystem::path*, int*> paths[] = {
      {"certificate", "a PEM file with this node's certificate", &out.certificate, &out.certificate_line},
      {"key", "a PEM file with the certificate's private key", &out.key, &out.key_line},
      {"ca_file", "a PEM file with the CA certificate that signed every node's certificate", &out.ca_file,
       &out.ca_file_line},
  };
  for (const auto& [key, hint, target, line] : paths) {
    const value_ref* v = m.require(key, hint);
    std::string text;
    if (v == nullptr || !read_string(ctx, *v, text)) return false;
    *target = text;
    *line = v->line;
  }
  if (const value_ref* v = m.find("passphrase")) {
    // Never echo the value, as for the secret.
    if (!v->node.IsScalar() || v->node.Scalar().empty()) return ctx.fail(v->line, v->field, "expected a non-empty string");
    out.passphrase = v->node.Scalar();
  }
  return true;
}

// api.tls: as cluster.tls, but the server's own certificate and key, and an optional CA for
// client certificates instead of the peers' CA.
bool parse_api_tls(context& ctx, const value_ref& at, api_tls_config& out) {
  mapping m(ctx, at, {"certificate", "key", "client_ca_file", "passphrase"});
  if (!m.ok()) return false;
  out.line = at.line;
  const std::tuple<std::string_view, std::string_view, std::filesystem::path*, int*> paths[] = {
      {"certificate", "a PEM file with the API server's certificate", &out.certificate, &out.certificate_line},
      {"key", "a PEM file with the certificate's private key", &out.key, &out.key_line},
  };
  for (const auto& [key, hint, target, line] : paths) {
    const value_ref* v = m.require(key, hint);
    std::string text;
    if (v == nullptr || !read_string(ctx, *v, text)) return false;
    *target = text;
    *line = v->line;
  }
  if (const value_ref* v = m.find("client_ca_file")) {
    std::string text;
    if (!read_string(ctx, *v, text)) return false;
    out.client_ca_file = text;
    out.client_ca_file_line = v->line;
  }
  if (const value_ref* v = m.find("passphrase")) {
    // Never echo the value, as for the secret.
    if (!v->node.IsScalar() || v->node.Scalar().empty()) return ctx.fail(v->line, v->field, "expected a non-empty string");
    out.passphrase = v->node.Scalar();
  }
  return true;
}

bool parse_api(context& ctx, const value_ref& at, cluster_config& out) {
  mapping m(ctx, at, {"tls"});
  if (!m.ok()) return false;
  if (const value_ref* v = m.find("tls")) {
    out.api_tls.emplace();
    if (!parse_api_tls(ctx, *v, *out.api_tls)) return false;
  }
  return true;
}

bool parse_cluster(context& ctx, const value_ref& at, cluster_config& out) {
  mapping m(ctx, at, {"name", "secret", "heartbeat_interval_ms", "failure_timeout_ms", "tls"});
  if (!m.ok()) return false;
  if (const value_ref* v = m.find("heartbeat_interval_ms");
      v && !read_int(ctx, *v, 10, INT32_MAX, out.heartbeat_interval_ms)) {
    return false;
  }
  if (const value_ref* v = m.find("failure_timeout_ms")) {
    if (!read_int(ctx, *v, 10, INT32_MAX, out.failure_timeout_ms)) return false;
    if (out.failure_timeout_ms <= out.heartbeat_interval_ms) {
      return ctx.fail(v->line, v->field,
                      "must exceed cluster.heartbeat_interval_ms (" +
                          std::to_string(out.heartbeat_interval_ms) +
                          "): a node gets at least one heartbeat before it is declared down");
    }
  } else if (out.failure_timeout_ms <= out.heartbeat_interval_ms) {
    out.failure_timeout_ms = 6 * out.heartbeat_interval_ms;  // a long interval, default timeout
  }
  const value_ref* name = m.require("name", "a string naming the cluster");
  if (name == nullptr || !read_string(ctx, *name, out.name)) return false;
  const value_ref* secret = m.require("secret", "a non-empty shared secret every node presents");
  if (secret == nullptr) return false;
  if (!secret->node.IsScalar() || secret->node.Scalar().empty()) {
    // Never echo the value: a secret pasted into the wrong shape is still a secret.
    return ctx.fail(secret->line, secret->field, "expected a non-empty string");
  }
  out.secret = secret->node.Scalar();
  if (const value_ref* v = m.find("tls")) {
    out.tls.emplace();
    if (!parse_tls(ctx, *v, *out.tls)) return false;
  }
  return true;
}

bool parse_node(context& ctx, const value_ref& at, node_config& node) {
  mapping m(ctx, at, {"name", "host", "devices", "memory", "gpu_memory", "control_port", "metrics_port"});
  if (!m.ok()) return false;
  node.line = at.line;
  const value_ref* name = m.require("name", "a unique node name");
  if (name == nullptr || !read_string(ctx, *name, node.name)) return false;
  if (!valid_node_name(node.name)) {
    return ctx.fail(name->line, name->field,
                    "'" + node.name + "' may contain only letters, digits, '_', '-' and '.'");
  }
  if (const value_ref* host = m.find("host"); host && !read_string(ctx, *host, node.host)) return false;
  const std::pair<std::string_view, std::optional<uint16_t>*> ports[] = {
      {"control_port", &node.control_port}, {"metrics_port", &node.metrics_port}};
  for (const auto& [key, target] : ports) {
    int64_t port = 0;
    if (const value_ref* v = m.find(key)) {
      if (!read_int(ctx, *v, 0, 65535, port)) return false;
      *target = static_cast<uint16_t>(port);
    }
  }

  const value_ref* devices = m.require("devices", "gpus and/or cpu_slots");
  if (devices == nullptr) return false;
  mapping d(ctx, *devices, {"gpus", "cpu_slots"});
  if (!d.ok()) return false;
  if (const value_ref* g = d.find("gpus"); g && !read_int(ctx, *g, 0, INT64_MAX, node.gpus)) return false;
  if (const value_ref* c = d.find("cpu_slots"); c && !read_int(ctx, *c, 0, INT64_MAX, node.cpu_slots)) {
    return false;
  }
  if (node.gpus + node.cpu_slots == 0) {
    return ctx.fail(devices->line, devices->field, "at least one GPU or CPU slot is needed");
  }

  if (const value_ref* mem = m.find("memory")) {
    if (!read_size(ctx, *mem, node.memory_bytes)) return false;
  } else if (node.cpu_slots > 0) {
    return ctx.fail(at.line, join_path(at.field, "memory"),
                    "required when devices.cpu_slots > 0 (host memory, e.g. 8GiB)");
  }
  if (const value_ref* mem = m.find("gpu_memory")) {
    if (!read_size(ctx, *mem, node.gpu_memory_bytes)) return false;
  } else if (node.gpus > 0) {
    return ctx.fail(at.line, join_path(at.field, "gpu_memory"),
                    "required when devices.gpus > 0 (memory of each GPU, e.g. 80GiB)");
  }
  return true;
}

bool parse_nodes(context& ctx, const value_ref& at, std::vector<node_config>& out) {
  if (!at.node.IsSequence() || at.node.size() == 0) {
    return ctx.fail(at.line, at.field, "expected a non-empty list of nodes, got " + describe(at.node));
  }
  for (size_t i = 0; i < at.node.size(); ++i) {
    const YAML::Node item = at.node[i];
    const int line = line_of(item);
    node_config node;
    if (!parse_node(ctx, {item, at.field + "[" + std::to_string(i) + "]", line > 0 ? line : at.line},
                    node)) {
      return false;
    }
    for (size_t j = 0; j < out.size(); ++j) {
      if (out[j].name == node.name) {
        return ctx.fail(line, at.field + "[" + std::to_string(i) + "].name",
                        "duplicate node name '" + node.name + "' (also nodes[" + std::to_string(j) + "])");
      }
    }
    out.push_back(std::move(node));
  }
  return true;
}

bool parse_model(context& ctx, const value_ref& at, model_source& out) {
  mapping m(ctx, at, {"path", "preset", "seed"});
  if (!m.ok()) return false;
  const value_ref* path = m.find("path");
  const value_ref* preset = m.find("preset");
  if (path != nullptr && preset != nullptr) {
    const value_ref* later = path->line > preset->line ? path : preset;
    return ctx.fail(later->line, later->field, "give exactly one of model.path and model.preset, not both");
  }
  if (path == nullptr && preset == nullptr) {
    return ctx.fail(at.line, at.field, "give exactly one of path (a checkpoint directory) and preset");
  }
  std::string text;
  if (path != nullptr) {
    if (!read_string(ctx, *path, text)) return false;
    out.path = text;
    out.line = path->line;
  } else {
    if (!read_string(ctx, *preset, out.preset)) return false;
    out.line = preset->line;
  }
  if (const value_ref* seed = m.find("seed")) {
    if (preset == nullptr) return ctx.fail(seed->line, seed->field, "only valid with model.preset");
    int64_t v = 0;
    if (!read_int(ctx, *seed, 0, INT64_MAX, v)) return false;
    out.seed = static_cast<uint64_t>(v);
  }
  return true;
}

// One expert id (5) or an inclusive range ("0-5") of a group's list.
bool parse_expert_item(context& ctx, const value_ref& item, std::vector<int64_t>& out) {
  const std::string expected = "expected an expert id (non-negative integer) or a range like \"0-5\"";
  if (!item.node.IsScalar()) return ctx.fail(item.line, item.field, expected + ", got " + describe(item.node));
  const std::string& text = item.node.Scalar();
  if (const auto id = to_int(text)) {
    if (*id < 0) return ctx.fail(item.line, item.field, expected + ", got " + describe(item.node));
    out.push_back(*id);
    return true;
  }
  const size_t dash = text.find('-', 1);
  const auto lo = dash == std::string::npos ? std::nullopt : to_int(text.substr(0, dash));
  const auto hi = dash == std::string::npos ? std::nullopt : to_int(text.substr(dash + 1));
  if (!lo || !hi || *lo < 0 || *hi < *lo || *hi - *lo > (int64_t{1} << 20)) {
    return ctx.fail(item.line, item.field, expected + ", got " + describe(item.node));
  }
  for (int64_t e = *lo; e <= *hi; ++e) out.push_back(e);
  return true;
}

bool parse_expert_lists(context& ctx, const value_ref& at, expert_groups_config& out) {
  if (!at.node.IsSequence() || at.node.size() == 0) {
    return ctx.fail(at.line, at.field, "expected a list with one list of expert ids per group, got " +
                                           describe(at.node));
  }
  for (size_t g = 0; g < at.node.size(); ++g) {
    const YAML::Node list = at.node[g];
    const std::string field = at.field + "[" + std::to_string(g) + "]";
    const int line = line_of(list) > 0 ? line_of(list) : at.line;
    if (!list.IsSequence() || list.size() == 0) {
      return ctx.fail(line, field, "expected a non-empty list of expert ids, got " + describe(list));
    }
    std::vector<int64_t> experts;
    for (size_t i = 0; i < list.size(); ++i) {
      const int item_line = line_of(list[i]);
      if (!parse_expert_item(ctx, {list[i], field + "[" + std::to_string(i) + "]", item_line > 0 ? item_line : line},
                             experts)) {
        return false;
      }
    }
    std::sort(experts.begin(), experts.end());
    if (auto dup = std::adjacent_find(experts.begin(), experts.end()); dup != experts.end()) {
      return ctx.fail(line, field, "expert " + std::to_string(*dup) +
                                       " listed twice (replicas go in different groups)");
    }
    out.experts.push_back(std::move(experts));
    out.experts_lines.push_back(line);
  }
  return true;
}

bool parse_expert_groups(context& ctx, const value_ref& at, expert_groups_config& out) {
  out.line = at.line;
  if (at.node.IsScalar()) return read_int(ctx, at, 1, INT32_MAX, out.count);
  if (!at.node.IsMap()) {
    return ctx.fail(at.line, at.field,
                    "expected an integer >= 1 or a mapping {count, experts}, got " + describe(at.node));
  }
  mapping m(ctx, at, {"count", "experts"});
  if (!m.ok()) return false;
  const value_ref* count = m.find("count");
  const value_ref* experts = m.find("experts");
  if (count == nullptr && experts == nullptr) {
    return ctx.fail(at.line, join_path(at.field, "count"), "required (the number of expert groups)");
  }
  if (count != nullptr && !read_int(ctx, *count, 1, INT32_MAX, out.count)) return false;
  if (experts == nullptr) return true;
  if (!parse_expert_lists(ctx, *experts, out)) return false;
  const auto num_lists = static_cast<int64_t>(out.experts.size());
  if (count == nullptr) {
    out.count = num_lists;
  } else if (out.count != num_lists) {
    return ctx.fail(experts->line, experts->field,
                    std::to_string(num_lists) + " lists but count is " + std::to_string(out.count) +
                        " (one list per group)");
  }
  return true;
}

bool parse_batching(context& ctx, const value_ref& at, batching_config& out) {
  mapping m(ctx, at,
            {"max_running_requests", "max_batch_tokens", "max_queue", "max_new_tokens_limit", "request_timeout_ms"});
  if (!m.ok()) return false;
  const std::pair<std::string_view, int64_t*> fields[] = {
      {"max_running_requests", &out.max_running_requests},
      {"max_batch_tokens", &out.max_batch_tokens},
      {"max_queue", &out.max_queue},
      {"max_new_tokens_limit", &out.max_new_tokens_limit},
  };
  for (const auto& [key, target] : fields) {
    if (const value_ref* v = m.find(key); v && !read_int(ctx, *v, 1, INT32_MAX, *target)) return false;
  }
  if (const value_ref* v = m.find("request_timeout_ms"); v && !read_int(ctx, *v, 0, INT32_MAX, out.request_timeout_ms))
    return false;
  return true;
}

bool parse_rebalancing(context& ctx, const value_ref& at, rebalancing_config& out) {
  out.line = at.line;
  mapping m(ctx, at, {"period_s", "load_window_steps", "max_moved_replicas", "min_improvement_pct"});
  if (!m.ok()) return false;
  if (const value_ref* v = m.find("period_s"); v && !read_int(ctx, *v, 0, INT32_MAX, out.period_s)) return false;
  if (const value_ref* v = m.find("load_window_steps"); v && !read_int(ctx, *v, 1, 1 << 20, out.load_window_steps))
    return false;
  if (const value_ref* v = m.find("max_moved_replicas"); v && !read_int(ctx, *v, 0, INT32_MAX, out.max_moved_replicas))
    return false;
  if (const value_ref* v = m.find("min_improvement_pct"); v && !read_int(ctx, *v, 0, 100, out.min_improvement_pct))
    return false;
  return true;
}

bool parse_training(context& ctx, const value_ref& at, training_config& out) {
  mapping m(ctx, at, {"snapshot_every_steps", "recovery_timeout_ms"});
  if (!m.ok()) return false;
  if (const value_ref* v = m.find("snapshot_every_steps"); v && !read_int(ctx, *v, 0, INT32_MAX, out.snapshot_every_steps))
    return false;
  if (const value_ref* v = m.find("recovery_timeout_ms"); v && !read_int(ctx, *v, 1000, INT32_MAX, out.recovery_timeout_ms))
    return false;
  return true;
}

bool parse_ports(context& ctx, const value_ref& at, ports_config& out) {
  mapping m(ctx, at, {"control", "api", "metrics"});
  if (!m.ok()) return false;
  const std::pair<std::string_view, uint16_t*> fields[] = {
      {"control", &out.control}, {"api", &out.api}, {"metrics", &out.metrics}};
  for (const auto& [key, target] : fields) {
    const value_ref* v = m.find(key);
    if (v == nullptr) continue;
    int64_t port = 0;
    if (!read_int(ctx, *v, 0, 65535, port)) return false;
    *target = static_cast<uint16_t>(port);
  }
  // Every node binds all three: two equal fixed ports would collide on every node.
  for (size_t i = 0; i < 3; ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (*fields[i].second == 0 || *fields[i].second != *fields[j].second) continue;
      const value_ref* a = m.find(fields[i].first);
      const value_ref* b = m.find(fields[j].first);
      // Blame the port written last in the file (at least one of the two was written).
      const bool blame_a = a != nullptr && (b == nullptr || a->line >= b->line);
      const value_ref* blamed = blame_a ? a : b;
      const auto& other = blame_a ? fields[j] : fields[i];
      const bool other_default = (blame_a ? b : a) == nullptr;
      return ctx.fail(blamed->line, blamed->field,
                      std::to_string(*other.second) + " is also ports." + std::string(other.first) +
                          (other_default ? " (its default)" : "") + "; 0 asks for an ephemeral port");
    }
  }
  return true;
}

// Two node processes on one host cannot bind the same port, nor may one take the controller's
// API or metrics port (the controller may run on any node's host). Ephemeral (0) never collides.
bool check_node_ports(context& ctx, const cluster_config& c) {
  struct use {
    std::string host, what;
  };
  std::vector<std::pair<uint16_t, use>> taken;
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    const std::string at = "nodes[" + std::to_string(i) + "]";
    const std::pair<uint16_t, std::string> mine[] = {
        {node_control_port(c, i), at + ".control_port"}, {node_metrics_port(c, i), at + ".metrics_port"}};
    for (const auto& entry : mine) {
      // Not a structured binding: clang before 16 cannot capture one in the lambda below.
      const uint16_t port = entry.first;
      const std::string& field = entry.second;
      if (port == 0) continue;
      const bool defaulted = field.ends_with(".control_port") ? !c.nodes[i].control_port : !c.nodes[i].metrics_port;
      auto clash = [&](const std::string& other) {
        return ctx.fail(c.nodes[i].line, field,
                        std::to_string(port) + (defaulted ? " (its default)" : "") + " is also " + other +
                            " on host " + c.nodes[i].host + "; set control_port/metrics_port of the node");
      };
      if (port == c.ports.api) return clash("ports.api");
      if (port == c.ports.metrics) return clash("ports.metrics");
      for (const auto& [p, u] : taken) {
        if (p == port && u.host == c.nodes[i].host) return clash(u.what);
      }
      taken.push_back({port, {c.nodes[i].host, field}});
    }
  }
  return true;
}

bool parse_document(context& ctx, const YAML::Node& root, cluster_config& out) {
  if (!root.IsDefined() || root.IsNull()) {
    return ctx.fail(0, "", "empty file (expected a mapping with cluster, nodes and model)");
  }
  const int root_line = line_of(root) > 0 ? line_of(root) : 1;
  mapping m(ctx, {root, "", root_line},
            {"cluster", "nodes", "model", "attention_shards", "expert_groups", "redundant_expert_slots",
             "batching", "rebalancing", "training", "ports", "api"});
  if (!m.ok()) return false;
  const value_ref* cluster = m.require("cluster", "name and secret");
  if (cluster == nullptr || !parse_cluster(ctx, *cluster, out)) return false;
  const value_ref* nodes = m.require("nodes", "a list of nodes with their devices");
  if (nodes == nullptr || !parse_nodes(ctx, *nodes, out.nodes)) return false;
  const value_ref* model = m.require("model", "path or preset");
  if (model == nullptr || !parse_model(ctx, *model, out.model)) return false;
  if (const value_ref* v = m.find("attention_shards");
      v && !read_int(ctx, *v, 1, INT32_MAX, out.attention_shards)) {
    return false;
  }
  if (const value_ref* v = m.find("expert_groups"); v && !parse_expert_groups(ctx, *v, out.expert_groups)) {
    return false;
  }
  if (const value_ref* v = m.find("redundant_expert_slots");
      v && !read_int(ctx, *v, 0, INT32_MAX, out.redundant_expert_slots)) {
    return false;
  }
  if (const value_ref* v = m.find("batching"); v && !parse_batching(ctx, *v, out.batching)) return false;
  if (const value_ref* v = m.find("rebalancing"); v && !parse_rebalancing(ctx, *v, out.rebalancing)) return false;
  if (const value_ref* v = m.find("training"); v && !parse_training(ctx, *v, out.training)) return false;
  if (const value_ref* v = m.find("ports"); v && !parse_ports(ctx, *v, out.ports)) return false;
  if (const value_ref* v = m.find("api"); v && !parse_api(ctx, *v, out)) return false;
  return check_node_ports(ctx, out);
}

// ---- the TLS files (check_tls_files) ----

struct bio_free {
  void operator()(BIO* b) const noexcept { BIO_free(b); }
};
struct x509_free {
  void operator()(X509* x) const noexcept { X509_free(x); }
};
struct pkey_free {
  void operator()(EVP_PKEY* k) const noexcept { EVP_PKEY_free(k); }
};
struct store_free {
  void operator()(X509_STORE* s) const noexcept { X509_STORE_free(s); }
};
struct store_ctx_free {
  void operator()(X509_STORE_CTX* c) const noexcept { X509_STORE_CTX_free(c); }
};
struct x509_stack_free {
  void operator()(STACK_OF(X509) * s) const noexcept { sk_X509_pop_free(s, X509_free); }
};
using bio_ptr = std::unique_ptr<BIO, bio_free>;
using x509_ptr = std::unique_ptr<X509, x509_free>;

/// The whole file, or the reason it cannot be read (a directory reads as EISDIR).
std::optional<std::string> read_whole_file(const std::filesystem::path& path, std::string& why) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    why = std::strerror(errno);
    return std::nullopt;
  }
  std::string text;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) {
    why = std::strerror(err);
    return std::nullopt;
  }
  return text;
}

/// The reasons OpenSSL queued (its error queue is per thread; emptied here).
std::string openssl_errors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += out.empty() ? "" : "; ";
    out += buf;
  }
  return out;
}

bio_ptr memory_bio(const std::string& text) {
  return bio_ptr{BIO_new_mem_buf(text.data(), static_cast<int>(text.size()))};
}

/// Every PEM certificate in `text`, in order.
std::vector<x509_ptr> read_certificates(const std::string& text) {
  std::vector<x509_ptr> out;
  auto bio = memory_bio(text);
  while (bio) {
    x509_ptr cert{PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)};
    if (!cert) break;
    out.push_back(std::move(cert));
  }
  ERR_clear_error();  // the read past the last certificate queues "no start line"
  return out;
}

// Never prompts on the terminal (OpenSSL's default for an encrypted key): no passphrase, no key.
int passphrase_cb(char* buf, int size, int /*rwflag*/, void* user) {
  const auto* passphrase = static_cast<const std::string*>(user);
  if (passphrase->empty() || size <= 0) return -1;
  const int n = static_cast<int>(std::min<size_t>(passphrase->size(), static_cast<size_t>(size)));
  std::memcpy(buf, passphrase->data(), static_cast<size_t>(n));
  return n;
}

bool key_is_encrypted(const std::string& pem) {
  return pem.find("ENCRYPTED PRIVATE KEY") != std::string::npos || pem.find("Proc-Type: 4,ENCRYPTED") != std::string::npos;
}

// Errors of one TLS section's file checks: "source:line: <section>.<key>: what".
struct tls_check {
  const cluster_config& config;
  std::string section;  // "cluster.tls", "api.tls"

  [[nodiscard]] caf::error fail(cluster_config_errc code, int line, std::string_view key,
                                const std::string& what) const {
    context ctx{config.source, std::nullopt};
    ctx.fail(line, key.empty() ? section : section + "." + std::string(key), what);
    return make_error(code, *ctx.error);
  }
};

struct tls_file {
  std::string_view key;
  const std::filesystem::path& path;
  int line;
  std::string text;
};

// Reads each file's text, or the error naming the first that cannot be read.
caf::error read_tls_files(const tls_check& check, std::vector<tls_file>& files) {
  for (auto& f : files) {
    std::string why;
    auto text = read_whole_file(f.path, why);
    if (!text) return check.fail(cluster_config_errc::io_error, f.line, f.key, "cannot read " + f.path.string() + ": " + why);
    f.text = std::move(*text);
  }
  return {};
}

// The certificates of a file that must hold at least one.
caf::expected<std::vector<x509_ptr>> certificates_of(const tls_check& check, const tls_file& f) {
  auto certs = read_certificates(f.text);
  if (certs.empty()) {
    return check.fail(cluster_config_errc::bad_config, f.line, f.key,
                      f.path.string() + " holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
  }
  return certs;
}

using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_free>;

// The key of `key_file`, decrypted with `passphrase` when it is encrypted, and checked to
// belong to `certificate`. The passphrase appears in no message.
caf::expected<pkey_ptr> key_of(const tls_check& check, const tls_file& key_file, const tls_file& cert_file,
                               X509* certificate, const std::string& passphrase) {
  auto key_bio = memory_bio(key_file.text);
  std::string pass = passphrase;
  pkey_ptr key{key_bio ? PEM_read_bio_PrivateKey(key_bio.get(), nullptr, passphrase_cb, &pass) : nullptr};
  if (!key) {
    const std::string reason = openssl_errors();
    std::string what;
    if (key_is_encrypted(key_file.text)) {
      what = passphrase.empty() ? "the key in " + key_file.path.string() + " is encrypted: give " + check.section + ".passphrase"
                                : "cannot decrypt the key in " + key_file.path.string() + " (wrong passphrase?)";
    } else {
      what = key_file.path.string() + " holds no PEM private key (-----BEGIN PRIVATE KEY-----)";
    }
    return check.fail(cluster_config_errc::bad_config, key_file.line, key_file.key,
                      what + (reason.empty() ? "" : ": " + reason));
  }
  if (X509_check_private_key(certificate, key.get()) != 1) {
    ERR_clear_error();
    return check.fail(cluster_config_errc::bad_config, key_file.line, key_file.key,
                      "the key in " + key_file.path.string() + " does not belong to the certificate in " +
                          cert_file.path.string());
  }
  return key;
}

caf::error check_cluster_tls(const cluster_config& config) {
  const tls_config& tls = *config.tls;
  const tls_check check{config, "cluster.tls"};
  std::vector<tls_file> files = {{"certificate", tls.certificate, tls.certificate_line, {}},
                                 {"key", tls.key, tls.key_line, {}},
                                 {"ca_file", tls.ca_file, tls.ca_file_line, {}}};
  if (auto err = read_tls_files(check, files)) return err;
  const auto& cert_file = files[0];
  const auto& key_file = files[1];
  const auto& ca_file = files[2];

  auto chain = certificates_of(check, cert_file);
  if (!chain) return chain.error();
  auto cas = certificates_of(check, ca_file);
  if (!cas) return cas.error();
  auto key = key_of(check, key_file, cert_file, chain->front().get(), tls.passphrase);
  if (!key) return key.error();

  // Peers check this node's certificate against the same CA file (the config is shared): a
  // certificate that does not chain to it would be refused by every peer, so refuse it here.
  std::unique_ptr<X509_STORE, store_free> store{X509_STORE_new()};
  std::unique_ptr<STACK_OF(X509), x509_stack_free> intermediates{sk_X509_new_null()};
  std::unique_ptr<X509_STORE_CTX, store_ctx_free> verify{X509_STORE_CTX_new()};
  if (!store || !intermediates || !verify) {
    return check.fail(cluster_config_errc::io_error, tls.line, "", "out of memory checking the certificates");
  }
  for (auto& ca : *cas) X509_STORE_add_cert(store.get(), ca.get());  // takes its own reference
  for (size_t i = 1; i < chain->size(); ++i) {
    if (sk_X509_push(intermediates.get(), (*chain)[i].get()) > 0) (*chain)[i].release();
  }
  // As OpenSSL checks it in a handshake: as a client certificate when this node connects (joins,
  // status), as a server certificate when it accepts (its gatekeeper). The chain is the same.
  const std::pair<int, const char*> purposes[] = {{X509_PURPOSE_SSL_SERVER, "server"},
                                                  {X509_PURPOSE_SSL_CLIENT, "client"}};
  for (const auto& [purpose, role] : purposes) {
    int verified = 0;
    if (X509_STORE_CTX_init(verify.get(), store.get(), chain->front().get(), intermediates.get()) == 1 &&
        X509_STORE_CTX_set_purpose(verify.get(), purpose) == 1) {
      verified = X509_verify_cert(verify.get());
    }
    const int code = X509_STORE_CTX_get_error(verify.get());
    X509_STORE_CTX_cleanup(verify.get());
    ERR_clear_error();
    if (verified == 1) continue;
    std::string why = "the certificate in " + cert_file.path.string();
    if (code == X509_V_ERR_INVALID_PURPOSE) {
      why += " cannot serve as a TLS " + std::string(role) + " certificate (every node is client and server: " +
             "give it extendedKeyUsage serverAuth,clientAuth, or none)";
    } else {
      why += " does not verify against ca_file " + ca_file.path.string() + ": " +
             X509_verify_cert_error_string(code) + " (peers would refuse it)";
    }
    return check.fail(cluster_config_errc::bad_config, cert_file.line, cert_file.key, why);
  }
  return {};
}

// The API server's certificate cannot be verified here (clients bring their CA): what can be
// checked is that it is a server certificate, valid now, with its key.
caf::error check_api_tls(const cluster_config& config) {
  const api_tls_config& tls = *config.api_tls;
  const tls_check check{config, "api.tls"};
  std::vector<tls_file> files = {{"certificate", tls.certificate, tls.certificate_line, {}},
                                 {"key", tls.key, tls.key_line, {}}};
  if (!tls.client_ca_file.empty()) files.push_back({"client_ca_file", tls.client_ca_file, tls.client_ca_file_line, {}});
  if (auto err = read_tls_files(check, files)) return err;
  const auto& cert_file = files[0];
  auto chain = certificates_of(check, cert_file);
  if (!chain) return chain.error();
  auto key = key_of(check, files[1], cert_file, chain->front().get(), tls.passphrase);
  if (!key) return key.error();
  X509* cert = chain->front().get();
  const int server_purpose = X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0);
  ERR_clear_error();
  if (server_purpose != 1) {
    return check.fail(cluster_config_errc::bad_config, cert_file.line, cert_file.key,
                      "the certificate in " + cert_file.path.string() +
                          " cannot serve as a TLS server certificate (give it extendedKeyUsage serverAuth, or none)");
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert)) < 0) {
    return check.fail(cluster_config_errc::bad_config, cert_file.line, cert_file.key,
                      "the certificate in " + cert_file.path.string() + " has expired (clients would refuse it)");
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert)) > 0) {
    return check.fail(cluster_config_errc::bad_config, cert_file.line, cert_file.key,
                      "the certificate in " + cert_file.path.string() + " is not yet valid (clients would refuse it)");
  }
  if (files.size() > 2) {
    if (auto cas = certificates_of(check, files[2]); !cas) return cas.error();
  }
  return {};
}

}  // namespace

caf::error check_tls_files(const cluster_config& config) {
  if (config.tls) {
    if (auto err = check_cluster_tls(config)) return err;
  }
  if (config.api_tls) return check_api_tls(config);
  return {};
}

uint16_t node_control_port(const cluster_config& c, size_t index) {
  if (index < c.nodes.size() && c.nodes[index].control_port) return *c.nodes[index].control_port;
  if (c.ports.control == 0) return 0;
  return static_cast<uint16_t>(std::min<size_t>(65535, c.ports.control + 10 * index));
}

uint16_t node_metrics_port(const cluster_config& c, size_t index) {
  if (index < c.nodes.size() && c.nodes[index].metrics_port) return *c.nodes[index].metrics_port;
  if (c.ports.metrics == 0) return 0;
  return static_cast<uint16_t>(std::min<size_t>(65535, c.ports.metrics + 10 * (index + 1)));
}

std::optional<size_t> find_node(const cluster_config& c, std::string_view name) {
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    if (c.nodes[i].name == name) return i;
  }
  return std::nullopt;
}

caf::expected<cluster_config> parse_cluster_config(std::string_view yaml, std::string source_name) {
  context ctx{std::move(source_name), std::nullopt};
  cluster_config out;
  out.source = ctx.source;
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    if (parse_document(ctx, root, out)) return out;
  } catch (const YAML::Exception& e) {
    // Syntax errors (and, defensively, anything else yaml-cpp throws while we walk the tree).
    const int line = e.mark.is_null() ? 0 : e.mark.line + 1;
    ctx.fail(line, "", "invalid YAML: " + e.msg);
  }
  return make_error(cluster_config_errc::bad_config, *ctx.error);
}

caf::expected<cluster_config> load_cluster_config(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return make_error(cluster_config_errc::io_error,
                      "cannot read " + path.string() + ": " + std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return make_error(cluster_config_errc::io_error, "cannot read " + path.string());
  }
  auto config = parse_cluster_config(text.str(), path.string());
  if (!config) return config;
  auto resolve = [&](std::filesystem::path& p) {
    if (!p.empty() && p.is_relative()) p = (path.parent_path() / p).lexically_normal();
  };
  resolve(config->model.path);
  if (config->tls) {
    resolve(config->tls->certificate);
    resolve(config->tls->key);
    resolve(config->tls->ca_file);
  }
  if (config->api_tls) {
    resolve(config->api_tls->certificate);
    resolve(config->api_tls->key);
    resolve(config->api_tls->client_ca_file);
  }
  if (auto err = check_tls_files(*config)) return err;
  return config;
}

std::optional<uint64_t> parse_size(std::string_view text) {
  while (!text.empty() && text.front() == ' ') text.remove_prefix(1);
  while (!text.empty() && text.back() == ' ') text.remove_suffix(1);
  size_t n = 0;
  bool dot = false;
  while (n < text.size() && ((text[n] >= '0' && text[n] <= '9') || (text[n] == '.' && !dot))) {
    dot = dot || text[n] == '.';
    ++n;
  }
  std::string_view number = text.substr(0, n);
  std::string_view unit = text.substr(n);
  while (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1);
  if (number.empty() || number == "." || number.front() == '.' || number.back() == '.') return std::nullopt;

  struct unit_scale {
    std::string_view name;
    long double scale;
  };
  static constexpr long double ki = 1024.0L;
  static constexpr unit_scale units[] = {
      {"", 1}, {"B", 1},
      {"KiB", ki}, {"MiB", ki * ki}, {"GiB", ki * ki * ki}, {"TiB", ki * ki * ki * ki},
      {"Ki", ki}, {"Mi", ki * ki}, {"Gi", ki * ki * ki}, {"Ti", ki * ki * ki * ki},
      {"kB", 1e3L}, {"KB", 1e3L}, {"MB", 1e6L}, {"GB", 1e9L}, {"TB", 1e12L},
      {"k", 1e3L}, {"K", 1e3L}, {"M", 1e6L}, {"G", 1e9L}, {"T", 1e12L},
  };
  const unit_scale* match = nullptr;
  for (const auto& u : units) {
    if (u.name == unit) match = &u;
  }
  if (match == nullptr) return std::nullopt;
  if (dot && match->scale == 1) return std::nullopt;  // fractional bytes
  long double value = 0;
  long double frac_scale = 1;
  bool in_frac = false;
  for (char c : number) {
    if (c == '.') {
      in_frac = true;
      continue;
    }
    if (in_frac) {
      frac_scale /= 10;
      value += (c - '0') * frac_scale;
    } else {
      value = value * 10 + (c - '0');
    }
  }
  const long double bytes = std::round(value * match->scale);
  if (bytes >= 18446744073709551615.0L) return std::nullopt;
  return static_cast<uint64_t>(bytes);
}

std::string format_bytes(uint64_t bytes) {
  static constexpr const char* names[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024.0 && u + 1 < std::size(names)) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  const double rounded = std::round(v * 10.0) / 10.0;
  if (rounded == std::floor(rounded)) {
    std::snprintf(buf, sizeof buf, "%.0f %s", rounded, names[u]);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f %s", rounded, names[u]);
  }
  return buf;
}

std::string format_id_ranges(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string to_string(const cluster_config& c) {
  std::ostringstream out;
  out << "cluster " << c.name << " (secret " << redacted << ", heartbeat every "
      << c.heartbeat_interval_ms << " ms, failure timeout " << c.failure_timeout_ms << " ms)";
  if (!c.source.empty()) out << " from " << c.source;
  out << "\n";
  if (c.tls) {
    out << "control plane over TLS: certificate " << c.tls->certificate.string() << ", key "
        << c.tls->key.string() << (c.tls->passphrase.empty() ? "" : " (passphrase <redacted>)") << ", ca_file "
        << c.tls->ca_file.string() << "\n";
  }
  for (const auto& n : c.nodes) {
    out << "node " << n.name << " at " << n.host << ": " << n.gpus << " GPUs";
    if (n.gpus > 0) out << " of " << format_bytes(n.gpu_memory_bytes);
    out << ", " << n.cpu_slots << " CPU slots, memory " << format_bytes(n.memory_bytes);
    if (n.control_port) out << ", control_port " << *n.control_port;
    if (n.metrics_port) out << ", metrics_port " << *n.metrics_port;
    out << "\n";
  }
  if (!c.model.preset.empty()) {
    out << "model preset " << c.model.preset;
    if (c.model.seed) out << " (seed " << *c.model.seed << ")";
  } else {
    out << "model " << c.model.path.string();
  }
  out << "\nattention_shards " << c.attention_shards << ", expert_groups " << c.expert_groups.count;
  if (!c.expert_groups.experts.empty()) {
    out << " [";
    for (size_t g = 0; g < c.expert_groups.experts.size(); ++g) {
      out << (g ? "; " : "") << format_id_ranges(c.expert_groups.experts[g]);
    }
    out << "]";
  }
  out << ", redundant_expert_slots " << c.redundant_expert_slots << "\n";
  out << "batching: max_running_requests " << c.batching.max_running_requests << ", max_batch_tokens "
      << c.batching.max_batch_tokens << ", max_queue " << c.batching.max_queue
      << ", max_new_tokens_limit " << c.batching.max_new_tokens_limit << ", request_timeout_ms "
      << c.batching.request_timeout_ms << "\n";
  out << "rebalancing: period_s " << c.rebalancing.period_s << ", load_window_steps " << c.rebalancing.load_window_steps
      << ", max_moved_replicas "
      << (c.rebalancing.max_moved_replicas < 0 ? std::string("unlimited") : std::to_string(c.rebalancing.max_moved_replicas))
      << ", min_improvement_pct " << c.rebalancing.min_improvement_pct << "\n";
  out << "training: snapshot_every_steps " << c.training.snapshot_every_steps << ", recovery_timeout_ms "
      << c.training.recovery_timeout_ms << "\n";
  out << "ports: control " << c.ports.control << ", api " << c.ports.api << ", metrics "
      << c.ports.metrics << "\n";
  if (c.api_tls) {
    out << "job API over TLS: certificate " << c.api_tls->certificate.string() << ", key "
        << c.api_tls->key.string() << (c.api_tls->passphrase.empty() ? "" : " (passphrase <redacted>)");
    if (!c.api_tls->client_ca_file.empty()) out << ", client_ca_file " << c.api_tls->client_ca_file.string();
    out << "\n";
  }
  return out.str();
}

nlohmann::json to_json(const cluster_config& c) {
  nlohmann::json nodes = nlohmann::json::array();
  for (const auto& n : c.nodes) {
    nlohmann::json node = {{"name", n.name},
                           {"host", n.host},
                           {"devices", {{"gpus", n.gpus}, {"cpu_slots", n.cpu_slots}}},
                           {"memory_bytes", n.memory_bytes},
                           {"gpu_memory_bytes", n.gpu_memory_bytes}};
    if (n.control_port) node["control_port"] = *n.control_port;
    if (n.metrics_port) node["metrics_port"] = *n.metrics_port;
    nodes.push_back(std::move(node));
  }
  nlohmann::json model = nlohmann::json::object();
  if (!c.model.preset.empty()) {
    model["preset"] = c.model.preset;
    if (c.model.seed) model["seed"] = *c.model.seed;
  } else {
    model["path"] = c.model.path.string();
  }
  nlohmann::json groups = {{"count", c.expert_groups.count}};
  if (!c.expert_groups.experts.empty()) groups["experts"] = c.expert_groups.experts;
  nlohmann::json cluster = {{"name", c.name},
                            {"secret", redacted},
                            {"heartbeat_interval_ms", c.heartbeat_interval_ms},
                            {"failure_timeout_ms", c.failure_timeout_ms}};
  if (c.tls) {
    cluster["tls"] = {{"certificate", c.tls->certificate.string()},
                      {"key", c.tls->key.string()},
                      {"ca_file", c.tls->ca_file.string()}};
    if (!c.tls->passphrase.empty()) cluster["tls"]["passphrase"] = redacted;
  }
  nlohmann::json out = {{"source", c.source},
                       {"cluster", std::move(cluster)},
                       {"nodes", std::move(nodes)},
                       {"model", std::move(model)},
                       {"attention_shards", c.attention_shards},
                       {"expert_groups", std::move(groups)},
                       {"redundant_expert_slots", c.redundant_expert_slots},
                       {"batching",
                        {{"max_running_requests", c.batching.max_running_requests},
                         {"max_batch_tokens", c.batching.max_batch_tokens},
                         {"max_queue", c.batching.max_queue},
                         {"max_new_tokens_limit", c.batching.max_new_tokens_limit},
                         {"request_timeout_ms", c.batching.request_timeout_ms}}},
                       {"rebalancing",
                        {{"period_s", c.rebalancing.period_s},
                         {"load_window_steps", c.rebalancing.load_window_steps},
                         {"max_moved_replicas", c.rebalancing.max_moved_replicas},
                         {"min_improvement_pct", c.rebalancing.min_improvement_pct}}},
                       {"training",
                        {{"snapshot_every_steps", c.training.snapshot_every_steps},
                         {"recovery_timeout_ms", c.training.recovery_timeout_ms}}},
                       {"ports", {{"control", c.ports.control}, {"api", c.ports.api}, {"metrics", c.ports.metrics}}}};
  if (c.api_tls) {
    nlohmann::json tls = {{"certificate", c.api_tls->certificate.string()}, {"key", c.api_tls->key.string()}};
    if (!c.api_tls->client_ca_file.empty()) tls["client_ca_file"] = c.api_tls->client_ca_file.string();
    if (!c.api_tls->passphrase.empty()) tls["passphrase"] = redacted;
    out["api"] = {{"tls", std::move(tls)}};
  }
  return out;
}

}  // namespace moe::runtime
