#include "model/model_errc.hpp"

namespace moe::model {

const char* to_string(model_errc e) noexcept {
  switch (e) {
    case model_errc::bad_config: return "bad_config";
    case model_errc::bad_checkpoint: return "bad_checkpoint";
    case model_errc::missing_tensor: return "missing_tensor";
    case model_errc::unexpected_tensor: return "unexpected_tensor";
    case model_errc::bad_tensor: return "bad_tensor";
    case model_errc::io_error: return "io_error";
    case model_errc::bad_input: return "bad_input";
    case model_errc::kernel_failed: return "kernel_failed";
    case model_errc::cache_full: return "cache_full";
    case model_errc::peer_refused: return "peer_refused";
  }
  return "unknown";
}

caf::error make_error(model_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("model"),
                    caf::make_message(std::move(text))};
}

}  // namespace moe::model
