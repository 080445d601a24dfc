// Training on a running cluster from the command line: what `moe train --config` and `moe demo`
// share. A corpus file becomes token ids, a training job runs on the cluster's training jobs
// actor (actors/training_jobs.hpp) while a progress line is drawn on stderr, and the run ends
// with a summary.
// Thread safety: call from one thread (it waits on the job in a scoped actor).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "actors/serving_cluster.hpp"
#include "base/error.hpp"
#include "model/tokenizer.hpp"

namespace moe::cli {

/// A corpus: a .safetensors file's integer tensor `input_ids` (any shape, flattened: pre-
/// tokenised ids), or any other file as UTF-8 text through `tok`. Errors name the file.
[[nodiscard]] caf::expected<std::vector<int32_t>> read_corpus(const std::string& path, const model::tokenizer& tok);

struct training_summary {
  int64_t steps = 0;
  std::vector<double> losses;               ///< per step
  std::vector<std::vector<double>> balance; ///< per step: max/mean expert load per MoE layer
  double tokens_per_second = 0;
  double seconds = 0;
};

/// Submits `job` to the cluster and follows it to the end, drawing progress on stderr (a line
/// redrawn in place on a terminal; a line per tenth of the run otherwise). Errors: the job's.
[[nodiscard]] caf::expected<training_summary> run_training_job(actors::serving_cluster& cluster,
                                                               actors::training_job job);

/// Prints the summary: losses at the start and the end, throughput, expert balance per layer.
void print_training_summary(const training_summary& s);

}  // namespace moe::cli
