#include "tests/unit/actors/fake_training_jobs.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <deque>
#include <map>
#include <optional>

#include "model/model_errc.hpp"

namespace moe::actors::testing {

double fake_loss(int64_t step) { return 5.0 / (1.0 + static_cast<double>(step)); }

void fake_training_log::record_submit(uint64_t, const training_job& job) {
  std::lock_guard<std::mutex> lock(mu_);
  submitted_.push_back(job);
  changed_.notify_all();
}

void fake_training_log::record_cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_.push_back(id);
  changed_.notify_all();
}

void fake_training_log::record_checkpoint(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  checkpoints_.push_back(dir);
  changed_.notify_all();
}

std::vector<training_job> fake_training_log::submitted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return submitted_;
}

std::vector<std::string> fake_training_log::checkpoints() const {
  std::lock_guard<std::mutex> lock(mu_);
  return checkpoints_;
}

bool fake_training_log::wait_for_cancel(uint64_t id, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, timeout, [&] {
    return std::find(cancelled_.begin(), cancelled_.end(), id) != cancelled_.end();
  });
}

namespace {

using step_done_atom = caf::atom_constant<caf::atom("fake_step")>;
using fake_actor = training_jobs_actor::extend<caf::reacts_to<step_done_atom>>;

struct fake_record {
  training_job job;
  caf::actor subscriber;
  training_event last;
  bool cancel = false;
};

struct fake_state {
  std::map<uint64_t, fake_record> jobs;
  std::deque<uint64_t> queue;
  std::optional<uint64_t> running;
  bool step_in_flight = false;
  std::deque<std::pair<std::string, caf::typed_response_promise<std::string>>> checkpoints;
  uint64_t next_id = 1;
};

using pointer = fake_actor::stateful_pointer<fake_state>;

size_t num_active(const fake_state& st) { return st.queue.size() + (st.running ? 1 : 0); }

void emit(const fake_record& r) {
  if (r.subscriber) caf::anon_send(r.subscriber, train_event_atom::value, r.last);
}

void end_job(pointer self, uint64_t id, job_state state, std::string error) {
  auto& st = self->state;
  auto& r = st.jobs.at(id);
  r.last.finished = true;
  r.last.state = static_cast<uint8_t>(state);
  r.last.error = std::move(error);
  emit(r);
  if (st.running == id) st.running.reset();
}

void run_next(pointer self, const fake_training_options& o, const std::shared_ptr<fake_training_log>& log) {
  auto& st = self->state;
  if (st.step_in_flight) return;
  while (!st.checkpoints.empty()) {
    auto [dir, promise] = std::move(st.checkpoints.front());
    st.checkpoints.pop_front();
    const std::string bad = "/unwritable";
    if (dir.size() >= bad.size() && dir.compare(dir.size() - bad.size(), bad.size(), bad) == 0) {
      promise.deliver(model::make_error(model::model_errc::io_error, "cannot create " + dir + ".saving: Permission denied"));
      continue;
    }
    log->record_checkpoint(dir);
    if (st.running) {
      auto& r = st.jobs.at(*st.running);
      r.last.checkpoint = dir;
      emit(r);
      r.last.checkpoint.clear();
    }
    promise.deliver(dir);
  }
  for (;;) {
    if (!st.running) {
      if (st.queue.empty()) return;
      st.running = st.queue.front();
      st.queue.pop_front();
      st.jobs.at(*st.running).last.state = static_cast<uint8_t>(job_state::running);
    }
    const uint64_t id = *st.running;
    auto& r = st.jobs.at(id);
    if (r.cancel) {
      end_job(self, id, job_state::cancelled, {});
      continue;
    }
    if (r.last.step >= r.job.steps) {
      end_job(self, id, job_state::finished, {});
      continue;
    }
    st.step_in_flight = true;
    self->delayed_send(self, o.step_interval, step_done_atom::value);
    return;
  }
}

fake_actor::behavior_type fake_training_jobs(pointer self, fake_training_options o,
                                             std::shared_ptr<fake_training_log> log) {
  return {
      [=](train_submit_atom, training_job& job, caf::actor& subscriber) -> caf::result<uint64_t> {
        auto& st = self->state;
        if (auto why = check_training_job(job, o.vocab_size, o.max_position_embeddings); !why.empty())
          return make_error(controller_errc::invalid_request, "training job: " + why);
        if (num_active(st) >= o.max_active)
          return make_error(controller_errc::overloaded,
                            std::to_string(st.queue.size()) + " training jobs are waiting already");
        const uint64_t id = st.next_id++;
        log->record_submit(id, job);
        fake_record r;
        r.last.job = id;
        r.last.steps = job.steps;
        r.last.state = static_cast<uint8_t>(job_state::queued);
        r.job = std::move(job);
        r.subscriber = std::move(subscriber);
        st.jobs.emplace(id, std::move(r));
        st.queue.push_back(id);
        run_next(self, o, log);
        return id;
      },
      [=](cancel_atom, uint64_t id) -> caf::result<bool> {
        auto& st = self->state;
        auto it = st.jobs.find(id);
        if (it == st.jobs.end())
          return make_error(controller_errc::unknown_job, "no training job " + std::to_string(id));
        log->record_cancel(id);
        if (it->second.last.finished) return false;
        it->second.cancel = true;
        if (auto q = std::find(st.queue.begin(), st.queue.end(), id); q != st.queue.end()) {
          st.queue.erase(q);
          end_job(self, id, job_state::cancelled, {});
        }
        return true;
      },
      [=](status_atom, uint64_t id) -> caf::result<training_event> {
        auto it = self->state.jobs.find(id);
        if (it == self->state.jobs.end())
          return make_error(controller_errc::unknown_job, "no training job " + std::to_string(id));
        return it->second.last;
      },
      [=](train_checkpoint_atom, std::string& dir) -> caf::result<std::string> {
        if (dir.empty()) return make_error(controller_errc::invalid_request, "a checkpoint needs a directory");
        auto rp = self->make_response_promise<std::string>();
        self->state.checkpoints.emplace_back(std::move(dir), rp);
        run_next(self, o, log);
        return rp;
      },
      [=](step_done_atom) {
        auto& st = self->state;
        st.step_in_flight = false;
        if (!st.running) return run_next(self, o, log);
        const uint64_t id = *st.running;
        auto& r = st.jobs.at(id);
        const int64_t k = ++r.last.step;
        r.last.loss = fake_loss(k);
        r.last.lr = r.job.hyper.lr;
        r.last.grad_norm = 1.0 / static_cast<double>(k);
        r.last.tokens_per_second = 1000;
        r.last.load_balance = {1.0 + 1.0 / static_cast<double>(k), 1.5};
        if (!r.job.tokens.empty() && r.job.tokens.front() == o.fail_token) {
          end_job(self, id, job_state::failed, "scripted failure");
        } else if (r.last.step < r.job.steps && !r.cancel) {
          emit(r);
        }
        run_next(self, o, log);
      },
  };
}

}  // namespace

training_jobs_actor spawn_fake_training_jobs(caf::actor_system& sys, fake_training_options options,
                                             std::shared_ptr<fake_training_log> log) {
  return sys.spawn(fake_training_jobs, options, std::move(log));
}

}  // namespace moe::actors::testing
