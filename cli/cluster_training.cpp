#include "cli/cluster_training.hpp"

#include <caf/all.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include "kernels/dtype.hpp"
#include "model/model_errc.hpp"
#include "model/progress_bar.hpp"
#include "model/safetensors.hpp"

namespace moe::cli {

caf::expected<std::vector<int32_t>> read_corpus(const std::string& path, const model::tokenizer& tok) {
  if (path.size() > 12 && path.ends_with(".safetensors")) {
    auto f = model::safetensors_file::open(path);
    if (!f) return f.error();
    const auto* ids = f->find("input_ids");
    if (!ids) return model::make_error(model::model_errc::missing_tensor, path + ": no tensor named input_ids");
    const size_t width = ids->dtype == kernels::dtype::i64 ? 8 : ids->dtype == kernels::dtype::i32 ? 4 : 0;
    if (width == 0) return model::make_error(model::model_errc::bad_tensor, path + ": input_ids must be int64 or int32");
    std::vector<int32_t> out(ids->data.size() / width);
    for (size_t i = 0; i < out.size(); ++i) {
      int64_t v = 0;
      if (width == 8) {
        std::memcpy(&v, ids->data.data() + i * 8, 8);
      } else {
        int32_t w = 0;
        std::memcpy(&w, ids->data.data() + i * 4, 4);
        v = w;
      }
      if (v < 0 || v > INT32_MAX)
        return model::make_error(model::model_errc::bad_tensor, path + ": token id " + std::to_string(v) + " out of range");
      out[i] = static_cast<int32_t>(v);
    }
    return out;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return model::make_error(model::model_errc::bad_input, path + ": cannot be read");
  std::ostringstream text;
  text << in.rdbuf();
  return tok.encode(text.str());
}

namespace {

// One line of progress: redrawn in place on a terminal, else printed every tenth of the run.
class step_progress {
 public:
  explicit step_progress(int64_t steps) : steps_(steps), tty_(model::progress_bar::stderr_is_terminal()) {}
  ~step_progress() {
    if (tty_ && drawn_) fmt::print(stderr, "\n");
  }
  step_progress(const step_progress&) = delete;
  step_progress& operator=(const step_progress&) = delete;

  void update(const actors::training_event& e) {
    const double balance = e.load_balance.empty()
                               ? 0.0
                               : std::accumulate(e.load_balance.begin(), e.load_balance.end(), 0.0) /
                                     static_cast<double>(e.load_balance.size());
    const double eta = e.tokens_per_second > 0 && e.step > 0
                           ? static_cast<double>(e.steps - e.step) * elapsed() / static_cast<double>(e.step)
                           : 0.0;
    const std::string text = fmt::format("step {}/{}  loss {:.4f}  lr {:.2e}  {:.0f} tok/s  balance {:.2f}  eta {:.0f}s",
                                         e.step, e.steps, e.loss, e.lr, e.tokens_per_second, balance, eta);
    if (tty_) {
      constexpr int width = 24;
      const auto filled = static_cast<int>(width * e.step / std::max<int64_t>(1, steps_));
      fmt::print(stderr, "\r[{}{}] {}   ", std::string(static_cast<size_t>(filled), '='),
                 std::string(static_cast<size_t>(width - filled), ' '), text);
      drawn_ = true;
      return;
    }
    const int64_t tenth = std::max<int64_t>(1, steps_ / 10);
    if (e.step == 1 || e.step % tenth == 0 || e.step == steps_) fmt::print(stderr, "train: {}\n", text);
  }

 private:
  [[nodiscard]] double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  int64_t steps_;
  bool tty_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace

caf::expected<training_summary> run_training_job(actors::serving_cluster& cluster, actors::training_job job) {
  caf::scoped_actor self{cluster.system()};
  training_summary out;
  const int64_t steps = job.steps;
  caf::error failure;
  uint64_t id = 0;
  self->request(cluster.training_jobs(), std::chrono::seconds(30), actors::train_submit_atom::value, std::move(job),
                caf::actor_cast<caf::actor>(self))
      .receive([&](uint64_t j) { id = j; }, [&](caf::error& e) { failure = std::move(e); });
  if (failure) return failure;
  const auto start = std::chrono::steady_clock::now();
  step_progress progress(steps);
  uint32_t rollbacks = 0;
  for (bool done = false; !done;) {
    self->receive([&](actors::train_event_atom, const actors::training_event& e) {
      if (e.job != id) return;
      if (e.rollbacks > rollbacks && e.step > 0) {
        // A node failure rolled the job back: the steps from here on ran again.
        rollbacks = e.rollbacks;
        fmt::print(stderr, "train: a node failed; rolled back and ran again from step {}\n", e.step);
        out.steps = std::min(out.steps, e.step - 1);
        out.losses.resize(static_cast<size_t>(out.steps));
        out.balance.resize(static_cast<size_t>(out.steps));
      }
      if (e.step > out.steps) {
        out.steps = e.step;
        out.losses.push_back(e.loss);
        out.balance.push_back(e.load_balance);
        out.tokens_per_second = e.tokens_per_second;
        progress.update(e);
      }
      if (!e.finished) return;
      done = true;
      if (e.state != static_cast<uint8_t>(actors::job_state::finished))
        failure = model::make_error(model::model_errc::bad_input,
                                    "training job " + std::to_string(id) + " " +
                                        actors::to_string(static_cast<actors::job_state>(e.state)) +
                                        (e.error.empty() ? "" : ": " + e.error));
    });
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failure) return failure;
  return out;
}

void print_training_summary(const training_summary& s) {
  if (s.losses.empty()) return;
  // Means over a few steps at each end: one batch's loss is noisy.
  const size_t k = std::max<size_t>(1, std::min<size_t>(5, s.losses.size() / 4));
  auto mean = [](auto first, auto last) { return std::accumulate(first, last, 0.0) / static_cast<double>(last - first); };
  fmt::print("trained {} steps in {:.1f} s ({:.0f} tokens/s)\n", s.steps, s.seconds, s.tokens_per_second);
  fmt::print("  loss: {:.4f} (first {} steps) -> {:.4f} (last {})\n", mean(s.losses.begin(), s.losses.begin() + k), k,
             mean(s.losses.end() - k, s.losses.end()), k);
  if (!s.balance.front().empty()) {
    std::vector<std::string> layers;
    for (size_t l = 0; l < s.balance.front().size(); ++l) {
      double first = 0, last = 0;
      for (size_t i = 0; i < k; ++i) {
        first += s.balance[i][l];
        last += s.balance[s.balance.size() - 1 - i][l];
      }
      layers.push_back(fmt::format("{:.2f} -> {:.2f}", first / k, last / k));
    }
    fmt::print("  expert load max/mean per MoE layer: {}\n", fmt::join(layers, ", "));
  }
}

}  // namespace moe::cli
