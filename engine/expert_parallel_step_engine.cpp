#include "engine/expert_parallel_step_engine.hpp"

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "engine/gpu_step_engine.hpp"
#include "model/cache_blocks.hpp"
#include "model/model_errc.hpp"
#include "runtime/nccl_comm.hpp"

namespace moe::engine {

namespace {

caf::error bad_input(std::string text) {
  return model::make_error(model::model_errc::bad_input,
                           "expert-parallel group: " + std::move(text));
}

/// One thread per rank, each running its part of a task and the caller waiting for all: NCCL's
/// collectives block until every rank has called them, so the ranks' steps must run at once.
class rank_threads {
 public:
  explicit rank_threads(size_t n) {
    for (size_t i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~rank_threads() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : threads_) t.join();
  }
  rank_threads(const rank_threads&) = delete;
  rank_threads& operator=(const rank_threads&) = delete;

  /// task(r) on rank r's thread, for every rank; returns when all have returned.
  void run(const std::function<void(size_t)>& task) {
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    pending_ = threads_.size();
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void loop(size_t rank) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const auto* task = task_;
      lock.unlock();
      (*task)(rank);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(size_t)>* task_ = nullptr;
  size_t pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

struct expert_parallel_step_engine::state {
  expert_parallel_group_options options;
  // Release order (reverse of declaration): the threads stop, the engines drain and go, then
  // the communicators they used.
  std::vector<runtime::nccl_comm_ptr> comms;
  std::vector<std::unique_ptr<gpu_step_engine>> ranks;
  std::unordered_map<uint64_t, int> rank_of;  // every cached sequence's rank
  std::vector<int64_t> live;                  // sequences cached on each rank
  std::optional<rank_threads> threads;
};

expert_parallel_step_engine::expert_parallel_step_engine(std::unique_ptr<state> s)
    : state_(std::move(s)) {}
expert_parallel_step_engine::~expert_parallel_step_engine() = default;

caf::expected<std::unique_ptr<expert_parallel_step_engine>> expert_parallel_step_engine::create(
    std::shared_ptr<const model::checkpoint> ckpt, const expert_parallel_group_options& options) {
  if (options.devices.empty()) return bad_input("no device");
  if (std::set<int>(options.devices.begin(), options.devices.end()).size() !=
      options.devices.size())
    return bad_input("a device is listed twice (one rank per GPU)");
  if (options.max_tokens_per_rank < 1) return bad_input("max_tokens_per_rank must be positive");
  auto s = std::make_unique<state>();
  s->options = options;
  auto comms = runtime::make_local_nccl_comms(options.devices);
  if (!comms) return with_context(comms.error(), "expert-parallel group: NCCL");
  s->comms = std::move(*comms);
  for (size_t r = 0; r < options.devices.size(); ++r) {
    gpu_engine_options eo = options.engine;
    eo.device = options.devices[r];
    eo.decode_graphs = false;
    eo.expert_parallel = {s->comms[r].get(), options.max_tokens_per_rank,
                          options.recv_rows_per_rank};
    auto e = gpu_engine::create(ckpt, eo);
    if (!e) return with_context(e.error(), "expert-parallel group: rank " + std::to_string(r));
    s->ranks.push_back(std::make_unique<gpu_step_engine>(std::move(*e), eo.device));
  }
  s->live.assign(options.devices.size(), 0);
  s->threads.emplace(options.devices.size());
  return std::unique_ptr<expert_parallel_step_engine>(
      new expert_parallel_step_engine(std::move(s)));
}

caf::expected<model::step_output> expert_parallel_step_engine::prefill(
    std::span<const model::step_sequence> seqs, bool want_logits) {
  state& s = *state_;
  if (auto err = model::check_step(seqs, false)) return err;
  const int64_t budget = s.options.max_tokens_per_rank;
  const int64_t block = s.options.engine.cache.block_size;
  std::unordered_set<uint64_t> seen;
  for (const auto& q : seqs) {
    const std::string name = "sequence " + std::to_string(q.id);
    if (s.rank_of.count(q.id) || !seen.insert(q.id).second)
      return bad_input(name + " is already in the batch or cache");
    if (static_cast<int64_t>(q.tokens.size()) > budget)
      return bad_input(name + ": " + std::to_string(q.tokens.size()) +
                       " prompt tokens, above the " + std::to_string(budget) +
                       " a rank takes in one step (max_tokens_per_rank)");
  }
  // Each new sequence to the rank with the fewest sequences that has room for it (then the
  // most free blocks, then the lowest rank), counting what this step already gave each rank.
  const size_t n = s.ranks.size();
  std::vector<int64_t> live = s.live, free(n);
  for (size_t r = 0; r < n; ++r) free[r] = s.ranks[r]->free_cache_blocks();
  std::vector<std::vector<size_t>> assigned(n);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t need = model::cache_block_allocator::blocks_for(
        static_cast<int64_t>(seqs[i].tokens.size()), block);
    std::optional<size_t> best;
    for (size_t r = 0; r < n; ++r) {
      if (free[r] < need) continue;
      if (!best || live[r] < live[*best] || (live[r] == live[*best] && free[r] > free[*best]))
        best = r;
    }
    if (!best)
      return model::make_error(model::model_errc::cache_full,
                               "expert-parallel group: no rank's cache has the " +
                                   std::to_string(need) + " blocks sequence " +
                                   std::to_string(seqs[i].id) + " needs");
    assigned[*best].push_back(i);
    ++live[*best];
    free[*best] -= need;
  }
  auto out = run(seqs, assigned, false, want_logits);
  if (!out) return out.error();
  s.live = std::move(live);
  for (size_t r = 0; r < n; ++r)
    for (const size_t i : assigned[r]) s.rank_of[seqs[i].id] = static_cast<int>(r);
  return out;
}

caf::expected<model::step_output> expert_parallel_step_engine::decode(
    std::span<const model::step_sequence> seqs, bool want_logits) {
  state& s = *state_;
  if (auto err = model::check_step(seqs, true)) return err;
  const int64_t block = s.options.engine.cache.block_size;
  const size_t n = s.ranks.size();
  std::unordered_set<uint64_t> seen;
  std::vector<std::vector<size_t>> assigned(n);
  std::vector<int64_t> need(n, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const std::string name = "sequence " + std::to_string(seqs[i].id);
    auto it = s.rank_of.find(seqs[i].id);
    if (it == s.rank_of.end()) return bad_input(name + " has no prefill");
    if (!seen.insert(seqs[i].id).second) return bad_input(name + " is twice in the batch");
    const auto r = static_cast<size_t>(it->second);
    assigned[r].push_back(i);
    const int64_t cached = s.ranks[r]->cached_tokens(seqs[i].id);
    need[r] += model::cache_block_allocator::blocks_for(cached + 1, block) -
               model::cache_block_allocator::blocks_for(cached, block);
  }
  for (size_t r = 0; r < n; ++r)
    if (need[r] > s.ranks[r]->free_cache_blocks())
      return model::make_error(model::model_errc::cache_full,
                               "expert-parallel group: rank " + std::to_string(r) + " needs " +
                                   std::to_string(need[r]) + " free cache blocks for this step");
  return run(seqs, assigned, true, want_logits);
}

caf::expected<model::step_output> expert_parallel_step_engine::run(
    std::span<const model::step_sequence> seqs, const std::vector<std::vector<size_t>>& assigned,
    bool decode, bool want_logits) {
  state& s = *state_;
  const size_t n = s.ranks.size();
  const auto vocab = static_cast<size_t>(config().vocab_size);
  model::step_output out;
  out.tokens.assign(seqs.size(), 0);
  if (want_logits) out.logits.assign(seqs.size() * vocab, 0.0f);
  std::vector<size_t> next(n, 0);  // each rank's first sequence not yet run
  std::vector<std::vector<size_t>> round(n);
  std::vector<caf::expected<model::step_output>> results(n, model::step_output{});
  caf::error failed;
  bool failed_itself = false;  // whether `failed` is a rank's own error, not a peer's notice
  auto pending = [&] {
    for (size_t r = 0; r < n; ++r)
      if (next[r] < assigned[r].size()) return true;
    return false;
  };
  // The group is the whole world, so a step without sequences has nobody to keep in step.
  while (!failed && pending()) {
    for (size_t r = 0; r < n; ++r) {
      round[r].clear();
      int64_t tokens = 0;
      for (; next[r] < assigned[r].size(); ++next[r]) {
        const auto cost = static_cast<int64_t>(seqs[assigned[r][next[r]]].tokens.size());
        if (!round[r].empty() && tokens + cost > s.options.max_tokens_per_rank) break;
        tokens += cost;
        round[r].push_back(assigned[r][next[r]]);
      }
    }
    s.threads->run([&](size_t r) {
      std::vector<model::step_sequence> part;
      part.reserve(round[r].size());
      for (const size_t i : round[r]) part.push_back(seqs[i]);
      results[r] =
          decode ? s.ranks[r]->decode(part, want_logits) : s.ranks[r]->prefill(part, want_logits);
    });
    ++rounds_;
    for (size_t r = 0; r < n; ++r) {
      if (!results[r]) {
        // The lowest rank that failed on its own, rather than one told of a peer's refusal.
        const caf::error& e = results[r].error();
        const bool itself = !(e.category() == caf::atom("model") &&
                              e.code() == static_cast<uint8_t>(model::model_errc::peer_refused));
        if (!failed || (itself && !failed_itself)) {
          failed = with_context(e, "rank " + std::to_string(r));
          failed_itself = itself;
        }
        continue;
      }
      for (size_t j = 0; j < round[r].size(); ++j) {
        const size_t i = round[r][j];
        out.tokens[i] = results[r]->tokens.at(j);
        if (want_logits)
          std::copy_n(results[r]->logits.begin() + static_cast<std::ptrdiff_t>(j * vocab), vocab,
                      out.logits.begin() + static_cast<std::ptrdiff_t>(i * vocab));
      }
    }
  }
  if (!failed) return out;
  // A failed prefill leaves none of the step's sequences cached, on any rank.
  if (!decode)
    for (size_t r = 0; r < n; ++r)
      for (const size_t i : assigned[r]) s.ranks[r]->release(seqs[i].id);
  return failed;
}

void expert_parallel_step_engine::release(uint64_t id) {
  auto it = state_->rank_of.find(id);
  if (it == state_->rank_of.end()) return;
  state_->ranks[static_cast<size_t>(it->second)]->release(id);
  --state_->live[static_cast<size_t>(it->second)];
  state_->rank_of.erase(it);
}

int64_t expert_parallel_step_engine::cached_tokens(uint64_t id) const {
  auto it = state_->rank_of.find(id);
  if (it == state_->rank_of.end()) return 0;
  return state_->ranks[static_cast<size_t>(it->second)]->cached_tokens(id);
}

int64_t expert_parallel_step_engine::free_cache_blocks() const {
  int64_t total = 0;
  for (const auto& r : state_->ranks) total += r->free_cache_blocks();
  return total;
}

const model::model_config& expert_parallel_step_engine::config() const {
  return state_->ranks.front()->config();
}

std::string expert_parallel_step_engine::device() const {
  std::string devices;
  for (const int d : state_->options.devices)
    devices += (devices.empty() ? "cuda:" : ",") + std::to_string(d);
  return devices + " " + std::string(kernels::to_string(state_->options.engine.dtype)) +
         ", experts split over " + std::to_string(state_->ranks.size()) + " GPUs (expert parallel)";
}

int expert_parallel_step_engine::world_size() const noexcept {
  return static_cast<int>(state_->ranks.size());
}

int expert_parallel_step_engine::rank_of(uint64_t id) const noexcept {
  auto it = state_->rank_of.find(id);
  return it == state_->rank_of.end() ? -1 : it->second;
}

const gpu_engine& expert_parallel_step_engine::rank_engine(int r) const {
  return state_->ranks.at(static_cast<size_t>(r))->engine();
}

}  // namespace moe::engine
