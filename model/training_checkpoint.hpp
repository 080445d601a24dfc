// Training checkpoints: the model in the hub layout plus the optimizer state, saved and resumed.
//
// A training checkpoint is a directory that serving reads as an ordinary hub checkpoint:
//   config.json                         the model config (torch_dtype float32, no quantization)
//   model.safetensors                   every tensor of the checkpoint as F32 under its hub name
//                                       (e_score_correction_bias and MTP modules included), or
//   model-0000k-of-0000n.safetensors +  shards, when the tensors exceed max_shard_bytes
//   model.safetensors.index.json
// and, for resuming, the training state beside it, which load_config/load_checkpoint ignore:
//   training_state.json                 {"format_version": 1, "step": s,
//                                        "optimizer": {"kind": "adamw", "steps": t, "beta1": ..,
//                                                      "beta2": .., "eps": .., "weight_decay": ..}}
//   optimizer/                          AdamW's moments, laid out as the model is
//   (model.safetensors
//                                       or shards + index, by the same max_shard_bytes):
//                                       "<param>.exp_avg" (m) and "<param>.exp_avg_sq" (v), each
//                                       with its parameter's shape.
// The moments are doubles in memory and are stored bit for bit, so a resumed run continues
// exactly where the saved one stopped. kernels::dtype has no F64, so each double travels as the
// I64 with the same bits (metadata "moment_encoding": "f64_bits_as_i64"): exact, readable by our
// safetensors reader, and in torch `t.view(torch.float64)`.
//
// Atomicity: everything is written into a sibling directory "<dir>.saving" (files synced) and
// only then takes the place of `dir` in one rename (renameat2 RENAME_EXCHANGE when `dir` exists),
// so a crash at any point leaves either the previous checkpoint or the new one, never a mixture
// or a half-written directory under `dir`. (Where the file system cannot exchange, the old
// directory is moved to "<dir>.replaced" first; a crash between the two renames leaves no `dir`,
// which fails to load rather than loading half.) A leftover "<dir>.saving" from a crashed save
// is discarded by the next save.
//
// Thread safety: free functions; concurrent saves into the same `dir` are not supported, saves
// into different directories and any number of loads are independent.
// Ownership: save borrows the weights and the optimizer for the call; load returns values.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>

#include "base/error.hpp"
#include "model/checkpoint.hpp"
#include "model/optimizer.hpp"

namespace moe::model {

/// The layout version save writes and the only one load reads.
inline constexpr int64_t training_checkpoint_format_version = 1;

struct training_checkpoint_options {
  /// Shards (of the model, and of the optimizer state) close at this many data bytes; one
  /// model.safetensors below it.
  uint64_t max_shard_bytes = uint64_t{4} << 30;
  /// Progress bar on stderr (loading only); nullopt: only when stderr is a terminal.
  std::optional<bool> progress;
};

/// Writes `weights` (every tensor), `opt`'s state and `step` (the training step the run resumes
/// at; it may differ from opt.steps(), which counts optimizer updates for the bias correction)
/// to `dir`, replacing whatever was there. Errors, nothing changed under `dir`:
///   bad_input  the weights are not a whole model of their config (a tensor it does not have, a
///              wrong shape, a missing one), a moment names no tensor or has another size than
///              it, or step < 0;
///   io_error   the file system (retry may help).
[[nodiscard]] caf::expected<void> save_training_checkpoint(
    const std::filesystem::path& dir, const checkpoint& weights, const adamw& opt, int64_t step,
    const training_checkpoint_options& options = {});

struct training_checkpoint {
  checkpoint weights;
  adamw optimizer;  ///< Options and moments restored; its next step is number steps() + 1.
  int64_t step = 0;
};

/// Reads a directory save_training_checkpoint wrote, or a plain hub checkpoint (no
/// training_state.json), which resumes at step 0 with a fresh default AdamW. Errors:
///   everything load_config / load_checkpoint report for the model;
///   bad_checkpoint     training_state.json malformed, of a format_version this build does not
///                      know, or naming an optimizer other than adamw; the optimizer files missing,
///                      truncated or corrupt; optimizer files without training_state.json;
///   unexpected_tensor  a moment of a parameter the model does not have, or of neither kind;
///   missing_tensor     a parameter with exp_avg but no exp_avg_sq, or the reverse;
///   bad_tensor         a moment whose shape is not its parameter's, or whose dtype is not I64.
[[nodiscard]] caf::expected<training_checkpoint> load_training_checkpoint(
    const std::filesystem::path& dir, const training_checkpoint_options& options = {});

}  // namespace moe::model
