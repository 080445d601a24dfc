// The controller's metrics, registered in one place (docs/metrics.md lists them).
// Thread safety: prometheus-cpp metrics are thread-safe; updated from the controller actor.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace moe::actors {

struct controller_metrics {
  explicit controller_metrics(prometheus::Registry& r);

  prometheus::Family<prometheus::Counter>& requests_total;  ///< {outcome}
  prometheus::Counter& requests_finished;
  prometheus::Counter& requests_cancelled;
  prometheus::Counter& requests_failed;
  prometheus::Counter& requests_rejected;
  prometheus::Histogram& time_to_first_token_seconds;
  prometheus::Histogram& inter_token_latency_seconds;
  prometheus::Histogram& request_latency_seconds;
  prometheus::Histogram& queue_seconds;
  prometheus::Gauge& running_requests;
  prometheus::Gauge& waiting_requests;
  prometheus::Histogram& decode_step_tokens;
  prometheus::Counter& generated_tokens_total;
  // Recovery (docs/operations.md, "Recovery while serving").
  prometheus::Counter& requests_replayed;         ///< re-run after a failure, each time
  prometheus::Counter& deadlines_exceeded;        ///< failed because their deadline passed
  prometheus::Family<prometheus::Counter>& recoveries_total;  ///< {kind, outcome}
  prometheus::Histogram& recovery_seconds;        ///< from the down event to serving again
  prometheus::Gauge& recovering;                  ///< 1 while a failover runs
  prometheus::Gauge& attention_shards_up;
};

}  // namespace moe::actors
