// A byte-count progress line for long checkpoint reads and writes.
//
// Drawn on stderr only when stderr is a terminal, so logs, pipes and CI output stay free of
// carriage returns; redraws at most every 100 ms or per whole percent.
// Thread safety: confined to the thread that drives it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moe::model {

class progress_bar {
 public:
  /// `enabled` defaults to whether stderr is a terminal.
  progress_bar(std::string label, uint64_t total_bytes, bool enabled = stderr_is_terminal());
  ~progress_bar();  ///< Ends the line if anything was drawn.
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;

  void advance(uint64_t bytes);

  [[nodiscard]] static bool stderr_is_terminal() noexcept;

 private:
  void draw();

  std::string label_;
  uint64_t total_bytes_;
  uint64_t done_bytes_ = 0;
  bool enabled_;
  bool drawn_ = false;
  int64_t last_percent_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace moe::model
