#include "tests/unit/actors/fake_controller.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <map>

namespace moe::actors::testing {

void fake_controller_log::record_submit(uint64_t id, const generation_job& job) {
  std::lock_guard<std::mutex> lock(mu_);
  submitted_.emplace_back(id, job);
  changed_.notify_all();
}

void fake_controller_log::record_cancel(uint64_t id, bool) {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_.push_back(id);
  changed_.notify_all();
}

size_t fake_controller_log::num_submitted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return submitted_.size();
}

std::vector<generation_job> fake_controller_log::submitted() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<generation_job> out;
  for (const auto& [id, job] : submitted_) out.push_back(job);
  return out;
}

bool fake_controller_log::wait_for_cancel(uint64_t id, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, timeout, [&] {
    return std::find(cancelled_.begin(), cancelled_.end(), id) != cancelled_.end();
  });
}

std::vector<int32_t> fake_tokens(const generation_job& job) {
  std::vector<int32_t> out;
  const int32_t base = job.prompt.empty() ? 0 : job.prompt.back();
  for (int64_t i = 0; i < job.max_new_tokens; ++i) {
    const auto t = static_cast<int32_t>((static_cast<int64_t>(base) + 1 + i) % 50000);
    out.push_back(t);
    if (std::find(job.stop_token_ids.begin(), job.stop_token_ids.end(), t) !=
        job.stop_token_ids.end())
      break;
  }
  return out;
}

namespace {

using tick_atom = caf::atom_constant<caf::atom("fake_tick")>;
using fake_actor = controller_actor::extend<caf::reacts_to<tick_atom, uint64_t>>;

struct fake_job {
  generation_job spec;
  caf::actor subscriber;
  std::vector<int32_t> planned;  // fake_tokens(spec)
  size_t emitted = 0;
  job_state state = job_state::queued;
  std::string finish_reason, error;
};

struct fake_state {
  std::map<uint64_t, fake_job> jobs;
  uint64_t next_id = 1;
  size_t active = 0;
};

bool is_active(job_state s) { return s == job_state::queued || s == job_state::running; }

fake_actor::behavior_type fake_controller(fake_actor::stateful_pointer<fake_state> self,
                                          fake_controller_options opts,
                                          std::shared_ptr<fake_controller_log> log) {
  auto finish = [self](uint64_t id, fake_job& j, job_state state, std::string reason,
                       std::string error, std::vector<int32_t> tokens) {
    j.state = state;
    j.finish_reason = reason;
    j.error = error;
    --self->state.active;
    if (j.subscriber) {
      caf::anon_send(j.subscriber, job_event_atom::value,
                 job_event{id, std::move(tokens), true, state, std::move(reason), std::move(error)});
    }
  };
  return {
      [=](submit_atom, generation_job& job, caf::actor subscriber) -> caf::result<uint64_t> {
        if (job.max_new_tokens > 4096) {
          return make_error(controller_errc::invalid_request,
                            "max_new_tokens " + std::to_string(job.max_new_tokens) +
                                " exceeds the limit of 4096");
        }
        if (self->state.active >= opts.max_active) {
          return make_error(controller_errc::overloaded,
                            "the queue is full (" + std::to_string(self->state.active) +
                                " requests waiting)");
        }
        const uint64_t id = self->state.next_id++;
        log->record_submit(id, job);
        fake_job j;
        j.planned = fake_tokens(job);
        j.spec = std::move(job);
        j.subscriber = std::move(subscriber);
        self->state.jobs.emplace(id, std::move(j));
        ++self->state.active;
        self->delayed_send(self, opts.token_interval, tick_atom::value, id);
        return id;
      },
      [=](status_atom, uint64_t id) -> caf::result<job_status> {
        auto it = self->state.jobs.find(id);
        if (it == self->state.jobs.end())
          return make_error(controller_errc::unknown_job, "no job " + std::to_string(id));
        const fake_job& j = it->second;
        return job_status{id, j.state, {j.planned.begin(), j.planned.begin() + j.emitted},
                          j.finish_reason, j.error, 0};
      },
      [=](cancel_atom, uint64_t id) -> caf::result<bool> {
        auto it = self->state.jobs.find(id);
        if (it == self->state.jobs.end())
          return make_error(controller_errc::unknown_job, "no job " + std::to_string(id));
        const bool was_active = is_active(it->second.state);
        log->record_cancel(id, was_active);
        if (was_active) finish(id, it->second, job_state::cancelled, "cancelled", "", {});
        return was_active;
      },
      [](hold_steps_atom) -> uint64_t { return 1; },  // a fake runs no steps: held at once
      [](resume_steps_atom, uint64_t) {},
      [](const member_event&) {},  // a fake cluster has no nodes to lose
      [](use_failover_atom, const rebalancer_actor&) {},
      [](deadline_atom, uint64_t) {},  // fake jobs end when the script says
      [](step_grace_atom, uint64_t, uint64_t) {},  // fake steps do not fail
      [=](tick_atom, uint64_t id) {
        auto it = self->state.jobs.find(id);
        if (it == self->state.jobs.end() || !is_active(it->second.state)) return;
        fake_job& j = it->second;
        j.state = job_state::running;
        if (j.emitted == j.planned.size()) {  // max_new_tokens 0
          finish(id, j, job_state::finished, "length", "", {});
          return;
        }
        const int32_t token = j.planned[j.emitted++];
        if (!j.spec.prompt.empty() && j.spec.prompt.front() == opts.fail_token) {
          finish(id, j, job_state::failed, "error", "scripted failure", {token});
          return;
        }
        if (j.emitted == j.planned.size()) {
          const auto& stop = j.spec.stop_token_ids;
          const bool stopped = std::find(stop.begin(), stop.end(), token) != stop.end();
          finish(id, j, job_state::finished, stopped ? "stop" : "length", "", {token});
          return;
        }
        if (j.subscriber) {
          caf::anon_send(j.subscriber, job_event_atom::value,
                     job_event{id, {token}, false, job_state::running, "", ""});
        }
        self->delayed_send(self, opts.token_interval, tick_atom::value, id);
      },
  };
}

}  // namespace

controller_actor spawn_fake_controller(caf::actor_system& sys, fake_controller_options options,
                                       std::shared_ptr<fake_controller_log> log) {
  return sys.spawn(fake_controller, options, std::move(log));
}

}  // namespace moe::actors::testing
