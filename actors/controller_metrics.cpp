#include "actors/controller_metrics.hpp"

namespace moe::actors {

namespace {

prometheus::Histogram::BucketBoundaries latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace

controller_metrics::controller_metrics(prometheus::Registry& r)
    : requests_total(prometheus::BuildCounter()
                         .Name("moe_controller_requests_total")
                         .Help("Generation requests by outcome")
                         .Register(r)),
      requests_finished(requests_total.Add({{"outcome", "finished"}})),
      requests_cancelled(requests_total.Add({{"outcome", "cancelled"}})),
      requests_failed(requests_total.Add({{"outcome", "failed"}})),
      requests_rejected(requests_total.Add({{"outcome", "rejected"}})),
      time_to_first_token_seconds(prometheus::BuildHistogram()
                                      .Name("moe_controller_time_to_first_token_seconds")
                                      .Help("From submission to the first generated token")
                                      .Register(r)
                                      .Add({}, latency_buckets())),
      inter_token_latency_seconds(prometheus::BuildHistogram()
                                      .Name("moe_controller_inter_token_latency_seconds")
                                      .Help("Between consecutive tokens of one request")
                                      .Register(r)
                                      .Add({}, latency_buckets())),
      request_latency_seconds(prometheus::BuildHistogram()
                                  .Name("moe_controller_request_latency_seconds")
                                  .Help("From submission to the last token (end to end)")
                                  .Register(r)
                                  .Add({}, latency_buckets())),
      queue_seconds(prometheus::BuildHistogram()
                        .Name("moe_controller_queue_seconds")
                        .Help("From submission to the start of the request's prefill")
                        .Register(r)
                        .Add({}, latency_buckets())),
      running_requests(prometheus::BuildGauge()
                           .Name("moe_controller_running_requests")
                           .Help("Requests in prefill or decode")
                           .Register(r)
                           .Add({})),
      waiting_requests(prometheus::BuildGauge()
                           .Name("moe_controller_waiting_requests")
                           .Help("Requests queued for prefill")
                           .Register(r)
                           .Add({})),
      decode_step_tokens(prometheus::BuildHistogram()
                             .Name("moe_controller_decode_step_tokens")
                             .Help("Sequences (tokens) per decode step")
                             .Register(r)
                             .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256})),
      generated_tokens_total(prometheus::BuildCounter()
                                 .Name("moe_controller_generated_tokens_total")
                                 .Help("Tokens generated")
                                 .Register(r)
                                 .Add({})),
      requests_replayed(prometheus::BuildCounter()
                            .Name("moe_controller_requests_replayed_total")
                            .Help("Requests re-run after a node failure (prompt and tokens so far), each time")
                            .Register(r)
                            .Add({})),
      deadlines_exceeded(prometheus::BuildCounter()
                             .Name("moe_controller_deadlines_exceeded_total")
                             .Help("Requests failed because their deadline passed")
                             .Register(r)
                             .Add({})),
      recoveries_total(prometheus::BuildCounter()
                           .Name("moe_recoveries_total")
                           .Help("Recoveries from node failures by kind (shards: attention shards lost; "
                                 "experts: expert groups failed over) and outcome (ok, failed)")
                           .Register(r)),
      recovery_seconds(prometheus::BuildHistogram()
                           .Name("moe_recovery_seconds")
                           .Help("From a node's down event to serving again (its requests replayed, its experts "
                                 "failed over)")
                           .Register(r)
                           .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                                            10, 30, 60, 120})),
      recovering(prometheus::BuildGauge()
                     .Name("moe_controller_recovering")
                     .Help("1 while the cluster re-places lost expert groups (no new steps start)")
                     .Register(r)
                     .Add({})),
      attention_shards_up(prometheus::BuildGauge()
                              .Name("moe_controller_attention_shards_up")
                              .Help("Attention shards the controller can send steps to")
                              .Register(r)
                              .Add({})) {
  // Both outcomes of both kinds exist from the start, so dashboards and alerts see zeros.
  for (const char* kind : {"shards", "experts"})
    for (const char* outcome : {"ok", "failed"}) recoveries_total.Add({{"kind", kind}, {"outcome", outcome}});
}

}  // namespace moe::actors
