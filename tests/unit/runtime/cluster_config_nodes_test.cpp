// The multi-process keys of the cluster config (per-node control_port/metrics_port, the
// heartbeat settings, port collisions on one host), and the Kubernetes manifests in
// deploy/k8s/: each parses as YAML, has the kinds it should, and the ConfigMap's embedded
// cluster config is valid.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <set>

#include "runtime/cluster_config.hpp"

using namespace moe;
using namespace moe::runtime;

namespace {

std::string config(const std::string& cluster_extra, const std::string& nodes) {
  return "cluster:\n  name: c\n  secret: s\n" + cluster_extra + "nodes:\n" + nodes + "model: {preset: tiny}\n";
}

const std::string two_nodes =
    "  - {name: a, devices: {cpu_slots: 1}, memory: 1GiB}\n"
    "  - {name: b, devices: {cpu_slots: 1}, memory: 1GiB}\n";

std::string error_of(const std::string& text) {
  auto c = parse_cluster_config(text, "x.yaml");
  return c ? std::string("no error") : error_text(c.error());
}

}  // namespace

TEST(cluster_config_nodes, default_ports_of_several_nodes_on_one_host_do_not_collide) {
  auto c = parse_cluster_config(config("", two_nodes), "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(node_control_port(*c, 0), 7100);
  EXPECT_EQ(node_control_port(*c, 1), 7110);
  EXPECT_EQ(node_metrics_port(*c, 0), 7112);
  EXPECT_EQ(node_metrics_port(*c, 1), 7122);
  EXPECT_EQ(c->heartbeat_interval_ms, 500);
  EXPECT_EQ(c->failure_timeout_ms, 3000);
  EXPECT_EQ(find_node(*c, "b"), std::optional<size_t>{1});
  EXPECT_EQ(find_node(*c, "z"), std::nullopt);
}

TEST(cluster_config_nodes, explicit_ports_and_heartbeat_settings) {
  auto c = parse_cluster_config(
      config("  heartbeat_interval_ms: 100\n  failure_timeout_ms: 1000\n",
             "  - {name: a, control_port: 9000, metrics_port: 9001, devices: {cpu_slots: 1}, memory: 1GiB}\n"),
      "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(node_control_port(*c, 0), 9000);
  EXPECT_EQ(node_metrics_port(*c, 0), 9001);
  EXPECT_EQ(c->failure_timeout_ms, 1000);
  EXPECT_EQ(to_json(*c)["nodes"][0]["control_port"], 9000);
}

TEST(cluster_config_nodes, errors_name_the_field) {
  EXPECT_EQ(error_of(config("  heartbeat_interval_ms: 500\n  failure_timeout_ms: 400\n", two_nodes)),
            "x.yaml:5: cluster.failure_timeout_ms: must exceed cluster.heartbeat_interval_ms (500): a node gets "
            "at least one heartbeat before it is declared down");
  EXPECT_EQ(error_of(config("", "  - {name: a, control_port: 70000, devices: {cpu_slots: 1}, memory: 1GiB}\n")),
            "x.yaml:5: nodes[0].control_port: expected an integer in 0..65535, got '70000'");
  // Two nodes on one host with the same explicit port.
  const std::string clash =
      "  - {name: a, control_port: 9000, devices: {cpu_slots: 1}, memory: 1GiB}\n"
      "  - {name: b, control_port: 9000, devices: {cpu_slots: 1}, memory: 1GiB}\n";
  EXPECT_EQ(error_of(config("", clash)),
            "x.yaml:6: nodes[1].control_port: 9000 is also nodes[0].control_port on host 127.0.0.1; set "
            "control_port/metrics_port of the node");
  // The same ports on different hosts are fine.
  const std::string apart =
      "  - {name: a, host: 10.0.0.1, control_port: 9000, devices: {cpu_slots: 1}, memory: 1GiB}\n"
      "  - {name: b, host: 10.0.0.2, control_port: 9000, devices: {cpu_slots: 1}, memory: 1GiB}\n";
  EXPECT_EQ(error_of(config("", apart)), "no error");
  // A node's default taking the controller's API port.
  EXPECT_EQ(error_of(config("", "  - {name: a, control_port: 7101, devices: {cpu_slots: 1}, memory: 1GiB}\n")),
            "x.yaml:5: nodes[0].control_port: 7101 is also ports.api on host 127.0.0.1; set "
            "control_port/metrics_port of the node");
}

TEST(k8s_manifests, parse_and_carry_a_valid_cluster_config) {
  const std::filesystem::path dir = std::filesystem::path(MOE_TEST_DATA_DIR) / "../../deploy/k8s";
  std::set<std::string> kinds;
  int num_files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    ++num_files;
    std::vector<YAML::Node> docs;
    try {
      docs = YAML::LoadAllFromFile(entry.path().string());
    } catch (const YAML::Exception& e) {
      FAIL() << entry.path() << ": " << e.what();
    }
    for (const auto& doc : docs) {
      ASSERT_TRUE(doc.IsMap()) << entry.path();
      ASSERT_TRUE(doc["kind"] && doc["apiVersion"]) << entry.path() << ": no kind or apiVersion";
      const auto kind = doc["kind"].as<std::string>();
      kinds.insert(kind);
      if (kind == "ConfigMap") {
        const auto text = doc["data"]["cluster.yaml"].as<std::string>();
        auto c = parse_cluster_config(text, "configmap.yaml:cluster.yaml");
        ASSERT_TRUE(c) << error_text(c.error());
        EXPECT_GE(c->nodes.size(), 1u);
      }
      if (kind == "StatefulSet") {
        const auto cmd = doc["spec"]["template"]["spec"]["containers"][0]["command"];
        ASSERT_TRUE(cmd.IsSequence());
        EXPECT_EQ(cmd[1].as<std::string>(), "node");
      }
      if (kind == "Deployment") {
        const auto cmd = doc["spec"]["template"]["spec"]["containers"][0]["command"];
        ASSERT_TRUE(cmd.IsSequence());
        EXPECT_EQ(cmd[1].as<std::string>(), "serve");
        bool joins = false;
        for (const auto& arg : cmd) joins = joins || arg.as<std::string>() == "--join-nodes";
        EXPECT_TRUE(joins) << "the controller must join the node pods";
      }
    }
  }
  EXPECT_GE(num_files, 4);
  for (const char* k : {"ConfigMap", "Secret", "StatefulSet", "Deployment", "Service", "Kustomization"}) {
    EXPECT_TRUE(kinds.count(k)) << k << " missing";
  }
}
