// An API server in front of the scripted fake controller (tests/unit/actors/fake_controller.hpp)
// and fake training jobs (fake_training_jobs.hpp, a model of 512 ids), for client tests in
// other languages (tests/python) and for `moe submit` (tests/tools/submit_contracts.sh). Prints
// "port N" on stdout once it serves, then runs until its stdin closes (so it ends with the test
// that started it).
//
//   moe_api_test_server --secret S [--token-interval-ms 1] [--max-active 1000] [--fail-token T]
//                       [--training-step-interval-ms 1] [--training 0 (training calls unavailable)]
//                       [--tls-cert F --tls-key F [--tls-passphrase P] [--tls-client-ca F]]
//   moe_api_test_server --make-test-certs DIR
//       writes throwaway certificates (tests/unit/runtime/tls_test_certs.hpp) for TLS tests and
//       exits: ca.pem; server.pem/.key (signed by ca, for 127.0.0.1 and localhost);
//       server-encrypted.pem/.key (its key encrypted with the passphrase in
//       server-encrypted.passphrase); other-ca.pem; impostor.pem/.key (signed by other-ca);
//       client-ca.pem, client.pem/.key (signed by client-ca), stranger.pem/.key (by other-ca).
#include <caf/all.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

#include "actors/actor_types.hpp"
#include "actors/api_server.hpp"
#include "runtime/actor_system.hpp"
#include "tests/unit/actors/fake_controller.hpp"
#include "tests/unit/actors/fake_training_jobs.hpp"
#include "tests/unit/runtime/tls_test_certs.hpp"

using namespace moe;

namespace {

int make_test_certs(const std::filesystem::path& dir) {
  try {
    test::tls_test_certs certs;
    auto ca = certs.make_ca("ca");
    certs.make_node(ca, "server");
    test::tls_node_options encrypted;
    encrypted.passphrase = "test server key passphrase";
    certs.make_node(ca, "server-encrypted", encrypted);
    certs.write_file("server-encrypted.passphrase", encrypted.passphrase);
    auto other = certs.make_ca("other-ca");
    certs.make_node(other, "impostor");
    auto client_ca = certs.make_ca("client-ca");
    certs.make_node(client_ca, "client");
    certs.make_node(other, "stranger");
    std::filesystem::create_directories(dir);
    for (const auto& f : std::filesystem::directory_iterator(certs.dir())) {
      std::filesystem::copy_file(f.path(), dir / f.path().filename(),
                                 std::filesystem::copy_options::overwrite_existing);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "api_test_server: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--make-test-certs") return make_test_certs(argv[2]);
  std::string secret;
  actors::testing::fake_controller_options fake;
  actors::testing::fake_training_options fake_training;
  bool training = true;
  std::optional<runtime::api_tls_config> tls;
  auto tls_config = [&tls]() -> runtime::api_tls_config& {
    if (!tls) tls.emplace();
    return *tls;
  };
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const std::string value = argv[i + 1];
    if (flag == "--secret") {
      secret = value;
    } else if (flag == "--tls-cert") {
      tls_config().certificate = value;
    } else if (flag == "--tls-key") {
      tls_config().key = value;
    } else if (flag == "--tls-passphrase") {
      tls_config().passphrase = value;
    } else if (flag == "--tls-client-ca") {
      tls_config().client_ca_file = value;
    } else if (flag == "--token-interval-ms") {
      fake.token_interval = std::chrono::milliseconds(std::stoll(value));
    } else if (flag == "--max-active") {
      fake.max_active = std::stoull(value);
    } else if (flag == "--fail-token") {
      fake.fail_token = static_cast<int32_t>(std::stol(value));
    } else if (flag == "--training-step-interval-ms") {
      fake_training.step_interval = std::chrono::milliseconds(std::stoll(value));
    } else if (flag == "--training") {
      training = value != "0";
    } else {
      std::fprintf(stderr, "api_test_server: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  runtime::actor_system_config::options o;
  o.load_middleman = false;
  o.num_worker_threads = 2;
  runtime::actor_system_config cfg{o};
  actors::add_actor_message_types(cfg);
  caf::actor_system sys{cfg};
  auto log = std::make_shared<actors::testing::fake_controller_log>();
  auto controller = actors::testing::spawn_fake_controller(sys, fake, log);
  actors::training_jobs_actor training_jobs;
  if (training) {
    training_jobs = actors::testing::spawn_fake_training_jobs(
        sys, fake_training, std::make_shared<actors::testing::fake_training_log>());
  }

  actors::api_server_options options;
  options.secret = secret;
  options.failed_login_delay = std::chrono::milliseconds(10);
  options.cluster.name = "fake";
  options.cluster.nodes = {{"n0", "127.0.0.1", {"n0/cpu0"}}};
  options.cluster.actors = {{"controller", "controller", "n0", "n0/cpu0"}};
  options.cluster.placement_version = 1;
  options.cluster.placement_json = "{}";
  options.training_jobs = training_jobs;
  options.vocab_size = fake_training.vocab_size;
  options.tls = tls;
  auto server = actors::api_server::start(sys, controller, options);
  if (!server) {
    std::fprintf(stderr, "api_test_server: %s\n", error_text(server.error()).c_str());
    caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
    if (training_jobs) caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
    return 1;
  }
  std::printf("port %u\n", static_cast<unsigned>((*server)->port()));
  std::fflush(stdout);
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  (*server)->stop();
  caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
  if (training_jobs) caf::anon_send_exit(training_jobs, caf::exit_reason::user_shutdown);
  return 0;
}
