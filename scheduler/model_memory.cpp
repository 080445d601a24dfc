#include "scheduler/model_memory.hpp"

#include <vector>

#include "base/assert.hpp"
#include "model/init_model.hpp"
#include "model/weights.hpp"
#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

model_memory model_memory_estimate(const model::model_config& config, size_t bytes_per_param,
                                   bool include_mtp) {
  model_memory m;
  std::vector<uint64_t> expert_params(static_cast<size_t>(config.n_routed_experts), 0);
  uint64_t attention_params = 0;
  uint64_t router_params = 0;
  uint64_t shared_params = 0;
  for (const auto& w : model::expected_weights(config, include_mtp)) {
    // Optional tensors (an MTP module's own embedding and head) fall back to the main model's.
    if (w.optional) continue;
    const auto n = static_cast<uint64_t>(w.num_elements());
    if (w.expert >= 0) {
      MOE_ASSERT(w.expert < config.n_routed_experts);
      expert_params[static_cast<size_t>(w.expert)] += n;
    } else if (w.kind == model::weight_kind::router || w.kind == model::weight_kind::router_bias) {
      router_params += n;
    } else if (w.name.find(".mlp.shared_experts.") != std::string::npos) {
      shared_params += n;
    } else {
      attention_params += n;
    }
  }
  for (uint64_t p : expert_params) MOE_ASSERT(p == expert_params.front());  // same shapes
  const int64_t num_layers =
      config.num_hidden_layers + (include_mtp ? config.num_nextn_predict_layers : 0);
  for (int64_t l = 0; l < num_layers; ++l) m.num_moe_layers += config.is_moe_layer(l) ? 1 : 0;

  const auto b = static_cast<uint64_t>(bytes_per_param);
  m.attention_bytes = attention_params * b;
  m.router_bytes = router_params * b;
  m.per_expert_bytes = expert_params.empty() ? 0 : expert_params.front() * b;
  m.shared_expert_bytes = shared_params * b;
  m.kv_cache_bytes_per_token =
      static_cast<uint64_t>(num_layers * (config.kv_lora_rank + config.qk_rope_head_dim)) * b;
  return m;
}

caf::expected<model::model_config> resolve_model_config(const runtime::cluster_config& config) {
  const std::string at = config.source + ":" + std::to_string(config.model.line) + ": ";
  if (!config.model.preset.empty()) {
    auto preset = model::model_preset(config.model.preset);
    if (!preset) return make_error(scheduler_errc::bad_model, at + "model.preset: " + error_text(preset.error()));
    return preset;
  }
  auto loaded = model::load_config(config.model.path);
  if (!loaded) return make_error(scheduler_errc::bad_model, at + "model.path: " + error_text(loaded.error()));
  return loaded;
}

}  // namespace moe::scheduler
