// cluster.tls: the schema (required keys, unknown keys, the passphrase never echoed), relative
// paths resolved against the config file's directory, and load_cluster_config's file checks
// (missing, unreadable, not PEM, wrong key, encrypted key, another CA, expired), each error
// naming the file, line and key. api.tls (the job API's certificate): the same for its keys and
// files, and its passphrase never rendered.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <unistd.h>

#include "base/error.hpp"
#include "runtime/cluster_config.hpp"
#include "tests/unit/runtime/tls_test_certs.hpp"

namespace moe::runtime {
namespace {

// Line 4 is `tls:`; the certificate is on line 5, the key on line 6, ca_file on line 7.
std::string config_yaml(const std::string& tls_body) {
  return "cluster:\n"
         "  name: test\n"
         "  secret: s3cret-value-xyz\n"
         "  tls:\n" +
         tls_body +
         "nodes:\n"
         "  - {name: n0, devices: {cpu_slots: 1}, memory: 1GiB}\n"
         "model: {preset: tiny}\n";
}

std::string tls_body(const std::string& cert, const std::string& key, const std::string& ca,
                     const std::string& extra = "") {
  std::string s;
  if (!cert.empty()) s += "    certificate: " + cert + "\n";
  if (!key.empty()) s += "    key: " + key + "\n";
  if (!ca.empty()) s += "    ca_file: " + ca + "\n";
  return s + extra;
}

class cluster_config_tls : public ::testing::Test {
 protected:
  void SetUp() override {
    ca_ = certs_.make_ca("ca");
    n0_ = certs_.make_node(ca_, "n0");
    n1_ = certs_.make_node(ca_, "n1");
  }

  /// Writes the config next to the certificates and loads it.
  caf::expected<cluster_config> load(const std::string& yaml) {
    config_file_ = certs_.write_file("cluster.yaml", yaml);
    return load_cluster_config(config_file_);
  }

  /// The error text of loading `yaml`, which must fail with `code`.
  std::string load_error(const std::string& yaml, cluster_config_errc code) {
    auto c = load(yaml);
    if (c) {
      ADD_FAILURE() << "loaded, expected an error";
      return {};
    }
    EXPECT_EQ(c.error().code(), static_cast<uint8_t>(code)) << error_text(c.error());
    return error_text(c.error());
  }

  test::tls_test_certs certs_;
  test::tls_test_certs::identity ca_, n0_, n1_;
  std::filesystem::path config_file_;
};

TEST_F(cluster_config_tls, relative_paths_resolve_against_the_config_directory) {
  auto c = load(config_yaml(tls_body("n0.pem", "n0.key", "ca.pem")));
  ASSERT_TRUE(c) << error_text(c.error());
  ASSERT_TRUE(c->tls);
  EXPECT_EQ(c->tls->certificate, (certs_.dir() / "n0.pem").lexically_normal());
  EXPECT_EQ(c->tls->key, (certs_.dir() / "n0.key").lexically_normal());
  EXPECT_EQ(c->tls->ca_file, (certs_.dir() / "ca.pem").lexically_normal());
  EXPECT_TRUE(c->tls->passphrase.empty());
  EXPECT_EQ(c->tls->line, 4);
  EXPECT_EQ(c->tls->key_line, 6);
}

TEST_F(cluster_config_tls, absolute_paths_stay) {
  auto c = load(
      config_yaml(tls_body(n0_.cert_file.string(), n0_.key_file.string(), ca_.cert_file.string())));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->tls->certificate, n0_.cert_file);
}

TEST_F(cluster_config_tls, without_the_section_there_is_no_tls) {
  auto c = load(
      "cluster: {name: t, secret: s}\nnodes:\n  - {name: n0, devices: {cpu_slots: 1}, memory: "
      "1GiB}\n"
      "model: {preset: tiny}\n");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_FALSE(c->tls);
  EXPECT_FALSE(check_tls_files(*c));
  EXPECT_FALSE(to_json(*c)["cluster"].contains("tls"));
}

TEST_F(cluster_config_tls, parse_opens_no_file_and_keeps_paths_as_written) {
  auto c =
      parse_cluster_config(config_yaml(tls_body("missing.pem", "missing.key", "ca.pem")), "x.yaml");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->tls->certificate, "missing.pem");
}

TEST_F(cluster_config_tls, every_file_is_required) {
  const auto no_key =
      load_error(config_yaml(tls_body("n0.pem", "", "ca.pem")), cluster_config_errc::bad_config);
  EXPECT_EQ(no_key,
            config_file_.string() +
                ":4: cluster.tls.key: required (a PEM file with the certificate's private key)");
  const auto no_cert =
      load_error(config_yaml(tls_body("", "n0.key", "ca.pem")), cluster_config_errc::bad_config);
  EXPECT_EQ(no_cert,
            config_file_.string() +
                ":4: cluster.tls.certificate: required (a PEM file with this node's certificate)");
  const auto no_ca =
      load_error(config_yaml(tls_body("n0.pem", "n0.key", "")), cluster_config_errc::bad_config);
  EXPECT_NE(no_ca.find(":4: cluster.tls.ca_file: required"), std::string::npos) << no_ca;
  const auto empty = load_error(config_yaml("    {}\n"), cluster_config_errc::bad_config);
  EXPECT_NE(empty.find("cluster.tls.certificate: required"), std::string::npos) << empty;
}

TEST_F(cluster_config_tls, schema_errors_name_line_and_key) {
  const auto unknown =
      load_error(config_yaml(tls_body("n0.pem", "n0.key", "", "    cafile: ca.pem\n")),
                 cluster_config_errc::bad_config);
  EXPECT_EQ(unknown, config_file_.string() + ":7: cluster.tls.cafile: unknown key");
  const auto empty_key =
      load_error(config_yaml(tls_body("n0.pem", "''", "ca.pem")), cluster_config_errc::bad_config);
  EXPECT_EQ(empty_key,
            config_file_.string() + ":6: cluster.tls.key: expected a non-empty string, got ''");
  const auto not_map = load_error(
      "cluster:\n  name: t\n  secret: s\n  tls: yes\nnodes:\n  - {name: n0, devices: {cpu_slots: "
      "1}, memory: 1GiB}\n"
      "model: {preset: tiny}\n",
      cluster_config_errc::bad_config);
  EXPECT_EQ(not_map, config_file_.string() + ":4: cluster.tls: expected a mapping, got 'yes'");
}

TEST_F(cluster_config_tls, missing_file_is_an_io_error_naming_the_file) {
  const auto msg = load_error(config_yaml(tls_body("n0.pem", "nope.key", "ca.pem")),
                              cluster_config_errc::io_error);
  EXPECT_EQ(msg, config_file_.string() + ":6: cluster.tls.key: cannot read " +
                     (certs_.dir() / "nope.key").string() + ": No such file or directory");
}

TEST_F(cluster_config_tls, directory_instead_of_a_file_is_an_io_error) {
  std::filesystem::create_directories(certs_.dir() / "a-dir.pem");
  const auto msg = load_error(config_yaml(tls_body("a-dir.pem", "n0.key", "ca.pem")),
                              cluster_config_errc::io_error);
  EXPECT_EQ(msg, config_file_.string() + ":5: cluster.tls.certificate: cannot read " +
                     (certs_.dir() / "a-dir.pem").string() + ": Is a directory");
}

TEST_F(cluster_config_tls, file_without_read_permission_is_an_io_error) {
  if (::geteuid() == 0)
    GTEST_SKIP() << "root reads files whatever their mode (the directory case covers unreadable)";
  std::filesystem::permissions(n0_.key_file, std::filesystem::perms::none);
  const auto msg = load_error(config_yaml(tls_body("n0.pem", "n0.key", "ca.pem")),
                              cluster_config_errc::io_error);
  EXPECT_NE(msg.find(":6: cluster.tls.key: cannot read "), std::string::npos) << msg;
  EXPECT_NE(msg.find("Permission denied"), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, content_that_is_not_pem_is_refused) {
  certs_.write_file("junk.txt", "not a certificate\n");
  auto msg = load_error(config_yaml(tls_body("junk.txt", "n0.key", "ca.pem")),
                        cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":5: cluster.tls.certificate: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("holds no PEM certificate"), std::string::npos) << msg;
  msg = load_error(config_yaml(tls_body("n0.pem", "junk.txt", "ca.pem")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":6: cluster.tls.key: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("holds no PEM private key"), std::string::npos) << msg;
  msg = load_error(config_yaml(tls_body("n0.pem", "n0.key", "junk.txt")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":7: cluster.tls.ca_file: "), std::string::npos) << msg;
  // A key where the certificate belongs.
  msg = load_error(config_yaml(tls_body("n0.key", "n0.key", "ca.pem")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("cluster.tls.certificate: "), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, key_of_another_certificate_is_refused) {
  const auto msg = load_error(config_yaml(tls_body("n0.pem", "n1.key", "ca.pem")),
                              cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":6: cluster.tls.key: the key in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not belong to the certificate"), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, encrypted_key_needs_its_passphrase) {
  test::tls_node_options o;
  o.passphrase = "open sesame";
  certs_.make_node(ca_, "enc", o);
  auto msg = load_error(config_yaml(tls_body("enc.pem", "enc.key", "ca.pem")),
                        cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":6: cluster.tls.key: the key in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("is encrypted: give cluster.tls.passphrase"), std::string::npos) << msg;

  msg = load_error(
      config_yaml(tls_body("enc.pem", "enc.key", "ca.pem", "    passphrase: wrong-one\n")),
      cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("wrong passphrase"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("wrong-one"), std::string::npos) << "the passphrase was echoed: " << msg;

  auto c =
      load(config_yaml(tls_body("enc.pem", "enc.key", "ca.pem", "    passphrase: open sesame\n")));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_EQ(c->tls->passphrase, "open sesame");
  // Never rendered.
  EXPECT_EQ(to_string(*c).find("open sesame"), std::string::npos);
  EXPECT_EQ(to_json(*c).dump().find("open sesame"), std::string::npos);
  EXPECT_EQ(to_json(*c)["cluster"]["tls"]["passphrase"], "<redacted>");
  EXPECT_EQ(to_json(*c)["cluster"]["tls"]["key"], (certs_.dir() / "enc.key").string());
}

TEST_F(cluster_config_tls, empty_passphrase_is_an_error_that_echoes_nothing) {
  const auto msg =
      load_error(config_yaml(tls_body("n0.pem", "n0.key", "ca.pem", "    passphrase: ''\n")),
                 cluster_config_errc::bad_config);
  EXPECT_EQ(msg, config_file_.string() + ":8: cluster.tls.passphrase: expected a non-empty string");
}

TEST_F(cluster_config_tls, certificate_from_another_ca_is_refused) {
  auto other = certs_.make_ca("other-ca");
  certs_.make_node(other, "stranger");
  const auto msg = load_error(config_yaml(tls_body("stranger.pem", "stranger.key", "ca.pem")),
                              cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":5: cluster.tls.certificate: the certificate in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not verify against ca_file"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peers would refuse it"), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, expired_certificate_is_refused) {
  test::tls_node_options o;
  o.valid_days = -2;
  certs_.make_node(ca_, "old", o);
  const auto msg = load_error(config_yaml(tls_body("old.pem", "old.key", "ca.pem")),
                              cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("certificate has expired"), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, certificate_must_serve_as_client_and_server) {
  // Every node both accepts connections (its gatekeeper) and makes them (joins, status).
  test::tls_node_options server_only;
  server_only.extended_key_usage = "serverAuth";
  certs_.make_node(ca_, "srv", server_only);
  auto msg = load_error(config_yaml(tls_body("srv.pem", "srv.key", "ca.pem")),
                        cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":5: cluster.tls.certificate: the certificate in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("as a TLS client certificate"), std::string::npos) << msg;
  test::tls_node_options client_only;
  client_only.extended_key_usage = "clientAuth";
  certs_.make_node(ca_, "cli", client_only);
  msg = load_error(config_yaml(tls_body("cli.pem", "cli.key", "ca.pem")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("as a TLS server certificate"), std::string::npos) << msg;
}

TEST_F(cluster_config_tls, to_string_mentions_tls) {
  auto c = load(config_yaml(tls_body("n0.pem", "n0.key", "ca.pem")));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_NE(to_string(*c).find("control plane over TLS: certificate " +
                               (certs_.dir() / "n0.pem").string()),
            std::string::npos)
      << to_string(*c);
  EXPECT_FALSE(to_json(*c)["cluster"]["tls"].contains("passphrase"));
}

// --- api.tls: the job API's certificate -------------------------------------------------

// Line 5 is `  tls:` under `api:` (line 4); the certificate is on line 6, the key on line 7.
std::string api_config_yaml(const std::string& api_tls_body) {
  return "cluster:\n"
         "  name: test\n"
         "  secret: s3cret-value-xyz\n"
         "api:\n"
         "  tls:\n" +
         api_tls_body +
         "nodes:\n"
         "  - {name: n0, devices: {cpu_slots: 1}, memory: 1GiB}\n"
         "model: {preset: tiny}\n";
}

std::string api_tls_body(const std::string& cert, const std::string& key, const std::string& extra = "") {
  std::string s;
  if (!cert.empty()) s += "    certificate: " + cert + "\n";
  if (!key.empty()) s += "    key: " + key + "\n";
  return s + extra;
}

TEST_F(cluster_config_tls, api_tls_paths_resolve_and_render_without_the_passphrase) {
  test::tls_node_options o;
  o.passphrase = "api-key-passphrase-8d1e";
  certs_.make_node(ca_, "api", o);
  auto c = load(api_config_yaml(api_tls_body("api.pem", "api.key",
                                             "    passphrase: api-key-passphrase-8d1e\n    client_ca_file: ca.pem\n")));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_FALSE(c->tls);  // the control plane's TLS is separate
  ASSERT_TRUE(c->api_tls);
  EXPECT_EQ(c->api_tls->certificate, (certs_.dir() / "api.pem").lexically_normal());
  EXPECT_EQ(c->api_tls->key, (certs_.dir() / "api.key").lexically_normal());
  EXPECT_EQ(c->api_tls->client_ca_file, (certs_.dir() / "ca.pem").lexically_normal());
  EXPECT_EQ(c->api_tls->passphrase, "api-key-passphrase-8d1e");
  EXPECT_EQ(c->api_tls->line, 5);
  EXPECT_EQ(c->api_tls->key_line, 7);
  EXPECT_EQ(to_string(*c).find("api-key-passphrase-8d1e"), std::string::npos) << to_string(*c);
  EXPECT_NE(to_string(*c).find("job API over TLS: certificate " + (certs_.dir() / "api.pem").string()),
            std::string::npos)
      << to_string(*c);
  const auto j = to_json(*c);
  EXPECT_EQ(j.dump().find("api-key-passphrase-8d1e"), std::string::npos);
  EXPECT_EQ(j["api"]["tls"]["passphrase"], "<redacted>");
  EXPECT_EQ(j["api"]["tls"]["client_ca_file"], (certs_.dir() / "ca.pem").string());
  EXPECT_EQ(j.dump().find("s3cret-value-xyz"), std::string::npos);
}

TEST_F(cluster_config_tls, api_tls_needs_a_certificate_and_key_and_knows_its_keys) {
  auto msg = load_error(api_config_yaml(api_tls_body("n0.pem", "")), cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":5: api.tls.key: required"), std::string::npos) << msg;
  msg = load_error(api_config_yaml(api_tls_body("n0.pem", "n0.key", "    ca_file: ca.pem\n")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":8: api.tls.ca_file: unknown key"), std::string::npos) << msg;
  msg = load_error(api_config_yaml(api_tls_body("n0.pem", "n0.key", "    passphrase: ''\n")),
                   cluster_config_errc::bad_config);
  EXPECT_EQ(msg, config_file_.string() + ":8: api.tls.passphrase: expected a non-empty string");
  auto c = load(api_config_yaml(api_tls_body("n0.pem", "n0.key")));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_TRUE(c->api_tls->client_ca_file.empty());
  EXPECT_FALSE(to_json(*c)["api"]["tls"].contains("passphrase"));
}

TEST_F(cluster_config_tls, api_tls_files_are_checked_at_load) {
  auto msg = load_error(api_config_yaml(api_tls_body("missing.pem", "n0.key")), cluster_config_errc::io_error);
  EXPECT_NE(msg.find(":6: api.tls.certificate: cannot read "), std::string::npos) << msg;
  msg = load_error(api_config_yaml(api_tls_body("n0.pem", "n1.key")), cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":7: api.tls.key: the key in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not belong to the certificate"), std::string::npos) << msg;

  test::tls_node_options enc;
  enc.passphrase = "right-one-5b7c";
  certs_.make_node(ca_, "enc", enc);
  msg = load_error(api_config_yaml(api_tls_body("enc.pem", "enc.key")), cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("is encrypted: give api.tls.passphrase"), std::string::npos) << msg;
  msg = load_error(api_config_yaml(api_tls_body("enc.pem", "enc.key", "    passphrase: wrong-one-3e9f\n")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("wrong passphrase"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("wrong-one-3e9f"), std::string::npos) << "the passphrase was echoed: " << msg;

  test::tls_node_options client_only;
  client_only.extended_key_usage = "clientAuth";
  certs_.make_node(ca_, "cli", client_only);
  msg = load_error(api_config_yaml(api_tls_body("cli.pem", "cli.key")), cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":6: api.tls.certificate: the certificate in "), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot serve as a TLS server certificate"), std::string::npos) << msg;

  test::tls_node_options old;
  old.valid_days = -2;
  certs_.make_node(ca_, "old", old);
  msg = load_error(api_config_yaml(api_tls_body("old.pem", "old.key")), cluster_config_errc::bad_config);
  EXPECT_NE(msg.find("has expired"), std::string::npos) << msg;

  certs_.write_file("not-pem.txt", "hello\n");
  msg = load_error(api_config_yaml(api_tls_body("n0.pem", "n0.key", "    client_ca_file: not-pem.txt\n")),
                   cluster_config_errc::bad_config);
  EXPECT_NE(msg.find(":8: api.tls.client_ca_file: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("holds no PEM certificate"), std::string::npos) << msg;
}

}  // namespace
}  // namespace moe::runtime
