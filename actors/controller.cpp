#include "actors/controller.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>

#include "actors/controller_metrics.hpp"
#include "runtime/data_plane.hpp"
#include "runtime/ucx/ucx.hpp"

namespace moe::actors {

const char* to_string(job_state s) noexcept {
  switch (s) {
    case job_state::queued: return "queued";
    case job_state::running: return "running";
    case job_state::finished: return "finished";
    case job_state::cancelled: return "cancelled";
    case job_state::failed: return "failed";
  }
  return "unknown";
}

caf::error make_error(controller_errc code, std::string text) {
  return caf::error{static_cast<uint8_t>(code), caf::atom("controller"),
                    caf::make_message(std::move(text))};
}

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct job {
  uint64_t id = 0;
  generation_job spec;
  caf::actor subscriber;
  job_state state = job_state::queued;
  std::vector<int32_t> tokens;
  std::string finish_reason, error;
  int shard = -1;
  bool prefilled = false;
  bool cancel_requested = false;
  int replays = 0;           // times re-run after failures
  uint64_t deadline_ms = 0;  // 0: none
  clock_type::time_point submitted, last_token;
};

// A step that failed because an actor it needed vanished, waiting for a down event to say why
// (options.failure_grace).
struct suspended_step {
  uint64_t id = 0;  // matches the step_grace message that ends the wait
  std::vector<uint64_t> jobs;
  bool prefill = false;
  std::string why;
};

struct shard_state {
  attention_actor handle;
  bool busy = false;
  std::vector<uint64_t> running;  // prefilled jobs, decoded every step
  std::string lost;               // why the shard cannot work (its node is down)
  std::optional<suspended_step> suspended;  // while set, the shard takes no step
};

// One node failure being recovered from: done once every request it interrupted runs again
// (or ended) and its expert groups, if any, have failed over.
struct recovery {
  std::string node;
  clock_type::time_point start;
  std::set<uint64_t> interrupted;
  bool failover_pending = false;
  bool experts = false;  // kind: expert groups lost (else attention shards only)
  int64_t replayed = 0;
};

struct controller_state {
  controller_options options;
  std::vector<shard_state> shards;
  std::map<uint64_t, job> jobs;
  std::deque<uint64_t> waiting;
  uint64_t next_job = 1;
  uint64_t next_step = 1;
  uint64_t next_suspension = 1;
  // Node failures (down events of nodes running our shards or groups) so far, and when the last
  // was: a step sent before one, or failing for a lost peer soon after one, is that node's.
  uint64_t node_failures = 0;
  clock_type::time_point last_node_failure{};
  std::optional<controller_metrics> metrics;
  // hold_steps: the active hold (0: none), whether its answer is still owed, and holds waiting.
  uint64_t hold = 0;
  uint64_t next_hold = 1;
  std::optional<caf::typed_response_promise<uint64_t>> hold_answer;
  std::deque<caf::typed_response_promise<uint64_t>> holds_waiting;
  rebalancer_actor failover;   // fails lost expert groups over; may be null
  int failovers_running = 0;   // while > 0 no new step starts
  std::vector<recovery> recoveries;
  std::string unrecoverable;   // set when lost expert groups could not be re-placed
  static inline const char* name = "controller";
};

using pointer = controller_actor::stateful_pointer<controller_state>;

void pump(pointer self);

void update_gauges(controller_state& st) {
  if (!st.metrics) return;
  size_t running = 0;
  for (const auto& s : st.shards) running += s.running.size();
  st.metrics->running_requests.Set(static_cast<double>(running));
  st.metrics->waiting_requests.Set(static_cast<double>(st.waiting.size()));
  st.metrics->attention_shards_up.Set(static_cast<double>(
      std::count_if(st.shards.begin(), st.shards.end(), [](const shard_state& s) { return s.lost.empty(); })));
  st.metrics->recovering.Set(st.failovers_running > 0 ? 1.0 : 0.0);
}

// Closes the recoveries that nothing holds open any more, with their time and outcome.
void settle_recoveries(pointer self) {
  auto& st = self->state;
  std::erase_if(st.recoveries, [&](const recovery& r) {
    if (r.failover_pending || !r.interrupted.empty()) return false;
    const double took = seconds_between(r.start, clock_type::now());
    if (st.metrics) {
      st.metrics->recovery_seconds.Observe(took);
      st.metrics->recoveries_total.Add({{"kind", r.experts ? "experts" : "shards"}, {"outcome", "ok"}}).Increment();
    }
    spdlog::info("recovered from node {} going down in {:.3f} s ({} requests replayed)", r.node, took, r.replayed);
    return true;
  });
}

// A request ran a step again, or ended: it no longer holds a recovery open.
void resumed(pointer self, uint64_t id) {
  auto& st = self->state;
  if (st.recoveries.empty()) return;
  for (auto& r : st.recoveries) r.interrupted.erase(id);
  settle_recoveries(self);
}

void interrupted(controller_state& st, uint64_t id) {
  if (st.recoveries.empty()) return;
  st.recoveries.back().interrupted.insert(id);
  ++st.recoveries.back().replayed;
}

void notify(pointer self, job& j, std::vector<int32_t> fresh) {
  if (!j.subscriber) return;
  job_event ev;
  ev.job = j.id;
  ev.tokens = std::move(fresh);
  ev.state = j.state;
  ev.finished = j.state == job_state::finished || j.state == job_state::cancelled ||
                j.state == job_state::failed;
  ev.finish_reason = j.finish_reason;
  ev.error = j.error;
  // Subscribers are dynamically typed (API bridges, test probes): an anonymous send.
  caf::anon_send(j.subscriber, job_event_atom::value, std::move(ev));
}

// Ends a job: records the outcome, tells the subscriber (with the job's last tokens, so each
// token is delivered once), frees its cache on the shard.
void end_job(pointer self, job& j, job_state state, std::string reason, std::string error = {},
             std::vector<int32_t> last_tokens = {}) {
  auto& st = self->state;
  const bool was_prefilled = j.prefilled;
  j.state = state;
  j.finish_reason = std::move(reason);
  j.error = std::move(error);
  if (j.shard >= 0) {
    auto& sh = st.shards[static_cast<size_t>(j.shard)];
    sh.running.erase(std::remove(sh.running.begin(), sh.running.end(), j.id), sh.running.end());
    if (was_prefilled) self->send(sh.handle, release_atom::value, std::vector<uint64_t>{j.id});
  }
  if (st.metrics) {
    switch (state) {
      case job_state::finished:
        st.metrics->requests_finished.Increment();
        st.metrics->request_latency_seconds.Observe(seconds_between(j.submitted, clock_type::now()));
        break;
      case job_state::cancelled: st.metrics->requests_cancelled.Increment(); break;
      case job_state::failed: st.metrics->requests_failed.Increment(); break;
      default: break;
    }
  }
  notify(self, j, std::move(last_tokens));
  resumed(self, j.id);
}

// Counts one more re-run of a request after a failure; past max_replays it fails instead, with
// the failure's text (false).
bool spend_replay(pointer self, job& j, const std::string& why) {
  auto& st = self->state;
  if (j.replays >= st.options.max_replays) {
    end_job(self, j, job_state::failed, "error",
            why + " (given up after " + std::to_string(j.replays) + " replays)");
    return false;
  }
  ++j.replays;
  if (st.metrics) st.metrics->requests_replayed.Increment();
  interrupted(st, j.id);
  return true;
}

// A running request whose cache is gone (its shard died, or its prefill failed) goes back to the
// head of the queue, behind earlier replays: its next prefill is its prompt plus the tokens it
// has generated, so it continues exactly where it stopped.
void requeue(pointer self, job& j, const std::string& why) {
  auto& st = self->state;
  if (j.shard >= 0) {
    auto& sh = st.shards[static_cast<size_t>(j.shard)];
    sh.running.erase(std::remove(sh.running.begin(), sh.running.end(), j.id), sh.running.end());
  }
  j.shard = -1;
  j.prefilled = false;
  if (j.cancel_requested) {
    end_job(self, j, job_state::cancelled, "cancelled");
    return;
  }
  if (!spend_replay(self, j, why)) return;
  j.state = job_state::queued;
  auto pos = st.waiting.begin();
  while (pos != st.waiting.end() && st.jobs.at(*pos).replays > 0 && *pos < j.id) ++pos;
  st.waiting.insert(pos, j.id);
}

// Appends a sampled token; ends the job on its stop conditions.
void accept_token(pointer self, job& j, int32_t token) {
  auto& st = self->state;
  const auto now = clock_type::now();
  if (st.metrics) {
    if (j.tokens.empty())
      st.metrics->time_to_first_token_seconds.Observe(seconds_between(j.submitted, now));
    else
      st.metrics->inter_token_latency_seconds.Observe(seconds_between(j.last_token, now));
    st.metrics->generated_tokens_total.Increment();
  }
  j.last_token = now;
  j.tokens.push_back(token);
  const auto& stops = j.spec.stop_token_ids;
  const bool stop = std::find(stops.begin(), stops.end(), token) != stops.end();
  const bool length = static_cast<int64_t>(j.tokens.size()) >= j.spec.max_new_tokens;
  if (stop || length) {
    end_job(self, j, job_state::finished, stop ? "stop" : "length", {}, {token});
    return;
  }
  notify(self, j, {token});
}

void on_step_done(pointer self, size_t s, const std::vector<uint64_t>& ids, bool prefill,
                  const step_result& r) {
  auto& st = self->state;
  st.shards[s].busy = false;
  if (!st.shards[s].lost.empty()) return;  // its jobs failed when the shard was lost
  for (size_t i = 0; i < r.sequences.size() && i < r.tokens.size(); ++i) {
    auto it = st.jobs.find(r.sequences[i]);
    if (it == st.jobs.end() || it->second.state != job_state::running || it->second.shard != static_cast<int>(s)) {
      // Ended while its prefill ran (a deadline): the shard has just cached it.
      if (prefill) self->send(st.shards[s].handle, release_atom::value, std::vector<uint64_t>{r.sequences[i]});
      continue;
    }
    job& j = it->second;
    if (prefill) {
      j.prefilled = true;
      st.shards[s].running.push_back(j.id);
    }
    resumed(self, j.id);
    if (j.cancel_requested) {
      end_job(self, j, job_state::cancelled, "cancelled");
      continue;
    }
    accept_token(self, j, r.tokens[i]);
  }
  (void)ids;
  update_gauges(st);
  pump(self);
}

// Ends or replays the requests of a failed step. Replayable: the failure came from a node
// going down, so they run again (a failed prefill from the queue, a decode step in place).
void settle_failed_step(pointer self, const std::vector<uint64_t>& ids, bool prefill, bool replayable,
                        const std::string& why) {
  auto& st = self->state;
  for (auto id : ids) {
    auto it = st.jobs.find(id);
    if (it == st.jobs.end() || it->second.state != job_state::running) continue;
    job& j = it->second;
    // A failed prefill leaves nothing cached; a failed decode step leaves the prefix cached
    // (the position it was writing is written again by the next decode step).
    if (prefill) j.prefilled = false;
    if (!replayable) {
      end_job(self, j, job_state::failed, "error", why);
    } else if (prefill) {
      requeue(self, j, why);
    } else if (j.cancel_requested) {
      end_job(self, j, job_state::cancelled, "cancelled");
    } else {
      (void)spend_replay(self, j, why);  // stays in the shard's decode batch
    }
  }
}

// Errors that a node dying produces before, or around, its down event: an actor that is gone,
// a data-plane peer whose endpoint failed (runtime/data_plane.hpp, ucx/ucx.hpp).
bool signals_node_loss(const caf::error& err) {
  const auto cat = err.category();
  const auto code = err.code();
  if (cat == caf::atom("system")) return code == static_cast<uint8_t>(caf::sec::request_receiver_down);
  if (cat == caf::atom("data_plane")) return code == static_cast<uint8_t>(runtime::data_plane_errc::peer_lost);
  if (cat == caf::atom("ucx"))
    return code == static_cast<uint8_t>(runtime::ucx::ucx_errc::transfer_failed) ||
           code == static_cast<uint8_t>(runtime::ucx::ucx_errc::connect_failed);
  return false;
}

void on_step_failed(pointer self, size_t s, const std::vector<uint64_t>& ids, bool prefill, uint64_t sent_after,
                    const caf::error& err) {
  auto& st = self->state;
  auto& sh = st.shards[s];
  sh.busy = false;
  if (!sh.lost.empty()) return;
  // Run again (once the routers have switched, if they must): a step that waited on a lost
  // expert group (controller_errc::unavailable from its router); any step failing while groups
  // fail over, or that was in flight when a node went down (its failure is that node's, however
  // late it arrives: a data-plane receive from the dead peer fails only when UCX gives up on
  // the endpoint); a lost peer's error within failure_grace after a node failure.
  const bool node_loss = signals_node_loss(err);
  const bool replayable =
      (err.category() == caf::atom("controller") &&
       err.code() == static_cast<uint8_t>(controller_errc::unavailable)) ||
      st.failovers_running > 0 || sent_after < st.node_failures ||
      (node_loss && st.node_failures > 0 && clock_type::now() - st.last_node_failure < st.options.failure_grace);
  const std::string why = moe::error_text(err);
  if (!replayable && node_loss && st.options.failure_grace.count() > 0) {
    // The shard's node, or that of a group its router asked, may have died with the down event
    // still on its way (a dropped connection fails requests at once; the membership reports
    // it a moment later). Whether to replay is decided by that event, or by its absence.
    const uint64_t id = st.next_suspension++;
    sh.suspended = suspended_step{id, ids, prefill, why};
    self->delayed_send(self, st.options.failure_grace, step_grace_atom::value, static_cast<uint64_t>(s), id);
    spdlog::warn("shard {}: step failed ({}); waiting up to {} ms for a node failure to explain it", s, why,
                 st.options.failure_grace.count());
  } else {
    settle_failed_step(self, ids, prefill, replayable, why);
  }
  update_gauges(st);
  pump(self);
}

// No down event explained a suspended step in time: its requests fail with the step's error.
void on_step_grace_over(pointer self, size_t s, uint64_t id) {
  auto& st = self->state;
  if (s >= st.shards.size() || !st.shards[s].suspended || st.shards[s].suspended->id != id) return;
  auto step = std::move(*st.shards[s].suspended);
  st.shards[s].suspended.reset();
  settle_failed_step(self, step.jobs, step.prefill, false,
                     "shard " + std::to_string(s) + ": " + step.why + " (an actor or peer the step needed is gone and no node went down within " +
                         std::to_string(st.options.failure_grace.count()) + " ms)");
  update_gauges(st);
  pump(self);
}

void send_step(pointer self, size_t s, step_request req, std::vector<uint64_t> ids) {
  auto& st = self->state;
  st.shards[s].busy = true;
  const bool prefill = req.prefill;
  const uint64_t sent_after = st.node_failures;
  self->request(st.shards[s].handle, caf::infinite, step_atom::value, std::move(req))
      .then([self, s, ids, prefill](step_result& r) { on_step_done(self, s, ids, prefill, r); },
            [self, s, ids, prefill, sent_after](caf::error& e) { on_step_failed(self, s, ids, prefill, sent_after, e); });
}

step_entry entry_for(const job& j, bool prefill) {
  step_entry e;
  e.sequence = j.id;
  if (prefill) {
    // A replayed request (tokens generated already) prefills its prompt and those tokens.
    e.tokens = j.spec.prompt;
    e.tokens.insert(e.tokens.end(), j.tokens.begin(), j.tokens.end());
  } else {
    e.tokens = {j.tokens.back()};
  }
  e.sampling = j.spec.sampling;
  e.sample_offset = j.tokens.size();
  return e;
}

void start_hold(pointer self, caf::typed_response_promise<uint64_t> rp);

bool all_idle(const controller_state& st) {
  return std::none_of(st.shards.begin(), st.shards.end(), [](const shard_state& s) { return s.busy; });
}

// Answers the active hold once no step is in flight.
void answer_hold(pointer self) {
  auto& st = self->state;
  if (st.hold == 0 || !st.hold_answer || !all_idle(st)) return;
  st.hold_answer->deliver(st.hold);
  st.hold_answer.reset();
}

void end_hold(pointer self, uint64_t id) {
  auto& st = self->state;
  if (id == 0 || st.hold != id) return;  // already ended (resumed, or expired)
  st.hold = 0;
  if (st.hold_answer) {
    st.hold_answer->deliver(make_error(controller_errc::unavailable, "the step hold expired before the steps drained"));
    st.hold_answer.reset();
  }
  if (!st.holds_waiting.empty()) {
    auto next = std::move(st.holds_waiting.front());
    st.holds_waiting.pop_front();
    start_hold(self, std::move(next));
  }
  pump(self);
}

void start_hold(pointer self, caf::typed_response_promise<uint64_t> rp) {
  auto& st = self->state;
  st.hold = st.next_hold++;
  st.hold_answer = std::move(rp);
  self->delayed_send(self, st.options.max_step_hold, resume_steps_atom::value, st.hold);
  answer_hold(self);
}

void pump(pointer self) {
  auto& st = self->state;
  const auto& lim = st.options.limits;
  if (st.hold != 0 || st.failovers_running > 0) {
    answer_hold(self);  // new steps wait until the hold ends, or the routers switched
    return;
  }
  // Idle shards, least loaded first: new requests go where the decode batch is smallest.
  std::vector<size_t> order;
  for (size_t s = 0; s < st.shards.size(); ++s)
    if (!st.shards[s].busy && st.shards[s].lost.empty() && !st.shards[s].suspended) order.push_back(s);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return st.shards[a].running.size() < st.shards[b].running.size();
  });
  for (size_t s : order) {
    auto& sh = st.shards[s];
    // Prefill stage: new requests within the token budget and the running limit.
    step_request req;
    std::vector<uint64_t> ids;
    int64_t tokens = 0;
    while (!st.waiting.empty() &&
           static_cast<int64_t>(sh.running.size() + ids.size()) < lim.max_running_requests) {
      job& j = st.jobs.at(st.waiting.front());
      const auto len = static_cast<int64_t>(j.spec.prompt.size() + j.tokens.size());
      if (!ids.empty() && tokens + len > lim.max_batch_tokens) break;
      st.waiting.pop_front();
      tokens += len;
      j.state = job_state::running;
      j.shard = static_cast<int>(s);
      if (st.metrics) st.metrics->queue_seconds.Observe(seconds_between(j.submitted, clock_type::now()));
      req.entries.push_back(entry_for(j, true));
      ids.push_back(j.id);
    }
    if (!ids.empty()) {
      req.prefill = true;
      req.step = st.next_step++;
      send_step(self, s, std::move(req), std::move(ids));
      continue;
    }
    // Decode stage: every running sequence of this shard, minus those cancelled meanwhile.
    for (auto id : std::vector<uint64_t>(sh.running)) {
      job& j = st.jobs.at(id);
      if (j.cancel_requested) end_job(self, j, job_state::cancelled, "cancelled");
    }
    if (sh.running.empty()) continue;
    for (auto id : sh.running) {
      req.entries.push_back(entry_for(st.jobs.at(id), false));
      ids.push_back(id);
    }
    if (st.metrics) st.metrics->decode_step_tokens.Observe(static_cast<double>(ids.size()));
    req.step = st.next_step++;
    send_step(self, s, std::move(req), std::move(ids));
  }
  update_gauges(st);
}

// Why no shard can take work, or empty while one can.
std::string unavailable_reason(const controller_state& st) {
  if (!st.unrecoverable.empty()) return st.unrecoverable;
  for (const auto& sh : st.shards)
    if (sh.lost.empty()) return {};
  return st.shards.empty() ? "no attention shard" : st.shards.front().lost;
}

// Fails every request still waiting or running, with the reason the cluster cannot serve.
void fail_everything(pointer self, const std::string& reason) {
  auto& st = self->state;
  for (auto& [id, j] : st.jobs) {
    if (j.state != job_state::queued && j.state != job_state::running) continue;
    end_job(self, j, job_state::failed, "error", "cluster unavailable: " + reason);
  }
  st.waiting.clear();
  for (auto& sh : st.shards) sh.running.clear();
}

void on_failover_done(pointer self, const std::string& node, caf::error err) {
  auto& st = self->state;
  --st.failovers_running;
  for (auto& r : st.recoveries)
    if (r.node == node) r.failover_pending = false;
  if (err) {
    st.unrecoverable = "node " + node + " is down and its expert groups could not be re-placed: " + error_text(err);
    spdlog::error("{}", st.unrecoverable);
    if (st.metrics) st.metrics->recoveries_total.Add({{"kind", "experts"}, {"outcome", "failed"}}).Increment();
    std::erase_if(st.recoveries, [&](const recovery& r) { return r.node == node; });
    fail_everything(self, st.unrecoverable);
  }
  settle_recoveries(self);
  update_gauges(st);
  pump(self);
}

// A node went down. Its attention shards stop and their requests start over on the others; its
// expert groups fail over, and no step starts until the routers serve without them. Requests
// lose nothing: they continue from the tokens they have.
void on_member_event(pointer self, const member_event& ev) {
  auto& st = self->state;
  if (ev.to != member_state::down) return;
  const std::string why = "node " + ev.node + " is down (" + ev.reason + ")";
  std::vector<int64_t> routers;
  std::vector<int64_t> groups;
  if (auto it = st.options.groups_on_node.find(ev.node); it != st.options.groups_on_node.end()) groups = it->second;
  if (auto it = st.options.shards_on_node.find(ev.node); it != st.options.shards_on_node.end()) {
    for (size_t s : it->second)
      if (s < st.shards.size() && st.shards[s].lost.empty()) routers.push_back(static_cast<int64_t>(s));
  }
  if (routers.empty() && groups.empty()) return;  // nothing of ours ran there (or known already)
  ++st.node_failures;
  st.last_node_failure = clock_type::now();
  recovery rec;
  rec.node = ev.node;
  rec.start = clock_type::now();
  rec.experts = !groups.empty();
  st.recoveries.push_back(std::move(rec));
  for (auto r : routers) {
    const auto s = static_cast<size_t>(r);
    auto& sh = st.shards[s];
    sh.lost = "shard " + std::to_string(s) + " stopped: " + why;
    sh.busy = false;
    sh.suspended.reset();  // its requests are replayed with the shard's others, just below
    // In job order, so replays keep their submission order at the head of the queue.
    for (auto& [id, j] : st.jobs)
      if (j.shard == static_cast<int>(s) && j.state == job_state::running) requeue(self, j, sh.lost);
    sh.running.clear();
  }
  if (!groups.empty() && !st.failover) {
    st.unrecoverable = why + ": it held expert groups and nothing re-places them (no rebalancer)";
    st.recoveries.pop_back();
    if (st.metrics) st.metrics->recoveries_total.Add({{"kind", "experts"}, {"outcome", "failed"}}).Increment();
    fail_everything(self, st.unrecoverable);
  } else if (st.failover) {
    // Also for attention shards alone: the rebalancer stops asking their routers.
    if (!groups.empty()) {
      ++st.failovers_running;
      st.recoveries.back().failover_pending = true;
    }
    spdlog::warn("{}: {} attention shard(s) lost, {} expert group(s) fail over", why, routers.size(), groups.size());
    const bool blocking = !groups.empty();
    self->request(st.failover, std::chrono::minutes(10), failover_atom::value, groups, routers)
        .then(
            [self, node = ev.node, blocking](rebalance_report&) {
              if (blocking) on_failover_done(self, node, {});
            },
            [self, node = ev.node, blocking](caf::error& e) {
              if (blocking) on_failover_done(self, node, std::move(e));
              else spdlog::warn("failover after node {} went down: {}", node, error_text(e));
            });
  }
  // Steps that failed for a vanished actor before this event arrived: it explains them (their
  // shard's router asked a group on this node), so they run again, after the failover.
  for (auto& sh : st.shards) {
    if (!sh.suspended) continue;
    auto step = std::move(*sh.suspended);
    sh.suspended.reset();
    settle_failed_step(self, step.jobs, step.prefill, true, step.why + " (" + why + ")");
  }
  if (auto reason = unavailable_reason(st); !reason.empty()) fail_everything(self, reason);
  settle_recoveries(self);
  update_gauges(st);
  pump(self);
}

// A request's deadline passed: it fails now, whatever it is doing, and frees what it holds (a
// step it is part of finishes first; the shard frees its cache then).
void on_deadline(pointer self, uint64_t id) {
  auto& st = self->state;
  auto it = st.jobs.find(id);
  if (it == st.jobs.end()) return;
  job& j = it->second;
  if (j.state != job_state::queued && j.state != job_state::running) return;
  const bool waiting = j.state == job_state::queued;
  if (waiting) st.waiting.erase(std::remove(st.waiting.begin(), st.waiting.end(), id), st.waiting.end());
  if (st.metrics) st.metrics->deadlines_exceeded.Increment();
  end_job(self, j, job_state::failed, "error",
          "deadline exceeded: not finished within " + std::to_string(j.deadline_ms) + " ms (" +
              (waiting ? "waiting for a shard" : "running") + ", " + std::to_string(j.tokens.size()) +
              " tokens generated" + (j.replays > 0 ? ", replayed " + std::to_string(j.replays) + " times" : "") + ")");
  update_gauges(st);
  pump(self);
}

caf::error validate(const controller_state& st, const generation_job& g) {
  const auto& lim = st.options.limits;
  if (g.prompt.empty()) return make_error(controller_errc::invalid_request, "the prompt is empty");
  for (auto t : g.prompt) {
    if (t < 0 || t >= st.options.vocab_size)
      return make_error(controller_errc::invalid_request,
                        "token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                            std::to_string(st.options.vocab_size) + ")");
  }
  if (static_cast<int64_t>(g.prompt.size()) > lim.max_batch_tokens)
    return make_error(controller_errc::invalid_request,
                      "the prompt has " + std::to_string(g.prompt.size()) +
                          " tokens, more than max_batch_tokens (" + std::to_string(lim.max_batch_tokens) + ")");
  if (g.max_new_tokens < 0 || g.max_new_tokens > lim.max_new_tokens_limit)
    return make_error(controller_errc::invalid_request,
                      "max_new_tokens must be in [0, " + std::to_string(lim.max_new_tokens_limit) + "]");
  if (!(g.sampling.temperature >= 0.0f) || !(g.sampling.top_p > 0.0f && g.sampling.top_p <= 1.0f))
    return make_error(controller_errc::invalid_request,
                      "temperature must be >= 0 and top_p in (0, 1]");
  return {};
}

}  // namespace

controller_actor spawn_controller(caf::actor_system& sys, controller_options options) {
  auto impl = [](pointer self, controller_options opts) -> controller_actor::behavior_type {
    auto& st = self->state;
    if (opts.metrics) st.metrics.emplace(*opts.metrics);
    for (auto& s : opts.shards) st.shards.push_back({s, false, {}, {}, {}});
    st.options = std::move(opts);
    return {
        [self](submit_atom, generation_job& g, caf::actor& subscriber) -> caf::result<uint64_t> {
          auto& st = self->state;
          if (auto err = validate(st, g)) {
            if (st.metrics) st.metrics->requests_rejected.Increment();
            return err;
          }
          if (auto reason = unavailable_reason(st); !reason.empty()) {
            if (st.metrics) st.metrics->requests_rejected.Increment();
            return make_error(controller_errc::unavailable, "cluster unavailable: " + reason);
          }
          if (static_cast<int64_t>(st.waiting.size()) >= st.options.limits.max_queue) {
            if (st.metrics) st.metrics->requests_rejected.Increment();
            return make_error(controller_errc::overloaded,
                              "overloaded: " + std::to_string(st.waiting.size()) +
                                  " requests are waiting (max_queue); retry later");
          }
          const uint64_t id = st.next_job++;
          job& j = st.jobs[id];
          j.id = id;
          j.spec = std::move(g);
          j.subscriber = std::move(subscriber);
          j.submitted = clock_type::now();
          if (j.spec.max_new_tokens == 0) {
            end_job(self, j, job_state::finished, "length");
            return id;
          }
          j.deadline_ms = j.spec.deadline_ms > 0 ? j.spec.deadline_ms
                                                 : static_cast<uint64_t>(st.options.request_timeout.count());
          if (j.deadline_ms > 0)
            self->delayed_send(self, std::chrono::milliseconds(j.deadline_ms), deadline_atom::value, id);
          st.waiting.push_back(id);
          pump(self);
          return id;
        },
        [self](status_atom, uint64_t id) -> caf::result<job_status> {
          auto& st = self->state;
          auto it = st.jobs.find(id);
          if (it == st.jobs.end())
            return make_error(controller_errc::unknown_job, "no job " + std::to_string(id));
          const job& j = it->second;
          return job_status{j.id, j.state, j.tokens, j.finish_reason, j.error, j.shard};
        },
        [self](cancel_atom, uint64_t id) -> caf::result<bool> {
          auto& st = self->state;
          auto it = st.jobs.find(id);
          if (it == st.jobs.end())
            return make_error(controller_errc::unknown_job, "no job " + std::to_string(id));
          job& j = it->second;
          if (j.state == job_state::queued) {
            st.waiting.erase(std::remove(st.waiting.begin(), st.waiting.end(), id), st.waiting.end());
            end_job(self, j, job_state::cancelled, "cancelled");
            update_gauges(st);
            return true;
          }
          if (j.state != job_state::running) return false;
          // A job inside a running step ends when that step returns; otherwise at once.
          j.cancel_requested = true;
          if (j.shard >= 0 && !st.shards[static_cast<size_t>(j.shard)].busy && j.prefilled) {
            end_job(self, j, job_state::cancelled, "cancelled");
            update_gauges(st);
          }
          return true;
        },
        [self](hold_steps_atom) -> caf::result<uint64_t> {
          auto& st = self->state;
          auto rp = self->make_response_promise<uint64_t>();
          if (st.hold != 0) st.holds_waiting.push_back(rp);
          else start_hold(self, rp);
          return rp;
        },
        [self](resume_steps_atom, uint64_t id) { end_hold(self, id); },
        [self](const member_event& ev) { on_member_event(self, ev); },
        [self](use_failover_atom, rebalancer_actor& r) { self->state.failover = std::move(r); },
        [self](deadline_atom, uint64_t id) { on_deadline(self, id); },
        [self](step_grace_atom, uint64_t shard, uint64_t id) { on_step_grace_over(self, static_cast<size_t>(shard), id); },
    };
  };
  return sys.spawn(impl, std::move(options));
}

}  // namespace moe::actors
