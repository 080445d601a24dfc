#include "actors/api_server.hpp"

#include <arpa/inet.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/timer.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <caf/all.hpp>

#include <cstdio>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "actors/api_mapping.hpp"
#include "actors/rebalancer.hpp"
#include "base/constant_time.hpp"
#include "model/tokenizer.hpp"
#include "protocol/api_codec.hpp"
#include "protocol/api_tls.hpp"

namespace moe::actors {

namespace {

namespace wire = moe::protocol::capnp;
using protocol::api_errc;

kj::Exception api_exception(api_errc code, const std::string& text) {
  return protocol::make_api_exception(code, text);
}

// An api-category error (actors/api_mapping.hpp made it) as the exception the client sees.
kj::Exception api_exception(const caf::error& err) {
  return api_exception(static_cast<api_errc>(err.code()), error_text(err));
}

// --- TLS ------------------------------------------------------------------------------

// "10.0.0.7:51234" for a log line; "an unknown peer" where the socket does not say.
std::string peer_address(kj::AsyncIoStream& stream) {
  sockaddr_storage addr{};
  kj::uint len = sizeof addr;
  try {
    stream.getpeername(reinterpret_cast<sockaddr*>(&addr), &len);
  } catch (const kj::Exception&) {
    return "an unknown peer";
  }
  char host[INET6_ADDRSTRLEN] = {};
  if (addr.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  return "an unknown peer";
}

// --- CAF threads -> the kj thread -------------------------------------------------------

// The events of one job on their way from its subscriber actor (any CAF thread) to the kj
// thread, which drains them in order. Also the one place where a job id and the stream's
// abandonment meet, so that a job is cancelled exactly once however the two race.
template <class Event>
class event_channel {
 public:
  /// CAF thread. Events after abandon() are dropped.
  void push(Event e) {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (abandoned_) return;
      events_.push_back(std::move(e));
      waiter = kj::mv(waiter_);
    }
    if (waiter) waiter->fulfill();
  }

  /// CAF thread, when submit answered `id`. False: the stream was abandoned before, so the
  /// caller must cancel the job (nobody else knows its id).
  bool bind_job(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    job_id_ = id;
    return !abandoned_;
  }

  /// kj thread. Drops queued and future events and wakes the reader. Returns the job id when
  /// it is already known (the caller cancels it); otherwise bind_job will say so.
  std::optional<uint64_t> abandon() {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
    std::optional<uint64_t> id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      abandoned_ = true;
      events_.clear();
      waiter = kj::mv(waiter_);
      if (job_id_ != 0) id = job_id_;
    }
    if (waiter) waiter->fulfill();
    return id;
  }

  /// kj thread: resolves when events are queued or the channel was abandoned.
  kj::Promise<void> ready() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!events_.empty() || abandoned_) return kj::READY_NOW;
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    waiter_ = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  /// kj thread: the queued events, oldest first.
  std::vector<Event> take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(events_, {});
  }

 private:
  std::mutex mu_;
  std::vector<Event> events_;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter_;
  uint64_t job_id_ = 0;
  bool abandoned_ = false;
};

// The two kinds of job streams: a generation job's tokens (submit, from the controller) and a
// training job's progress (train, from the training jobs actor). Each names its events, its
// sink, the message its source sends, and how events that queued up while the client was
// busy become the one sent next.
struct token_stream {
  using event = protocol::api_job_event;
  using sink = wire::TokenSink;
  using atom = job_event_atom;
  using message = job_event;
  static constexpr const char* source = "controller";

  // Tokens concatenated, the rest from the newest.
  static event merge(std::vector<event> events) {
    event merged = std::move(events.back());
    if (events.size() > 1) {
      std::vector<int32_t> tokens;
      for (size_t i = 0; i + 1 < events.size(); ++i)
        tokens.insert(tokens.end(), events[i].tokens.begin(), events[i].tokens.end());
      tokens.insert(tokens.end(), merged.tokens.begin(), merged.tokens.end());
      merged.tokens = std::move(tokens);
    }
    return merged;
  }

  static event failure(std::string error) {
    event e;
    e.finished = true;
    e.state = protocol::api_job_state::failed;
    e.finish_reason = "error";
    e.error = std::move(error);
    return e;
  }
};

struct training_stream {
  using event = protocol::api_training_event;
  using sink = wire::TrainingSink;
  using atom = train_event_atom;
  using message = training_event;
  static constexpr const char* source = "training jobs actor";

  // The newest (progress in between is stale; the finished event is always the newest).
  static event merge(std::vector<event> events) {
    return protocol::merge_training_events(std::move(events));
  }

  static event failure(std::string error) {
    event e;
    e.finished = true;
    e.state = protocol::api_job_state::failed;
    e.error = std::move(error);
    return e;
  }
};

// Receives one job's events from its source (the controller, the training jobs actor). Ends
// with the job's final event, or when the source goes down (then it reports the job as
// failed, so no client waits forever).
template <class Kind, class Source>
caf::behavior stream_subscriber(caf::event_based_actor* self,
                                std::shared_ptr<event_channel<typename Kind::event>> channel,
                                Source source) {
  self->monitor(source);
  self->set_down_handler([self, channel](caf::down_msg& msg) {
    channel->push(Kind::failure(std::string("the ") + Kind::source +
                                " terminated: " + caf::to_string(msg.reason)));
    self->quit();
  });
  return {
      [self, channel](typename Kind::atom, typename Kind::message& e) {
        const bool last = e.finished;
        channel->push(to_api(std::move(e)));
        if (last) self->quit();
      },
  };
}

// An actor's answer on its way to the kj thread. (Not caf::expected: GCC 12 reports false
// "maybe uninitialized" warnings for it inside kj's promise nodes.)
template <class T>
struct actor_reply {
  std::optional<T> value;
  caf::error error;  // set when value is not
};

template <class T>
using reply_fulfiller =
    std::shared_ptr<kj::Own<kj::CrossThreadPromiseFulfiller<actor_reply<T>>>>;

// Sends one request to `dest` (the controller, the rebalancer) from a short-lived actor and
// hands its answer to the calling (kj) thread. `on_value` runs on the CAF thread first (submit
// uses it to cancel a job whose caller has gone). The kj side may drop the promise at any
// time: fulfilling a dropped promise does nothing.
template <class T, class Handle, class OnValue, class... Ts>
kj::Promise<actor_reply<T>> ask(caf::actor_system& sys, const Handle& dest,
                                std::chrono::milliseconds timeout, OnValue on_value, Ts... xs) {
  auto paf = kj::newPromiseAndCrossThreadFulfiller<actor_reply<T>>();
  reply_fulfiller<T> reply = std::make_shared<decltype(paf.fulfiller)>(kj::mv(paf.fulfiller));
  sys.spawn([=](caf::event_based_actor* self) {
    self->request(dest, caf::duration{timeout}, xs...)
        .then(
            [=](T& value) {
              on_value(value);
              (*reply)->fulfill(actor_reply<T>{std::move(value), caf::error{}});
            },
            [=](caf::error& err) {
              (*reply)->fulfill(actor_reply<T>{std::nullopt, std::move(err)});
            });
  });
  return kj::mv(paf.promise);
}

// --- the kj thread ----------------------------------------------------------------------
// Continuations capture the server_core, never a capability object: the core outlives every
// connection and call, a JobService may not.

struct connection_state;

// One job with its event stream, from submit/train until its final event reached the client
// (or was given up); the part that does not depend on the kind of job. kj thread only.
struct stream_state {
  virtual ~stream_state() = default;
  /// The channel's abandon(): the job id when already known.
  virtual std::optional<uint64_t> abandon_channel() = 0;

  std::function<void(uint64_t)> cancel_job;  // sends cancel to the actor that runs the job
  caf::actor subscriber;
  std::weak_ptr<connection_state> owner;
  uint64_t job_id = 0;  // 0 until submit/train answered
  bool cancel_sent = false;
  bool done = false;
};

// kj thread only, apart from `channel`.
template <class Kind>
struct job_stream final : stream_state {
  std::shared_ptr<event_channel<typename Kind::event>> channel =
      std::make_shared<event_channel<typename Kind::event>>();
  std::optional<typename Kind::sink::Client> sink;  // none: the client polls the status

  // kj's Client destructors are noexcept(false), which would make this one laxer than the
  // base's (clang refuses that); dropping a capability does not throw.
  ~job_stream() noexcept override = default;
  std::optional<uint64_t> abandon_channel() override { return channel->abandon(); }
};

// kj thread only.
struct connection_state {
  bool open = true;
  std::set<std::shared_ptr<stream_state>> streams;  // streaming to this client
};

}  // namespace

struct api_server::impl {
  impl(caf::actor_system& s, controller_actor c, api_server_options o)
      : sys(s), controller(std::move(c)), options(std::move(o)), cluster(options.cluster) {}

  caf::actor_system& sys;
  controller_actor controller;
  api_server_options options;
  kj::Own<kj::TlsContext> tls;  // null: plain TCP. Used by the kj thread only, after start().
  std::unique_ptr<model::tokenizer> tokenizer;  // for text corpora; null when training is off
  std::string training_unavailable;             // why training is off; empty when it is on

  std::mutex cluster_mu;
  protocol::api_cluster_description cluster;  // guarded by cluster_mu

  uint16_t bound_port = 0;
  std::thread thread;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> stop_signal;  // set before start() returns
  std::once_flag stop_once;

  void run(std::promise<caf::expected<uint16_t>> started);
};

namespace {

class server_core;

class gateway_impl final : public wire::Gateway::Server {
 public:
  gateway_impl(server_core& core, std::shared_ptr<connection_state> conn)
      : core_(core), conn_(std::move(conn)) {}

 protected:
  kj::Promise<void> login(LoginContext ctx) override;

 private:
  server_core& core_;
  std::shared_ptr<connection_state> conn_;
};

class job_service_impl final : public wire::JobService::Server {
 public:
  job_service_impl(server_core& core, std::shared_ptr<connection_state> conn)
      : core_(core), conn_(std::move(conn)) {}

 protected:
  kj::Promise<void> submit(SubmitContext ctx) override;
  kj::Promise<void> status(StatusContext ctx) override;
  kj::Promise<void> cancel(CancelContext ctx) override;
  kj::Promise<void> describe(DescribeContext ctx) override;
  kj::Promise<void> rebalance(RebalanceContext ctx) override;
  kj::Promise<void> train(TrainContext ctx) override;
  kj::Promise<void> trainingStatus(TrainingStatusContext ctx) override;
  kj::Promise<void> cancelTraining(CancelTrainingContext ctx) override;
  kj::Promise<void> checkpoint(CheckpointContext ctx) override;

 private:
  server_core& core_;
  std::shared_ptr<connection_state> conn_;
};

::capnp::ReaderOptions reader_options() {
  ::capnp::ReaderOptions o;
  o.traversalLimitInWords = 8u << 20;  // 64 MiB: far above the largest allowed prompt
  o.nestingLimit = 16;
  return o;
}

struct connection {
  connection(server_core& core, kj::Own<kj::AsyncIoStream>&& s)
      : stream(kj::mv(s)),
        network(*stream, ::capnp::rpc::twoparty::Side::SERVER, reader_options()),
        state(std::make_shared<connection_state>()),
        rpc(::capnp::makeRpcServer(network, wire::Gateway::Client(kj::heap<gateway_impl>(core, state)))) {}

  kj::Own<kj::AsyncIoStream> stream;
  ::capnp::TwoPartyVatNetwork network;
  std::shared_ptr<connection_state> state;
  ::capnp::RpcSystem<::capnp::rpc::twoparty::VatId> rpc;
};

// Everything the kj thread owns while serving. Destroying it closes every connection.
class server_core final : private kj::TaskSet::ErrorHandler {
 public:
  server_core(api_server::impl& shared, kj::AsyncIoContext& io)
      : shared_(shared),
        io_(io),
        tasks_(kj::heap<kj::TaskSet>(static_cast<kj::TaskSet::ErrorHandler&>(*this))) {}

  void serve(kj::Own<kj::ConnectionReceiver> listener) {
    listener_ = kj::mv(listener);
    accepting_ = accept_loop();
  }

  // The stop sequence, up to closing the connections (the destructor does that).
  kj::Promise<void> shutdown() {
    stopping_ = true;
    accepting_ = nullptr;
    listener_ = nullptr;
    for (const auto& s : streams_) request_cancel(*s);
    auto deadline = io_.provider->getTimer().now() +
                    shared_.options.stop_grace.count() * kj::MILLISECONDS;
    return drain(deadline).then([this] {
      auto left = streams_;
      for (const auto& s : left) abandon(s);
    });
  }

  [[nodiscard]] bool stopping() const noexcept { return stopping_; }
  [[nodiscard]] const api_server_options& options() const noexcept { return shared_.options; }
  [[nodiscard]] kj::Timer& timer() { return io_.provider->getTimer(); }

  [[nodiscard]] protocol::api_cluster_description cluster() {
    std::lock_guard<std::mutex> lock(shared_.cluster_mu);
    return shared_.cluster;
  }

  // Counts a call as in flight until the returned guard is destroyed (stop waits for them).
  struct in_flight_guard {
    explicit in_flight_guard(size_t& n) : n_(n) { ++n_; }
    ~in_flight_guard() { --n_; }
    in_flight_guard(const in_flight_guard&) = delete;
    in_flight_guard& operator=(const in_flight_guard&) = delete;
    size_t& n_;
  };
  [[nodiscard]] kj::Own<in_flight_guard> enter() { return kj::heap<in_flight_guard>(in_flight_); }

  template <class T, class... Ts>
  kj::Promise<actor_reply<T>> ask_controller(Ts... xs) {
    return actors::ask<T>(shared_.sys, shared_.controller, shared_.options.request_timeout,
                          [](const T&) {}, xs...);
  }

  // The caller checks that training is on (training_unavailable).
  template <class T, class... Ts>
  kj::Promise<actor_reply<T>> ask_training(std::chrono::milliseconds timeout, Ts... xs) {
    return actors::ask<T>(shared_.sys, shared_.options.training_jobs, timeout, [](const T&) {}, xs...);
  }

  // The caller checks that a rebalancer runs.
  kj::Promise<actor_reply<rebalance_report>> ask_rebalance() {
    return actors::ask<rebalance_report>(shared_.sys, shared_.options.rebalancer,
                                         shared_.options.rebalance_timeout,
                                         [](const rebalance_report&) {}, rebalance_atom::value);
  }

  [[nodiscard]] kj::Exception to_exception(const caf::error& err) const {
    return api_exception(controller_failure(err, shared_.options.request_timeout));
  }

  [[nodiscard]] kj::Exception to_rebalance_exception(const caf::error& err) const {
    return api_exception(rebalance_failure(err, shared_.options.rebalance_timeout));
  }

  [[nodiscard]] kj::Exception to_training_exception(const caf::error& err,
                                                    std::chrono::milliseconds timeout) const {
    return api_exception(training_failure(err, timeout));
  }

  // Why the training calls are refused; nothing when training is on.
  [[nodiscard]] std::optional<std::string> training_unavailable() const {
    if (shared_.training_unavailable.empty()) return std::nullopt;
    return "training is not enabled on this server (" + shared_.training_unavailable + ")";
  }

  [[nodiscard]] const model::tokenizer& tokenizer() const { return *shared_.tokenizer; }
  [[nodiscard]] const controller_actor& controller() const noexcept { return shared_.controller; }

  // submit and train: sends `job` to `dest` (the controller, the training jobs actor) with a
  // subscriber when the client gave a sink, answers the job id and streams the job's events
  // to the sink. If the call is dropped before `dest` answered (the client went away or
  // cancelled the call), the stream is given up, which cancels the job if it was accepted
  // after all. `failure` maps `dest`'s errors to the API's.
  template <class Kind, class Context, class Dest, class Atom, class Job>
  kj::Promise<void> start_job(Context ctx, const std::shared_ptr<connection_state>& conn,
                              std::optional<typename Kind::sink::Client> sink, const Dest& dest,
                              Atom atom, Job job,
                              caf::error (*failure)(const caf::error&, std::chrono::milliseconds)) {
    auto stream = open_stream<Kind>(conn, kj::mv(sink), dest);
    auto answered = std::make_shared<bool>(false);
    auto give_up = kj::defer([this, stream, answered] {
      if (!*answered) abandon(stream);
    });
    const auto timeout = shared_.options.request_timeout;
    auto accepted = actors::ask<uint64_t>(
        shared_.sys, dest, timeout,
        [channel = stream->channel, cancel = stream->cancel_job](const uint64_t& id) {
          if (!channel->bind_job(id)) cancel(id);
        },
        atom, std::move(job), stream->subscriber);
    return accepted
        .then([this, ctx, stream, answered, failure, timeout](actor_reply<uint64_t> id) mutable
              -> kj::Promise<void> {
          *answered = true;
          if (!id.value) {
            abandon(stream);
            return api_exception(failure(id.error, timeout));
          }
          ctx.getResults().setJobId(*id.value);
          stream_accepted(stream, *id.value);
          return kj::READY_NOW;
        })
        .attach(kj::mv(give_up), enter());
  }

  // Gives a stream up: its job is cancelled (once), its events dropped.
  void abandon(const std::shared_ptr<stream_state>& s) {
    if (s->done) return;
    if (auto id = s->abandon_channel(); id && !s->cancel_sent) {
      s->cancel_sent = true;
      s->cancel_job(*id);
    }
    if (s->subscriber) caf::anon_send_exit(s->subscriber, caf::exit_reason::user_shutdown);
    finish(s);
  }

  void on_disconnect(connection_state& conn) {
    conn.open = false;
    auto streams = conn.streams;
    for (const auto& s : streams) abandon(s);
  }

  void adopt(kj::Own<kj::AsyncIoStream>&& stream) {
    auto conn = kj::heap<connection>(*this, kj::mv(stream));
    auto state = conn->state;
    tasks_->add(conn->network.onDisconnect()
                    .then([this, state] { on_disconnect(*state); })
                    .attach(kj::mv(conn)));
  }

 private:
  kj::Promise<void> accept_loop() {
    return listener_->accept()
        .then(
            [this](kj::Own<kj::AsyncIoStream>&& stream) -> kj::Promise<void> {
              if (stopping_) return kj::READY_NOW;
              if (shared_.tls) {
                tasks_->add(handshake(kj::mv(stream)));
              } else {
                adopt(kj::mv(stream));
              }
              return kj::READY_NOW;
            },
            // E.g. out of file descriptors: keep serving the open connections, retry soon.
            [this](kj::Exception&& e) -> kj::Promise<void> {
              std::fprintf(stderr, "moe api server: accept failed: %s\n",
                           e.getDescription().cStr());
              return timer().afterDelay(100 * kj::MILLISECONDS);
            })
        .then([this] { return accept_loop(); });
  }

  // A TLS connection reaches the Gateway only once its handshake completed (client
  // certificate checked, when asked for). A failed one is closed here: the client sees its
  // handshake fail (or, for a plain Cap'n Proto client, the connection drop).
  kj::Promise<void> handshake(kj::Own<kj::AsyncIoStream>&& raw) {
    auto peer = peer_address(*raw);
    const auto limit = shared_.options.tls_handshake_timeout.count() * kj::MILLISECONDS;
    return timer()
        .timeoutAfter(limit, shared_.tls->wrapServer(kj::mv(raw)))
        .then(
            [this](kj::Own<kj::AsyncIoStream>&& stream) {
              if (!stopping_) adopt(kj::mv(stream));
            },
            [peer](kj::Exception&& e) {
              // Usually a client without TLS ("wrong version number") or one that does not trust
              // this certificate; a log line per connection, as nothing else records it.
              std::fprintf(stderr, "moe api server: TLS handshake with %s failed: %s\n", peer.c_str(),
                           e.getDescription().cStr());
            });
  }

  kj::Promise<void> drain(kj::TimePoint deadline) {
    if ((streams_.empty() && in_flight_ == 0) || timer().now() >= deadline) return kj::READY_NOW;
    return timer().afterDelay(5 * kj::MILLISECONDS).then([this, deadline] { return drain(deadline); });
  }

  template <class Kind, class Dest>
  std::shared_ptr<job_stream<Kind>> open_stream(const std::shared_ptr<connection_state>& conn,
                                                std::optional<typename Kind::sink::Client> sink,
                                                const Dest& dest) {
    auto s = std::make_shared<job_stream<Kind>>();
    s->owner = conn;
    s->cancel_job = [dest](uint64_t id) { caf::anon_send(dest, cancel_atom::value, id); };
    if (sink) {
      s->sink = kj::mv(*sink);
      s->subscriber = shared_.sys.spawn(stream_subscriber<Kind, Dest>, s->channel, dest);
      conn->streams.insert(s);
      streams_.insert(s);
    }
    return s;
  }

  // The job was accepted as `id`: start forwarding events, unless the client or the server is
  // gone.
  template <class Kind>
  void stream_accepted(const std::shared_ptr<job_stream<Kind>>& s, uint64_t id) {
    s->job_id = id;
    if (s->done || !s->sink) return;
    auto conn = s->owner.lock();
    if (!conn || !conn->open) return abandon(s);
    if (stopping_) request_cancel(*s);
    tasks_->add(pump(s));
  }

  void request_cancel(stream_state& s) {
    if (s.job_id == 0 || s.cancel_sent) return;  // unknown yet: stream_accepted cancels it
    s.cancel_sent = true;
    s.cancel_job(s.job_id);
  }

  void finish(const std::shared_ptr<stream_state>& s) {
    s->done = true;
    if (auto conn = s->owner.lock()) conn->streams.erase(s);
    streams_.erase(s);
  }

  // Forwards the job's events to its sink, one call at a time; events queued meanwhile become
  // one (Kind::merge), which keeps a slow client from building up a backlog of calls.
  template <class Kind>
  kj::Promise<void> pump(std::shared_ptr<job_stream<Kind>> s) {
    return s->channel->ready().then([this, s]() -> kj::Promise<void> {
      auto events = s->channel->take();
      if (s->done || events.empty()) return kj::READY_NOW;  // abandoned
      auto merged = Kind::merge(std::move(events));
      if (merged.job_id == 0) merged.job_id = s->job_id;
      const bool last = merged.finished;
      auto req = s->sink->eventRequest();
      protocol::to_wire(merged, req.initEvent());
      return req.send().ignoreResult().then(
          [this, s, last]() -> kj::Promise<void> {
            if (!last) return pump(s);
            finish(s);
            return kj::READY_NOW;
          },
          // The client is gone or its handler failed: nobody will read this job's events.
          [this, s](kj::Exception&&) { abandon(s); });
    });
  }

  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;  // a client went away
    std::fprintf(stderr, "moe api server: %s\n", e.getDescription().cStr());
  }

  api_server::impl& shared_;
  kj::AsyncIoContext& io_;
  bool stopping_ = false;
  size_t in_flight_ = 0;
  std::set<std::shared_ptr<stream_state>> streams_;
  kj::Own<kj::ConnectionReceiver> listener_;
  kj::Maybe<kj::Promise<void>> accepting_;
  kj::Own<kj::TaskSet> tasks_;  // last: its connections refer to the members above
};

kj::Promise<void> gateway_impl::login(LoginContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  auto params = ctx.getParams();
  auto given = params.getSecret();
  if (!constant_time_equal(std::string_view(given.cStr(), given.size()),
                           core_.options().secret)) {
    // Answered late, to slow down guessing; the secret itself appears nowhere.
    return core_.timer()
        .afterDelay(core_.options().failed_login_delay.count() * kj::MILLISECONDS)
        .then([]() -> kj::Promise<void> {
          return api_exception(api_errc::unauthenticated, "the cluster secret was not accepted");
        });
  }
  if (params.getClientVersion() != protocol::api_version()) {
    return api_exception(api_errc::unsupported_version,
                         "the client speaks API version " +
                             std::to_string(params.getClientVersion()) + ", this server " +
                             std::to_string(protocol::api_version()));
  }
  auto results = ctx.getResults();
  results.setService(kj::heap<job_service_impl>(core_, conn_));
  results.setServerVersion(protocol::api_version());
  return kj::READY_NOW;
}

kj::Promise<void> job_service_impl::submit(SubmitContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  auto params = ctx.getParams();
  auto job = params.getJob();
  if (job.which() == wire::JobSpec::TRAINING) {
    return api_exception(api_errc::invalid_request,
                         "training: JobSpec.training is reserved; submit training jobs with "
                         "JobService.train()");
  }
  if (job.which() != wire::JobSpec::GENERATION) {
    return api_exception(api_errc::invalid_request, "job: unknown kind (a newer client?)");
  }
  auto spec = protocol::from_wire(job.getGeneration());
  if (auto err = protocol::validate(spec, core_.options().limits)) return api_exception(err);
  std::optional<wire::TokenSink::Client> sink;
  if (params.hasSink()) sink = params.getSink();
  return core_.start_job<token_stream>(ctx, conn_, kj::mv(sink), core_.controller(), submit_atom::value,
                                       to_controller(std::move(spec)), controller_failure);
}

kj::Promise<void> job_service_impl::status(StatusContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  return core_.ask_controller<job_status>(status_atom::value, ctx.getParams().getJobId())
      .then([&core = core_, ctx](actor_reply<job_status> s) mutable -> kj::Promise<void> {
        if (!s.value) return core.to_exception(s.error);
        protocol::to_wire(to_api(std::move(*s.value)), ctx.getResults().initStatus());
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

kj::Promise<void> job_service_impl::cancel(CancelContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  return core_.ask_controller<bool>(cancel_atom::value, ctx.getParams().getJobId())
      .then([&core = core_, ctx](actor_reply<bool> was_active) mutable -> kj::Promise<void> {
        if (!was_active.value) return core.to_exception(was_active.error);
        ctx.getResults().setWasActive(*was_active.value);
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

kj::Promise<void> job_service_impl::describe(DescribeContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  protocol::to_wire(core_.cluster(), ctx.getResults().initCluster());
  return kj::READY_NOW;
}

kj::Promise<void> job_service_impl::rebalance(RebalanceContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  if (!core_.options().rebalancer) {
    const auto& why = core_.options().rebalance_unavailable;
    return api_exception(api_errc::unavailable, "rebalancing is not enabled on this cluster " +
                                                    (why.empty() ? std::string("(no rebalancer runs)") : "(" + why + ")"));
  }
  return core_.ask_rebalance()
      .then([&core = core_, ctx](actor_reply<rebalance_report> r) mutable -> kj::Promise<void> {
        if (!r.value) return core.to_rebalance_exception(r.error);
        protocol::to_wire(to_api(std::move(*r.value)), ctx.getResults().initReport());
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

kj::Promise<void> job_service_impl::train(TrainContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  if (auto why = core_.training_unavailable()) return api_exception(api_errc::unavailable, *why);
  auto params = ctx.getParams();
  auto spec = protocol::from_wire(params.getJob());
  if (auto err = protocol::validate(spec, core_.options().limits)) return api_exception(err);
  std::optional<wire::TrainingSink::Client> sink;
  if (params.hasSink()) sink = params.getSink();
  return core_.start_job<training_stream>(ctx, conn_, kj::mv(sink), core_.options().training_jobs,
                                          train_submit_atom::value,
                                          to_training_job(std::move(spec), core_.tokenizer()),
                                          training_failure);
}

kj::Promise<void> job_service_impl::trainingStatus(TrainingStatusContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  if (auto why = core_.training_unavailable()) return api_exception(api_errc::unavailable, *why);
  const auto timeout = core_.options().request_timeout;
  return core_.ask_training<training_event>(timeout, status_atom::value, ctx.getParams().getJobId())
      .then([&core = core_, ctx, timeout](actor_reply<training_event> e) mutable -> kj::Promise<void> {
        if (!e.value) return core.to_training_exception(e.error, timeout);
        protocol::to_wire(to_api(std::move(*e.value)), ctx.getResults().initEvent());
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

kj::Promise<void> job_service_impl::cancelTraining(CancelTrainingContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  if (auto why = core_.training_unavailable()) return api_exception(api_errc::unavailable, *why);
  const auto timeout = core_.options().request_timeout;
  return core_.ask_training<bool>(timeout, cancel_atom::value, ctx.getParams().getJobId())
      .then([&core = core_, ctx, timeout](actor_reply<bool> was_active) mutable -> kj::Promise<void> {
        if (!was_active.value) return core.to_training_exception(was_active.error, timeout);
        ctx.getResults().setWasActive(*was_active.value);
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

kj::Promise<void> job_service_impl::checkpoint(CheckpointContext ctx) {
  if (core_.stopping()) return api_exception(api_errc::unavailable, "the api server is stopping");
  if (auto why = core_.training_unavailable()) return api_exception(api_errc::unavailable, *why);
  auto given = ctx.getParams().getDirectory();
  std::string directory(given.cStr(), given.size());
  if (auto err = protocol::validate_checkpoint_directory(directory, core_.options().limits)) {
    return api_exception(err);
  }
  const auto timeout = core_.options().checkpoint_timeout;
  return core_.ask_training<std::string>(timeout, train_checkpoint_atom::value, std::move(directory))
      .then([&core = core_, ctx, timeout](actor_reply<std::string> written) mutable -> kj::Promise<void> {
        if (!written.value) return core.to_training_exception(written.error, timeout);
        ctx.getResults().setDirectory(kj::StringPtr(written.value->c_str(), written.value->size()));
        return kj::READY_NOW;
      })
      .attach(core_.enter());
}

}  // namespace

void api_server::impl::run(std::promise<caf::expected<uint16_t>> started) {
  bool announced = false;
  try {
    auto io = kj::setupAsyncIo();
    auto address = io.provider->getNetwork()
                       .parseAddress(kj::StringPtr(options.host.c_str()), options.port)
                       .wait(io.waitScope);
    auto listener = address->listen();
    bound_port = static_cast<uint16_t>(listener->getPort());
    auto stop = kj::newPromiseAndCrossThreadFulfiller<void>();
    stop_signal = kj::mv(stop.fulfiller);
    {
      server_core core(*this, io);
      core.serve(kj::mv(listener));
      announced = true;
      started.set_value(bound_port);
      stop.promise.wait(io.waitScope);
      core.shutdown().wait(io.waitScope);
    }
  } catch (const kj::Exception& e) {
    std::string what = e.getDescription().cStr();
    if (!announced) {
      started.set_value(protocol::make_error(
          api_errc::unavailable,
          "api server: cannot listen on " + options.host + ":" + std::to_string(options.port) +
              ": " + what));
      return;
    }
    std::fprintf(stderr, "moe api server: stopped on an error: %s\n", what.c_str());
  }
}

api_server::api_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

api_server::~api_server() { stop(); }

caf::expected<std::unique_ptr<api_server>> api_server::start(caf::actor_system& sys,
                                                             controller_actor controller,
                                                             api_server_options options) {
  if (options.secret.empty()) {
    return protocol::make_error(api_errc::invalid_request,
                                "api server: the cluster secret is empty");
  }
  if (!controller) {
    return protocol::make_error(api_errc::invalid_request, "api server: no controller");
  }
  kj::Own<kj::TlsContext> tls;
  if (options.tls) {
    auto made = protocol::make_api_server_tls({options.tls->certificate, options.tls->key,
                                              options.tls->passphrase, options.tls->client_ca_file});
    if (!made) {
      return protocol::make_error(api_errc::invalid_request, "api server: " + error_text(made.error()));
    }
    tls = kj::mv(*made);
  }
  auto p = std::make_unique<impl>(sys, std::move(controller), std::move(options));
  p->tls = kj::mv(tls);
  if (!p->options.training_jobs) {
    p->training_unavailable = p->options.training_unavailable.empty()
                                  ? "no training jobs actor runs"
                                  : p->options.training_unavailable;
  } else if (auto t = model::make_tokenizer(p->options.vocab_size); !t) {
    p->training_unavailable = error_text(t.error());
  } else {
    p->tokenizer = std::move(*t);
  }
  std::promise<caf::expected<uint16_t>> started;
  auto port = started.get_future();
  p->thread = std::thread(
      [raw = p.get(), st = std::move(started)]() mutable { raw->run(std::move(st)); });
  auto bound = port.get();
  if (!bound) {
    p->thread.join();
    return bound.error();
  }
  return std::unique_ptr<api_server>(new api_server(std::move(p)));
}

uint16_t api_server::port() const noexcept { return impl_->bound_port; }

bool api_server::uses_tls() const noexcept { return impl_->tls.get() != nullptr; }

void api_server::set_cluster_description(protocol::api_cluster_description cluster) {
  std::lock_guard<std::mutex> lock(impl_->cluster_mu);
  impl_->cluster = std::move(cluster);
}

void api_server::stop() {
  std::call_once(impl_->stop_once, [this] {
    impl_->stop_signal->fulfill();
    impl_->thread.join();
    impl_->stop_signal = nullptr;
  });
}

}  // namespace moe::actors
