// Loading a DeepSeek-V3-family checkpoint into float32 host tensors.
//
// load_checkpoint opens the safetensors files (single or sharded), checks the tensor names
// against expected_weights(config) and converts what the caller selected to float32: F32, BF16
// and F16 exactly; F8_E4M3 projection weights dequantised with their `<name>_scale_inv` block
// scales (value x scale of its block, quantization_config's block size, partial edge blocks).
// With load_options::keep_fp8 the F8_E4M3 weights are not dequantised: they land as stored (e4m3
// bytes and their float32 block scales) in checkpoint::fp8, for a backend that computes on them
// (the GPU engine keeps them FP8 on the device).
// Each problem is an error naming the tensor:
//   missing_tensor     an expected tensor (or an FP8 weight's scale) is absent;
//   unexpected_tensor  a tensor that is neither expected nor the scale of an FP8 weight;
//   bad_tensor         wrong shape, or a dtype the tensor may not have.
// Names are always checked across the whole checkpoint (headers only, cheap); contents only for
// the selected tensors, so an expert-group actor can load just its experts:
//   opts.filter = [](std::string_view n) { return n.find(".mlp.experts.3.") != n.npos; };
//
// Ownership: a checkpoint owns its tensors; nothing in it refers to the files, which are closed
// when loading returns. Thread safety: values; load functions may run concurrently.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"

namespace moe::model {

/// A dense, row-major float32 tensor in host memory.
class host_tensor {
 public:
  host_tensor() = default;
  /// Zero-filled.
  explicit host_tensor(std::vector<int64_t> shape);
  /// Takes `values`; requires values.size() == product(shape) (asserted).
  host_tensor(std::vector<int64_t> shape, std::vector<float> values);

  [[nodiscard]] const std::vector<int64_t>& shape() const noexcept { return shape_; }
  [[nodiscard]] size_t rank() const noexcept { return shape_.size(); }
  [[nodiscard]] int64_t dim(size_t i) const noexcept { return shape_[i]; }
  [[nodiscard]] int64_t num_elements() const noexcept {
    return static_cast<int64_t>(values_.size());
  }
  [[nodiscard]] std::span<float> data() noexcept { return values_; }
  [[nodiscard]] std::span<const float> data() const noexcept { return values_; }

 private:
  std::vector<int64_t> shape_;
  std::vector<float> values_;
};

/// A projection weight kept in DeepSeek-V3's FP8 format:
///   value[r, c] = e4m3(values[r, c]) * scales[r / block_rows, c / block_cols]
/// values: (rows, cols) float8_e4m3fn bytes, row-major; scales: (scale_rows(), scale_cols())
/// float32, row-major (the checkpoint's `<name>_scale_inv`). Edge blocks are partial.
struct fp8_tensor {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t block_rows = 128;
  int64_t block_cols = 128;
  std::vector<uint8_t> values;
  std::vector<float> scales;

  [[nodiscard]] int64_t scale_rows() const noexcept { return (rows + block_rows - 1) / block_rows; }
  [[nodiscard]] int64_t scale_cols() const noexcept { return (cols + block_cols - 1) / block_cols; }
  /// The float32 weight, exactly as load_checkpoint without keep_fp8 gives it.
  [[nodiscard]] host_tensor dequantize() const;
};

struct checkpoint {
  model_config config;
  std::map<std::string, host_tensor, std::less<>> tensors;
  /// FP8 projection weights loaded with load_options::keep_fp8; such a weight is here and not
  /// in `tensors`.
  std::map<std::string, fp8_tensor, std::less<>> fp8;

  [[nodiscard]] const host_tensor* find(std::string_view name) const noexcept;
  [[nodiscard]] host_tensor* find(std::string_view name) noexcept;
  [[nodiscard]] const fp8_tensor* find_fp8(std::string_view name) const noexcept;
};

enum class mtp_policy : uint8_t {
  load_if_present,  ///< Load the MTP modules when the checkpoint has them (all or none).
  require,          ///< Missing MTP tensors are errors.
  skip,             ///< Accept MTP tensors in the checkpoint but do not load them.
};

struct load_options {
  /// Loads only the tensors whose name it accepts; empty loads everything. Scale tensors follow
  /// their weight.
  std::function<bool(std::string_view name)> filter;
  mtp_policy mtp = mtp_policy::load_if_present;
  /// F8_E4M3 weights stay FP8, in checkpoint::fp8, instead of being dequantised to float32.
  bool keep_fp8 = false;
  /// Progress bar on stderr by bytes read; nullopt: only when stderr is a terminal.
  std::optional<bool> progress;
};

/// Opens `dir_or_file` (see safetensors_set::open) and loads it.
[[nodiscard]] caf::expected<checkpoint> load_checkpoint(const std::filesystem::path& dir_or_file,
                                                        const model_config& config,
                                                        const load_options& options = {});
[[nodiscard]] caf::expected<checkpoint> load_checkpoint(const safetensors_set& files,
                                                        const model_config& config,
                                                        const load_options& options = {});

/// The expected tensors present in `files`, with the MTP modules resolved by `mtp`, after checking
/// that no tensor is unexpected and none of the required ones is missing (only those `filter`
/// accepts are required, when it is set).
[[nodiscard]] caf::expected<std::vector<weight_spec>> check_tensor_names(
    const safetensors_set& files, const model_config& config, const load_options& options = {});

/// Quantizes every projection weight of ckpt.tensors (weight_kind::projection: what DeepSeek-V3
/// stores as FP8; embeddings, norms, the router and the LM head stay) into ckpt.fp8, as
/// DeepSeek-V3's weights were quantized: per block_rows x block_cols block (edge blocks partial),
/// scale = amax / 448 (1 for an all-zero block), value = e4m3(w / scale) rounded to nearest
/// even, saturating. Sets config.quantization. For serving a bf16 or f32 checkpoint with FP8
/// weights (the GPU engine keeps them FP8) and for benchmarks. Tensors are quantized on up to
/// `threads` threads (0: one per hardware thread). model_errc::bad_input, and nothing changed,
/// for blocks below 1, a non-finite weight (naming it), or a checkpoint that already has FP8
/// weights.
[[nodiscard]] caf::error quantize_fp8(checkpoint& ckpt, int64_t block_rows = 128,
                                      int64_t block_cols = 128, unsigned threads = 0);

/// Reads one F8_E4M3 projection weight as stored, with its block scales (the same checks as
/// read_weight). model_errc::bad_tensor when the tensor is not F8_E4M3.
[[nodiscard]] caf::expected<fp8_tensor> read_fp8_weight(const safetensors_set& files,
                                                        const weight_spec& spec,
                                                        const model_config& config);

/// Reads one tensor as float32, checking shape and dtype and dequantising FP8.
[[nodiscard]] caf::expected<host_tensor> read_weight(const safetensors_set& files,
                                                     const weight_spec& spec,
                                                     const model_config& config);

}  // namespace moe::model
