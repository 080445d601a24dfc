#include "actors/actor_metrics.hpp"

namespace moe::actors {

mailbox_gauge::mailbox_gauge(prometheus::Registry& r, const std::string& kind,
                             const std::string& id) {
  gauge_ = &prometheus::BuildGauge()
                .Name("moe_actor_mailbox_depth")
                .Help("Messages waiting in an actor's mailbox when it last handled one")
                .Register(r)
                .Add({{"actor", kind}, {"id", id}});
}

routed_tokens_counter::routed_tokens_counter(prometheus::Registry& r, int64_t num_layers,
                                             int64_t num_experts,
                                             const std::vector<bool>& is_moe_layer) {
  auto& family = prometheus::BuildCounter()
                     .Name("moe_router_tokens_routed_total")
                     .Help("Tokens routed to each logical expert, per MoE layer")
                     .Register(r);
  counters_.resize(static_cast<size_t>(num_layers));
  for (int64_t l = 0; l < num_layers; ++l) {
    if (!is_moe_layer[static_cast<size_t>(l)]) continue;
    for (int64_t e = 0; e < num_experts; ++e)
      counters_[l].push_back(
          &family.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}));
  }
}

void routed_tokens_counter::add(int64_t layer, const std::vector<int32_t>& choices) {
  if (layer < 0 || static_cast<size_t>(layer) >= counters_.size()) return;
  auto& row = counters_[static_cast<size_t>(layer)];
  for (int32_t e : choices)
    if (e >= 0 && static_cast<size_t>(e) < row.size()) row[static_cast<size_t>(e)]->Increment();
}

prometheus::Gauge* queued_steps_gauge(prometheus::Registry& r, const std::string& shard) {
  return &prometheus::BuildGauge()
              .Name("moe_attention_queued_steps")
              .Help("Steps waiting behind the running one on an attention shard")
              .Register(r)
              .Add({{"shard", shard}});
}

prometheus::Gauge* free_cache_blocks_gauge(prometheus::Registry& r, const std::string& shard) {
  return &prometheus::BuildGauge()
              .Name("moe_attention_free_cache_blocks")
              .Help("Free blocks of the latent KV cache of a shard")
              .Register(r)
              .Add({{"shard", shard}});
}

engine_step_metrics::engine_step_metrics(prometheus::Registry& r, const std::string& shard) {
  auto& seconds = prometheus::BuildHistogram()
                      .Name("moe_engine_step_seconds")
                      .Help("Wall time of one step on a whole-model engine shard")
                      .Register(r);
  auto& tokens = prometheus::BuildCounter()
                     .Name("moe_engine_tokens_total")
                     .Help(
                         "Tokens a whole-model engine shard ran: prompt tokens (prefill), "
                         "sequences (decode)")
                     .Register(r);
  auto& failures = prometheus::BuildCounter()
                       .Name("moe_engine_step_failures_total")
                       .Help("Steps a whole-model engine shard failed")
                       .Register(r);
  const char* phases[2] = {"decode", "prefill"};
  for (int p = 0; p < 2; ++p) {
    const prometheus::Labels labels{{"shard", shard}, {"phase", phases[p]}};
    seconds_[p] = &seconds.Add(
        labels, prometheus::Histogram::BucketBoundaries{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                        0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
    tokens_[p] = &tokens.Add(labels);
    failures_[p] = &failures.Add(labels);
  }
}

void engine_step_metrics::observe(bool prefill, double seconds, int64_t tokens, bool ok) {
  const int p = prefill ? 1 : 0;
  if (!seconds_[p]) return;
  seconds_[p]->Observe(seconds);
  if (ok)
    tokens_[p]->Increment(static_cast<double>(tokens));
  else
    failures_[p]->Increment();
}

prometheus::Histogram* expert_forward_histogram(prometheus::Registry& r, const std::string& group) {
  return &prometheus::BuildHistogram()
              .Name("moe_expert_group_forward_seconds")
              .Help("Time an expert group spends on one forward batch")
              .Register(r)
              .Add({{"group", group}},
                   prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                           0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1});
}

}  // namespace moe::actors
