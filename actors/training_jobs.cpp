#include "actors/training_jobs.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <numeric>
#include <random>

#include <spdlog/spdlog.h>

#include "model/optimizer.hpp"

namespace moe::actors {

std::string check_training_job(const training_job& job, int64_t vocab_size, int64_t max_position_embeddings) {
  if (job.sequence_length < 2) return "sequence_length must be at least 2 (a sequence predicts its next tokens)";
  if (max_position_embeddings > 0 && job.sequence_length > max_position_embeddings)
    return "sequence_length " + std::to_string(job.sequence_length) + " exceeds the model's context of " +
           std::to_string(max_position_embeddings);
  if (job.batch_sequences < 1) return "batch_sequences must be at least 1";
  if (job.steps < 1) return "steps must be at least 1";
  if (static_cast<int64_t>(job.tokens.size()) < job.sequence_length)
    return "the corpus has " + std::to_string(job.tokens.size()) + " tokens, fewer than one sequence of " +
           std::to_string(job.sequence_length);
  for (auto t : job.tokens)
    if (t < 0 || t >= vocab_size)
      return "token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")";
  const auto& h = job.hyper;
  if (!std::isfinite(h.lr) || h.lr <= 0) return "the learning rate must be positive";
  if (!std::isfinite(job.min_lr) || job.min_lr < 0 || job.min_lr > h.lr) return "min_lr must be in [0, lr]";
  if (job.warmup_steps < 0) return "warmup_steps must be >= 0";
  if (!(h.beta1 >= 0 && h.beta1 < 1 && h.beta2 >= 0 && h.beta2 < 1)) return "betas must be in [0, 1)";
  if (!(h.eps > 0) || !std::isfinite(h.eps) || !(h.weight_decay >= 0) || !std::isfinite(h.weight_decay))
    return "eps must be positive and weight_decay >= 0";
  if (!std::isfinite(h.grad_clip) || !(h.balance_alpha >= 0) || !std::isfinite(h.balance_alpha) ||
      !(h.bias_update_speed >= 0) || !std::isfinite(h.bias_update_speed))
    return "grad_clip, balance_alpha and bias_update_speed must be finite (the last two >= 0)";
  return {};
}

train_batch batch_of(const training_job& job, int64_t step) {
  const auto L = static_cast<size_t>(job.sequence_length);
  const size_t windows = job.tokens.size() / L;
  train_batch b;
  b.step = static_cast<uint64_t>(step + 1);
  b.hyper = job.hyper;
  b.hyper.lr = model::learning_rate_at(step, job.hyper.lr, job.warmup_steps, job.steps, job.min_lr);
  b.cu_seqlens = {0};
  std::vector<size_t> order;
  int64_t epoch = -1;
  for (int64_t s = 0; s < job.batch_sequences; ++s) {
    const auto index = static_cast<size_t>(step * job.batch_sequences + s);
    if (const auto e = static_cast<int64_t>(index / windows); e != epoch) {
      epoch = e;
      order.resize(windows);
      std::iota(order.begin(), order.end(), size_t{0});
      std::mt19937_64 rng(job.seed * 1000003u + static_cast<uint64_t>(epoch));
      std::shuffle(order.begin(), order.end(), rng);
    }
    const size_t w = order[index % windows];
    b.tokens.insert(b.tokens.end(), job.tokens.begin() + static_cast<std::ptrdiff_t>(w * L),
                    job.tokens.begin() + static_cast<std::ptrdiff_t>((w + 1) * L));
    b.cu_seqlens.push_back(static_cast<int32_t>(b.tokens.size()));
  }
  return b;
}

namespace {

struct job_record {
  training_job job;
  caf::actor subscriber;
  training_event last;
  bool cancel = false;
  double seconds = 0;  // summed step times
  int64_t tokens = 0;
  // The step the trainer's snapshot was taken before (a rollback resumes there), and the last
  // step a snapshot was tried at (a failed one is not retried at the same step).
  std::optional<int64_t> snapshot_step;
  std::optional<int64_t> snapshot_tried;
};

struct pending_checkpoint {
  std::string dir;
  caf::typed_response_promise<std::string> promise;
};

struct jobs_state {
  training_jobs_options options;
  uint64_t next_id = 1;
  std::map<uint64_t, job_record> jobs;  // queued, running and ended (the last kept for status)
  std::deque<uint64_t> queue;
  std::optional<uint64_t> running;
  bool step_in_flight = false;
  std::deque<pending_checkpoint> checkpoints;
  static inline const char* name = "training_jobs";
};

using pointer = training_jobs_actor::stateful_pointer<jobs_state>;

void run_next_step(pointer self);

// Whether `e` says the trainer rolled the cluster back to its snapshot: the job then goes back to
// the step it took the snapshot at and runs the same batches from there again.
bool rolled_back(pointer self, uint64_t id, const caf::error& e) {
  auto& r = self->state.jobs.at(id);
  if (e.category() != caf::atom("trainer") || e.code() != static_cast<uint8_t>(trainer_errc::rolled_back) ||
      !r.snapshot_step)
    return false;
  spdlog::warn("training job {}: {}; steps {} to {} run again", id, error_text(e), *r.snapshot_step + 1, r.last.step + 1);
  r.last.step = *r.snapshot_step;
  r.snapshot_tried.reset();
  ++r.last.rollbacks;
  return true;
}

void emit(pointer self, job_record& r) {
  if (r.subscriber) caf::anon_send(r.subscriber, train_event_atom::value, r.last);
}

void end_job(pointer self, uint64_t id, job_state state, std::string error) {
  auto& st = self->state;
  auto& r = st.jobs.at(id);
  r.last.finished = true;
  r.last.state = static_cast<uint8_t>(state);
  r.last.error = std::move(error);
  emit(self, r);
  r.job.tokens = {};  // ended: keep the last event only
  if (st.running == id) st.running.reset();
}

// Writes the checkpoints asked for, one after the other, then goes on.
void write_checkpoints(pointer self) {
  auto& st = self->state;
  if (st.checkpoints.empty()) return run_next_step(self);
  auto c = std::move(st.checkpoints.front());
  st.checkpoints.pop_front();
  st.step_in_flight = true;
  self->request(st.options.trainer, caf::infinite, train_save_atom::value, c.dir)
      .then(
          [self, c](std::string& dir) mutable {
            auto& st = self->state;
            st.step_in_flight = false;
            if (st.running) {
              auto& r = st.jobs.at(*st.running);
              r.last.checkpoint = dir;
              emit(self, r);
              r.last.checkpoint.clear();
            }
            c.promise.deliver(std::move(dir));
            write_checkpoints(self);
          },
          [self, c](caf::error& e) mutable {
            self->state.step_in_flight = false;
            c.promise.deliver(std::move(e));
            write_checkpoints(self);
          });
}

void run_next_step(pointer self) {
  auto& st = self->state;
  if (st.step_in_flight) return;
  if (!st.checkpoints.empty()) return write_checkpoints(self);
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
    return run_next_step(self);
  }
  if (r.last.step >= r.job.steps) {
    end_job(self, id, job_state::finished, {});
    return run_next_step(self);
  }
  const int64_t every = st.options.snapshot_every;
  if (every > 0 && r.last.step % every == 0 && r.snapshot_step != r.last.step && r.snapshot_tried != r.last.step) {
    const int64_t at = r.last.step;
    r.snapshot_tried = at;
    st.step_in_flight = true;
    self->request(st.options.trainer, caf::infinite, train_snapshot_atom::value)
        .then(
            [self, id, at](int64_t) {
              self->state.step_in_flight = false;
              self->state.jobs.at(id).snapshot_step = at;
              run_next_step(self);
            },
            [self, id, at](caf::error& e) {
              // The older snapshot stays (the trainer replaces it only with a whole new one).
              self->state.step_in_flight = false;
              if (!rolled_back(self, id, e))
                spdlog::warn("training job {}: no snapshot before step {}: {}", id, at + 1, error_text(e));
              run_next_step(self);
            });
    return;
  }
  auto batch = batch_of(r.job, r.last.step);
  const double lr = batch.hyper.lr;
  st.step_in_flight = true;
  self->request(st.options.trainer, caf::infinite, train_step_atom::value, std::move(batch))
      .then(
          [self, id, lr](train_step_report& rep) {
            auto& st = self->state;
            st.step_in_flight = false;
            auto& r = st.jobs.at(id);
            r.seconds += rep.seconds;
            r.tokens += rep.tokens;
            r.last.step += 1;
            r.last.loss = rep.loss;
            r.last.lr = lr;
            r.last.grad_norm = rep.grad_norm;
            r.last.load_balance = rep.load_balance;
            r.last.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0;
            if (r.last.step < r.job.steps && !r.cancel) emit(self, r);
            run_next_step(self);
          },
          [self, id](caf::error& e) {
            auto& st = self->state;
            st.step_in_flight = false;
            if (rolled_back(self, id, e)) return run_next_step(self);
            end_job(self, id, job_state::failed, error_text(e));
            run_next_step(self);
          });
}

}  // namespace

training_jobs_actor spawn_training_jobs(caf::actor_system& sys, training_jobs_options options) {
  return sys.spawn([o = std::move(options)](pointer self) mutable -> training_jobs_actor::behavior_type {
    self->state.options = std::move(o);
    return {
        [self](train_submit_atom, training_job& job, caf::actor& subscriber) -> caf::result<uint64_t> {
          auto& st = self->state;
          if (auto why = check_training_job(job, st.options.vocab_size, st.options.max_position_embeddings);
              !why.empty())
            return make_error(controller_errc::invalid_request, "training job: " + why);
          if (static_cast<int64_t>(st.queue.size()) >= st.options.max_queue)
            return make_error(controller_errc::overloaded,
                              std::to_string(st.queue.size()) + " training jobs are waiting already");
          const uint64_t id = st.next_id++;
          job_record r;
          r.last.job = id;
          r.last.steps = job.steps;
          r.last.state = static_cast<uint8_t>(job_state::queued);
          r.job = std::move(job);
          r.subscriber = std::move(subscriber);
          st.jobs.emplace(id, std::move(r));
          st.queue.push_back(id);
          run_next_step(self);
          return id;
        },
        [self](cancel_atom, uint64_t id) -> caf::result<bool> {
          auto& st = self->state;
          auto it = st.jobs.find(id);
          if (it == st.jobs.end()) return make_error(controller_errc::unknown_job, "no training job " + std::to_string(id));
          if (it->second.last.finished) return false;
          it->second.cancel = true;
          if (auto q = std::find(st.queue.begin(), st.queue.end(), id); q != st.queue.end()) {
            st.queue.erase(q);
            end_job(self, id, job_state::cancelled, {});
          }
          return true;
        },
        [self](status_atom, uint64_t id) -> caf::result<training_event> {
          auto& st = self->state;
          auto it = st.jobs.find(id);
          if (it == st.jobs.end()) return make_error(controller_errc::unknown_job, "no training job " + std::to_string(id));
          return it->second.last;
        },
        [self](train_checkpoint_atom, std::string& dir) -> caf::result<std::string> {
          auto& st = self->state;
          if (dir.empty()) return make_error(controller_errc::invalid_request, "a checkpoint needs a directory");
          auto rp = self->make_response_promise<std::string>();
          st.checkpoints.push_back({std::move(dir), rp});
          run_next_step(self);
          return rp;
        },
    };
  });
}

}  // namespace moe::actors
