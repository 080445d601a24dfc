#include "model/init_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include "model/dequantize.hpp"
#include "model/model_errc.hpp"
#include "model/progress_bar.hpp"
#include "model/safetensors_writer.hpp"
#include "model/weights.hpp"

namespace moe::model {

namespace {

constexpr std::string_view preset_list[] = {"tiny", "small", "v2lite-8L"};

rope_config v3_yarn(double mscale) {
  rope_config r;
  r.kind = rope_kind::yarn;
  r.theta = 10000.0;
  r.factor = 40.0;
  r.original_max_position_embeddings = 4096;
  r.beta_fast = 32.0;
  r.beta_slow = 1.0;
  r.mscale = mscale;
  r.mscale_all_dim = mscale;
  return r;
}

model_config tiny_preset() {
  model_config c;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.q_lora_rank = 32;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.n_routed_experts = 16;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.first_k_dense_replace = 1;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.rope = v3_yarn(1.0);
  c.max_position_embeddings = 163840;
  c.bos_token_id = 0;
  c.eos_token_ids = {1};
  c.torch_dtype = kernels::dtype::f32;
  c.initializer_range = 0.1;
  return c;
}

model_config small_preset() {
  model_config c = tiny_preset();
  c.vocab_size = 32000;
  c.hidden_size = 512;
  c.intermediate_size = 1536;
  c.moe_intermediate_size = 160;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 8;
  c.q_lora_rank = 384;
  c.kv_lora_rank = 256;
  c.qk_nope_head_dim = 64;
  c.qk_rope_head_dim = 32;
  c.v_head_dim = 64;
  c.n_routed_experts = 64;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 6;
  c.n_group = 8;
  c.topk_group = 4;
  c.num_nextn_predict_layers = 1;
  c.torch_dtype = kernels::dtype::bf16;
  c.initializer_range = 0.02;
  return c;
}

model_config v2lite_8l_preset() {
  model_config c = tiny_preset();
  c.vocab_size = 102400;
  c.hidden_size = 2048;
  c.intermediate_size = 10944;
  c.moe_intermediate_size = 1408;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.q_lora_rank = std::nullopt;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.n_routed_experts = 64;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 6;
  c.n_group = 1;
  c.topk_group = 1;
  // V2-Lite's own values; normalising the top-k sigmoid weights keeps their sum at 1 as
  // V2-Lite's softmax weights roughly were.
  c.routed_scaling_factor = 1.0;
  c.norm_topk_prob = true;
  c.rope = v3_yarn(0.707);
  c.bos_token_id = 100000;
  c.eos_token_ids = {100001};
  c.torch_dtype = kernels::dtype::bf16;
  c.initializer_range = 0.02;
  return c;
}

uint64_t splitmix64(uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a64(std::string_view s) noexcept {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : s) {
    h ^= static_cast<unsigned char>(ch);
    h *= 0x100000001b3ull;
  }
  return h;
}

enum class fill_kind : uint8_t { uniform, ones, zeros };

// Element i of a tensor: a pure function of (key, i), so chunks and the threads filling them
// may take any share of the indices.
struct element_source {
  fill_kind kind;
  uint64_t key;
  float half_width;

  float uniform(uint64_t i) const noexcept {
    // splitmix64's own stream evaluated at position i: the top 24 bits give a uniform on
    // (0, 1) at the centre of 2^24 cells, exactly symmetric around 1/2.
    uint64_t bits = splitmix64(key + (i + 1) * 0x9e3779b97f4a7c15ull) >> 40;
    float u = (static_cast<float>(bits) + 0.5f) * 0x1p-24f;
    return (2.0f * u - 1.0f) * half_width;
  }
};

template <class Element, class Encode>
void fill_elements(const element_source& source, uint64_t first, std::span<std::byte> out,
                   Encode encode) {
  const size_t count = out.size() / sizeof(Element);
  auto store = [&](size_t i, float v) {
    Element e = encode(v);
    std::memcpy(out.data() + i * sizeof(Element), &e, sizeof(Element));
  };
  // The kind is tested once per range, keeping the per-element loop branch-free.
  switch (source.kind) {
    case fill_kind::ones:
      for (size_t i = 0; i < count; ++i) store(i, 1.0f);
      return;
    case fill_kind::zeros:
      for (size_t i = 0; i < count; ++i) store(i, 0.0f);
      return;
    case fill_kind::uniform:
      for (size_t i = 0; i < count; ++i) store(i, source.uniform(first + i));
      return;
  }
}

void fill_range(const element_source& source, kernels::dtype dtype, uint64_t first,
                std::span<std::byte> out) {
  if (dtype == kernels::dtype::f32) {
    fill_elements<float>(source, first, out, [](float v) { return v; });
  } else {
    fill_elements<uint16_t>(source, first, out, float_to_bf16);
  }
}

// Runs fill(begin, end) over [0, count) split across the cores: sampling costs about as much as
// writing, and values do not depend on the split.
template <class Fill>
void parallel_fill(size_t count, Fill fill) {
  constexpr size_t min_elements_per_thread = size_t{1} << 18;
  const size_t num_threads = std::clamp<size_t>(count / min_elements_per_thread, 1,
                                                std::max(1u, std::thread::hardware_concurrency()));
  const size_t per_thread = (count + num_threads - 1) / num_threads;
  std::vector<std::jthread> workers;
  for (size_t t = 1; t < num_threads; ++t) {
    const size_t begin = std::min(count, t * per_thread);
    const size_t end = std::min(count, begin + per_thread);
    workers.emplace_back([&fill, begin, end] { fill(begin, end); });
  }
  fill(size_t{0}, std::min(count, per_thread));
}

void fill_chunk(const element_source& source, kernels::dtype dtype, uint64_t offset_bytes,
                std::span<std::byte> chunk) {
  const size_t width = kernels::dtype_bytes(dtype);
  const uint64_t first = offset_bytes / width;
  parallel_fill(chunk.size() / width, [&](size_t begin, size_t end) {
    fill_range(source, dtype, first + begin, chunk.subspan(begin * width, (end - begin) * width));
  });
}

/// The tensors init_model writes, each with the source of its values.
struct planned_weight {
  weight_spec spec;
  element_source source;
};

std::vector<planned_weight> plan_weights(const model_config& config, uint64_t seed) {
  const float half_width = static_cast<float>(std::sqrt(3.0) * config.initializer_range);
  std::vector<planned_weight> out;
  for (auto& spec : expected_weights(config, /*include_mtp=*/true)) {
    if (spec.optional) continue;
    fill_kind kind = fill_kind::uniform;
    if (spec.kind == weight_kind::norm) kind = fill_kind::ones;
    if (spec.kind == weight_kind::router_bias) kind = fill_kind::zeros;
    element_source source{kind, splitmix64(seed ^ fnv1a64(spec.name)), half_width};
    out.push_back({std::move(spec), source});
  }
  return out;
}

caf::error check_init_options(const model_config& config, const init_options& options,
                              std::string_view who) {
  if (options.dtype != kernels::dtype::f32 && options.dtype != kernels::dtype::bf16) {
    return make_error(model_errc::bad_input,
                      std::string(who) + ": dtype " + std::string(kernels::to_string(options.dtype)) +
                          " is not supported (expected f32 or bf16)");
  }
  if (auto ok = validate_config(config); !ok) return ok.error();
  return {};
}

}  // namespace

std::span<const std::string_view> preset_names() noexcept { return preset_list; }

caf::expected<model_config> model_preset(std::string_view name) {
  if (name == "tiny") return tiny_preset();
  if (name == "small") return small_preset();
  if (name == "v2lite-8L") return v2lite_8l_preset();
  std::string known;
  for (auto n : preset_list) known += (known.empty() ? "" : ", ") + std::string(n);
  return make_error(model_errc::bad_input,
                    "unknown model preset '" + std::string(name) + "' (known: " + known + ")");
}

caf::expected<std::vector<std::filesystem::path>> init_model(const std::filesystem::path& dir,
                                                             const model_config& config,
                                                             const init_options& options) {
  if (auto err = check_init_options(config, options, "init_model")) return err;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(model_errc::io_error, dir.string() + ": " + ec.message());

  model_config written = config;
  written.torch_dtype = options.dtype;
  written.quantization.reset();
  if (auto ok = save_config(written, dir / "config.json"); !ok) return ok.error();
  if (options.config_only) return std::vector<std::filesystem::path>{dir / "config.json"};

  std::vector<tensor_to_write> tensors;
  uint64_t total_bytes = 0;
  for (auto& [spec, source] : plan_weights(config, options.seed)) {
    tensor_to_write t;
    t.name = std::move(spec.name);
    t.dtype = options.dtype;
    t.shape = std::move(spec.shape);
    t.produce = [source = source, dtype = options.dtype](uint64_t offset, std::span<std::byte> chunk) {
      fill_chunk(source, dtype, offset, chunk);
    };
    total_bytes += t.size_bytes();
    tensors.push_back(std::move(t));
  }
  progress_bar progress("init-model", total_bytes,
                        options.progress.value_or(progress_bar::stderr_is_terminal()));
  shard_options shards;
  shards.max_shard_bytes = options.max_shard_bytes;
  shards.progress = &progress;
  auto files = save_sharded_safetensors(dir, tensors, shards);
  if (!files) return files.error();
  files->insert(files->begin(), dir / "config.json");
  return files;
}

caf::expected<checkpoint> random_checkpoint(const model_config& config, const init_options& options) {
  if (auto err = check_init_options(config, options, "random_checkpoint")) return err;
  checkpoint out;
  out.config = config;
  out.config.torch_dtype = options.dtype;
  out.config.quantization.reset();
  const bool bf16 = options.dtype == kernels::dtype::bf16;
  for (auto& [spec, source] : plan_weights(config, options.seed)) {
    host_tensor t(spec.shape);
    std::span<float> values = t.data();
    parallel_fill(values.size(), [&, src = source](size_t begin, size_t end) {
      std::span<float> part = values.subspan(begin, end - begin);
      fill_elements<float>(src, begin, std::as_writable_bytes(part), [bf16](float v) {
        // What loading the bf16 file would give: each value rounded once.
        return bf16 ? bf16_to_float(float_to_bf16(v)) : v;
      });
    });
    out.tensors.emplace(std::move(spec.name), std::move(t));
  }
  return out;
}

}  // namespace moe::model
