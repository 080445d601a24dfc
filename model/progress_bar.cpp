#include "model/progress_bar.hpp"

#include <unistd.h>

#include <cstdio>

namespace moe::model {

progress_bar::progress_bar(std::string label, uint64_t total_bytes, bool enabled)
    : label_(std::move(label)),
      total_bytes_(total_bytes),
      enabled_(enabled),
      start_(std::chrono::steady_clock::now()) {}

progress_bar::~progress_bar() {
  if (!enabled_) return;
  if (done_bytes_ < total_bytes_ || !drawn_) {
    // Partial (an error stopped the work) or never redrawn: show where it ended.
    last_percent_ = -1;
    draw();
  }
  std::fputc('\n', stderr);
}

bool progress_bar::stderr_is_terminal() noexcept { return ::isatty(STDERR_FILENO) == 1; }

void progress_bar::advance(uint64_t bytes) {
  done_bytes_ += bytes;
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  int64_t percent = total_bytes_ == 0 ? 100 : static_cast<int64_t>(done_bytes_ * 100 / total_bytes_);
  if (percent != last_percent_ || now - last_draw_ >= std::chrono::milliseconds(100)) draw();
}

void progress_bar::draw() {
  constexpr int width = 30;
  auto now = std::chrono::steady_clock::now();
  double fraction = total_bytes_ == 0 ? 1.0
                                      : static_cast<double>(done_bytes_) /
                                            static_cast<double>(total_bytes_);
  if (fraction > 1.0) fraction = 1.0;
  int filled = static_cast<int>(fraction * width);
  char bar[width + 1];
  for (int i = 0; i < width; ++i) bar[i] = i < filled ? '=' : (i == filled ? '>' : ' ');
  bar[width] = '\0';
  double seconds = std::chrono::duration<double>(now - start_).count();
  double gib = 1024.0 * 1024.0 * 1024.0;
  double rate = seconds > 0 ? static_cast<double>(done_bytes_) / gib / seconds : 0.0;
  std::fprintf(stderr, "\r%s [%s] %3d%% %.2f/%.2f GiB %.2f GiB/s", label_.c_str(), bar,
               static_cast<int>(fraction * 100), static_cast<double>(done_bytes_) / gib,
               static_cast<double>(total_bytes_) / gib, rate);
  std::fflush(stderr);
  drawn_ = true;
  last_draw_ = now;
  last_percent_ = static_cast<int64_t>(fraction * 100);
}

}  // namespace moe::model
