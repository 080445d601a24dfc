#include "model/routing_bias.hpp"

#include "base/assert.hpp"

namespace moe::model {

void update_routing_bias(std::span<float> bias, std::span<const int64_t> load, double speed) {
  MOE_ASSERT(bias.size() == load.size());
  int64_t total = 0;
  for (auto l : load) total += l;
  if (speed == 0 || total == 0) return;
  const double mean = static_cast<double>(total) / static_cast<double>(load.size());
  for (size_t i = 0; i < bias.size(); ++i) {
    const double gap = mean - static_cast<double>(load[i]);
    const double sign = gap > 0 ? 1.0 : (gap < 0 ? -1.0 : 0.0);
    bias[i] = static_cast<float>(bias[i] + speed * sign);
  }
}

}  // namespace moe::model
