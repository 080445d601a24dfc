#include "engine/device_weights.hpp"

#include <algorithm>
#include <cstring>
#include <functional>
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

/// A run of host floats that goes into a device tensor.
struct source_run {
  const float* data = nullptr;
  size_t count = 0;
};

/// A device tensor: its runs, concatenated, converted to `dt`, at `offset` of the allocation.
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

  caf::error put(const float* src, size_t count, dtype dt) {
    const size_t es = kernels::dtype_bytes(dt);
    while (count > 0) {
      const size_t n = std::min(count, (capacity_ - fill_) / es);
      if (dt == dtype::bf16) {
        auto* out = reinterpret_cast<uint16_t*>(stage_ + fill_);
        for (size_t i = 0; i < n; ++i) out[i] = model::float_to_bf16(src[i]);
      } else {
        std::memcpy(stage_ + fill_, src, n * es);
      }
      fill_ += n * es;
      src += n;
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

}  // namespace

caf::expected<device_weights> device_weights::upload(const model::checkpoint& ckpt, dtype dt,
                                                     cudaStream_t stream) {
  if (dt != dtype::bf16 && dt != dtype::f32)
    return model::make_error(model::model_errc::bad_input,
                             "gpu engine: weights dtype must be bf16 or f32, not " +
                                 std::string(kernels::to_string(dt)));
  const model::model_config& c = ckpt.config;
  const model::weight_lookup lookup = model::lookup_in(ckpt);
  device_weights w;
  w.dtype_ = dt;
  w.layers_.resize(static_cast<size_t>(c.num_hidden_layers));
  upload_plan plan;
  caf::error err;

  // One tensor of the checkpoint, checked against `shape`, as one device tensor.
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape, dtype as,
                    std::function<void(const void*)> bind) {
    if (err) return;
    auto p = lookup(name, shape);
    if (!p) {
      err = p.error();
      return;
    }
    size_t count = 1;
    for (auto d : shape) count *= static_cast<size_t>(d);
    plan.add(as, {{*p, count}}, std::move(bind));
  };
  // Several checkpoint tensors, each of `shape`, concatenated into one device tensor.
  auto stacked = [&](const std::vector<std::string>& names, std::vector<int64_t> shape,
                     std::function<void(const void*)> bind) {
    if (err) return;
    std::vector<source_run> runs;
    size_t count = 1;
    for (auto d : shape) count *= static_cast<size_t>(d);
    for (const auto& name : names) {
      auto p = lookup(name, shape);
      if (!p) {
        err = p.error();
        return;
      }
      runs.push_back({*p, count});
    }
    plan.add(dt, std::move(runs), std::move(bind));
  };
  auto as_float = [](const float*& field) {
    return [&field](const void* p) { field = static_cast<const float*>(p); };
  };
  auto as_void = [](const void*& field) { return [&field](const void* p) { field = p; }; };
  auto mlp = [&](const std::string& prefix, int64_t inter, device_mlp& m) {
    m.intermediate = inter;
    stacked({prefix + "gate_proj.weight", prefix + "up_proj.weight"}, {inter, c.hidden_size},
            as_void(m.gate_up));
    tensor(prefix + "down_proj.weight", {c.hidden_size, inter}, dt, as_void(m.down));
  };

  const int64_t D = c.hidden_size, H = c.num_attention_heads, R = c.kv_lora_rank;
  const int64_t qk = c.qk_head_dim(), dr = c.qk_rope_head_dim;
  tensor("model.embed_tokens.weight", {c.vocab_size, D}, dt, as_void(w.embed_));
  tensor(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
         {c.vocab_size, D}, dt, as_void(w.lm_head_));
  tensor("model.norm.weight", {D}, dtype::f32, as_float(w.final_norm_));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    device_layer& layer = w.layers_[static_cast<size_t>(l)];
    device_attention& a = layer.attention;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string s = p + "self_attn.";
    tensor(p + "input_layernorm.weight", {D}, dtype::f32, as_float(a.input_norm));
    if (const int64_t QR = c.q_lora_rank.value_or(0); QR > 0) {
      tensor(s + "q_a_proj.weight", {QR, D}, dt, as_void(a.q_a_proj));
      tensor(s + "q_a_layernorm.weight", {QR}, dtype::f32, as_float(a.q_a_norm));
      tensor(s + "q_b_proj.weight", {H * qk, QR}, dt, as_void(a.q_proj));
    } else {
      tensor(s + "q_proj.weight", {H * qk, D}, dt, as_void(a.q_proj));
    }
    if (!err) {
      auto kv_a = lookup(s + "kv_a_proj_with_mqa.weight", std::vector<int64_t>{R + dr, D});
      if (!kv_a) return kv_a.error();
      const auto latent = static_cast<size_t>(R * D), rope = static_cast<size_t>(dr * D);
      plan.add(dt, {{*kv_a, latent}}, as_void(a.kv_a_latent));
      plan.add(dt, {{*kv_a + latent, rope}}, as_void(a.kv_a_rope));
    }
    tensor(s + "kv_a_layernorm.weight", {R}, dtype::f32, as_float(a.kv_a_norm));
    tensor(s + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), R}, dt,
           as_void(a.kv_b_proj));
    tensor(s + "o_proj.weight", {D, H * c.v_head_dim}, dt, as_void(a.o_proj));
    tensor(p + "post_attention_layernorm.weight", {D}, dtype::f32, as_float(a.post_norm));
    if (!c.is_moe_layer(l)) {
      mlp(p + "mlp.", c.intermediate_size, layer.dense.emplace());
      continue;
    }
    device_moe& m = layer.moe.emplace();
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
    tensor(p + "mlp.gate.weight", {E, D}, dtype::f32, as_float(m.router));
    tensor(p + "mlp.gate.e_score_correction_bias", {E}, dtype::f32, as_float(m.router_bias));
    std::vector<std::string> gate_up, down;
    for (int64_t e = 0; e < E; ++e) {
      gate_up.push_back(model::expert_weight_name(l, e, "gate_proj"));
      gate_up.push_back(model::expert_weight_name(l, e, "up_proj"));
      down.push_back(model::expert_weight_name(l, e, "down_proj"));
    }
    stacked(gate_up, {I, D}, as_void(m.experts_gate_up));
    stacked(down, {D, I}, as_void(m.experts_down));
    if (c.n_shared_experts > 0)
      mlp(p + "mlp.shared_experts.", c.shared_intermediate_size(), m.shared.emplace());
  }
  if (err) return err;

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
