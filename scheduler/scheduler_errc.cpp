#include "scheduler/scheduler_errc.hpp"

namespace moe::scheduler {

const char* to_string(scheduler_errc e) noexcept {
  switch (e) {
    case scheduler_errc::infeasible: return "infeasible";
    case scheduler_errc::bad_assignment: return "bad_assignment";
    case scheduler_errc::bad_model: return "bad_model";
    case scheduler_errc::bad_placement: return "bad_placement";
  }
  return "unknown";
}

caf::error make_error(scheduler_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("scheduler"),
                    caf::make_message(std::move(text))};
}

}  // namespace moe::scheduler
