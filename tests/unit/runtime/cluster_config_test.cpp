#include "runtime/cluster_config.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace moe::runtime {
namespace {

const std::filesystem::path deploy_dir = std::filesystem::path(MOE_TEST_DATA_DIR) / ".." / ".." / "deploy";

// A valid file; tests replace or insert numbered lines to break one field at a time.
constexpr std::string_view base_yaml = R"(cluster:
  name: test
  secret: s3cret-value-xyz
nodes:
  - name: n0
    devices:
      gpus: 2
      cpu_slots: 1
    memory: 16GiB
    gpu_memory: 80GiB
model:
  preset: tiny
)";

std::vector<std::string> lines_of(std::string_view text) {
  std::vector<std::string> lines;
  std::istringstream in{std::string(text)};
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string join(const std::vector<std::string>& lines) {
  std::string s;
  for (const auto& l : lines) s += l + "\n";
  return s;
}

/// base_yaml with line `line` (1-based) replaced by `text`.
std::string replace_line(int line, const std::string& text) {
  auto lines = lines_of(base_yaml);
  lines.at(static_cast<size_t>(line - 1)) = text;
  return join(lines);
}

/// base_yaml with `text` inserted before line `line` (so `text` starts at line `line`).
std::string insert_at(int line, const std::string& text) {
  auto lines = lines_of(base_yaml);
  auto extra = lines_of(text);
  lines.insert(lines.begin() + (line - 1), extra.begin(), extra.end());
  return join(lines);
}

std::string append(const std::string& text) { return std::string(base_yaml) + text; }

/// The error text of parsing `yaml` as "x.yaml" (fails the test when it parses).
std::string error_of(const std::string& yaml) {
  auto c = parse_cluster_config(yaml, "x.yaml");
  if (c) {
    ADD_FAILURE() << "parsed, expected an error:\n" << yaml;
    return {};
  }
  EXPECT_EQ(c.error().category(), caf::atom("clustercfg"));
  return error_text(c.error());
}

TEST(cluster_config, base_file_parses_with_defaults) {
  auto c = parse_cluster_config(base_yaml, "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->source, "x.yaml");
  EXPECT_EQ(c->name, "test");
  EXPECT_EQ(c->secret, "s3cret-value-xyz");
  ASSERT_EQ(c->nodes.size(), 1u);
  EXPECT_EQ(c->nodes[0].name, "n0");
  EXPECT_EQ(c->nodes[0].host, "127.0.0.1");
  EXPECT_EQ(c->nodes[0].gpus, 2);
  EXPECT_EQ(c->nodes[0].cpu_slots, 1);
  EXPECT_EQ(c->nodes[0].memory_bytes, uint64_t{16} << 30);
  EXPECT_EQ(c->nodes[0].gpu_memory_bytes, uint64_t{80} << 30);
  EXPECT_EQ(c->nodes[0].line, 5);
  EXPECT_EQ(c->model.preset, "tiny");
  EXPECT_TRUE(c->model.path.empty());
  EXPECT_FALSE(c->model.seed);
  EXPECT_EQ(c->model.line, 12);
  EXPECT_EQ(c->attention_shards, 1);
  EXPECT_EQ(c->expert_groups.count, 1);
  EXPECT_TRUE(c->expert_groups.experts.empty());
  EXPECT_EQ(c->redundant_expert_slots, 0);
  EXPECT_EQ(c->batching.max_running_requests, 64);
  EXPECT_EQ(c->batching.max_batch_tokens, 4096);
  EXPECT_EQ(c->batching.max_queue, 256);
  EXPECT_EQ(c->batching.max_new_tokens_limit, 4096);
  EXPECT_EQ(c->ports.control, 7100);
  EXPECT_EQ(c->ports.api, 7101);
  EXPECT_EQ(c->ports.metrics, 7102);
}

TEST(cluster_config, every_field_set) {
  auto c = parse_cluster_config(append(R"(attention_shards: 2
expert_groups:
  count: 3
  experts:
    - [0-6]
    - [9, 7, 8, "10-11"]
    - [12-15, 0]
redundant_expert_slots: 1
batching: {max_running_requests: 8, max_batch_tokens: 512, max_queue: 9, max_new_tokens_limit: 100}
ports: {control: 0, api: 0, metrics: 9100}
)"),
                                "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->attention_shards, 2);
  EXPECT_EQ(c->expert_groups.count, 3);
  const std::vector<std::vector<int64_t>> want = {
      {0, 1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11}, {0, 12, 13, 14, 15}};
  EXPECT_EQ(c->expert_groups.experts, want);
  EXPECT_EQ(c->expert_groups.experts_lines, (std::vector<int>{17, 18, 19}));
  EXPECT_EQ(c->expert_groups.line, 14);
  EXPECT_EQ(c->redundant_expert_slots, 1);
  EXPECT_EQ(c->batching.max_running_requests, 8);
  EXPECT_EQ(c->batching.max_batch_tokens, 512);
  EXPECT_EQ(c->batching.max_queue, 9);
  EXPECT_EQ(c->batching.max_new_tokens_limit, 100);
  EXPECT_EQ(c->ports.control, 0);  // two ephemeral ports do not collide
  EXPECT_EQ(c->ports.api, 0);
  EXPECT_EQ(c->ports.metrics, 9100);
}

TEST(cluster_config, expert_group_count_from_lists_and_scalar_form) {
  auto lists = parse_cluster_config(append("expert_groups:\n  experts: [[0-7], [8-15]]\n"), "x.yaml");
  ASSERT_TRUE(lists) << error_text(lists.error());
  EXPECT_EQ(lists->expert_groups.count, 2);
  auto scalar = parse_cluster_config(append("expert_groups: 5\n"), "x.yaml");
  ASSERT_TRUE(scalar) << error_text(scalar.error());
  EXPECT_EQ(scalar->expert_groups.count, 5);
  EXPECT_TRUE(scalar->expert_groups.experts.empty());
}

TEST(cluster_config, model_path_and_seed) {
  auto c = parse_cluster_config(replace_line(12, "  path: ckpt/tiny"), "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->model.path, "ckpt/tiny");
  EXPECT_TRUE(c->model.preset.empty());
  auto seeded = parse_cluster_config(append("  seed: 42\n"), "x.yaml");
  ASSERT_TRUE(seeded) << error_text(seeded.error());
  EXPECT_EQ(seeded->model.seed, 42u);
}

TEST(cluster_config, deploy_files_parse) {
  auto local = load_cluster_config(deploy_dir / "local.yaml");
  ASSERT_TRUE(local) << error_text(local.error());
  EXPECT_EQ(local->name, "local-demo");
  ASSERT_EQ(local->nodes.size(), 1u);
  EXPECT_EQ(local->nodes[0].cpu_slots, 4);
  EXPECT_EQ(local->nodes[0].gpus, 0);
  EXPECT_EQ(local->model.preset, "tiny");
  EXPECT_EQ(local->attention_shards, 1);
  EXPECT_EQ(local->expert_groups.count, 4);
  EXPECT_TRUE(local->expert_groups.experts.empty());
  EXPECT_EQ(local->redundant_expert_slots, 4);
  EXPECT_EQ(local->rebalancing.period_s, 0);
  EXPECT_EQ(local->rebalancing.load_window_steps, 1024);

  auto two = load_cluster_config(deploy_dir / "local-2shards.yaml");
  ASSERT_TRUE(two) << error_text(two.error());
  EXPECT_EQ(two->attention_shards, 2);
  EXPECT_EQ(two->expert_groups.count, 4);
}

TEST(cluster_config, rebalancing_section) {
  auto defaults = parse_cluster_config(base_yaml, "x.yaml");
  ASSERT_TRUE(defaults) << error_text(defaults.error());
  EXPECT_EQ(defaults->rebalancing.period_s, 0);
  EXPECT_EQ(defaults->rebalancing.load_window_steps, 1024);
  EXPECT_EQ(defaults->rebalancing.max_moved_replicas, -1);
  EXPECT_EQ(defaults->rebalancing.min_improvement_pct, 2);
  auto set = parse_cluster_config(
      append("rebalancing: {period_s: 300, load_window_steps: 64, max_moved_replicas: 12, min_improvement_pct: 5}\n"),
      "x.yaml");
  ASSERT_TRUE(set) << error_text(set.error());
  EXPECT_EQ(set->rebalancing.period_s, 300);
  EXPECT_EQ(set->rebalancing.load_window_steps, 64);
  EXPECT_EQ(set->rebalancing.max_moved_replicas, 12);
  EXPECT_EQ(set->rebalancing.min_improvement_pct, 5);
  EXPECT_NE(to_string(*set).find("rebalancing: period_s 300, load_window_steps 64, max_moved_replicas 12"), std::string::npos);
  EXPECT_EQ(error_of(append("rebalancing: {load_window_steps: 0}\n")),
            "x.yaml:13: rebalancing.load_window_steps: expected an integer in 1..1048576, got '0'");
  EXPECT_EQ(error_of(append("rebalancing: {max_moved_replicas: -1}\n")),
            "x.yaml:13: rebalancing.max_moved_replicas: expected a non-negative integer, got '-1'");
  EXPECT_EQ(error_of(append("rebalancing: {every: 5}\n")), "x.yaml:13: rebalancing.every: unknown key");
}

TEST(cluster_config, training_section) {
  auto defaults = parse_cluster_config(base_yaml, "x.yaml");
  ASSERT_TRUE(defaults) << error_text(defaults.error());
  EXPECT_EQ(defaults->training.snapshot_every_steps, 10);
  EXPECT_EQ(defaults->training.recovery_timeout_ms, 120000);
  auto set = parse_cluster_config(append("training: {snapshot_every_steps: 0, recovery_timeout_ms: 5000}\n"), "x.yaml");
  ASSERT_TRUE(set) << error_text(set.error());
  EXPECT_EQ(set->training.snapshot_every_steps, 0);
  EXPECT_EQ(set->training.recovery_timeout_ms, 5000);
  EXPECT_NE(to_string(*set).find("training: snapshot_every_steps 0, recovery_timeout_ms 5000"), std::string::npos);
  EXPECT_EQ(to_json(*set)["training"]["snapshot_every_steps"], 0);
  EXPECT_EQ(error_of(append("training: {snapshot_every_steps: -1}\n")),
            "x.yaml:13: training.snapshot_every_steps: expected a non-negative integer, got '-1'");
  EXPECT_EQ(error_of(append("training: {recovery_timeout_ms: 10}\n")),
            "x.yaml:13: training.recovery_timeout_ms: expected an integer >= 1000, got '10'");
  EXPECT_EQ(error_of(append("training: {checkpoint_every: 5}\n")), "x.yaml:13: training.checkpoint_every: unknown key");
}

TEST(cluster_config, load_resolves_relative_model_path_against_the_file) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("moe_cluster_config_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream(dir / "c.yaml") << replace_line(12, "  path: ckpt");
  }
  auto c = load_cluster_config(dir / "c.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->model.path, (dir / "ckpt").lexically_normal());
  EXPECT_EQ(c->source, (dir / "c.yaml").string());
  std::filesystem::remove_all(dir);
}

TEST(cluster_config, missing_file_is_an_io_error) {
  auto c = load_cluster_config("/no/such/dir/cluster.yaml");
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code(), static_cast<uint8_t>(cluster_config_errc::io_error));
  EXPECT_NE(error_text(c.error()).find("/no/such/dir/cluster.yaml"), std::string::npos);
}

// ---- one broken field at a time: the message names the file, the line and the field ----

TEST(cluster_config_errors, wrong_type) {
  EXPECT_EQ(error_of(replace_line(7, "      gpus: two")),
            "x.yaml:7: nodes[0].devices.gpus: expected a non-negative integer, got 'two'");
  EXPECT_EQ(error_of(replace_line(7, "      gpus: 1.5")),
            "x.yaml:7: nodes[0].devices.gpus: expected a non-negative integer, got '1.5'");
  EXPECT_EQ(error_of(replace_line(7, "      gpus: [1]")),
            "x.yaml:7: nodes[0].devices.gpus: expected a non-negative integer, got a list");
  EXPECT_EQ(error_of(append("attention_shards: many\n")),
            "x.yaml:13: attention_shards: expected an integer >= 1, got 'many'");
  EXPECT_EQ(error_of(join({"cluster: {name: a, secret: b}", "model: {preset: tiny}", "nodes: {name: n0}"})),
            "x.yaml:3: nodes: expected a non-empty list of nodes, got a mapping");
  EXPECT_EQ(error_of(append("attention_shards: 3000000000\n")),
            "x.yaml:13: attention_shards: expected an integer >= 1, got '3000000000' (at most 2147483647)");
  EXPECT_EQ(error_of(replace_line(2, "  name: [a, b]")),
            "x.yaml:2: cluster.name: expected a non-empty string, got a list");
}

TEST(cluster_config_errors, negative_and_out_of_range) {
  EXPECT_EQ(error_of(replace_line(8, "      cpu_slots: -1")),
            "x.yaml:8: nodes[0].devices.cpu_slots: expected a non-negative integer, got '-1'");
  EXPECT_EQ(error_of(append("attention_shards: 0\n")),
            "x.yaml:13: attention_shards: expected an integer >= 1, got '0'");
  EXPECT_EQ(error_of(append("redundant_expert_slots: -2\n")),
            "x.yaml:13: redundant_expert_slots: expected a non-negative integer, got '-2'");
  EXPECT_EQ(error_of(append("ports:\n  control: 70000\n")),
            "x.yaml:14: ports.control: expected an integer in 0..65535, got '70000'");
  EXPECT_EQ(error_of(append("batching:\n  max_queue: 0\n")),
            "x.yaml:14: batching.max_queue: expected an integer >= 1, got '0'");
  EXPECT_EQ(error_of(append("expert_groups: 0\n")),
            "x.yaml:13: expert_groups: expected an integer >= 1, got '0'");
}

TEST(cluster_config_errors, unknown_keys_top_level_and_nested) {
  EXPECT_EQ(error_of(append("attention_shard: 2\n")), "x.yaml:13: attention_shard: unknown key");
  EXPECT_EQ(error_of(append("batching:\n  max_running_requests: 4\n  max_queue_len: 5\n")),
            "x.yaml:15: batching.max_queue_len: unknown key");
  EXPECT_EQ(error_of(insert_at(9, "    gpu: 1")), "x.yaml:9: nodes[0].gpu: unknown key");
  EXPECT_EQ(error_of(insert_at(9, "      tpus: 1")), "x.yaml:9: nodes[0].devices.tpus: unknown key");
  EXPECT_EQ(error_of(insert_at(3, "  region: eu")), "x.yaml:3: cluster.region: unknown key");
  EXPECT_EQ(error_of(append("  revision: main\n")), "x.yaml:13: model.revision: unknown key");
  EXPECT_EQ(error_of(append("expert_groups: {count: 2, sizes: [1, 2]}\n")),
            "x.yaml:13: expert_groups.sizes: unknown key");
  EXPECT_EQ(error_of(append("ports: {control: 1, admin: 2}\n")), "x.yaml:13: ports.admin: unknown key");
}

TEST(cluster_config_errors, duplicate_key) {
  EXPECT_EQ(error_of(insert_at(9, "      gpus: 3")), "x.yaml:9: nodes[0].devices.gpus: duplicate key");
}

TEST(cluster_config_errors, secret_missing_or_empty) {
  EXPECT_EQ(error_of(replace_line(3, "  # no secret")),
            "x.yaml:1: cluster.secret: required (a non-empty shared secret every node presents)");
  EXPECT_EQ(error_of(replace_line(3, "  secret: \"\"")), "x.yaml:3: cluster.secret: expected a non-empty string");
  EXPECT_EQ(error_of(replace_line(3, "  secret:")), "x.yaml:3: cluster.secret: expected a non-empty string");
}

TEST(cluster_config_errors, required_sections) {
  auto lines = lines_of(base_yaml);
  lines.resize(10);  // drop model
  EXPECT_EQ(error_of(join(lines)), "x.yaml:1: model: required (path or preset)");
  EXPECT_EQ(error_of(replace_line(5, "  - host: 10.0.0.1")), "x.yaml:5: nodes[0].name: required (a unique node name)");
  EXPECT_EQ(error_of(""), "x.yaml: empty file (expected a mapping with cluster, nodes and model)");
}

TEST(cluster_config_errors, path_and_preset_both_or_neither) {
  EXPECT_EQ(error_of(append("  path: /models/tiny\n")),
            "x.yaml:13: model.path: give exactly one of model.path and model.preset, not both");
  EXPECT_EQ(error_of(replace_line(12, "  seed: 1")),
            "x.yaml:11: model: give exactly one of path (a checkpoint directory) and preset");
  EXPECT_EQ(error_of(join({"cluster: {name: a, secret: b}", "nodes: [{name: n, devices: {gpus: 1}, gpu_memory: 1GiB}]",
                           "model: {path: /m, seed: 3}"})),
            "x.yaml:3: model.seed: only valid with model.preset");
}

TEST(cluster_config_errors, duplicate_node_names) {
  EXPECT_EQ(error_of(insert_at(11, "  - name: n1\n    devices: {cpu_slots: 1}\n    memory: 1GiB\n"
                                   "  - name: n0\n    devices: {cpu_slots: 1}\n    memory: 1GiB")),
            "x.yaml:14: nodes[2].name: duplicate node name 'n0' (also nodes[0])");
  EXPECT_EQ(error_of(replace_line(5, "  - name: n0/gpu")),
            "x.yaml:5: nodes[0].name: 'n0/gpu' may contain only letters, digits, '_', '-' and '.'");
}

TEST(cluster_config_errors, bad_size_strings) {
  EXPECT_EQ(error_of(replace_line(9, "    memory: 16 gigs")),
            "x.yaml:9: nodes[0].memory: expected a size like 8GiB, 512MiB or a byte count, got '16 gigs'");
  EXPECT_EQ(error_of(replace_line(10, "    gpu_memory: -1GiB")),
            "x.yaml:10: nodes[0].gpu_memory: expected a size like 8GiB, 512MiB or a byte count, got '-1GiB'");
  EXPECT_EQ(error_of(replace_line(9, "    memory: 1.5")),
            "x.yaml:9: nodes[0].memory: expected a size like 8GiB, 512MiB or a byte count, got '1.5'");
}

TEST(cluster_config_errors, devices_and_their_memory) {
  EXPECT_EQ(error_of(join({"cluster: {name: a, secret: b}", "nodes:", "  - name: n",
                           "    devices: {gpus: 0, cpu_slots: 0}", "model: {preset: tiny}"})),
            "x.yaml:4: nodes[0].devices: at least one GPU or CPU slot is needed");
  EXPECT_EQ(error_of(replace_line(9, "    # no memory")),
            "x.yaml:5: nodes[0].memory: required when devices.cpu_slots > 0 (host memory, e.g. 8GiB)");
  EXPECT_EQ(error_of(replace_line(10, "    # no gpu_memory")),
            "x.yaml:5: nodes[0].gpu_memory: required when devices.gpus > 0 (memory of each GPU, e.g. 80GiB)");
}

TEST(cluster_config_errors, explicit_expert_lists) {
  EXPECT_EQ(error_of(append("expert_groups:\n  count: 3\n  experts: [[0-7], [8-15]]\n")),
            "x.yaml:15: expert_groups.experts: 2 lists but count is 3 (one list per group)");
  EXPECT_EQ(error_of(append("expert_groups:\n  experts:\n    - [0, 1, 1]\n")),
            "x.yaml:15: expert_groups.experts[0]: expert 1 listed twice (replicas go in different groups)");
  EXPECT_EQ(error_of(append("expert_groups:\n  experts:\n    - [0-3]\n    - [9-4]\n")),
            "x.yaml:16: expert_groups.experts[1][0]: expected an expert id (non-negative integer) or a "
            "range like \"0-5\", got '9-4'");
  EXPECT_EQ(error_of(append("expert_groups:\n  experts:\n    - []\n")),
            "x.yaml:15: expert_groups.experts[0]: expected a non-empty list of expert ids, got a list");
  EXPECT_EQ(error_of(append("expert_groups: [1, 2]\n")),
            "x.yaml:13: expert_groups: expected an integer >= 1 or a mapping {count, experts}, got a list");
}

TEST(cluster_config_errors, colliding_ports) {
  EXPECT_EQ(error_of(append("ports:\n  control: 9000\n  api: 9000\n")),
            "x.yaml:15: ports.api: 9000 is also ports.control; 0 asks for an ephemeral port");
  EXPECT_EQ(error_of(append("ports:\n  metrics: 7100\n")),
            "x.yaml:14: ports.metrics: 7100 is also ports.control (its default); 0 asks for an ephemeral port");
}

TEST(cluster_config_errors, yaml_syntax_error_has_a_line) {
  const std::string text = error_of(replace_line(7, "      gpus: [1, 2"));
  EXPECT_EQ(text.rfind("x.yaml:", 0), 0u) << text;
  EXPECT_NE(text.find("invalid YAML"), std::string::npos) << text;
}

// ---- the secret never leaves in a rendering ----

TEST(cluster_config, secret_is_never_rendered) {
  auto c = parse_cluster_config(base_yaml, "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  const std::string text = to_string(*c);
  EXPECT_EQ(text.find("s3cret-value-xyz"), std::string::npos) << text;
  EXPECT_NE(text.find("<redacted>"), std::string::npos) << text;
  const std::string json = to_json(*c).dump();
  EXPECT_EQ(json.find("s3cret-value-xyz"), std::string::npos) << json;
  EXPECT_EQ(to_json(*c)["cluster"]["secret"], "<redacted>");
  EXPECT_EQ(to_json(*c)["nodes"][0]["memory_bytes"], uint64_t{16} << 30);
  // Nor in an error about the secret itself.
  const std::string err = error_of(replace_line(3, "  secret: [s3cret-value-xyz]"));
  EXPECT_EQ(err.find("s3cret-value-xyz"), std::string::npos) << err;
}

// ---- sizes ----

TEST(cluster_config_sizes, parse) {
  EXPECT_EQ(parse_size("8GiB"), uint64_t{8} << 30);
  EXPECT_EQ(parse_size("512MiB"), uint64_t{512} << 20);
  EXPECT_EQ(parse_size("512 MiB"), uint64_t{512} << 20);
  EXPECT_EQ(parse_size("1.5GiB"), uint64_t{3} << 29);
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("4096B"), 4096u);
  EXPECT_EQ(parse_size("2Gi"), uint64_t{2} << 30);
  EXPECT_EQ(parse_size("1GB"), 1000000000u);
  EXPECT_EQ(parse_size("3k"), 3000u);
  EXPECT_EQ(parse_size("1TiB"), uint64_t{1} << 40);
  EXPECT_FALSE(parse_size(""));
  EXPECT_FALSE(parse_size("GiB"));
  EXPECT_FALSE(parse_size("8 gigs"));
  EXPECT_FALSE(parse_size("-1"));
  EXPECT_FALSE(parse_size("1.5"));
  EXPECT_FALSE(parse_size("1.GiB"));
  EXPECT_FALSE(parse_size("99999999999TiB"));
}

TEST(cluster_config_sizes, format) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1000), "1000 B");
  EXPECT_EQ(format_bytes(1024), "1 KiB");
  EXPECT_EQ(format_bytes(uint64_t{8} << 30), "8 GiB");
  EXPECT_EQ(format_bytes(uint64_t{3} << 29), "1.5 GiB");
  EXPECT_EQ(format_id_ranges({0, 1, 2, 5, 7, 8}), "0-2,5,7-8");
  EXPECT_EQ(format_id_ranges({}), "");
}

}  // namespace
}  // namespace moe::runtime
