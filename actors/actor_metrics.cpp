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
