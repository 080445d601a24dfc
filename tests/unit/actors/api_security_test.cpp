// Security of the job API end to end over 127.0.0.1, against the scripted fake controller and
// training jobs (fake_controller.hpp, fake_training_jobs.hpp):
// - every JobService method is refused as "unauthenticated" without the cluster secret (wrong,
//   empty, a prefix), over plain TCP and over TLS, and none reaches an actor;
// - TLS (api_server_options::tls, the config's api.tls) with moe::client, certificates made by
//   libcrypto at run time (tests/unit/runtime/tls_test_certs.hpp): tokens stream over TLS; a
//   client trusting another CA, checking another name, speaking plain TCP to a TLS server or TLS
//   to a plain one gets an error naming the cause, not a hang; client certificates when the
//   server asks; an encrypted key; a stalled handshake holds up no other client.
#include "actors/api_server.hpp"

#include <arpa/inet.h>
#include <capnp/ez-rpc.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/schema.h>
#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <iterator>

#include "actors/actor_types.hpp"
#include "client/job_client.hpp"
#include "protocol/api.capnp.h"
#include "runtime/actor_system.hpp"
#include "system_config.hpp"
#include "tests/unit/actors/fake_controller.hpp"
#include "tests/unit/actors/fake_training_jobs.hpp"
#include "tests/unit/runtime/tls_test_certs.hpp"

using namespace moe;
using namespace std::chrono_literals;

namespace {

namespace wire = moe::protocol::capnp;

const std::string secret = "the api security test's secret";

bool is(const caf::error& e, client::client_errc code) {
  return e.category() == caf::atom("client") && e.code() == static_cast<uint8_t>(code);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

class api_security_test : public ::testing::Test {
 protected:
  api_security_test() {
    ca = certs.make_ca("ca");
    server_identity = certs.make_node(ca, "server");
    other_ca = certs.make_ca("other-ca");
    client_ca = certs.make_ca("client-ca");
    client_identity = certs.make_node(client_ca, "client");
    stranger = certs.make_node(other_ca, "stranger");
  }

  ~api_security_test() override {
    if (server) server->stop();
    if (controller) caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (training_jobs) caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
  }

  runtime::api_tls_config server_tls() const {
    runtime::api_tls_config t;
    t.certificate = server_identity.cert_file;
    t.key = server_identity.key_file;
    return t;
  }

  void start(std::optional<runtime::api_tls_config> tls,
             const std::function<void(actors::api_server_options&)>& adjust = {}) {
    controller = actors::testing::spawn_fake_controller(sys, {}, log);
    training_jobs = actors::testing::spawn_fake_training_jobs(sys, {}, training_log);
    actors::api_server_options o;
    o.secret = secret;
    o.cluster.name = "security-test";
    o.failed_login_delay = 10ms;
    o.training_jobs = training_jobs;
    o.vocab_size = 512;
    o.tls = std::move(tls);
    if (adjust) adjust(o);
    auto s = actors::api_server::start(sys, controller, o);
    ASSERT_TRUE(s) << error_text(s.error());
    server = std::move(*s);
  }

  // Client options for TLS trusting `ca_file`, checking the certificate for `name`.
  static client::client_options tls_to(const std::filesystem::path& ca_file, std::string name = "localhost") {
    client::client_options o;
    o.tls = client::client_tls_options{ca_file.string(), {}, {}, std::move(name)};
    return o;
  }

  caf::expected<std::unique_ptr<client::job_client>> connect(const client::client_options& o,
                                                             const std::string& s = secret,
                                                             const std::string& host = "127.0.0.1") {
    return client::job_client::connect(host, server->port(), s, o);
  }

  runtime::actor_system_config cfg = moe::actors::testing::local_system_config();
  caf::actor_system sys{cfg};
  std::shared_ptr<actors::testing::fake_controller_log> log =
      std::make_shared<actors::testing::fake_controller_log>();
  std::shared_ptr<actors::testing::fake_training_log> training_log =
      std::make_shared<actors::testing::fake_training_log>();
  actors::controller_actor controller;
  actors::training_jobs_actor training_jobs;
  std::unique_ptr<actors::api_server> server;
  test::tls_test_certs certs;
  test::tls_test_certs::identity ca, server_identity, other_ca, client_ca, client_identity, stranger;
};

// --- every method, without the secret ---------------------------------------------------

// How one call ended.
struct call_outcome {
  std::string method;
  bool failed = false;
  kj::Exception::Type type = kj::Exception::Type::FAILED;
  std::string text;  // the exception's description
};

// Calls every JobService method on `service` and answers how each ended. The list must name
// every method of the schema (checked: a method added later must be added here).
std::vector<call_outcome> call_every_method(wire::JobService::Client service, kj::WaitScope& ws) {
  std::vector<std::pair<std::string, std::function<kj::Promise<void>()>>> calls = {
      {"submit",
       [&] {
         auto r = service.submitRequest();
         auto g = r.initJob().initGeneration();
         g.initPrompt(1).set(0, 5);
         g.setMaxNewTokens(3);
         g.setTopP(1);
         return r.send().ignoreResult();
       }},
      {"status",
       [&] {
         auto r = service.statusRequest();
         r.setJobId(1);
         return r.send().ignoreResult();
       }},
      {"cancel",
       [&] {
         auto r = service.cancelRequest();
         r.setJobId(1);
         return r.send().ignoreResult();
       }},
      {"describe", [&] { return service.describeRequest().send().ignoreResult(); }},
      {"rebalance", [&] { return service.rebalanceRequest().send().ignoreResult(); }},
      {"train",
       [&] {
         auto r = service.trainRequest();
         r.initJob().getCorpus().setText("some text to train on, long enough for a sequence or two");
         return r.send().ignoreResult();
       }},
      {"trainingStatus",
       [&] {
         auto r = service.trainingStatusRequest();
         r.setJobId(1);
         return r.send().ignoreResult();
       }},
      {"cancelTraining",
       [&] {
         auto r = service.cancelTrainingRequest();
         r.setJobId(1);
         return r.send().ignoreResult();
       }},
      {"checkpoint",
       [&] {
         auto r = service.checkpointRequest();
         r.setDirectory("/tmp/moe-api-security-test-checkpoint");
         return r.send().ignoreResult();
       }},
  };
  EXPECT_EQ(calls.size(), capnp::Schema::from<wire::JobService>().getMethods().size())
      << "a JobService method is missing from this test";
  std::vector<call_outcome> out;
  for (auto& [name, call] : calls) {
    call_outcome o;
    o.method = name;
    try {
      call().wait(ws);
    } catch (const kj::Exception& e) {
      o.failed = true;
      o.type = e.getType();
      o.text = e.getDescription().cStr();
    }
    out.push_back(std::move(o));
  }
  return out;
}

// Logs in with `given` and, without waiting for the answer (promise pipelining, as a client
// that never looks at the login result would), calls every method on the service it returned.
void expect_every_method_unauthenticated(wire::Gateway::Client gateway, kj::WaitScope& ws, const std::string& given) {
  auto login = gateway.loginRequest();
  login.setSecret(kj::StringPtr(given.c_str(), given.size()));
  login.setClientVersion(wire::API_VERSION);
  auto pending = login.send();
  for (const auto& o : call_every_method(pending.getService(), ws)) {
    EXPECT_TRUE(o.failed && contains(o.text, "unauthenticated")) << o.method << " with secret '" << given << "': " << o.text;
    EXPECT_FALSE(!given.empty() && contains(o.text, given)) << o.method << " echoed the secret: " << o.text;
  }
  try {
    pending.wait(ws);
    ADD_FAILURE() << "login with '" << given << "' succeeded";
  } catch (const kj::Exception& e) {
    EXPECT_TRUE(contains(e.getDescription().cStr(), "unauthenticated")) << e.getDescription().cStr();
  }
  // The bootstrap capability itself is a Gateway: as a JobService it implements nothing.
  for (const auto& o : call_every_method(gateway.castAs<wire::JobService>(), ws)) {
    EXPECT_TRUE(o.failed && o.type == kj::Exception::Type::UNIMPLEMENTED) << o.method << " on the bare gateway: " << o.text;
  }
}

}  // namespace

TEST_F(api_security_test, every_method_is_refused_without_the_secret) {
  start(std::nullopt);
  capnp::EzRpcClient rpc("127.0.0.1", server->port());
  auto gateway = rpc.getMain<wire::Gateway>();
  for (const std::string& given : {std::string("not the secret"), std::string(), secret.substr(0, 8), secret + " "}) {
    expect_every_method_unauthenticated(gateway, rpc.getWaitScope(), given);
  }
  // Nothing reached the controller or the training jobs.
  EXPECT_EQ(log->num_submitted(), 0u);
  EXPECT_TRUE(training_log->submitted().empty());
  EXPECT_TRUE(training_log->checkpoints().empty());

  // The same methods with the secret are served (so the refusals above were the secret's).
  auto login = gateway.loginRequest();
  login.setSecret(secret);
  login.setClientVersion(wire::API_VERSION);
  for (const auto& o : call_every_method(login.send().getService(), rpc.getWaitScope())) {
    EXPECT_FALSE(contains(o.text, "unauthenticated")) << o.method << ": " << o.text;
  }
  EXPECT_EQ(log->num_submitted(), 1u);
}

TEST_F(api_security_test, every_method_is_refused_without_the_secret_over_tls) {
  start(server_tls());
  auto io = kj::setupAsyncIo();
  kj::TlsContext::Options o;
  o.useSystemTrustStore = false;
  const std::string ca_pem = [&] {
    std::ifstream in(ca.cert_file);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  kj::TlsCertificate trusted(kj::StringPtr(ca_pem.c_str(), ca_pem.size()));
  o.trustedCertificates = kj::arrayPtr(&trusted, 1);
  kj::TlsContext tls(kj::mv(o));
  auto plain = io.provider->getNetwork().parseAddress("127.0.0.1", server->port()).wait(io.waitScope)->connect().wait(io.waitScope);
  auto stream = tls.wrapClient(kj::mv(plain), "localhost").wait(io.waitScope);
  capnp::TwoPartyClient rpc(*stream);
  auto gateway = rpc.bootstrap().castAs<wire::Gateway>();
  for (const std::string& given : {std::string("not the secret"), std::string()}) {
    expect_every_method_unauthenticated(gateway, io.waitScope, given);
  }
  EXPECT_EQ(log->num_submitted(), 0u);
  EXPECT_TRUE(training_log->submitted().empty());
}

// --- TLS with moe::client ---------------------------------------------------------------

TEST_F(api_security_test, tokens_stream_over_tls) {
  start(server_tls());
  EXPECT_TRUE(server->uses_tls());
  auto c = connect(tls_to(ca.cert_file));
  ASSERT_TRUE(c) << error_text(c.error());
  client::generation_request_spec spec;
  spec.prompt = {5, 17, 42};
  spec.max_new_tokens = 24;
  std::vector<int32_t> streamed;
  size_t num_events = 0;
  auto id = (*c)->submit(spec, [&](const client::client_event& e) {
    ++num_events;
    streamed.insert(streamed.end(), e.tokens.begin(), e.tokens.end());
  });
  ASSERT_TRUE(id) << error_text(id.error());
  auto done = (*c)->wait(*id);
  ASSERT_TRUE(done) << error_text(done.error());
  actors::generation_job job;
  job.prompt = spec.prompt;
  job.max_new_tokens = spec.max_new_tokens;
  const auto want = actors::testing::fake_tokens(job);
  EXPECT_EQ(done->tokens, want);
  EXPECT_EQ(streamed, want);
  EXPECT_GE(num_events, 1u);
  auto described = (*c)->describe();
  ASSERT_TRUE(described) << error_text(described.error());
  EXPECT_EQ(described->name, "security-test");
}

TEST_F(api_security_test, a_client_dialling_a_name_the_certificate_holds_needs_no_server_name) {
  start(server_tls());
  auto c = connect(tls_to(ca.cert_file, ""), secret, "localhost");
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_TRUE((*c)->describe());
}

TEST_F(api_security_test, a_wrong_secret_over_tls_is_unauthenticated) {
  start(server_tls());
  auto c = connect(tls_to(ca.cert_file), "not the secret");
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::unauthenticated)) << error_text(c.error());
  EXPECT_FALSE(contains(error_text(c.error()), "not the secret"));
  EXPECT_EQ(log->num_submitted(), 0u);
}

TEST_F(api_security_test, a_client_trusting_another_ca_gets_a_clear_error) {
  start(server_tls());
  auto c = connect(tls_to(other_ca.cert_file));
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::tls_failed)) << error_text(c.error());
  EXPECT_TRUE(contains(error_text(c.error()), "not signed by a CA this client trusts")) << error_text(c.error());
  // The server keeps serving the clients that trust it.
  auto good = connect(tls_to(ca.cert_file));
  ASSERT_TRUE(good) << error_text(good.error());
  EXPECT_TRUE((*good)->describe());
}

TEST_F(api_security_test, a_certificate_for_another_name_is_refused) {
  start(server_tls());
  auto c = connect(tls_to(ca.cert_file, "api.example.org"));
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::tls_failed)) << error_text(c.error());
  EXPECT_TRUE(contains(error_text(c.error()), "does not name 'api.example.org'")) << error_text(c.error());
}

TEST_F(api_security_test, a_plain_client_of_a_tls_server_gets_an_error_not_a_hang) {
  start(server_tls());
  auto c = connect({});
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::connection_failed)) << error_text(c.error());
  EXPECT_TRUE(contains(error_text(c.error()), "connect with TLS")) << error_text(c.error());
  auto good = connect(tls_to(ca.cert_file));
  ASSERT_TRUE(good) << error_text(good.error());
}

TEST_F(api_security_test, a_tls_client_of_a_plain_server_gets_an_error_not_a_hang) {
  start(std::nullopt);
  EXPECT_FALSE(server->uses_tls());
  auto c = connect(tls_to(ca.cert_file));
  ASSERT_FALSE(c);
  EXPECT_TRUE(is(c.error(), client::client_errc::tls_failed)) << error_text(c.error());
  EXPECT_TRUE(contains(error_text(c.error()), "does not speak TLS")) << error_text(c.error());
}

TEST_F(api_security_test, client_certificates_when_the_server_asks_for_them) {
  auto tls = server_tls();
  tls.client_ca_file = client_ca.cert_file;
  start(tls);
  auto without = connect(tls_to(ca.cert_file));
  ASSERT_FALSE(without);
  EXPECT_TRUE(is(without.error(), client::client_errc::tls_failed)) << error_text(without.error());
  EXPECT_TRUE(contains(error_text(without.error()), "client certificate")) << error_text(without.error());

  auto with_stranger = tls_to(ca.cert_file);
  with_stranger.tls->certificate = stranger.cert_file.string();
  with_stranger.tls->key = stranger.key_file.string();
  auto refused = connect(with_stranger);
  ASSERT_FALSE(refused);
  EXPECT_TRUE(is(refused.error(), client::client_errc::tls_failed)) << error_text(refused.error());

  auto with_client = tls_to(ca.cert_file);
  with_client.tls->certificate = client_identity.cert_file.string();
  with_client.tls->key = client_identity.key_file.string();
  auto accepted = connect(with_client);
  ASSERT_TRUE(accepted) << error_text(accepted.error());
  EXPECT_TRUE((*accepted)->describe());
  // A certificate does not replace the secret.
  auto no_secret = connect(with_client, "not the secret");
  ASSERT_FALSE(no_secret);
  EXPECT_TRUE(is(no_secret.error(), client::client_errc::unauthenticated)) << error_text(no_secret.error());
}

TEST_F(api_security_test, an_encrypted_key_needs_its_passphrase_which_no_error_shows) {
  test::tls_node_options encrypted;
  encrypted.passphrase = "passphrase-of-the-api-key-7f3a";
  auto id = certs.make_node(ca, "encrypted", encrypted);
  runtime::api_tls_config tls;
  tls.certificate = id.cert_file;
  tls.key = id.key_file;
  tls.passphrase = "a-wrong-passphrase-19c2";
  controller = actors::testing::spawn_fake_controller(sys, {}, log);
  actors::api_server_options o;
  o.secret = secret;
  o.tls = tls;
  auto refused = actors::api_server::start(sys, controller, o);
  ASSERT_FALSE(refused);
  const auto text = error_text(refused.error());
  EXPECT_TRUE(contains(text, id.key_file.string())) << text;
  EXPECT_FALSE(contains(text, tls.passphrase)) << text;
  EXPECT_FALSE(contains(text, encrypted.passphrase)) << text;

  tls.passphrase = encrypted.passphrase;
  start(tls);
  auto c = connect(tls_to(ca.cert_file));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_TRUE((*c)->describe());
}

TEST_F(api_security_test, unreadable_tls_files_are_named_at_start) {
  auto tls = server_tls();
  tls.certificate = certs.dir() / "missing.pem";
  controller = actors::testing::spawn_fake_controller(sys, {}, log);
  actors::api_server_options o;
  o.secret = secret;
  o.tls = tls;
  auto s = actors::api_server::start(sys, controller, o);
  ASSERT_FALSE(s);
  EXPECT_TRUE(contains(error_text(s.error()), "missing.pem")) << error_text(s.error());
}

TEST_F(api_security_test, a_stalled_handshake_holds_up_no_other_client) {
  start(server_tls(), [](actors::api_server_options& o) { o.tls_handshake_timeout = 300ms; });
  // A TCP connection that never starts its handshake.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(server->port());
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  auto c = connect(tls_to(ca.cert_file));
  ASSERT_TRUE(c) << error_text(c.error());
  EXPECT_TRUE((*c)->describe());
  // The server gives the silent one up after tls_handshake_timeout: its read ends.
  char byte = 0;
  EXPECT_LE(::recv(fd, &byte, 1, 0), 0);
  ::close(fd);
}
