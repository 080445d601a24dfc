#include "base/error.hpp"

#include <caf/message.hpp>

namespace moe {

std::string error_text(const caf::error& e) {
  if (!e) return "no error";
  const caf::message& ctx = e.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0)) return ctx.get_as<std::string>(0);
  return caf::to_string(e);
}

caf::error with_context(const caf::error& e, const std::string& what) {
  if (!e) return e;
  return caf::error(e.code(), e.category(), caf::make_message(what + ": " + error_text(e)));
}

}  // namespace moe
