// prometheus-cpp wired for real: a counter is scraped over HTTP from the process's metrics
// endpoint on 127.0.0.1, in a process that has also run OpenBLAS and initialised CUDA (the
// combination that crashes prometheus-cpp's own Exposer; see monitoring/metrics_server.hpp).
#include "monitoring/metrics_server.hpp"

#include <cblas.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <prometheus/counter.h>
#include <prometheus/registry.h>

#include <thread>

#include "runtime/devices.hpp"

using namespace moe;

TEST(metrics_server, counter_is_scraped_over_http_with_blas_and_cuda_loaded) {
  // Load OpenBLAS's threads and CUDA's runtime into this process first.
  std::vector<float> a(64 * 64, 1.0f), b(64 * 64, 2.0f), c(64 * 64, 0.0f);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 64, 64, 64, 1.0f, a.data(), 64,
              b.data(), 64, 0.0f, c.data(), 64);
  ASSERT_FLOAT_EQ(c[0], 128.0f);
  (void)runtime::discover_devices();

  auto registry = std::make_shared<prometheus::Registry>();
  auto& family = prometheus::BuildCounter()
                     .Name("moe_test_requests_total")
                     .Help("Requests seen by the test")
                     .Register(*registry);
  auto& counter = family.Add({{"outcome", "ok"}});
  counter.Increment(3);

  auto server = monitoring::metrics_server::start(registry, "127.0.0.1", 0);
  ASSERT_TRUE(server) << error_text(server.error());
  EXPECT_NE((*server)->port(), 0);

  // Scrape from several threads at once, as Prometheus and a curl may.
  std::vector<std::thread> scrapers;
  std::vector<std::string> bodies(4);
  for (size_t i = 0; i < bodies.size(); ++i) {
    scrapers.emplace_back([&, i] {
      httplib::Client cli("127.0.0.1", (*server)->port());
      if (auto res = cli.Get("/metrics"); res && res->status == 200) bodies[i] = res->body;
    });
  }
  for (auto& t : scrapers) t.join();
  for (const auto& body : bodies)
    EXPECT_NE(body.find("moe_test_requests_total{outcome=\"ok\"} 3"), std::string::npos) << body;

  counter.Increment();
  httplib::Client cli("127.0.0.1", (*server)->port());
  auto res = cli.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("moe_test_requests_total{outcome=\"ok\"} 4"), std::string::npos);
  EXPECT_EQ(cli.Get("/nothing-here")->status, 404);
  (*server)->stop();
  (*server)->stop();  // idempotent
}

TEST(metrics_server, binding_a_busy_port_is_an_error) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto first = monitoring::metrics_server::start(registry, "127.0.0.1", 0);
  ASSERT_TRUE(first);
  auto second = monitoring::metrics_server::start(registry, "127.0.0.1", (*first)->port());
  ASSERT_FALSE(second);
  EXPECT_NE(error_text(second.error()).find("cannot bind"), std::string::npos);
}
