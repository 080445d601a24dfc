// Error codes of the model component (config, checkpoints, blocks, reference engine).
#pragma once

#include <cstdint>
#include <string>

#include "base/error.hpp"

namespace moe::model {

enum class model_errc : uint8_t {
  bad_config = 1,     ///< Permanent: config.json is malformed or names an unsupported value.
  bad_checkpoint,     ///< Permanent: a checkpoint file is malformed, truncated or inconsistent.
  missing_tensor,     ///< Permanent: the checkpoint lacks a tensor the model needs.
  unexpected_tensor,  ///< Permanent: the checkpoint holds a tensor the model does not use.
  bad_tensor,         ///< Permanent: a tensor has the wrong shape or dtype.
  io_error,           ///< Maybe transient: a file could not be opened, mapped or written.
  bad_input,          ///< Permanent for this request: token ids, lengths or options invalid.
  kernel_failed,      ///< Permanent: a kernel rejected its arguments (a bug or unsupported).
  cache_full,         ///< Transient: no free KV-cache blocks; retry when sequences finish.
  peer_refused,       ///< Permanent for this step: another rank of an expert-parallel world
                      ///< refused its part; that rank's own error says why.
};

[[nodiscard]] const char* to_string(model_errc e) noexcept;

/// caf::error carrying `text` as its reason (moe::error_text returns it).
[[nodiscard]] caf::error make_error(model_errc code, std::string text);

}  // namespace moe::model

MOE_ERROR_ENUM(moe::model::model_errc, "model")
