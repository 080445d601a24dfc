#include "model/training_checkpoint.hpp"

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <string_view>
#include <unistd.h>
#include <unordered_map>

#include "model/json_reader.hpp"
#include "model/model_errc.hpp"
#include "model/safetensors_writer.hpp"
#include "model/weights.hpp"

namespace moe::model {

namespace {

static_assert(sizeof(double) == sizeof(int64_t) && std::numeric_limits<double>::is_iec559,
              "moments are stored as the I64 with a double's bits");

constexpr std::string_view state_file_name = "training_state.json";
constexpr std::string_view optimizer_dir_name = "optimizer";
constexpr std::string_view exp_avg_suffix = ".exp_avg";
constexpr std::string_view exp_avg_sq_suffix = ".exp_avg_sq";
constexpr std::string_view moment_encoding_key = "moment_encoding";
constexpr std::string_view moment_encoding = "f64_bits_as_i64";

caf::error io_failure(const std::filesystem::path& path, const std::string& what) {
  return make_error(model_errc::io_error,
                    path.string() + ": " + what + ": " + std::strerror(errno));
}

caf::error fs_failure(const std::filesystem::path& path, const std::string& what,
                      const std::error_code& ec) {
  return make_error(model_errc::io_error, path.string() + ": " + what + ": " + ec.message());
}

// "dir/" names the same directory as "dir"; the staging sibling needs the last component.
std::filesystem::path without_trailing_separator(const std::filesystem::path& dir) {
  auto p = dir.lexically_normal();
  return p.has_filename() ? p : p.parent_path();
}

std::filesystem::path sibling(const std::filesystem::path& dir, std::string_view suffix) {
  return dir.parent_path() / (dir.filename().string() + std::string(suffix));
}

class unique_fd {
 public:
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  ~unique_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  [[nodiscard]] int get() const noexcept { return fd_; }

 private:
  int fd_;
};

caf::expected<void> sync_path(const std::filesystem::path& path, bool directory) {
  unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0)));
  if (fd.get() < 0) return io_failure(path, "cannot open to sync");
  if (::fsync(fd.get()) != 0) return io_failure(path, "fsync failed");
  return {};
}

// Every file and directory below `root`, and `root`: the rename that publishes the checkpoint
// must not reach the disk before its contents do.
caf::expected<void> sync_tree(const std::filesystem::path& root) {
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(root, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    const bool directory = it->is_directory(ec);
    if (ec) break;
    if (auto ok = sync_path(it->path(), directory); !ok) return ok;
  }
  if (ec) return fs_failure(root, "cannot list", ec);
  return sync_path(root, /*directory=*/true);
}

caf::expected<void> write_text_file(const std::filesystem::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) return make_error(model_errc::io_error, file.string() + ": cannot open for writing");
  out << text;
  out.close();
  if (!out) return make_error(model_errc::io_error, file.string() + ": write failed");
  return {};
}

// The entries of a directory that a save writes (and so replaces); any other entry of a
// directory being replaced (a tokenizer, notes) is carried into the new one.
bool is_layout_entry(const std::string& name) {
  static const std::regex shard_pattern(R"(model-\d{5}-of-\d{5}\.safetensors)");
  return name == "config.json" || name == "model.safetensors" ||
         name == "model.safetensors.index.json" || name == state_file_name ||
         name == optimizer_dir_name || name.ends_with(".tmp") ||
         std::regex_match(name, shard_pattern);
}

// Hard links where possible (same file system: no copy, and deleting the old directory keeps
// them), copies otherwise.
caf::expected<void> carry_other_entries(const std::filesystem::path& from,
                                        const std::filesystem::path& to) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(from, ec)) {
    const auto name = entry.path().filename().string();
    if (is_layout_entry(name)) continue;
    const auto target = to / name;
    using std::filesystem::copy_options;
    std::filesystem::copy(entry.path(), target,
                          copy_options::recursive | copy_options::create_hard_links, ec);
    if (ec) {
      std::filesystem::remove_all(target, ec);
      std::filesystem::copy(entry.path(), target, copy_options::recursive, ec);
    }
    if (ec) return fs_failure(entry.path(), "cannot carry into the new checkpoint", ec);
  }
  if (ec) return fs_failure(from, "cannot list", ec);
  return {};
}

// Moves the complete `staging` directory to `dir` in one step where the system allows.
caf::expected<void> publish(const std::filesystem::path& staging,
                            const std::filesystem::path& dir) {
  std::error_code ec;
  const bool replacing = std::filesystem::exists(dir, ec);
  if (!replacing) {
    std::filesystem::rename(staging, dir, ec);
    if (ec) return fs_failure(dir, "cannot rename from " + staging.string(), ec);
  } else if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    std::filesystem::remove_all(staging,
                                ec);  // now the previous checkpoint; leftovers are harmless
  } else if (errno == EINVAL || errno == ENOSYS || errno == ENOTSUP) {
    // No atomic exchange here: old aside, new in. Between the two, `dir` is absent (loads fail).
    const auto replaced = sibling(dir, ".replaced");
    std::filesystem::remove_all(replaced, ec);
    std::filesystem::rename(dir, replaced, ec);
    if (ec) return fs_failure(dir, "cannot move aside to " + replaced.string(), ec);
    std::filesystem::rename(staging, dir, ec);
    if (ec) return fs_failure(dir, "cannot rename from " + staging.string(), ec);
    std::filesystem::remove_all(replaced, ec);
  } else {
    return io_failure(dir, "cannot exchange with " + staging.string());
  }
  const auto parent = dir.parent_path().empty() ? std::filesystem::path(".") : dir.parent_path();
  return sync_path(parent, /*directory=*/true);
}

std::span<const std::byte> bytes_of(std::span<const float> values) {
  return std::as_bytes(values);
}
std::span<const std::byte> bytes_of(std::span<const double> values) {
  return std::as_bytes(values);
}

// Every tensor of `weights` in expected_weights order, after checking that load_checkpoint will
// read them back: names and shapes of the config, nothing required missing, MTP all or none.
caf::expected<std::vector<tensor_to_write>> model_tensors(const checkpoint& weights) {
  const auto specs = expected_weights(weights.config, /*include_mtp=*/true);
  std::unordered_map<std::string_view, const weight_spec*> by_name;
  for (const auto& s : specs) by_name.emplace(s.name, &s);
  bool any_mtp = false;
  for (const auto& [name, tensor] : weights.tensors) {
    auto it = by_name.find(name);
    if (it == by_name.end())
      return make_error(model_errc::bad_input, "save_training_checkpoint: tensor '" + name +
                                                   "' is not a tensor of the model's config");
    if (tensor.shape() != it->second->shape)
      return make_error(model_errc::bad_input, "save_training_checkpoint: " + name + ": shape " +
                                                   shape_string(tensor.shape()) + ", expected " +
                                                   shape_string(it->second->shape));
    any_mtp = any_mtp || it->second->mtp;
  }
  std::vector<tensor_to_write> out;
  for (const auto& s : specs) {
    const host_tensor* t = weights.find(s.name);
    if (t == nullptr) {
      if (s.optional || (s.mtp && !any_mtp)) continue;
      return make_error(model_errc::bad_input, "save_training_checkpoint: the weights lack '" +
                                                   s.name + "', so the saved model would not load");
    }
    tensor_to_write w;
    w.name = s.name;
    w.dtype = kernels::dtype::f32;
    w.shape = t->shape();
    w.bytes = bytes_of(t->data());
    out.push_back(std::move(w));
  }
  return out;
}

caf::expected<std::vector<tensor_to_write>> moment_tensors(const checkpoint& weights,
                                                           const adamw& opt) {
  std::vector<tensor_to_write> out;
  for (const auto& [name, moments] : opt.state()) {
    if (moments.m.empty() && moments.v.empty()) continue;  // never stepped
    const host_tensor* param = weights.find(name);
    if (param == nullptr)
      return make_error(model_errc::bad_input,
                        "save_training_checkpoint: the optimizer has moments of '" + name +
                            "', not in the weights");
    const auto n = static_cast<size_t>(param->num_elements());
    if (moments.m.size() != n || moments.v.size() != n)
      return make_error(model_errc::bad_input, "save_training_checkpoint: the moments of '" + name +
                                                   "' hold " + std::to_string(moments.m.size()) +
                                                   " and " + std::to_string(moments.v.size()) +
                                                   " values, the parameter " + std::to_string(n));
    for (auto [suffix, values] :
         {std::pair{exp_avg_suffix, &moments.m}, std::pair{exp_avg_sq_suffix, &moments.v}}) {
      tensor_to_write w;
      w.name = name + std::string(suffix);
      w.dtype = kernels::dtype::i64;
      w.shape = param->shape();
      w.bytes = bytes_of(std::span<const double>(*values));
      out.push_back(std::move(w));
    }
  }
  return out;
}

nlohmann::json training_state_json(int64_t step, const adamw& opt) {
  const auto& o = opt.options();
  // nlohmann writes doubles in their shortest round-trip form: the options come back exactly.
  return {{"format_version", training_checkpoint_format_version},
          {"step", step},
          {"optimizer",
           {{"kind", "adamw"},
            {"steps", opt.steps()},
            {"beta1", o.beta1},
            {"beta2", o.beta2},
            {"eps", o.eps},
            {"weight_decay", o.weight_decay}}}};
}

caf::expected<void> write_checkpoint_files(const std::filesystem::path& staging,
                                           const checkpoint& weights, const adamw& opt,
                                           int64_t step,
                                           const training_checkpoint_options& options) {
  auto model = model_tensors(weights);
  if (!model) return model.error();
  auto moments = moment_tensors(weights, opt);
  if (!moments) return moments.error();
  std::error_code ec;
  std::filesystem::create_directories(staging / optimizer_dir_name, ec);
  if (ec) return fs_failure(staging, "cannot create", ec);

  model_config config = weights.config;  // what the saved files hold
  config.torch_dtype = kernels::dtype::f32;
  config.quantization.reset();
  if (auto ok = save_config(config, staging / "config.json"); !ok) return ok;
  shard_options shards;
  shards.max_shard_bytes = options.max_shard_bytes;
  if (auto ok = save_sharded_safetensors(staging, *model, shards); !ok) return ok.error();
  shards.metadata = {{"format", "moe-adamw"},
                     {std::string(moment_encoding_key), std::string(moment_encoding)}};
  if (auto ok = save_sharded_safetensors(staging / optimizer_dir_name, *moments, shards); !ok)
    return ok.error();
  return write_text_file(staging / state_file_name, training_state_json(step, opt).dump(2) + "\n");
}

// Removes the staging directory unless it was published.
struct staging_guard {
  std::filesystem::path path;
  ~staging_guard() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

caf::error bad_state(const std::filesystem::path& file, const std::string& message) {
  return make_error(model_errc::bad_checkpoint, file.string() + ": " + message);
}

struct training_state {
  int64_t step = 0;
  int64_t optimizer_steps = 0;
  adamw_options options;
};

caf::expected<training_state> read_training_state(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return make_error(model_errc::io_error, file.string() + ": cannot open for reading");
  std::ostringstream text;
  text << in.rdbuf();
  const parsed_json parsed = parse_json_file_text(text.str());
  if (parsed.too_deep) return bad_state(file, "nests deeper than " + std::to_string(max_json_depth) + " levels");
  if (!parsed.ok()) return bad_state(file, "not valid JSON");
  const nlohmann::json& json = parsed.value;
  if (!json.is_object()) return bad_state(file, "expected a JSON object");
  // The version first: a later format may differ in every other field.
  auto version = json.find("format_version");
  if (version == json.end() || !version->is_number_integer())
    return bad_state(file, "format_version: missing or not an integer");
  if (version->get<int64_t>() != training_checkpoint_format_version)
    return bad_state(file, "format_version " + version->dump() + " is not one this build reads (" +
                               std::to_string(training_checkpoint_format_version) + ")");

  json_object_reader r(json, file.string(), "", model_errc::bad_checkpoint);
  r.skip("format_version");
  training_state out;
  out.step = r.integer("step");
  const nlohmann::json* optimizer = r.child("optimizer");
  if (optimizer == nullptr || !optimizer->is_object()) {
    r.fail("optimizer", "missing or not an object");
  } else {
    json_object_reader o(*optimizer, file.string(), "optimizer.", model_errc::bad_checkpoint);
    if (auto kind = o.string("kind"); o.ok() && kind != "adamw")
      o.fail("kind", "'" + kind + "' is not an optimizer this build restores (adamw)");
    out.optimizer_steps = o.integer("steps");
    out.options.beta1 = o.number("beta1");
    out.options.beta2 = o.number("beta2");
    out.options.eps = o.number("eps");
    out.options.weight_decay = o.number("weight_decay");
    if (auto unread = o.unread_keys(); !unread.empty()) o.fail(unread.front(), "unknown key");
    if (o.ok() && out.optimizer_steps < 0) o.fail("steps", "negative");
    if (o.ok() && !(out.options.beta1 >= 0 && out.options.beta1 < 1))
      o.fail("beta1", "outside [0, 1)");
    if (o.ok() && !(out.options.beta2 >= 0 && out.options.beta2 < 1))
      o.fail("beta2", "outside [0, 1)");
    if (o.ok() && !(out.options.eps > 0)) o.fail("eps", "not positive");
    r.absorb(o);
  }
  if (auto unread = r.unread_keys(); !unread.empty()) r.fail(unread.front(), "unknown key");
  if (r.ok() && out.step < 0) r.fail("step", "negative");
  if (!r.ok()) return r.error();
  return out;
}

// The moments in `dir` (the optimizer/ directory), checked against the parameters in `weights`.
caf::expected<std::map<std::string, adamw::moments, std::less<>>> read_moments(
    const std::filesystem::path& dir, const checkpoint& weights) {
  auto files = safetensors_set::open(dir);
  if (!files) return files.error();
  for (const auto& f : files->files()) {
    auto it = f.metadata().find(std::string(moment_encoding_key));
    if (it == f.metadata().end() || it->second != moment_encoding)
      return make_error(model_errc::bad_checkpoint,
                        f.path().string() + ": __metadata__." + std::string(moment_encoding_key) +
                            " is not '" + std::string(moment_encoding) + "'");
  }
  std::map<std::string, adamw::moments, std::less<>> state;
  for (std::string_view name : files->names()) {
    const tensor_view* view = files->find(name);
    const std::string where = " (in " + files->file_of(name).string() + ")";
    const bool is_m = name.ends_with(exp_avg_suffix);
    const bool is_v = name.ends_with(exp_avg_sq_suffix);
    if (!is_m && !is_v)
      return make_error(model_errc::unexpected_tensor,
                        "optimizer state: tensor '" + std::string(name) +
                            "' is neither an exp_avg nor an exp_avg_sq" + where);
    const std::string param_name(
        name.substr(0, name.size() - (is_m ? exp_avg_suffix : exp_avg_sq_suffix).size()));
    const host_tensor* param = weights.find(param_name);
    if (param == nullptr)
      return make_error(model_errc::unexpected_tensor,
                        "optimizer state: '" + std::string(name) +
                            "' is a moment of no parameter of the model" + where);
    if (view->dtype != kernels::dtype::i64)
      return make_error(model_errc::bad_tensor,
                        "optimizer state: " + std::string(name) + ": dtype " +
                            std::string(kernels::safetensors_name(view->dtype)) +
                            ", expected I64 (a double's bits)" + where);
    if (view->shape != param->shape())
      return make_error(model_errc::bad_tensor, "optimizer state: " + std::string(name) +
                                                    ": shape " + shape_string(view->shape) +
                                                    ", but its parameter's is " +
                                                    shape_string(param->shape()) + where);
    auto& values = is_m ? state[param_name].m : state[param_name].v;
    values.resize(static_cast<size_t>(param->num_elements()));
    std::memcpy(values.data(), view->data.data(), view->data.size());
  }
  for (const auto& [name, moments] : state) {
    if (moments.m.empty() != moments.v.empty())
      return make_error(model_errc::missing_tensor,
                        "optimizer state: '" + name +
                            std::string(moments.m.empty() ? exp_avg_suffix : exp_avg_sq_suffix) +
                            "' is missing (its other moment is there)");
  }
  return state;
}

}  // namespace

caf::expected<void> save_training_checkpoint(const std::filesystem::path& dir_arg,
                                             const checkpoint& weights, const adamw& opt,
                                             int64_t step,
                                             const training_checkpoint_options& options) {
  if (step < 0) return make_error(model_errc::bad_input, "save_training_checkpoint: negative step");
  const auto dir = without_trailing_separator(dir_arg);
  if (dir.empty())
    return make_error(model_errc::bad_input, "save_training_checkpoint: no directory");
  std::error_code ec;
  if (std::filesystem::exists(dir, ec) && !std::filesystem::is_directory(dir, ec))
    return make_error(model_errc::bad_input, dir.string() + ": exists and is not a directory");
  staging_guard staging{sibling(dir, ".saving")};
  std::filesystem::remove_all(staging.path, ec);  // a crashed save's leftovers
  if (ec) return fs_failure(staging.path, "cannot remove a previous save's leftovers", ec);
  if (auto ok = write_checkpoint_files(staging.path, weights, opt, step, options); !ok) return ok;
  if (std::filesystem::is_directory(dir, ec))
    if (auto ok = carry_other_entries(dir, staging.path); !ok) return ok;
  if (auto ok = sync_tree(staging.path); !ok) return ok;
  return publish(staging.path, dir);
}

caf::expected<training_checkpoint> load_training_checkpoint(
    const std::filesystem::path& dir, const training_checkpoint_options& options) {
  auto config = load_config(dir);
  if (!config) return config.error();
  load_options model_options;
  model_options.progress = options.progress;
  auto weights = load_checkpoint(dir, *config, model_options);
  if (!weights) return weights.error();
  training_checkpoint out{std::move(*weights), adamw(), 0};

  std::error_code ec;
  const auto state_file = dir / state_file_name;
  const auto optimizer_dir = dir / optimizer_dir_name;
  if (!std::filesystem::exists(state_file, ec)) {
    if (std::filesystem::exists(optimizer_dir, ec))
      return make_error(model_errc::bad_checkpoint,
                        optimizer_dir.string() + ": optimizer state without " +
                            std::string(state_file_name) + " to give its step");
    return out;  // a model-only checkpoint: training starts here
  }
  auto state = read_training_state(state_file);
  if (!state) return state.error();
  if (!std::filesystem::is_directory(optimizer_dir, ec))
    return make_error(model_errc::bad_checkpoint, dir.string() + ": " +
                                                      std::string(state_file_name) +
                                                      " without the optimizer state (" +
                                                      std::string(optimizer_dir_name) + "/)");
  auto moments = read_moments(optimizer_dir, out.weights);
  if (!moments) return moments.error();
  out.optimizer = adamw(state->options);
  out.optimizer.restore(state->optimizer_steps, std::move(*moments));
  out.step = state->step;
  return out;
}

}  // namespace moe::model
