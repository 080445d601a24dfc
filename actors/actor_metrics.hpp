// Metrics of the model actors (router, attention, expert group), registered in one place;
// docs/metrics.md lists them.
//
// Label cardinality: moe_router_tokens_routed_total has one series per (MoE layer, logical
// expert) of the served model: bounded by the model, e.g. 2 x 16 for tiny, 58 x 256 for
// DeepSeek-V3. Mailbox gauges have one series per actor instance.
// Thread safety: prometheus-cpp metrics are thread-safe; Family::Add is too.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>
#include <vector>

namespace moe::actors {

/// Mailbox depth of one actor instance, sampled whenever it handles a message.
class mailbox_gauge {
 public:
  mailbox_gauge() = default;
  mailbox_gauge(prometheus::Registry& r, const std::string& kind, const std::string& id);
  void set(size_t depth) {
    if (gauge_) gauge_->Set(static_cast<double>(depth));
  }

 private:
  prometheus::Gauge* gauge_ = nullptr;
};

/// Tokens the routers sent to each logical expert, per MoE layer.
class routed_tokens_counter {
 public:
  routed_tokens_counter() = default;
  routed_tokens_counter(prometheus::Registry& r, int64_t num_layers, int64_t num_experts,
                        const std::vector<bool>& is_moe_layer);
  /// choices: (T, top_k) logical expert ids of `layer`.
  void add(int64_t layer, const std::vector<int32_t>& choices);

 private:
  std::vector<std::vector<prometheus::Counter*>> counters_;  // [layer][expert]
};

/// Time an expert group spends per forward call.
prometheus::Histogram* expert_forward_histogram(prometheus::Registry& r, const std::string& group);

}  // namespace moe::actors
