#include "engine/device_weights.hpp"

#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <numeric>
#include <string>

#include "model/dequantize.hpp"
#include "model/model_errc.hpp"
#include "model/weight_lookup.hpp"
#include "model/weights.hpp"

namespace moe::engine {

namespace {

using kernels::dtype;

constexpr size_t tensor_alignment = 256;
constexpr size_t staging_bytes_max = size_t{16} << 20;

/// A run of host data that goes into a device tensor: floats converted to the tensor's dtype, or
/// (an f8_e4m3 tensor) bytes copied as they are.
struct source_run {
  const void* data = nullptr;
  size_t count = 0;  // elements
};

/// A device tensor: its runs, concatenated, in `dt`, at `offset` of the allocation.
struct planned_tensor {
  size_t offset = 0;
  dtype dt = dtype::f32;
  std::vector<source_run> runs;
  std::function<void(const void*)> bind;  // stores the device address where it belongs
};

class upload_plan {
 public:
  void add(dtype dt, std::vector<source_run> runs, std::function<void(const void*)> bind) {
    size_t count = 0;
    for (const auto& r : runs) count += r.count;
    planned_tensor t{total_bytes_, dt, std::move(runs), std::move(bind)};
    total_bytes_ += (count * kernels::dtype_bytes(dt) + tensor_alignment - 1) / tensor_alignment *
                    tensor_alignment;
    tensors_.push_back(std::move(t));
  }
  [[nodiscard]] size_t total_bytes() const noexcept { return total_bytes_; }
  [[nodiscard]] const std::vector<planned_tensor>& tensors() const noexcept { return tensors_; }

 private:
  std::vector<planned_tensor> tensors_;
  size_t total_bytes_ = 0;
};

/// Fills the device allocation front to back through a pinned staging buffer: converted values
/// (and zero padding) accumulate in the buffer, which is copied out and waited for when full.
class staged_writer {
 public:
  staged_writer(void* device, runtime::pinned_host_buffer& staging, cudaStream_t stream)
      : device_(static_cast<char*>(device)),
        stage_(static_cast<char*>(staging.data())),
        capacity_(staging.size_bytes()),
        stream_(stream) {}

  /// Zero bytes up to device offset `offset` (>= the current position).
  caf::error pad_to(size_t offset) {
    while (position() < offset) {
      const size_t n = std::min(offset - position(), capacity_ - fill_);
      std::memset(stage_ + fill_, 0, n);
      fill_ += n;
      if (fill_ == capacity_)
        if (auto err = flush()) return err;
    }
    return {};
  }

  /// `count` elements of `dt` from `data`: floats (converted for bf16), or e4m3 bytes.
  caf::error put(const void* data, size_t count, dtype dt) {
    const size_t es = kernels::dtype_bytes(dt);
    const auto* src = static_cast<const char*>(data);
    const size_t src_es = dt == dtype::f8_e4m3 ? 1 : sizeof(float);
    while (count > 0) {
      const size_t n = std::min(count, (capacity_ - fill_) / es);
      if (dt == dtype::bf16) {
        auto* out = reinterpret_cast<uint16_t*>(stage_ + fill_);
        const auto* in = reinterpret_cast<const float*>(src);
        for (size_t i = 0; i < n; ++i) out[i] = model::float_to_bf16(in[i]);
      } else {
        std::memcpy(stage_ + fill_, src, n * es);
      }
      fill_ += n * es;
      src += n * src_es;
      count -= n;
      if (capacity_ - fill_ < es)
        if (auto err = flush()) return err;
    }
    return {};
  }

  caf::error flush() {
    if (fill_ == 0) return {};
    if (auto err = runtime::copy_async(device_ + done_, stage_, fill_, stream_)) return err;
    if (auto err = runtime::cuda_error(cudaStreamSynchronize(stream_), "weight upload")) return err;
    done_ += fill_;
    fill_ = 0;
    return {};
  }

 private:
  [[nodiscard]] size_t position() const noexcept { return done_ + fill_; }

  char* device_;
  char* stage_;
  size_t capacity_;
  cudaStream_t stream_;
  size_t done_ = 0;  // bytes already copied to the device
  size_t fill_ = 0;  // bytes waiting in the staging buffer
};


/// One part of a projection's device matrix: rows [row0, row0 + rows) of checkpoint tensor
/// `name`, which has `shape`.
struct part {
  std::string name;
  std::vector<int64_t> shape;
  int64_t row0 = 0;
  int64_t rows = 0;
};

/// Plans the device tensors of one upload, holding what the host builds for them (expanded FP8
/// weights, stacked scale grids) until they are copied.
class weight_planner {
 public:
  weight_planner(const model::checkpoint& ckpt, dtype dt, upload_plan& plan)
      : ckpt_(ckpt), dt_(dt), plan_(plan), lookup_(model::lookup_in(ckpt)) {}

  [[nodiscard]] const caf::error& error() const noexcept { return err_; }
  [[nodiscard]] int64_t num_fp8() const noexcept { return num_fp8_; }
  [[nodiscard]] int64_t max_linear_elements() const noexcept { return max_linear_elements_; }

  /// A float tensor (stored as `as`): norms, the router, embeddings, kv_b_proj.
  void tensor(const std::string& name, const std::vector<int64_t>& shape, dtype as,
              std::function<void(const void*)> bind) {
    if (err_) return;
    const float* p = floats(name, shape);
    if (p) plan_.add(as, {{p, count(shape)}}, std::move(bind));
  }

  /// A projection from `parts`, stacked: FP8 when every part is FP8 and the engine is bf16,
  /// otherwise of the engine's dtype. `experts`: the routed experts' stack (the grouped GEMM
  /// reads it as FP8 itself; the other products may expand theirs). `rows`, when set, gets the
  /// matrix's row count: the parts' rows, or for an FP8 stack whose last part ends in a partial
  /// block when `pad_fp8` (the others' blocks whole), that rounded up to whole blocks with zero
  /// rows: the block-scaled product takes only whole 128-row blocks, and zero rows add zero
  /// columns to its output.
  void matrix(const std::vector<part>& parts, device_matrix& m, bool experts = false,
              int64_t* rows = nullptr, bool pad_fp8 = false) {
    if (err_ || parts.empty()) return;
    if (rows != nullptr) {
      *rows = 0;
      for (const auto& p : parts) *rows += p.rows;
    }
    bool all_fp8 = dt_ == dtype::bf16;
    for (const auto& p : parts) all_fp8 = all_fp8 && ckpt_.find_fp8(p.name) != nullptr;
    if (all_fp8) return fp8_matrix(parts, m, experts, pad_fp8 ? rows : nullptr);
    std::vector<source_run> runs;
    for (const auto& p : parts) {
      const float* data = floats(p.name, p.shape);
      if (!data) return;
      runs.push_back({data + p.row0 * p.shape[1], static_cast<size_t>(p.rows * p.shape[1])});
    }
    plan_.add(dt_, std::move(runs), [&m](const void* d) { m.data = d; });
  }

  /// One whole tensor as a projection.
  void matrix(const std::string& name, const std::vector<int64_t>& shape, device_matrix& m) {
    matrix({{name, shape, 0, shape[0]}}, m);
  }

 private:
  static size_t count(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    return n;
  }

  // The float32 values of a tensor, expanding a kept FP8 one on the host (once, however many
  // parts read it); null after an error.
  const float* floats(const std::string& name, const std::vector<int64_t>& shape) {
    if (const model::fp8_tensor* f = ckpt_.find_fp8(name)) {
      if (!check_shape(name, *f, shape)) return nullptr;
      auto [it, added] = expanded_.try_emplace(name);
      if (added) it->second = f->dequantize();
      return it->second.data().data();
    }
    auto p = lookup_(name, shape);
    if (!p) {
      err_ = p.error();
      return nullptr;
    }
    return *p;
  }

  bool check_shape(const std::string& name, const model::fp8_tensor& f,
                   const std::vector<int64_t>& shape) {
    if (shape.size() == 2 && f.rows == shape[0] && f.cols == shape[1]) return true;
    err_ = model::make_error(model::model_errc::bad_tensor,
                             name + ": shape " + model::shape_string(std::vector<int64_t>{f.rows, f.cols}) +
                                 ", expected " + model::shape_string(shape));
    return false;
  }

  void fp8_matrix(const std::vector<part>& parts, device_matrix& m, bool experts,
                  int64_t* padded_rows) {
    std::vector<const model::fp8_tensor*> tensors;
    for (const auto& p : parts) {
      const model::fp8_tensor* f = ckpt_.find_fp8(p.name);
      if (!check_shape(p.name, *f, p.shape)) return;
      tensors.push_back(f);
    }
    const model::fp8_tensor& first = *tensors.front();
    // The stacked grid's block height: divides the checkpoint's, and every part's first row
    // and (but for the last part, whose blocks may end partial) its row count.
    int64_t h = first.block_rows;
    for (size_t i = 0; i < parts.size(); ++i) {
      const model::fp8_tensor& f = *tensors[i];
      if (f.cols != first.cols || f.block_rows != first.block_rows ||
          f.block_cols != first.block_cols) {
        err_ = model::make_error(model::model_errc::bad_tensor,
                                 parts[i].name + ": FP8 blocks or columns differ from " +
                                     parts.front().name + "'s, with which it is stacked");
        return;
      }
      h = std::gcd(h, parts[i].row0);
      if (i + 1 < parts.size()) h = std::gcd(h, parts[i].rows);
    }
    const int64_t cols = first.cols, grid_cols = first.scale_cols();
    const int64_t ld = (grid_cols + 3) / 4 * 4;
    int64_t total_rows = 0;
    for (const auto& p : parts) total_rows += p.rows;
    // Zero rows complete the last block, whose grid row the loop below fills from the last
    // part's block (zero values times any scale are zero).
    const int64_t pad = padded_rows != nullptr && h == first.block_rows && total_rows % h != 0
                            ? h - total_rows % h
                            : 0;
    std::vector<float>& grid = owned_scales_.emplace_back(
        static_cast<size_t>((total_rows + h - 1) / h * ld), 0.0f);
    std::vector<source_run> runs;
    int64_t at = 0;  // the part's first row in the stacked matrix, a multiple of h
    for (size_t i = 0; i < parts.size(); ++i) {
      const part& p = parts[i];
      const model::fp8_tensor& f = *tensors[i];
      for (int64_t r = 0; r < p.rows; r += h) {
        const int64_t source_row = (p.row0 + r) / f.block_rows;
        std::copy_n(f.scales.begin() + source_row * grid_cols, grid_cols,
                    grid.begin() + (at + r) / h * ld);
      }
      runs.push_back({f.values.data() + p.row0 * cols, static_cast<size_t>(p.rows * cols)});
      at += p.rows;
    }
    if (pad > 0) {
      // e4m3's zero is the byte 0.
      const std::vector<uint8_t>& zeros =
          owned_bytes_.emplace_back(static_cast<size_t>(pad * cols), uint8_t{0});
      runs.push_back({zeros.data(), zeros.size()});
      total_rows += pad;
      *padded_rows = total_rows;
    }
    ++num_fp8_;
    if (!experts) max_linear_elements_ = std::max(max_linear_elements_, total_rows * cols);
    m.scale_ld = ld;
    m.block_rows = h;
    m.block_cols = first.block_cols;
    plan_.add(dtype::f8_e4m3, std::move(runs), [&m](const void* d) { m.data = d; });
    plan_.add(dtype::f32, {{grid.data(), grid.size()}},
              [&m](const void* d) { m.scale = static_cast<const float*>(d); });
  }

  const model::checkpoint& ckpt_;
  dtype dt_;
  upload_plan& plan_;
  model::weight_lookup lookup_;
  caf::error err_;
  int64_t num_fp8_ = 0;
  int64_t max_linear_elements_ = 0;
  std::map<std::string, model::host_tensor, std::less<>> expanded_;
  std::deque<std::vector<float>> owned_scales_;
  std::deque<std::vector<uint8_t>> owned_bytes_;
};

}  // namespace

caf::expected<device_weights> device_weights::upload(const model::checkpoint& ckpt, dtype dt,
                                                     cudaStream_t stream, expert_range experts) {
  if (dt != dtype::bf16 && dt != dtype::f32)
    return model::make_error(model::model_errc::bad_input,
                             "gpu engine: weights dtype must be bf16 or f32, not " +
                                 std::string(kernels::to_string(dt)));
  const model::model_config& c = ckpt.config;
  if (experts.count == 0) experts = {0, c.n_routed_experts};
  if (experts.first < 0 || experts.count < 0 || experts.first > c.n_routed_experts - experts.count)
    return model::make_error(model::model_errc::bad_input,
                             "gpu engine: experts [" + std::to_string(experts.first) + ", " +
                                 std::to_string(experts.first + experts.count) + ") of " +
                                 std::to_string(c.n_routed_experts));
  device_weights w;
  w.dtype_ = dt;
  w.layers_.resize(static_cast<size_t>(c.num_hidden_layers));
  upload_plan plan;
  weight_planner planner(ckpt, dt, plan);

  auto as_float = [](const float*& field) {
    return [&field](const void* p) { field = static_cast<const float*>(p); };
  };
  auto as_void = [](const void*& field) { return [&field](const void* p) { field = p; }; };
  auto mlp = [&](const std::string& prefix, int64_t inter, device_mlp& m) {
    m.intermediate = inter;
    const std::vector<int64_t> gate_shape{inter, c.hidden_size};
    planner.matrix({{prefix + "gate_proj.weight", gate_shape, 0, inter},
                    {prefix + "up_proj.weight", gate_shape, 0, inter}},
                   m.gate_up);
    planner.matrix(prefix + "down_proj.weight", {c.hidden_size, inter}, m.down);
  };

  const int64_t D = c.hidden_size, H = c.num_attention_heads, R = c.kv_lora_rank;
  const int64_t qk = c.qk_head_dim(), dr = c.qk_rope_head_dim;
  planner.tensor("model.embed_tokens.weight", {c.vocab_size, D}, dt, as_void(w.embed_));
  planner.tensor(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                 {c.vocab_size, D}, dt, as_void(w.lm_head_));
  planner.tensor("model.norm.weight", {D}, dtype::f32, as_float(w.final_norm_));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    device_layer& layer = w.layers_[static_cast<size_t>(l)];
    device_attention& a = layer.attention;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string s = p + "self_attn.";
    planner.tensor(p + "input_layernorm.weight", {D}, dtype::f32, as_float(a.input_norm));
    const int64_t QR = c.q_lora_rank.value_or(0);
    const std::string q_name = s + (QR > 0 ? "q_a_proj.weight" : "q_proj.weight");
    const int64_t Q = QR > 0 ? QR : H * qk;
    planner.matrix(
        {{q_name, {Q, D}, 0, Q}, {s + "kv_a_proj_with_mqa.weight", {R + dr, D}, 0, R + dr}},
        a.input_proj, /*experts=*/false, &a.input_proj_rows, /*pad_fp8=*/true);
    if (QR > 0) {
      planner.tensor(s + "q_a_layernorm.weight", {QR}, dtype::f32, as_float(a.q_a_norm));
      planner.matrix(s + "q_b_proj.weight", {H * qk, QR}, a.q_b_proj);
    }
    planner.tensor(s + "kv_a_layernorm.weight", {R}, dtype::f32, as_float(a.kv_a_norm));
    planner.tensor(s + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), R}, dt,
                   as_void(a.kv_b_proj));
    planner.matrix(s + "o_proj.weight", {D, H * c.v_head_dim}, a.o_proj);
    planner.tensor(p + "post_attention_layernorm.weight", {D}, dtype::f32, as_float(a.post_norm));
    if (!c.is_moe_layer(l)) {
      mlp(p + "mlp.", c.intermediate_size, layer.dense.emplace());
      continue;
    }
    device_moe& m = layer.moe.emplace();
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
    planner.tensor(p + "mlp.gate.weight", {E, D}, dtype::f32, as_float(m.router));
    planner.tensor(p + "mlp.gate.e_score_correction_bias", {E}, dtype::f32,
                   as_float(m.router_bias));
    std::vector<part> gate_up, down;
    for (int64_t e = experts.first; e < experts.first + experts.count; ++e) {
      gate_up.push_back({model::expert_weight_name(l, e, "gate_proj"), {I, D}, 0, I});
      gate_up.push_back({model::expert_weight_name(l, e, "up_proj"), {I, D}, 0, I});
      down.push_back({model::expert_weight_name(l, e, "down_proj"), {D, I}, 0, D});
    }
    planner.matrix(gate_up, m.experts_gate_up, /*experts=*/true);
    planner.matrix(down, m.experts_down, /*experts=*/true);
    if (c.n_shared_experts > 0)
      mlp(p + "mlp.shared_experts.", c.shared_intermediate_size(), m.shared.emplace());
  }
  if (const caf::error& err = planner.error()) return err;
  w.num_fp8_ = planner.num_fp8();
  w.max_fp8_linear_ = planner.max_linear_elements();

  auto storage = runtime::device_buffer::allocate(plan.total_bytes());
  if (!storage) return storage.error();
  w.storage_ = std::move(*storage);
  auto staging =
      runtime::pinned_host_buffer::allocate(std::clamp<size_t>(plan.total_bytes(), 16, staging_bytes_max));
  if (!staging) return staging.error();
  staged_writer writer(w.storage_.data(), *staging, stream);
  for (const auto& t : plan.tensors()) {
    if (auto e = writer.pad_to(t.offset)) return e;
    for (const auto& r : t.runs)
      if (auto e = writer.put(r.data, r.count, t.dt)) return e;
    t.bind(static_cast<const char*>(w.storage_.data()) + t.offset);
  }
  if (auto e = writer.pad_to(plan.total_bytes())) return e;
  if (auto e = writer.flush()) return e;
  return w;
}

}  // namespace moe::engine
