// libFuzzer target: the job API's messages (protocol/api_codec.hpp, protocol/api_types.hpp) as
// the API server reads a call's parameters and as the client library reads a server's answers.
// The first byte picks the message; the rest is one flat Cap'n Proto message, read as the RPC
// layer reads it (with a smaller traversal limit: fuzz_reader_options says why).
// Properties: from_wire either returns a value or throws kj::Exception (the documented way: the
// RPC layer turns it into an error reply, the client catches it); nothing else escapes.
// validate() answers nothing or an api error with a text. A decoded value re-encodes to bytes
// that decode and re-encode to the same bytes (to_wire writes every field, so equal encodings
// mean equal values, NaNs included).
// parse_api_exception reads any description a server may send without failing.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "protocol/api_codec.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

namespace schema = moe::protocol::capnp;
using moe::fuzz::check_rejection;

enum class message : uint8_t {
  submit,             // server: JobService.submit's parameters
  train,              // server: JobService.train's parameters
  checkpoint,         // server: JobService.checkpoint's parameters
  job_event,          // client: TokenSink.event's parameters
  job_status,         // client: JobService.status's results
  cluster,            // client: JobService.describe's results
  rebalance,          // client: JobService.rebalance's results
  training_event,     // client: TrainingSink.event's parameters / trainingStatus's results
  error_description,  // client: an exception's description
  count,
};

// The server reads with a traversal limit of 8 Mi words (actors/api_server.cpp). Lists of
// zero-sized elements let a few bytes claim that many elements, so the limit alone lets a tiny
// input allocate and re-encode tens of MiB, which is allowed (bounded) but leaves the fuzzer
// running at a few inputs per second. A smaller limit keeps every code path, with shorter lists.
::capnp::ReaderOptions fuzz_reader_options() {
  ::capnp::ReaderOptions options;
  options.traversalLimitInWords = 64u << 10;
  return options;
}

std::vector<uint8_t> flat_bytes(::capnp::MessageBuilder& message) {
  const auto words = ::capnp::messageToFlatArray(message);
  const auto bytes = words.asBytes();
  return {bytes.begin(), bytes.end()};
}

// Encodes `value` as a `Schema`, decodes that, encodes again: the two encodings must be equal.
template <class Schema, class Value>
void check_round_trip(const Value& value) {
  ::capnp::MallocMessageBuilder first;
  moe::protocol::to_wire(value, first.initRoot<Schema>());
  const auto first_bytes = flat_bytes(first);
  kj::Array<::capnp::word> words = kj::heapArray<::capnp::word>(first_bytes.size() / sizeof(::capnp::word));
  std::memcpy(words.begin(), first_bytes.data(), first_bytes.size());
  try {
    ::capnp::FlatArrayMessageReader reader(words.asPtr());
    const Value again = moe::protocol::from_wire(reader.getRoot<Schema>());
    ::capnp::MallocMessageBuilder second;
    moe::protocol::to_wire(again, second.initRoot<Schema>());
    MOE_FUZZ_CHECK(flat_bytes(second) == first_bytes);
  } catch (const kj::Exception& e) {
    // Our own encoding must always decode; the outer handler would take this for bad input.
    std::fprintf(stderr, "a re-encoded message does not decode: %s\n", e.getDescription().cStr());
    MOE_FUZZ_CHECK(false);
  }
}

void check_validation(const caf::error& err) {
  if (err) check_rejection(err, "api");
}

void decode(message kind, ::capnp::MessageReader& reader) {
  switch (kind) {
    case message::submit: {
      auto job = reader.getRoot<schema::JobService::SubmitParams>().getJob();
      if (job.which() != schema::JobSpec::GENERATION) return;  // refused by the server as such
      auto spec = moe::protocol::from_wire(job.getGeneration());
      check_validation(moe::protocol::validate(spec));
      check_round_trip<schema::GenerationJob>(spec);
      return;
    }
    case message::train: {
      auto spec = moe::protocol::from_wire(reader.getRoot<schema::JobService::TrainParams>().getJob());
      check_validation(moe::protocol::validate(spec));
      check_round_trip<schema::TrainingJob>(spec);
      return;
    }
    case message::checkpoint: {
      auto given = reader.getRoot<schema::JobService::CheckpointParams>().getDirectory();
      check_validation(moe::protocol::validate_checkpoint_directory(std::string(given.cStr(), given.size())));
      return;
    }
    case message::job_event: {
      auto e = moe::protocol::from_wire(reader.getRoot<schema::TokenSink::EventParams>().getEvent());
      check_round_trip<schema::JobEvent>(e);
      return;
    }
    case message::job_status: {
      auto s = moe::protocol::from_wire(reader.getRoot<schema::JobService::StatusResults>().getStatus());
      check_round_trip<schema::JobStatus>(s);
      return;
    }
    case message::cluster: {
      auto c = moe::protocol::from_wire(reader.getRoot<schema::JobService::DescribeResults>().getCluster());
      check_round_trip<schema::ClusterDescription>(c);
      return;
    }
    case message::rebalance: {
      auto r = moe::protocol::from_wire(reader.getRoot<schema::JobService::RebalanceResults>().getReport());
      check_validation(moe::protocol::validate(r));
      check_round_trip<schema::RebalanceReport>(r);
      return;
    }
    case message::training_event: {
      auto e = moe::protocol::from_wire(reader.getRoot<schema::TrainingSink::EventParams>().getEvent());
      check_round_trip<schema::TrainingEvent>(e);
      return;
    }
    case message::error_description:
    case message::count: return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto kind = static_cast<message>(data[0] % static_cast<uint8_t>(message::count));
  ++data;
  --size;
  if (kind == message::error_description) {
    const std::string description(reinterpret_cast<const char*>(data), size);
    auto failure = moe::protocol::parse_api_exception(
        kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::heapString(description.data(), size)));
    MOE_FUZZ_CHECK(failure.text.size() <= size);
    return 0;
  }
  // The RPC transport hands over whole words; a partial one is cut off, not rejected, so that
  // the fuzzer's byte-level mutations still reach the decoders.
  const size_t num_words = size / sizeof(::capnp::word);
  if (num_words == 0) return 0;
  kj::Array<::capnp::word> words = kj::heapArray<::capnp::word>(num_words);
  std::memcpy(words.begin(), data, num_words * sizeof(::capnp::word));
  try {
    ::capnp::FlatArrayMessageReader reader(words.asPtr(), fuzz_reader_options());
    decode(kind, reader);
  } catch (const kj::Exception&) {
    // A malformed message: the server answers the call with an error, the client fails it.
  }
  return 0;
}
