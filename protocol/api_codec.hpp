// Conversions between the API's plain values (protocol/api_types.hpp) and its Cap'n Proto
// builders/readers, and the error convention on the wire ("<code>: <text>" exceptions).
// Only the two RPC endpoints include this header (it pulls in the generated api.capnp.h);
// never include it from a .cu file.
// Readers come from the network: from_wire may throw kj::Exception on a malformed message,
// which Cap'n Proto's RPC layer turns into an error reply on the server; the client library
// catches it at the call.
// Thread safety: pure functions.
#pragma once

#include <kj/exception.h>

#include <optional>
#include <string>

#include "protocol/api.capnp.h"
#include "protocol/api_types.hpp"

namespace moe::protocol {

void to_wire(const api_generation_spec& spec, capnp::GenerationJob::Builder b);
[[nodiscard]] api_generation_spec from_wire(capnp::GenerationJob::Reader r);

void to_wire(const api_job_event& e, capnp::JobEvent::Builder b);
[[nodiscard]] api_job_event from_wire(capnp::JobEvent::Reader r);

void to_wire(const api_job_status& s, capnp::JobStatus::Builder b);
[[nodiscard]] api_job_status from_wire(capnp::JobStatus::Reader r);

void to_wire(const api_cluster_description& c, capnp::ClusterDescription::Builder b);
[[nodiscard]] api_cluster_description from_wire(capnp::ClusterDescription::Reader r);

void to_wire(const api_rebalance_report& r, capnp::RebalanceReport::Builder b);
[[nodiscard]] api_rebalance_report from_wire(capnp::RebalanceReport::Reader r);

void to_wire(const api_training_spec& spec, capnp::TrainingJob::Builder b);
/// A corpus union member this build does not know reads as an empty token list (refused by
/// validate()).
[[nodiscard]] api_training_spec from_wire(capnp::TrainingJob::Reader r);

void to_wire(const api_training_event& e, capnp::TrainingEvent::Builder b);
[[nodiscard]] api_training_event from_wire(capnp::TrainingEvent::Reader r);

/// The exception a server throws for `code`: type OVERLOADED for overloaded, DISCONNECTED for
/// unavailable (both mean "retry"), FAILED otherwise; description "<code>: <text>".
[[nodiscard]] kj::Exception make_api_exception(api_errc code, const std::string& text);

/// A call's failure as the client sees it: the server's code when the description carries one
/// (Cap'n Proto prefixes remote ones with "remote exception: "), and the text after it.
struct api_failure {
  std::optional<api_errc> code;
  kj::Exception::Type type = kj::Exception::Type::FAILED;
  std::string text;
};
[[nodiscard]] api_failure parse_api_exception(const kj::Exception& e);

}  // namespace moe::protocol
