// Errors as values, shared by every component above kernels/.
//
// Each component declares its own error-code enum (with a comment per value saying whether a
// caller may retry) and registers it with CAF through MOE_ERROR_ENUM, so that it travels inside
// caf::error / caf::expected<T> across actor and process boundaries. The human-readable reason
// is carried as the error's context: make_error(model_errc::bad_config, "config.json: ...").
// Header-only; every function is safe to call from any thread.
#pragma once

#include <caf/error.hpp>
#include <caf/expected.hpp>
#include <caf/make_message.hpp>

#include <string>

namespace moe {

/// The reason text attached to an error made with make_error(code, text), else CAF's rendering.
[[nodiscard]] std::string error_text(const caf::error& e);

/// `e` with `what + ": "` before its reason, keeping its category and code, so that a caller
/// several layers up still tells, say, a checkpoint that does not exist from a device out of
/// memory. No error stays no error.
[[nodiscard]] caf::error with_context(const caf::error& e, const std::string& what);

}  // namespace moe

/// Registers `enum_type` as a CAF error category named `category` (at most 10 characters).
#define MOE_ERROR_ENUM(enum_type, category) CAF_ERROR_CODE_ENUM(enum_type, category)
