// Loading the part of a checkpoint one actor needs (its experts, its gate weights, its
// attention), shared by the node agent and the single-process cluster.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string_view>

#include "base/error.hpp"
#include "model/checkpoint.hpp"

namespace moe::actors {

/// The tensors `filter` accepts, owned by the caller (expert groups take theirs).
[[nodiscard]] caf::expected<model::checkpoint> load_weights_part(const std::filesystem::path& dir,
                                                                const model::model_config& config,
                                                                std::function<bool(std::string_view)> filter);

/// The same, shared by the actors bound to it.
[[nodiscard]] caf::expected<std::shared_ptr<const model::checkpoint>> load_weights(
    const std::filesystem::path& dir, const model::model_config& config,
    std::function<bool(std::string_view)> filter);

}  // namespace moe::actors
