#include "model/checkpoint.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>
#include <unordered_map>

#include "kernels/cpu/fp8.hpp"

#include "base/assert.hpp"
#include "model/dequantize.hpp"
#include "model/model_errc.hpp"
#include "model/progress_bar.hpp"

namespace moe::model {

namespace {

constexpr std::string_view scale_suffix = "_scale_inv";

int64_t product(std::span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string where(const safetensors_set& files, std::string_view name) {
  return " (in " + files.file_of(name).string() + ")";
}

std::string_view dtype_name(kernels::dtype t) { return kernels::safetensors_name(t); }

// "'a' (and 3 more)" for error lists, so one message reports the scale of a problem.
std::string first_and_count(const std::vector<std::string>& names) {
  std::string s = "'" + names.front() + "'";
  if (names.size() > 1) s += " (and " + std::to_string(names.size() - 1) + " more)";
  return s;
}

bool is_fp8(const tensor_view* v) { return v != nullptr && v->dtype == kernels::dtype::f8_e4m3; }

caf::expected<std::vector<float>> read_scale(const safetensors_set& files,
                                             const weight_spec& spec,
                                             const fp8_quant_config& quant) {
  const std::string name = scale_name(spec.name);
  const tensor_view* scale = files.find(name);
  if (scale == nullptr) {
    return make_error(model_errc::missing_tensor,
                      "missing tensor '" + name + "': the block scales of F8_E4M3 weight '" +
                          spec.name + "'");
  }
  const std::vector<int64_t> want = {(spec.shape[0] + quant.block_rows - 1) / quant.block_rows,
                                     (spec.shape[1] + quant.block_cols - 1) / quant.block_cols};
  if (scale->shape != want) {
    return make_error(model_errc::bad_tensor, name + ": shape " + shape_string(scale->shape) +
                                                  ", expected " + shape_string(want) +
                                                  where(files, name));
  }
  if (!is_float_type(scale->dtype) || scale->dtype == kernels::dtype::f8_e4m3) {
    return make_error(model_errc::bad_tensor, name + ": dtype " +
                                                  std::string(dtype_name(scale->dtype)) +
                                                  ", expected F32, BF16 or F16" +
                                                  where(files, name));
  }
  std::vector<float> values(static_cast<size_t>(product(want)));
  decode_to_f32(scale->dtype, scale->data, values);
  return values;
}

}  // namespace

host_tensor::host_tensor(std::vector<int64_t> shape)
    : shape_(std::move(shape)), values_(static_cast<size_t>(product(shape_))) {}

host_tensor::host_tensor(std::vector<int64_t> shape, std::vector<float> values)
    : shape_(std::move(shape)), values_(std::move(values)) {
  MOE_ASSERT(static_cast<int64_t>(values_.size()) == product(shape_));
}

const host_tensor* checkpoint::find(std::string_view name) const noexcept {
  auto it = tensors.find(name);
  return it != tensors.end() ? &it->second : nullptr;
}

host_tensor* checkpoint::find(std::string_view name) noexcept {
  auto it = tensors.find(name);
  return it != tensors.end() ? &it->second : nullptr;
}

namespace {

// The header checks every read shares: present, of the expected shape.
caf::expected<const tensor_view*> checked_view(const safetensors_set& files,
                                               const weight_spec& spec) {
  const tensor_view* view = files.find(spec.name);
  if (view == nullptr) {
    return make_error(model_errc::missing_tensor, "missing tensor '" + spec.name + "'");
  }
  if (view->shape != spec.shape) {
    return make_error(model_errc::bad_tensor, spec.name + ": shape " + shape_string(view->shape) +
                                                  ", expected " + shape_string(spec.shape) +
                                                  where(files, spec.name));
  }
  return view;
}

// An F8_E4M3 view may be read only as a projection weight of a config that gives the blocks;
// returns those blocks' scales.
caf::expected<std::vector<float>> fp8_scales(const safetensors_set& files, const weight_spec& spec,
                                             const model_config& config) {
  if (spec.kind != weight_kind::projection) {
    return make_error(model_errc::bad_tensor,
                      spec.name + ": dtype F8_E4M3, expected F32, BF16 or F16 (only projection "
                                  "weights may be FP8)" + where(files, spec.name));
  }
  if (!config.quantization) {
    return make_error(model_errc::bad_tensor,
                      spec.name + ": dtype F8_E4M3, but config.json has no quantization_config "
                                  "to give its block size" + where(files, spec.name));
  }
  return read_scale(files, spec, *config.quantization);
}

}  // namespace

host_tensor fp8_tensor::dequantize() const {
  host_tensor out({rows, cols});
  dequantize_fp8_blocks(std::as_bytes(std::span<const uint8_t>(values)), rows, cols, scales,
                        block_rows, block_cols, out.data());
  return out;
}

const fp8_tensor* checkpoint::find_fp8(std::string_view name) const noexcept {
  auto it = fp8.find(name);
  return it != fp8.end() ? &it->second : nullptr;
}

namespace {

// One weight, DeepSeek's weight_quant per block; false (nothing kept) on a non-finite value.
bool quantize_blocks(const host_tensor& w, int64_t block_rows, int64_t block_cols, fp8_tensor& out) {
  out.rows = w.dim(0);
  out.cols = w.dim(1);
  out.block_rows = block_rows;
  out.block_cols = block_cols;
  out.values.assign(static_cast<size_t>(out.rows * out.cols), 0);
  out.scales.assign(static_cast<size_t>(out.scale_rows() * out.scale_cols()), 1.0f);
  const float* v = w.data().data();
  for (int64_t br = 0; br < out.scale_rows(); ++br)
    for (int64_t bc = 0; bc < out.scale_cols(); ++bc) {
      const int64_t r1 = std::min(out.rows, (br + 1) * block_rows);
      const int64_t c1 = std::min(out.cols, (bc + 1) * block_cols);
      float amax = 0.0f;
      for (int64_t r = br * block_rows; r < r1; ++r)
        for (int64_t c = bc * block_cols; c < c1; ++c) {
          const float x = v[r * out.cols + c];
          if (!std::isfinite(x)) return false;
          amax = std::max(amax, std::fabs(x));
        }
      const float scale = amax > 0.0f ? amax / kernels::cpu::e4m3_max : 1.0f;
      out.scales[static_cast<size_t>(br * out.scale_cols() + bc)] = scale;
      for (int64_t r = br * block_rows; r < r1; ++r)
        for (int64_t c = bc * block_cols; c < c1; ++c)
          out.values[static_cast<size_t>(r * out.cols + c)] =
              kernels::cpu::float_to_e4m3(v[r * out.cols + c] / scale);
    }
  return true;
}

}  // namespace

caf::error quantize_fp8(checkpoint& ckpt, int64_t block_rows, int64_t block_cols, unsigned threads) {
  if (block_rows < 1 || block_cols < 1)
    return make_error(model_errc::bad_input, "quantize_fp8: blocks must be at least 1 x 1");
  if (!ckpt.fp8.empty())
    return make_error(model_errc::bad_input, "quantize_fp8: the checkpoint already has FP8 weights");
  std::vector<std::string> names;
  for (const auto& spec : expected_weights(ckpt.config, /*include_mtp=*/true))
    if (spec.kind == weight_kind::projection && ckpt.find(spec.name) != nullptr &&
        ckpt.find(spec.name)->rank() == 2)
      names.push_back(spec.name);
  std::vector<fp8_tensor> out(names.size());
  std::vector<char> ok(names.size(), 1);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < names.size();)
      ok[i] = quantize_blocks(*ckpt.find(names[i]), block_rows, block_cols, out[i]) ? 1 : 0;
  };
  const unsigned n = std::max(1u, std::min<unsigned>(threads ? threads : std::thread::hardware_concurrency(),
                                                     static_cast<unsigned>(names.size())));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  for (size_t i = 0; i < names.size(); ++i)
    if (!ok[i])
      return make_error(model_errc::bad_input,
                        "quantize_fp8: " + names[i] + " has a non-finite value; nothing was quantized");
  for (size_t i = 0; i < names.size(); ++i) {
    ckpt.tensors.erase(ckpt.tensors.find(names[i]));
    ckpt.fp8.emplace(names[i], std::move(out[i]));
  }
  ckpt.config.quantization = fp8_quant_config{block_rows, block_cols};
  return {};
}

caf::expected<fp8_tensor> read_fp8_weight(const safetensors_set& files, const weight_spec& spec,
                                          const model_config& config) {
  auto view = checked_view(files, spec);
  if (!view) return view.error();
  if ((*view)->dtype != kernels::dtype::f8_e4m3) {
    return make_error(model_errc::bad_tensor,
                      spec.name + ": dtype " + std::string(dtype_name((*view)->dtype)) +
                          ", expected F8_E4M3" + where(files, spec.name));
  }
  auto scale = fp8_scales(files, spec, config);
  if (!scale) return scale.error();
  fp8_tensor out;
  out.rows = spec.shape[0];
  out.cols = spec.shape[1];
  out.block_rows = config.quantization->block_rows;
  out.block_cols = config.quantization->block_cols;
  const auto* bytes = reinterpret_cast<const uint8_t*>((*view)->data.data());
  out.values.assign(bytes, bytes + (*view)->data.size());
  out.scales = std::move(*scale);
  return out;
}

caf::expected<host_tensor> read_weight(const safetensors_set& files, const weight_spec& spec,
                                       const model_config& config) {
  auto checked = checked_view(files, spec);
  if (!checked) return checked.error();
  const tensor_view* view = *checked;
  host_tensor out(spec.shape);
  if (view->dtype != kernels::dtype::f8_e4m3) {
    if (!is_float_type(view->dtype)) {
      return make_error(model_errc::bad_tensor,
                        spec.name + ": dtype " + std::string(dtype_name(view->dtype)) +
                            ", expected F32, BF16 or F16" + where(files, spec.name));
    }
    decode_to_f32(view->dtype, view->data, out.data());
    return out;
  }
  auto scale = fp8_scales(files, spec, config);
  if (!scale) return scale.error();
  dequantize_fp8_blocks(view->data, spec.shape[0], spec.shape[1], *scale,
                        config.quantization->block_rows, config.quantization->block_cols,
                        out.data());
  return out;
}

caf::expected<std::vector<weight_spec>> check_tensor_names(const safetensors_set& files,
                                                           const model_config& config,
                                                           const load_options& options) {
  std::vector<weight_spec> specs = expected_weights(config, /*include_mtp=*/true);
  std::unordered_map<std::string_view, const weight_spec*> by_name;
  bool mtp_present = false;
  for (const auto& s : specs) {
    by_name.emplace(s.name, &s);
    mtp_present = mtp_present || (s.mtp && files.find(s.name) != nullptr);
  }

  std::vector<std::string> unexpected;
  std::string unexpected_why;  // of the first one; the message names it
  for (std::string_view name : files.names()) {
    if (by_name.count(name) != 0) continue;
    std::string why = ": not a tensor of this model config";
    if (name.ends_with(scale_suffix)) {
      auto base = by_name.find(name.substr(0, name.size() - scale_suffix.size()));
      if (base != by_name.end() && base->second->kind == weight_kind::projection) {
        if (is_fp8(files.find(base->first))) continue;
        why = ": a block scale, but '" + std::string(base->first) + "' is not stored as F8_E4M3";
      }
    }
    if (unexpected.empty()) unexpected_why = why + where(files, name);
    unexpected.emplace_back(name);
  }
  if (!unexpected.empty()) {
    return make_error(model_errc::unexpected_tensor,
                      "unexpected tensor " + first_and_count(unexpected) + unexpected_why);
  }

  std::vector<weight_spec> selected;
  std::vector<std::string> missing;
  for (auto& s : specs) {
    if (s.mtp && (options.mtp == mtp_policy::skip ||
                  (options.mtp == mtp_policy::load_if_present && !mtp_present))) {
      continue;
    }
    if (options.filter && !options.filter(s.name)) continue;
    const tensor_view* view = files.find(s.name);
    if (view == nullptr) {
      if (!s.optional) missing.push_back(s.name);
      continue;
    }
    if (is_fp8(view) && s.kind == weight_kind::projection &&
        files.find(scale_name(s.name)) == nullptr) {
      missing.push_back(scale_name(s.name));
    }
    selected.push_back(std::move(s));
  }
  if (!missing.empty()) {
    return make_error(model_errc::missing_tensor, "missing tensor " + first_and_count(missing));
  }
  return selected;
}

caf::expected<checkpoint> load_checkpoint(const safetensors_set& files, const model_config& config,
                                          const load_options& options) {
  auto selected = check_tensor_names(files, config, options);
  if (!selected) return selected.error();
  uint64_t total_bytes = 0;
  for (const auto& s : *selected) {
    total_bytes += files.find(s.name)->data.size();
    if (const tensor_view* scale = files.find(scale_name(s.name))) total_bytes += scale->data.size();
  }
  progress_bar progress("loading", total_bytes,
                        options.progress.value_or(progress_bar::stderr_is_terminal()));
  checkpoint out;
  out.config = config;
  for (const auto& s : *selected) {
    if (options.keep_fp8 && is_fp8(files.find(s.name))) {
      auto kept = read_fp8_weight(files, s, config);
      if (!kept) return kept.error();
      out.fp8.emplace(s.name, std::move(*kept));
    } else {
      auto tensor = read_weight(files, s, config);
      if (!tensor) return tensor.error();
      out.tensors.emplace(s.name, std::move(*tensor));
    }
    uint64_t n = files.find(s.name)->data.size();
    if (const tensor_view* scale = files.find(scale_name(s.name))) n += scale->data.size();
    progress.advance(n);
  }
  return out;
}

caf::expected<checkpoint> load_checkpoint(const std::filesystem::path& dir_or_file,
                                          const model_config& config,
                                          const load_options& options) {
  auto files = safetensors_set::open(dir_or_file);
  if (!files) return files.error();
  return load_checkpoint(*files, config, options);
}

}  // namespace moe::model
