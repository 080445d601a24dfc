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

/// Steps waiting behind the running one on attention shard `shard`.
prometheus::Gauge* queued_steps_gauge(prometheus::Registry& r, const std::string& shard);
/// Free blocks of attention shard `shard`'s latent KV cache (an attention shard of the actor
/// graph or a whole-model engine shard).
prometheus::Gauge* free_cache_blocks_gauge(prometheus::Registry& r, const std::string& shard);

/// A whole-model engine shard's steps (actors/engine_shard.hpp), by phase: how long each took,
/// the tokens it ran (a prefill's prompt tokens, a decode's sequences) and the steps that
/// failed. Rates of the token counters are the shard's throughput: per GPU with --engine gpu.
class engine_step_metrics {
 public:
  engine_step_metrics() = default;
  engine_step_metrics(prometheus::Registry& r, const std::string& shard);
  void observe(bool prefill, double seconds, int64_t tokens, bool ok);

 private:
  prometheus::Histogram* seconds_[2] = {nullptr, nullptr};  // [decode, prefill]
  prometheus::Counter* tokens_[2] = {nullptr, nullptr};
  prometheus::Counter* failures_[2] = {nullptr, nullptr};
};

/// Time an expert group spends per forward call.
prometheus::Histogram* expert_forward_histogram(prometheus::Registry& r, const std::string& group);

}  // namespace moe::actors
