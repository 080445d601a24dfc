#include "client/job_client.hpp"

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/timer.h>

#include <charconv>
#include <map>
#include <optional>

#include "protocol/api_codec.hpp"
#include "protocol/api_tls.hpp"

namespace moe::client {

const char* to_string(client_errc code) noexcept {
  switch (code) {
    case client_errc::connection_failed: return "connection_failed";
    case client_errc::disconnected: return "disconnected";
    case client_errc::unauthenticated: return "unauthenticated";
    case client_errc::unsupported_version: return "unsupported_version";
    case client_errc::invalid_request: return "invalid_request";
    case client_errc::overloaded: return "overloaded";
    case client_errc::unknown_job: return "unknown_job";
    case client_errc::unavailable: return "unavailable";
    case client_errc::timed_out: return "timed_out";
    case client_errc::job_failed: return "job_failed";
    case client_errc::job_cancelled: return "job_cancelled";
    case client_errc::server_error: return "server_error";
    case client_errc::tls_failed: return "tls_failed";
  }
  return "server_error";
}

caf::error make_error(client_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("client"),
                    caf::make_message(std::move(text))};
}

caf::expected<std::pair<std::string, uint16_t>> parse_address(std::string_view text) {
  const auto colon = text.rfind(':');
  const auto bad = [&] {
    return make_error(client_errc::invalid_request,
                      "address '" + std::string(text) + "' is not HOST:PORT (e.g. 127.0.0.1:7101)");
  };
  if (colon == std::string_view::npos || colon == 0) return bad();
  std::string_view host = text.substr(0, colon);
  std::string_view port_text = text.substr(colon + 1);
  // An IPv6 literal needs brackets, or its own colons would be read as the port separator.
  if (host.find(':') != std::string_view::npos && (host.front() != '[' || host.back() != ']'))
    return bad();
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port == 0 || port > 65535)
    return bad();
  return std::pair<std::string, uint16_t>{std::string(host), static_cast<uint16_t>(port)};
}

namespace {

namespace wire = moe::protocol::capnp;

// kj allows one event loop per thread: the clients of a thread share it, and it ends with the
// last of them.
struct io_context {
  kj::AsyncIoContext io = kj::setupAsyncIo();
};

std::shared_ptr<io_context> thread_io() {
  thread_local std::weak_ptr<io_context> current;
  if (auto p = current.lock()) return p;
  auto p = std::make_shared<io_context>();
  current = p;
  return p;
}

// The host a certificate must name: an IPv6 literal without its brackets.
std::string tls_host_name(const std::string& host) {
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') return host.substr(1, host.size() - 2);
  return host;
}

client_errc to_client(protocol::api_errc code) {
  switch (code) {
    case protocol::api_errc::unauthenticated: return client_errc::unauthenticated;
    case protocol::api_errc::unsupported_version: return client_errc::unsupported_version;
    case protocol::api_errc::invalid_request: return client_errc::invalid_request;
    case protocol::api_errc::overloaded: return client_errc::overloaded;
    case protocol::api_errc::unknown_job: return client_errc::unknown_job;
    case protocol::api_errc::unavailable: return client_errc::unavailable;
    case protocol::api_errc::internal: return client_errc::server_error;
  }
  return client_errc::server_error;
}

// A failed call as an error value. The server's own code wins; without one, the exception's
// type says whether the connection was the problem.
caf::error to_error(const kj::Exception& e, const std::string& what) {
  auto f = protocol::parse_api_exception(e);
  if (f.code) return make_error(to_client(*f.code), std::string(to_string(*f.code)) + ": " + f.text);
  switch (f.type) {
    case kj::Exception::Type::DISCONNECTED:
      return make_error(client_errc::disconnected, what + ": connection lost: " + f.text);
    case kj::Exception::Type::OVERLOADED:
      return make_error(client_errc::overloaded, what + ": overloaded: " + f.text);
    case kj::Exception::Type::UNIMPLEMENTED:
      return make_error(client_errc::server_error,
                        what + ": the server does not implement this call (an older version?): " +
                            f.text);
    default: return make_error(client_errc::server_error, what + ": " + f.text);
  }
}

// Runs an event handler; what it threw, as text (empty: it returned).
template <class Handler, class Event>
std::string run_handler(const Handler& on_event, const Event& e) {
  if (!on_event) return {};
  try {
    on_event(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "an unknown exception";
  }
  return {};
}

// What arrived for one submitted job. Confined to the client's thread.
struct job_record {
  job_client::event_handler on_event;
  std::vector<int32_t> tokens;
  bool finished = false;
  client_status final;                         // valid once finished
  kj::Own<kj::PromiseFulfiller<void>> waiter;  // set while wait() blocks on this job
};

class token_sink final : public wire::TokenSink::Server {
 public:
  explicit token_sink(std::shared_ptr<job_record> r) : r_(std::move(r)) {}

 protected:
  kj::Promise<void> event(EventContext ctx) override {
    job_record& r = *r_;
    if (r.finished) return kj::READY_NOW;
    auto e = protocol::from_wire(ctx.getParams().getEvent());
    r.tokens.insert(r.tokens.end(), e.tokens.begin(), e.tokens.end());
    const std::string handler_error = run_handler(r.on_event, e);
    if (!handler_error.empty()) {
      e.finished = true;
      e.state = job_state::failed;
      e.finish_reason = "error";
      e.error = "the on_event handler threw " + handler_error;
    }
    if (e.finished) {
      r.finished = true;
      r.final = {e.job_id, e.state, r.tokens, e.finish_reason, e.error, -1};
      if (r.waiter) r.waiter->fulfill();
    }
    // Failing the call tells the server nobody reads this job any more: it cancels the job.
    if (!handler_error.empty())
      return KJ_EXCEPTION(FAILED, "moe client: the on_event handler failed");
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<job_record> r_;
};

// What arrived for one training job. Confined to the client's thread.
struct training_record {
  job_client::training_event_handler on_event;
  bool finished = false;
  training_event final;                        // valid once finished
  kj::Own<kj::PromiseFulfiller<void>> waiter;  // set while wait_training() blocks on this job
};

class training_sink final : public wire::TrainingSink::Server {
 public:
  explicit training_sink(std::shared_ptr<training_record> r) : r_(std::move(r)) {}

 protected:
  kj::Promise<void> event(EventContext ctx) override {
    training_record& r = *r_;
    if (r.finished) return kj::READY_NOW;
    auto e = protocol::from_wire(ctx.getParams().getEvent());
    const std::string handler_error = run_handler(r.on_event, e);
    if (!handler_error.empty()) {
      e.finished = true;
      e.state = job_state::failed;
      e.error = "the on_event handler threw " + handler_error;
    }
    if (e.finished) {
      r.finished = true;
      r.final = std::move(e);
      if (r.waiter) r.waiter->fulfill();
    }
    // Failing the call tells the server nobody reads this job any more: it cancels the job.
    if (!handler_error.empty())
      return KJ_EXCEPTION(FAILED, "moe client: the on_event handler failed");
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<training_record> r_;
};

}  // namespace

struct job_client::impl {
  // Declared so that destruction runs bottom-up: the jobs and capabilities before the
  // connection, the connection before its TLS context and the event loop.
  std::shared_ptr<io_context> io;
  kj::Own<kj::TlsContext> tls;  // null: plain TCP
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<::capnp::TwoPartyClient> rpc;
  std::optional<kj::ForkedPromise<void>> disconnected;
  std::optional<wire::JobService::Client> service;
  std::map<uint64_t, std::shared_ptr<job_record>> jobs;
  std::map<uint64_t, std::shared_ptr<training_record>> training_jobs;
  client_options options;
  uint16_t server_version = 0;

  kj::WaitScope& wait_scope() { return io->io.waitScope; }

  // Replaces `stream` by a TLS session over it, the server's certificate checked for
  // `server_name`; the handshake shares options.connect_timeout with the TCP connect.
  caf::error start_tls(const client_tls_options& o, const std::string& server_name, const std::string& where) {
    auto made = protocol::make_api_client_tls({o.ca_file, o.certificate, o.key});
    if (!made) return make_error(client_errc::invalid_request, "invalid_request: " + error_text(made.error()));
    tls = kj::mv(*made);
    try {
      auto secured = await(tls->wrapClient(kj::mv(stream), kj::StringPtr(server_name.c_str(), server_name.size())),
                           options.connect_timeout);
      if (!secured) {
        return make_error(client_errc::tls_failed,
                          "TLS handshake with " + where + ": no answer within " +
                              std::to_string(options.connect_timeout.count()) + " ms (does the server speak TLS?)");
      }
      stream = kj::mv(*secured);
    } catch (const kj::Exception& e) {
      return make_error(client_errc::tls_failed, "TLS handshake with " + where + " failed: " +
                                                     protocol::explain_tls_failure(e.getDescription().cStr(), server_name));
    }
    return {};
  }

  // Waits for `p` up to `timeout` (0: no limit). Nothing: timed out. Throws kj::Exception.
  template <class T>
  std::optional<T> await(kj::Promise<T> p, std::chrono::milliseconds timeout) {
    if (timeout.count() <= 0) return p.wait(wait_scope());
    auto timed = p.then([](T v) { return kj::Maybe<T>(kj::mv(v)); })
                     .exclusiveJoin(io->io.provider->getTimer()
                                        .afterDelay(timeout.count() * kj::MILLISECONDS)
                                        .then([] { return kj::Maybe<T>(nullptr); }));
    auto result = timed.wait(wait_scope());
    KJ_IF_MAYBE(v, result) { return kj::mv(*v); }
    return std::nullopt;
  }

  // One unary call: its result, or an error naming `what` failed and why.
  template <class T>
  caf::expected<T> call(kj::Promise<T> p, const std::string& what) {
    return call(kj::mv(p), what, options.call_timeout);
  }

  // Delivers events until `r` finished (nothing), the connection dropped or `timeout` passed
  // (0: no limit). `call` and `job` name them in the error.
  template <class Record>
  caf::error wait_until_finished(Record& r, const std::string& call, const std::string& job,
                                 std::chrono::milliseconds timeout) {
    if (r.finished) return {};
    auto paf = kj::newPromiseAndFulfiller<void>();
    r.waiter = kj::mv(paf.fulfiller);
    std::optional<bool> done;
    try {
      auto finished = paf.promise.then([] { return true; })
                          .exclusiveJoin(disconnected->addBranch().then([] { return false; }));
      done = await(kj::mv(finished), timeout);
    } catch (const kj::Exception& e) {
      r.waiter = nullptr;
      return to_error(e, call);
    }
    r.waiter = nullptr;
    if (r.finished) return {};
    if (!done) {
      return make_error(client_errc::timed_out, call + ": " + job + " did not finish within " +
                                                    std::to_string(timeout.count()) + " ms");
    }
    return make_error(client_errc::disconnected,
                      call + ": connection lost before " + job + " finished");
  }

  template <class T>
  caf::expected<T> call(kj::Promise<T> p, const std::string& what,
                        std::chrono::milliseconds timeout) {
    try {
      auto v = await(kj::mv(p), timeout);
      if (!v) {
        return make_error(client_errc::timed_out,
                          what + ": no answer within " + std::to_string(timeout.count()) + " ms");
      }
      return std::move(*v);
    } catch (const kj::Exception& e) {
      return to_error(e, what);
    }
  }
};

job_client::job_client(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

job_client::~job_client() = default;

caf::expected<std::unique_ptr<job_client>> job_client::connect(const std::string& host,
                                                               uint16_t port,
                                                               const std::string& secret,
                                                               const client_options& options) {
  auto p = std::make_unique<impl>();
  p->options = options;
  const std::string where = host + ":" + std::to_string(port);
  try {
    p->io = thread_io();
  } catch (const kj::Exception& e) {
    return make_error(client_errc::connection_failed,
                      "cannot connect to " + where +
                          ": this thread already runs another Cap'n Proto event loop (" +
                          e.getDescription().cStr() + ")");
  }
  try {
    auto connecting = p->io->io.provider->getNetwork()
                          .parseAddress(kj::StringPtr(host.c_str()), port)
                          .then([](kj::Own<kj::NetworkAddress> a) { return a->connect(); });
    auto stream = p->await(kj::mv(connecting), options.connect_timeout);
    if (!stream) {
      return make_error(client_errc::connection_failed,
                        "cannot connect to " + where + ": no answer within " +
                            std::to_string(options.connect_timeout.count()) + " ms");
    }
    p->stream = kj::mv(*stream);
  } catch (const kj::Exception& e) {
    return make_error(client_errc::connection_failed,
                      "cannot connect to " + where + ": " + e.getDescription().cStr());
  }
  std::string server_name;  // the name the server's certificate was checked for; TLS only
  if (options.tls) {
    server_name = options.tls->server_name.empty() ? tls_host_name(host) : options.tls->server_name;
    if (auto err = p->start_tls(*options.tls, server_name, where)) return err;
  }
  try {
    p->rpc = kj::heap<::capnp::TwoPartyClient>(*p->stream);
    p->disconnected = p->rpc->onDisconnect().fork();
    auto gateway = p->rpc->bootstrap().castAs<wire::Gateway>();
    auto req = gateway.loginRequest();
    req.setSecret(kj::StringPtr(secret.c_str(), secret.size()));
    req.setClientVersion(protocol::api_version());
    auto login = p->await(req.send(), options.call_timeout);
    if (!login) {
      return make_error(client_errc::timed_out,
                        "login to " + where + ": no answer within " +
                            std::to_string(options.call_timeout.count()) + " ms");
    }
    p->service = login->getService();
    p->server_version = login->getServerVersion();
  } catch (const kj::Exception& e) {
    auto f = protocol::parse_api_exception(e);
    if (f.code) return make_error(to_client(*f.code), std::string(to_string(*f.code)) + ": " + f.text);
    // With TLS 1.3 the server checks a client certificate after the client's handshake
    // completed: its refusal arrives as the answer to login, as its alert or, when the
    // connection was reset first, as a bare drop.
    if (options.tls) {
      auto why = protocol::explain_tls_failure(f.text, server_name);
      if (why == f.text) {
        why = "the server dropped the TLS session before answering login (does it ask for a client certificate, "
              "api.tls.client_ca_file? then give one signed by that CA, e.g. --cert, --key): " + f.text;
      }
      return make_error(client_errc::tls_failed, "TLS session with " + where + " failed: " + why);
    }
    return make_error(client_errc::connection_failed,
                      "cannot log in to " + where + ": " + f.text +
                          " (a server with api.tls drops plain connections so: connect with TLS, e.g. --ca-file)");
  }
  return std::unique_ptr<job_client>(new job_client(std::move(p)));
}

caf::expected<uint64_t> job_client::submit(const generation_request_spec& spec,
                                           event_handler on_event) {
  if (auto err = protocol::validate(spec)) {
    return make_error(client_errc::invalid_request, "invalid_request: " + error_text(err));
  }
  auto record = std::make_shared<job_record>();
  record->on_event = std::move(on_event);
  caf::expected<uint64_t> id = make_error(client_errc::server_error, "submit: not sent");
  try {
    auto req = impl_->service->submitRequest();
    protocol::to_wire(spec, req.initJob().initGeneration());
    req.setSink(kj::heap<token_sink>(record));
    id = impl_->call(req.send().then([](auto r) { return r.getJobId(); }), "submit");
  } catch (const kj::Exception& e) {
    return to_error(e, "submit");
  }
  if (id) impl_->jobs[*id] = std::move(record);
  return id;
}

caf::expected<client_status> job_client::wait(uint64_t job_id, std::chrono::milliseconds timeout) {
  auto it = impl_->jobs.find(job_id);
  if (it == impl_->jobs.end()) {
    return make_error(client_errc::unknown_job,
                      "wait: job " + std::to_string(job_id) +
                          " was not submitted by this client, or was already waited for");
  }
  auto record = it->second;
  if (auto err = impl_->wait_until_finished(*record, "wait", "job " + std::to_string(job_id), timeout))
    return err;
  // The answer to the final event call is still queued: send it now, as the caller may not
  // call this client again for a while (the server holds the stream open until it arrives).
  poll();
  impl_->jobs.erase(job_id);
  client_status result = record->final;
  result.job_id = job_id;
  return result;
}

caf::expected<std::vector<int32_t>> job_client::generate(const generation_request_spec& spec) {
  auto id = submit(spec);
  if (!id) return id.error();
  auto done = wait(*id);
  if (!done) return done.error();
  switch (done->state) {
    case job_state::failed:
      return make_error(client_errc::job_failed,
                        "job " + std::to_string(*id) + " failed: " + done->error);
    case job_state::cancelled:
      return make_error(client_errc::job_cancelled,
                        "job " + std::to_string(*id) + " was cancelled" +
                            (done->error.empty() ? "" : ": " + done->error));
    default: return std::move(done->tokens);
  }
}

caf::expected<client_status> job_client::status(uint64_t job_id) {
  try {
    auto req = impl_->service->statusRequest();
    req.setJobId(job_id);
    return impl_->call(req.send().then([](auto r) { return protocol::from_wire(r.getStatus()); }),
                       "status");
  } catch (const kj::Exception& e) {
    return to_error(e, "status");
  }
}

caf::expected<bool> job_client::cancel(uint64_t job_id) {
  try {
    auto req = impl_->service->cancelRequest();
    req.setJobId(job_id);
    return impl_->call(req.send().then([](auto r) { return r.getWasActive(); }), "cancel");
  } catch (const kj::Exception& e) {
    return to_error(e, "cancel");
  }
}

caf::expected<client_cluster_description> job_client::describe() {
  try {
    auto req = impl_->service->describeRequest();
    return impl_->call(
        req.send().then([](auto r) { return protocol::from_wire(r.getCluster()); }), "describe");
  } catch (const kj::Exception& e) {
    return to_error(e, "describe");
  }
}

caf::expected<client_rebalance_report> job_client::rebalance() {
  caf::expected<client_rebalance_report> report =
      make_error(client_errc::server_error, "rebalance: not sent");
  try {
    auto req = impl_->service->rebalanceRequest();
    report = impl_->call(
        req.send().then([](auto r) { return protocol::from_wire(r.getReport()); }), "rebalance",
        impl_->options.rebalance_timeout);
  } catch (const kj::Exception& e) {
    return to_error(e, "rebalance");
  }
  if (report) {
    if (auto err = protocol::validate(*report)) {
      return make_error(client_errc::server_error,
                        "rebalance: the server answered a malformed report: " + error_text(err));
    }
  }
  return report;
}

caf::expected<uint64_t> job_client::submit_training(const training_request_spec& spec,
                                                    training_event_handler on_event) {
  if (auto err = protocol::validate(spec)) {
    return make_error(client_errc::invalid_request, "invalid_request: " + error_text(err));
  }
  auto record = std::make_shared<training_record>();
  record->on_event = std::move(on_event);
  caf::expected<uint64_t> id = make_error(client_errc::server_error, "submit_training: not sent");
  try {
    auto req = impl_->service->trainRequest();
    protocol::to_wire(spec, req.initJob());
    req.setSink(kj::heap<training_sink>(record));
    id = impl_->call(req.send().then([](auto r) { return r.getJobId(); }), "submit_training");
  } catch (const kj::Exception& e) {
    return to_error(e, "submit_training");
  }
  if (id) impl_->training_jobs[*id] = std::move(record);
  return id;
}

caf::expected<training_event> job_client::wait_training(uint64_t job_id,
                                                        std::chrono::milliseconds timeout) {
  auto it = impl_->training_jobs.find(job_id);
  if (it == impl_->training_jobs.end()) {
    return make_error(client_errc::unknown_job,
                      "wait_training: training job " + std::to_string(job_id) +
                          " was not submitted by this client, or was already waited for");
  }
  auto record = it->second;
  if (auto err = impl_->wait_until_finished(*record, "wait_training",
                                            "training job " + std::to_string(job_id), timeout))
    return err;
  poll();  // sends the answer to the final event call (see wait)
  impl_->training_jobs.erase(job_id);
  training_event result = record->final;
  result.job_id = job_id;
  return result;
}

caf::expected<training_event> job_client::train(const training_request_spec& spec,
                                                training_event_handler on_event) {
  auto id = submit_training(spec, std::move(on_event));
  if (!id) return id.error();
  auto done = wait_training(*id);
  if (!done) return done.error();
  const std::string where = "training job " + std::to_string(*id) + " ";
  const std::string at = " at step " + std::to_string(done->step) + " of " + std::to_string(done->steps);
  switch (done->state) {
    case job_state::failed:
      return make_error(client_errc::job_failed, where + "failed" + at + ": " + done->error);
    case job_state::cancelled:
      return make_error(client_errc::job_cancelled, where + "was cancelled" + at);
    default: return done;
  }
}

caf::expected<training_event> job_client::training_status(uint64_t job_id) {
  try {
    auto req = impl_->service->trainingStatusRequest();
    req.setJobId(job_id);
    return impl_->call(req.send().then([](auto r) { return protocol::from_wire(r.getEvent()); }),
                       "training_status");
  } catch (const kj::Exception& e) {
    return to_error(e, "training_status");
  }
}

caf::expected<bool> job_client::cancel_training(uint64_t job_id) {
  try {
    auto req = impl_->service->cancelTrainingRequest();
    req.setJobId(job_id);
    return impl_->call(req.send().then([](auto r) { return r.getWasActive(); }), "cancel_training");
  } catch (const kj::Exception& e) {
    return to_error(e, "cancel_training");
  }
}

caf::expected<std::string> job_client::checkpoint(const std::string& directory) {
  if (auto err = protocol::validate_checkpoint_directory(directory)) {
    return make_error(client_errc::invalid_request, "invalid_request: " + error_text(err));
  }
  try {
    auto req = impl_->service->checkpointRequest();
    req.setDirectory(kj::StringPtr(directory.c_str(), directory.size()));
    return impl_->call(req.send().then([](auto r) {
                         auto d = r.getDirectory();
                         return std::string(d.cStr(), d.size());
                       }),
                       "checkpoint", impl_->options.checkpoint_timeout);
  } catch (const kj::Exception& e) {
    return to_error(e, "checkpoint");
  }
}

void job_client::poll() {
  try {
    impl_->wait_scope().poll();
  } catch (const kj::Exception&) {
    // Nothing to report: a lost connection shows up at the next call.
  }
}

uint16_t job_client::server_version() const noexcept { return impl_->server_version; }

}  // namespace moe::client
