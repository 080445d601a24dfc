#include "engine/forward_pass.hpp"

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

#include "engine/expert_parallel.hpp"
#include "kernels/cuda/fp8_quantize.hpp"
#include "kernels/cuda/gather.hpp"
#include "kernels/cuda/grouped_gemm.hpp"
#include "kernels/cuda/mla_decode.hpp"
#include "kernels/cuda/mla_prefill.hpp"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/sampling.hpp"
#include "kernels/cuda/skinny_linear.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "model/model_errc.hpp"
#include "runtime/cuda_memory.hpp"

namespace moe::engine::detail {

namespace kcu = kernels::cuda;
using kernels::dtype;
using kernels::kernel_status;

namespace {

constexpr size_t buffer_alignment = 256;

// `elements` elements of `dt` past p.
const void* offset(const void* p, int64_t elements, dtype dt) noexcept {
  return static_cast<const char*>(p) + elements * static_cast<int64_t>(kernels::dtype_bytes(dt));
}

/// The dimensions every pass uses, named as in model/attention_block.cpp.
struct dims {
  explicit dims(const model::model_config& c)
      : D(c.hidden_size),
        H(c.num_attention_heads),
        dn(c.qk_nope_head_dim),
        dr(c.qk_rope_head_dim),
        dv(c.v_head_dim),
        qk(c.qk_head_dim()),
        R(c.kv_lora_rank),
        QR(c.q_lora_rank.value_or(0)),
        Q(QR > 0 ? QR : H * qk),
        E(c.n_routed_experts),
        top_k(c.num_experts_per_tok),
        V(c.vocab_size) {}
  int64_t D, H, dn, dr, dv, qk, R, QR;
  int64_t Q;  ///< the input projection's q part: q_a (q_lora_rank) or q itself
  int64_t E, top_k, V;
};

/// One step's passes; each queues kernels on m.stream and answers the first kernel refusal.
class forward {
 public:
  forward(const model_state& m, const step_shape& s, const step_buffers& b)
      : m_(m),
        c_(*m.config),
        s_(s),
        b_(b),
        d_(*m.config),
        T_(s.num_tokens),
        stream_(m.stream),
        workspace_(m.gemm_workspace) {}

  caf::error run() {
    kcu::gather_rows_args g;
    g.table = m_.weights->embed();
    g.ids = b_.token_ids;
    g.out = b_.x;
    g.num_rows = d_.V;
    g.num_ids = T_;
    g.dim = d_.D;
    g.dt = m_.dt;
    if (auto err = check(kcu::gather_rows_run(g, stream_), "embedding")) return err;
    for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
      layer_ = l;
      if (auto err = attention()) return err;
      if (auto err = ffn()) return err;
    }
    layer_ = -1;
    return head();
  }

 private:
  caf::error check(kernel_status s, const char* what) const {
    if (s == kernel_status::ok) return {};
    const std::string where =
        layer_ < 0 ? "gpu engine: " : "gpu engine: layer " + std::to_string(layer_) + ": ";
    return model::make_error(model::model_errc::kernel_failed,
                             where + what + ": " + std::string(kernels::to_string(s)));
  }

  caf::error gemm(const kcu::gemm_desc& g, const char* what) {
    return check(m_.gemm->run(g, workspace_, m_.gemm_workspace_bytes, stream_), what);
  }

  /// The few-row product on skinny_linear.hpp's kernel where the step has few enough rows and
  /// the kernel takes the shape; nullopt: the caller uses cuBLASLt.
  std::optional<caf::error> skinny(const kcu::skinny_linear_args& a, const char* what) {
    return skinny_upto(a, what, m_.skinny_rows);
  }

  /// The rows up to which a product whose weight stays in L2 (the router's 0.5 MB, the absorbed
  /// attention's 2 MB a layer of v2-lite) takes the skinny kernel, in passes of 8 rows, the
  /// later ones reading the weight from L2: at batch 32 that is one launch instead of cuBLASLt's
  /// strided batch, or of a conversion and a float32 product for the router.
  static constexpr int64_t small_weight_rows = 64;

  /// skinny() for such a product: up to small_weight_rows rows (or skinny_rows if more); never
  /// with skinny_rows 0, which keeps every product on cuBLASLt.
  std::optional<caf::error> skinny_small_weight(const kcu::skinny_linear_args& a,
                                                const char* what) {
    if (m_.skinny_rows == 0) return std::nullopt;
    return skinny_upto(a, what, std::max(m_.skinny_rows, small_weight_rows));
  }

  std::optional<caf::error> skinny_upto(const kcu::skinny_linear_args& a, const char* what,
                                        int64_t max_rows) {
    if (a.rows > max_rows || kcu::skinny_linear_can_run(a) != kernel_status::ok)
      return std::nullopt;
    return check(kcu::skinny_linear_run(a, stream_), what);
  }

  /// A strided batch of products (the absorbed attention's, one per head) on skinny_linear.hpp's
  /// kernel, as one launch, up to small_weight_rows rows where the kernel takes the shape;
  /// cuBLASLt's strided batch otherwise.
  caf::error batched(const kcu::gemm_desc& g, const char* what) {
    if (const auto a = kcu::skinny_linear_of(g))
      if (auto done = skinny_small_weight(*a, what)) return *done;
    return gemm(g, what);
  }

  /// The product (x and w of the step's dtype or w FP8, y of y_dt, beta for the residual add) on
  /// the grouped expert GEMM as one expert, where the step's rows are in (skinny_rows,
  /// grouped_dense_rows] and the kernel takes it; nullopt: the caller uses cuBLASLt.
  std::optional<caf::error> as_one_expert(const void* x, const device_matrix& w, void* y,
                                          int64_t rows, int64_t in, int64_t out, float beta,
                                          const char* what, dtype y_dt) {
    if (rows <= m_.skinny_rows || rows > m_.grouped_dense_rows || m_.dt != dtype::bf16)
      return std::nullopt;
    kcu::grouped_gemm_args g;
    g.x = x;
    g.expert_offsets = m_.one_expert_offsets + 2 * rows;
    set_weights(g, w);
    g.y = y;
    g.num_rows = rows;
    g.num_experts = 1;
    g.n = out;
    g.k = in;
    g.dt = m_.dt;
    g.y_dt = y_dt;
    g.beta = beta;
    if (kcu::grouped_gemm_can_run(g) != kernel_status::ok) return std::nullopt;
    const kernel_status st = kcu::grouped_gemm_run(g, stream_);
    if (st == kernel_status::ok) count(&gpu_kernel_stats::dense_as_one_expert);
    return check(st, what);
  }

  void count(uint64_t gpu_kernel_stats::*product) const {
    if (m_.kernels != nullptr) ++(m_.kernels->*product);
  }

  /// y (rows, out) = x (rows, in) . w (out, in)^T + beta * y: x and w of `ab`, y of `c`.
  caf::error linear_as(dtype ab, dtype c, const void* x, const void* w, void* y, int64_t rows,
                       int64_t in, int64_t out, const char* what, float beta = 0.0f) {
    if (ab == m_.dt) {
      device_matrix plain;
      plain.data = w;
      if (auto done = as_one_expert(x, plain, y, rows, in, out, beta, what, c)) return *done;
    }
    if (auto done = skinny(kcu::skinny_linear_desc(x, w, y, rows, in, out, ab, c, beta), what))
      return *done;
    return gemm(kcu::linear_desc(x, w, y, rows, in, out, ab, c, beta), what);
  }
  /// The same, everything in the step's dtype.
  caf::error linear(const void* x, const void* w, void* y, int64_t rows, int64_t in, int64_t out,
                    const char* what, float beta = 0.0f) {
    return linear_as(m_.dt, m_.dt, x, w, y, rows, in, out, what, beta);
  }
  /// skinny_linear.hpp's arguments for a projection's product, its weight of the step's dtype
  /// or FP8 (streamed as FP8, expanded in registers).
  kcu::skinny_linear_args few_rows(const void* x, const device_matrix& w, void* y, int64_t rows,
                                   int64_t in, int64_t out, float beta = 0.0f) const {
    auto few = kcu::skinny_linear_desc(x, w.data, y, rows, in, out, m_.dt, m_.dt, beta);
    if (w.fp8()) {
      few.w_dt = dtype::f8_e4m3;
      few.w_scale = w.scale;
      few.block_rows = w.block_rows;
      few.block_cols = w.block_cols;
      few.scale_ld = w.scale_ld;
    }
    return few;
  }

  /// act (rows, I) = SwiGLU of the stacked gate|up product of x (rows, D): within skinny_rows
  /// one skinny_linear launch with the activation fused (its float32 sums activated: in f32
  /// the values of the two launches, in bf16 without the products' rounding, as the routed
  /// experts' fused product), else the product into gate_up, then swiglu.
  caf::error gate_up_swiglu(const void* x, const device_matrix& w, void* gate_up, void* act,
                            int64_t rows, int64_t I, const char* what) {
    auto fused = few_rows(x, w, act, rows, d_.D, I);
    fused.swiglu = true;
    if (auto done = skinny(fused, what)) return *done;
    if (auto err = linear(x, w, gate_up, rows, d_.D, 2 * I, what)) return err;
    return swiglu(gate_up, act, rows, I, what);
  }

  /// A projection's product, its weight of the step's dtype or FP8; beta 0 or 1.
  caf::error linear(const void* x, const device_matrix& w, void* y, int64_t rows, int64_t in,
                    int64_t out, const char* what, float beta = 0.0f) {
    if (!w.fp8()) return linear(x, w.data, y, rows, in, out, what, beta);
    if (auto done = as_one_expert(x, w, y, rows, in, out, beta, what, m_.dt)) return *done;
    // A few rows: the FP8 bytes stream as they are, expanded in registers (`expand`'s values).
    if (auto done = skinny(few_rows(x, w, y, rows, in, out, beta), what)) return *done;
    if (m_.fp8_block_scaled && w.block_rows == 128 && w.block_cols == 128 && b_.fp8_x != nullptr &&
        (beta == 0.0f || beta == 1.0f)) {
      kcu::fp8_linear_desc d;
      d.x_q = b_.fp8_x;
      d.x_scale = b_.fp8_x_scale;
      d.w_q = static_cast<const uint8_t*>(w.data);
      d.w_scale = w.scale;
      d.y = beta == 0.0f ? y : b_.fp8_y;
      d.m = kcu::fp8_linear_rows(rows);
      d.n = out;
      d.k = in;
      if (kcu::fp8_linear_can_run(d) == kernel_status::ok) {
        kcu::fp8_quantize_args q;
        q.x = x;
        q.q = b_.fp8_x;
        q.scale = b_.fp8_x_scale;
        q.rows = rows;
        q.k = in;
        q.x_dt = m_.dt;
        q.layout = kcu::fp8_scale_layout::group_major;
        q.scale_ld = d.m;
        if (auto err = check(kcu::fp8_quantize_run(q, stream_), what)) return err;
        const kernel_status st =
            m_.gemm->run_fp8_linear(d, workspace_, m_.gemm_workspace_bytes, stream_);
        if (st == kernel_status::ok) {
          count(&gpu_kernel_stats::fp8_block_scaled);
          if (beta == 0.0f) return {};
          kcu::accumulate_args acc;
          acc.x = b_.fp8_y;
          acc.y = y;
          acc.count = rows * out;
          acc.dt = m_.dt;
          return check(kcu::accumulate_run(acc, stream_), what);
        }
        // A shape or card cuBLASLt has no block-scaled algorithm for: the expansion below.
        if (st != kernel_status::unsupported_shape && st != kernel_status::unsupported_arch)
          return check(st, what);
      }
    }
    // The weight expanded to bf16 (bf16(e4m3 * scale)) in the engine's scratch, then the bf16
    // product.
    if (out * in > m_.weights->max_fp8_linear_elements())
      return check(kernel_status::unsupported_shape, what);
    kcu::fp8_linear_fallback_desc f;
    f.x = x;
    f.w_q = static_cast<const uint8_t*>(w.data);
    f.w_scale = w.scale;
    f.w_scratch = m_.fp8_expanded;
    f.y = y;
    f.m = rows;
    f.n = out;
    f.k = in;
    f.block_rows = w.block_rows;
    f.block_cols = w.block_cols;
    f.scale_ld = w.scale_ld;
    f.beta = beta;
    const kernel_status st =
        m_.gemm->run_fp8_linear_fallback(f, workspace_, m_.gemm_workspace_bytes, stream_);
    if (st == kernel_status::ok) count(&gpu_kernel_stats::fp8_expanded);
    return check(st, what);
  }

  /// out = norm(x) (x += residual first when residual is set: residual keeps the sum); x's
  /// rows x_stride apart (0: dim).
  caf::error norm(const void* x, void* residual, const float* weight, void* out, int64_t rows,
                  int64_t dim, const char* what, int64_t x_stride = 0) {
    kcu::rmsnorm_args a;
    a.x = x;
    a.residual = residual;
    a.weight = weight;
    a.out = out;
    a.rows = rows;
    a.dim = dim;
    a.x_stride = x_stride;
    a.eps = m_.eps;
    a.dt = m_.dt;
    return check(kcu::rmsnorm_run(a, stream_), what);
  }

  /// The step's q (T, H, dn + dr), row stride q_stride(): q_b_proj's output with q_lora_rank,
  /// else the first columns of the input projection's rows.
  [[nodiscard]] void* q() const noexcept { return d_.QR > 0 ? b_.q : b_.proj; }
  [[nodiscard]] int64_t q_stride() const { return d_.QR > 0 ? d_.H * d_.qk : P(); }
  /// The width of the input projection's output rows: [q or q_a | latent | k_pe], and with FP8
  /// weights maybe zero columns after them (device_attention::input_proj_rows).
  [[nodiscard]] int64_t P() const { return m_.weights->layer(layer_).attention.input_proj_rows; }
  /// The step's k_pe (T, dr): after the latent in the input projection's rows (stride P()).
  [[nodiscard]] void* k_pe() const noexcept {
    return const_cast<void*>(offset(b_.proj, d_.Q + d_.R, m_.dt));
  }

  /// The layer's input norm (fusing the previous FFN's residual add), the projections, RoPE
  /// and the cache append: as attention_block::project.
  caf::error project() {
    const device_attention& a = m_.weights->layer(layer_).attention;
    const int64_t D = d_.D, H = d_.H, qk = d_.qk, dr = d_.dr, P = this->P();
    caf::error err;
    if ((err = layer_ == 0 ? norm(b_.x, nullptr, a.input_norm, b_.normed, T_, D, "input norm")
                           : norm(b_.ffn_out, b_.x, a.input_norm, b_.normed, T_, D,
                                  "residual + input norm")))
      return err;
    // [q or q_a | latent | k_pe] of every token in one product.
    if ((err = linear(b_.normed, a.input_proj, b_.proj, T_, D, P, "q_a_proj|q_proj + kv_a_proj")))
      return err;
    if (d_.QR > 0 &&
        ((err = norm(b_.proj, nullptr, a.q_a_norm, b_.q_a, T_, d_.QR, "q_a norm", P)) ||
         (err = linear(b_.q_a, a.q_b_proj, b_.q, T_, d_.QR, H * qk, "q_b_proj"))))
      return err;
    kcu::rope_args r;
    r.x = const_cast<void*>(offset(q(), d_.dn, m_.dt));
    r.num_tokens = T_;
    r.num_heads = H;
    r.token_stride = q_stride();
    r.head_stride = qk;
    r.head_dim = dr;
    r.positions = b_.positions;
    r.cos = m_.rope_cos;
    r.sin = m_.rope_sin;
    r.table_positions = m_.rope_positions;
    r.dt = m_.dt;
    kcu::rope_args k = r;
    k.x = k_pe();
    k.num_heads = 1;
    k.token_stride = P;
    k.head_stride = dr;
    if ((err = check(kcu::rope_pair_run(r, k, stream_), "rope(q, k)"))) return err;
    // kv_a_layernorm on the way into the cache: the normed latent into its slot and b_.latent.
    kcu::mla_cache_append_args ca;
    ca.layout = m_.cache_layout;
    ca.pool = m_.cache_pool(layer_);
    ca.latent = offset(b_.proj, d_.Q, m_.dt);
    ca.latent_stride = P;
    ca.k_pe = k_pe();
    ca.k_pe_stride = P;
    ca.slot_mapping = b_.slots;
    ca.num_tokens = T_;
    ca.dt = m_.dt;
    ca.latent_norm = a.kv_a_norm;
    ca.latent_norm_eps = m_.eps;
    ca.latent_out = b_.latent;
    return check(kcu::mla_cache_append_run(ca, stream_), "kv_a norm + cache append");
  }

  /// Causal attention over the decompressed keys and values of the step's own tokens.
  caf::error attend_prefill() {
    const device_attention& a = m_.weights->layer(layer_).attention;
    const int64_t H = d_.H, dn = d_.dn, dv = d_.dv;
    if (auto err = linear(b_.latent, a.kv_b_proj, b_.kv, T_, d_.R, H * (dn + dv), "kv_b_proj"))
      return err;
    kcu::mla_prefill_args p;
    p.q = q();
    p.q_token_stride = q_stride();
    p.q_head_stride = d_.qk;
    p.k_nope = b_.kv;
    p.k_nope_token_stride = H * (dn + dv);
    p.k_nope_head_stride = dn + dv;
    p.k_pe = k_pe();
    p.k_pe_token_stride = P();
    p.v = offset(b_.kv, dn, m_.dt);
    p.v_token_stride = H * (dn + dv);
    p.v_head_stride = dn + dv;
    p.out = b_.attn;
    p.cu_seqlens_q = b_.cu_seqlens;
    p.num_seqs = s_.num_seqs;
    p.num_q_tokens = T_;
    p.max_seqlen_q = s_.max_seq_len;
    p.num_heads = H;
    p.nope_dim = dn;
    p.rope_dim = d_.dr;
    p.v_dim = dv;
    p.softmax_scale = m_.softmax_scale;
    p.dt = m_.dt;
    return check(kcu::mla_prefill_run(p, stream_), "mla prefill");
  }

  /// One query per sequence against the paged latent cache, kv_b_proj absorbed on both sides
  /// (as kernels::cpu::mla_absorb_q / mla_absorb_out, per head as one strided batch: the skinny
  /// kernel's at few rows, cuBLASLt's above).
  caf::error attend_decode() {
    const device_attention& a = m_.weights->layer(layer_).attention;
    const int64_t H = d_.H, dn = d_.dn, dv = d_.dv, R = d_.R, qk = d_.qk;
    kcu::gemm_desc g;  // q_latent[b, h, :] = q_nope[b, h, :] . W_UK[h] (dn, R)
    g.m = T_;
    g.n = R;
    g.k = dn;
    g.a = q();
    g.lda = q_stride();
    g.b = a.kv_b_proj;
    g.ldb = R;
    g.c = b_.q_latent;
    g.ldc = H * R;
    g.ab_dt = g.c_dt = m_.dt;
    g.batch_count = H;
    g.stride_a = qk;
    g.stride_b = (dn + dv) * R;
    g.stride_c = R;
    if (auto err = batched(g, "absorb q")) return err;
    kcu::mla_decode_args dec;
    dec.layout = m_.cache_layout;
    dec.pool = m_.cache_pool(layer_);
    dec.q_latent = b_.q_latent;
    dec.q_pe = offset(q(), dn, m_.dt);
    dec.q_pe_token_stride = q_stride();
    dec.q_pe_head_stride = qk;
    dec.block_table = b_.block_table;
    dec.max_blocks_per_seq = s_.max_blocks;
    dec.seq_lens = b_.seq_lens;
    dec.out_latent = b_.out_latent;
    dec.batch = T_;
    dec.num_heads = H;
    dec.softmax_scale = m_.softmax_scale;
    dec.max_seq_len = s_.max_seq_len;
    dec.dt = m_.dt;
    if (auto err =
            check(kcu::mla_decode_run(dec, b_.mla_workspace, b_.mla_workspace_bytes, stream_),
                  "mla decode"))
      return err;
    kcu::gemm_desc o;  // attn[b, h, :] = out_latent[b, h, :] . W_UV[h]^T (R, dv)
    o.trans_b = kcu::transpose::yes;
    o.m = T_;
    o.n = dv;
    o.k = R;
    o.a = b_.out_latent;
    o.lda = H * R;
    o.b = offset(a.kv_b_proj, dn * R, m_.dt);
    o.ldb = R;
    o.c = b_.attn;
    o.ldc = H * dv;
    o.ab_dt = o.c_dt = m_.dt;
    o.batch_count = H;
    o.stride_a = R;
    o.stride_b = (dn + dv) * R;
    o.stride_c = dv;
    return batched(o, "absorb out");
  }

  caf::error attention() {
    const device_attention& a = m_.weights->layer(layer_).attention;
    caf::error err;
    if ((err = project()) || (err = s_.decode ? attend_decode() : attend_prefill())) return err;
    // x += attn . o_proj^T: the residual add rides on the product's beta, as on the CPU.
    if ((err = linear(b_.attn, a.o_proj, b_.x, T_, d_.H * d_.dv, d_.D, "o_proj", 1.0f)))
      return err;
    return norm(b_.x, nullptr, a.post_norm, b_.mlp_in, T_, d_.D, "post-attention norm");
  }

  /// act (rows, dim) = silu(gate) * up of gate_up's (rows, 2 dim) stacked halves.
  caf::error swiglu(const void* gate_up, void* act, int64_t rows, int64_t dim, const char* what) {
    kcu::swiglu_args s;
    s.gate_up = gate_up;
    s.out = act;
    s.rows = rows;
    s.dim = dim;
    s.dt = m_.dt;
    return check(kcu::swiglu_run(s, stream_), what);
  }

  /// out (rows, hidden) = beta * out + down(silu(gate(in)) * up(in)).
  caf::error mlp(const device_mlp& w, const void* in, int64_t rows, void* out, float beta) {
    const int64_t D = d_.D, I = w.intermediate;
    if (auto err =
            gate_up_swiglu(in, w.gate_up, b_.gate_up, b_.act, rows, I, "mlp gate|up + swiglu"))
      return err;
    return linear(b_.act, w.down, out, rows, I, D, "mlp down", beta);
  }

  static void set_weights(kcu::grouped_gemm_args& g, const device_matrix& w) {
    g.weights = w.data;
    g.weight_scale = w.scale;
    g.scale_block_rows = w.block_rows;
    g.scale_block_cols = w.block_cols;
    g.scale_ld = w.scale_ld;
  }

  /// One grouped expert product: through cuBLAS's grouped GEMM when `blas`, else, or where
  /// cuBLAS refuses the problems, our kernel.
  caf::error experts_product(kcu::grouped_gemm_args g, bool blas, int64_t product,
                             const char* what) {
    if (blas)
      if (auto done = cublas_product(g, product, what)) return *done;
    g.wgmma = m_.wgmma_experts;
    return *grouped_run(g, what);
  }

  /// The product on cuBLAS's grouped GEMM (the offsets are on the host; `product` picks its
  /// scratch, 0 or 1); nullopt where cuBLAS refuses the problems.
  std::optional<caf::error> cublas_product(const kcu::grouped_gemm_args& g, int64_t product,
                                           const char* what) {
    const int64_t scratch = 3 * g.num_experts * product;
    kcu::cublas_grouped_args a;
    a.x = g.x;
    a.weights = g.weights;
    a.y = g.y;
    a.offsets = m_.host_offsets;
    a.num_rows = g.num_rows;
    a.num_experts = g.num_experts;
    a.n = g.n;
    a.k = g.k;
    a.dt = g.dt;
    a.host_pointers = m_.host_pointers + scratch;
    a.device_pointers = m_.device_pointers + scratch;
    const kernel_status st = m_.blas->run(a, stream_);
    if (st == kernel_status::unsupported_shape) return std::nullopt;
    if (st == kernel_status::ok) count(&gpu_kernel_stats::experts_cublas);
    return check(st, what);
  }

  /// Our grouped kernel's launch, counted by the kernel it took. With fuse_swiglu, a call the
  /// kernels refuse (unsupported_shape, before any launch) gives nullopt, and the caller runs
  /// the product and swiglu apart.
  std::optional<caf::error> grouped_run(const kcu::grouped_gemm_args& g, const char* what) {
    auto launched = kcu::grouped_gemm_kernel::none;
    const kernel_status st = kcu::grouped_gemm_run(g, stream_, &launched);
    if (g.fuse_swiglu && st == kernel_status::unsupported_shape) return std::nullopt;
    if (launched == kcu::grouped_gemm_kernel::wgmma ||
        launched == kcu::grouped_gemm_kernel::wgmma_tma)
      count(&gpu_kernel_stats::experts_wgmma);
    else if (launched != kcu::grouped_gemm_kernel::none)
      count(&gpu_kernel_stats::experts_grouped_gemm);
    return check(st, what);
  }

  /// Routed experts (gate, permute, grouped products, weighted combine) plus the shared
  /// experts, into ffn_out: the reference's moe_layer_output order (routed rows summed in k
  /// order from zero, then the shared output added). In decode steps with a side stream
  /// (model_state::side_stream) the shared experts' first two kernels run beside the routed
  /// ones (shared_experts_aside).
  caf::error moe(const device_moe& w) {
    if (!w.shared) return routed_experts(w);
    if (b_.shared_act == nullptr) {  // one stream
      if (auto err = routed_experts(w)) return err;
      return mlp(*w.shared, b_.mlp_in, T_, b_.ffn_out, 1.0f);
    }
    caf::error err = shared_experts_aside(*w.shared);
    if (!err) err = routed_experts(w);
    // Joined whatever happened, so that none of the step's work is left unordered.
    const cudaError_t joined = cudaStreamWaitEvent(stream_, m_.shared_done, 0);
    if (err) return err;
    if ((err = runtime::cuda_error(joined, "waiting for the shared experts"))) return err;
    return linear(b_.shared_act, w.shared->down, b_.ffn_out, T_, w.shared->intermediate, d_.D,
                  "shared experts down", 1.0f);
  }

  /// The routed experts' part of moe(), into ffn_out.
  caf::error routed_experts(const device_moe& w) {
    const int64_t D = d_.D, E = d_.E, k = d_.top_k, I = c_.moe_intermediate_size;
    const int64_t rows = T_ * k;
    caf::error err;
    const void* router_in = b_.mlp_in;
    // The gate runs in float32, as transformers'. Up to small_weight_rows rows take the bf16
    // input straight into the skinny kernel, which widens it exactly (one launch instead of a
    // conversion and a product); otherwise the input is converted first.
    auto r =
        kcu::skinny_linear_desc(b_.mlp_in, w.router, b_.router_logits, T_, D, E, m_.dt, dtype::f32);
    r.w_dt = dtype::f32;
    std::optional<caf::error> routed = skinny_small_weight(r, "router");
    if (routed) {
      if (*routed) return *routed;
    } else if (m_.dt != dtype::f32) {
      kcu::convert_args cv;
      cv.in = b_.mlp_in;
      cv.out = b_.mlp_in_f32;
      cv.count = T_ * D;
      cv.in_dt = m_.dt;
      cv.out_dt = dtype::f32;
      if ((err = check(kcu::convert_run(cv, stream_), "router input to f32"))) return err;
      router_in = b_.mlp_in_f32;
    }
    if (!routed && (err = linear_as(dtype::f32, dtype::f32, router_in, w.router, b_.router_logits,
                                    T_, D, E, "router")))
      return err;
    kcu::moe_gate_args g;
    g.params.num_experts = static_cast<size_t>(E);
    g.params.num_groups = static_cast<size_t>(c_.n_group);
    g.params.topk_group = static_cast<size_t>(c_.topk_group);
    g.params.top_k = static_cast<size_t>(k);
    g.params.norm_topk_prob = c_.norm_topk_prob;
    g.params.routed_scaling_factor = static_cast<float>(c_.routed_scaling_factor);
    g.logits = b_.router_logits;
    g.bias = w.router_bias;
    int32_t* topk_idx = b_.topk_idx + moe_ordinal_++ * T_ * k;
    g.topk_idx = topk_idx;
    g.topk_weight = b_.topk_weight;
    g.num_tokens = T_;
    if (m_.expert_parallel != nullptr) {
      // Each token's rows go to the ranks holding its experts and come back as its weighted sum:
      // one collective round of the world per MoE layer (engine/expert_parallel.hpp).
      if ((err = check(kcu::moe_gate_run(g, stream_), "gate"))) return err;
      ++m_.kernels->experts_parallel;
      const expert_parallel_weights local{w.experts_gate_up.data, w.experts_down.data};
      err = m_.expert_parallel->forward(b_.mlp_in, topk_idx, b_.topk_weight, T_, local, b_.ffn_out,
                                        stream_);
      m_.kernels->experts_parallel_chunks +=
          static_cast<uint64_t>(m_.expert_parallel->last_chunks());
      return err;
    }
    kcu::permute_plan_args plan;
    plan.topk_idx = topk_idx;
    plan.num_tokens = T_;
    plan.top_k = k;
    plan.num_experts = E;
    plan.expert_offsets = b_.expert_offsets;
    plan.positions = b_.expert_positions;
    plan.inverse = b_.expert_inverse;
    // The gate and the plan in one launch (the same outputs) for up to moe_gate_plan_max_entries
    // routed rows (a decode step, a short prefill), else apart.
    if (kcu::moe_gate_plan_can_run(g, plan) == kernel_status::ok) {
      if ((err = check(kcu::moe_gate_plan_run(g, plan, stream_), "gate + permute plan")))
        return err;
    } else if ((err = check(kcu::moe_gate_run(g, stream_), "gate")) ||
               (err = check(kcu::permute_plan_run(plan, stream_), "permute plan"))) {
      return err;
    }
    // cuBLAS's grouped GEMM needs the experts' row offsets on the host: a prefill copies them
    // and waits (a decode step may be replayed from a graph, which cannot).
    const bool blas =
        !s_.decode && m_.blas != nullptr && !w.experts_gate_up.fp8() && !w.experts_down.fp8();
    kcu::grouped_gemm_args gg;
    gg.x = b_.expert_rows;
    gg.expert_offsets = b_.expert_offsets;
    set_weights(gg, w.experts_gate_up);
    gg.y = b_.gate_up;
    gg.num_rows = rows;
    gg.num_experts = E;
    gg.n = 2 * I;
    gg.k = D;
    gg.dt = gg.y_dt = m_.dt;
    gg.wgmma = m_.wgmma_experts;
    // Our WMMA and CUDA-core kernels read each expert row's token from mlp_in through the plan
    // (grouped_gemm_args::x_entries: the same products, one launch and a copy of the routed
    // rows fewer); cuBLAS and the wgmma kernels read the rows permute_rows lays out.
    const bool gather = !blas && !kcu::grouped_gemm_uses_wgmma(gg);
    if (gather) {
      gg.x = b_.mlp_in;
      gg.x_entries = b_.expert_inverse;
      gg.entries_per_x_row = k;
      gg.num_x_rows = T_;
    } else {
      if (b_.expert_rows == nullptr)
        return check(kernel_status::unsupported_shape, "permute rows (no buffer for them)");
      kcu::permute_rows_args pr;
      pr.x = b_.mlp_in;
      pr.positions = b_.expert_positions;
      pr.permuted = b_.expert_rows;
      pr.num_tokens = T_;
      pr.top_k = k;
      pr.dim = D;
      pr.num_rows = rows;
      pr.dt = m_.dt;
      if ((err = check(kcu::permute_rows_run(pr, stream_), "permute rows"))) return err;
    }
    if (blas) {
      if ((err = runtime::copy_async(m_.host_offsets, b_.expert_offsets,
                                     static_cast<size_t>(E + 1) * sizeof(int32_t), stream_)) ||
          (err = runtime::cuda_error(cudaStreamSynchronize(stream_), "expert offsets to the host")))
        return err;
    }
    // On our bf16 kernels (WMMA, gathering or not, and wgmma) the gate|up product and SwiGLU
    // are one launch, the activation of the float32 products straight into act
    // (grouped_gemm_args::fuse_swiglu: no (rows, 2 I) intermediate, no second launch); on
    // cuBLAS (unless it refuses the problems) and in f32 the product, then swiglu.
    std::optional<caf::error> gate_up;
    if (blas) {
      gate_up = cublas_product(gg, 0, "experts gate|up");
      if (gate_up && !*gate_up) gate_up = swiglu(b_.gate_up, b_.act, rows, I, "experts swiglu");
    }
    if (!gate_up && m_.dt == dtype::bf16) {
      auto fused = gg;
      fused.y = b_.act;
      fused.fuse_swiglu = true;
      gate_up = grouped_run(fused, "experts gate|up + swiglu");
    }
    if (!gate_up) {
      if ((err = *grouped_run(gg, "experts gate|up"))) return err;
      gate_up = swiglu(b_.gate_up, b_.act, rows, I, "experts swiglu");
    }
    if (*gate_up) return *gate_up;
    gg.x = b_.act;  // grouped by expert already
    gg.x_entries = nullptr;
    set_weights(gg, w.experts_down);
    gg.y = b_.expert_out;
    gg.n = D;
    gg.k = I;
    if ((err = experts_product(gg, blas, 1, "experts down"))) return err;
    kcu::unpermute_args u;
    u.y = b_.expert_out;
    u.weight = b_.topk_weight;
    u.positions = b_.expert_positions;
    u.out = b_.ffn_out;
    u.num_tokens = T_;
    u.top_k = k;
    u.dim = D;
    u.num_rows = rows;
    u.dt = m_.dt;
    return check(kcu::unpermute_run(u, stream_), "combine");
  }

  /// The shared experts' gate|up product and SwiGLU into shared_act, queued on the side stream
  /// after what the step queued so far, while the routed experts run on the step's stream (a
  /// decode step's small kernels leave most of the card idle). moe() waits for shared_done
  /// before the down product adds into ffn_out: the same sum, in the same order, as without.
  /// Nothing they touch is touched by the routed path meanwhile: their own buffers, the side
  /// cuBLASLt workspace, and the FP8 scratch, which the routed path does not use.
  caf::error shared_experts_aside(const device_mlp& w) {
    if (auto err = runtime::cuda_error(cudaEventRecord(m_.shared_start, stream_),
                                       "cudaEventRecord (shared experts)"))
      return err;
    if (auto err = runtime::cuda_error(cudaStreamWaitEvent(m_.side_stream, m_.shared_start, 0),
                                       "cudaStreamWaitEvent (shared experts)"))
      return err;
    stream_ = m_.side_stream;
    workspace_ = m_.side_gemm_workspace;
    const int64_t I = w.intermediate;
    const caf::error err = gate_up_swiglu(b_.mlp_in, w.gate_up, b_.shared_gate_up, b_.shared_act,
                                          T_, I, "shared experts gate|up + swiglu");
    // Joined back even after an error, so that no work of the step is left unordered.
    const cudaError_t recorded = cudaEventRecord(m_.shared_done, stream_);
    stream_ = m_.stream;
    workspace_ = m_.gemm_workspace;
    if (err) return err;
    return runtime::cuda_error(recorded, "cudaEventRecord (shared experts done)");
  }

  caf::error ffn() {
    const device_layer& l = m_.weights->layer(layer_);
    if (l.dense) return mlp(*l.dense, b_.mlp_in, T_, b_.ffn_out, 0.0f);
    return moe(*l.moe);
  }

  /// Final norm (fusing the last FFN's residual add), the rows that get logits, the LM head
  /// in float32 output, and each row's greedy token.
  caf::error head() {
    const int64_t D = d_.D, V = d_.V, rows = s_.num_logit_rows;
    caf::error err;
    if ((err = c_.num_hidden_layers > 0
                   ? norm(b_.ffn_out, b_.x, m_.weights->final_norm(), b_.normed, T_, D,
                          "residual + final norm")
                   : norm(b_.x, nullptr, m_.weights->final_norm(), b_.normed, T_, D,
                          "final norm")))
      return err;
    const void* head_in = b_.normed;
    if (rows != T_) {  // each sequence's last token only
      kcu::gather_rows_args g;
      g.table = b_.normed;
      g.ids = b_.last_rows;
      g.out = b_.head_in;
      g.num_rows = T_;
      g.num_ids = rows;
      g.dim = D;
      g.dt = m_.dt;
      if ((err = check(kcu::gather_rows_run(g, stream_), "last rows"))) return err;
      head_in = b_.head_in;
    }
    if ((err = linear_as(m_.dt, dtype::f32, head_in, m_.weights->lm_head(), b_.logits, rows, D,
                         V, "lm head")))
      return err;
    kcu::sample_args sa;
    sa.logits = b_.logits;
    sa.params = b_.sampling;
    sa.tokens = b_.tokens;
    sa.rows = rows;
    sa.vocab = V;
    return check(kcu::sample_run(sa, stream_), "sampling");
  }

  const model_state& m_;
  const model::model_config& c_;
  const step_shape& s_;
  const step_buffers& b_;
  const dims d_;
  const int64_t T_;
  // Where kernels are queued now: the step's stream, or the side stream (and its cuBLASLt
  // workspace) while the shared experts overlap the routed ones.
  cudaStream_t stream_;
  void* workspace_;
  int64_t layer_ = -1;
  int64_t moe_ordinal_ = 0;  // MoE layers run so far: this one's slice of topk_idx
};

}  // namespace

void* model_state::cache_pool(int64_t layer) const noexcept {
  const size_t pool_elements = cache_layout.num_blocks * cache_layout.block_size *
                               (cache_layout.latent_dim + cache_layout.rope_dim);
  return static_cast<char*>(cache) +
         static_cast<size_t>(layer) * pool_elements * kernels::dtype_bytes(dt);
}

size_t carve_step_buffers(const model_state& m, const step_shape& s, char* base,
                          step_buffers& b) {
  const model::model_config& c = *m.config;
  const dims d(c);
  const size_t es = kernels::dtype_bytes(m.dt);
  const auto T = static_cast<size_t>(s.num_tokens), S = static_cast<size_t>(s.num_seqs);
  const auto rows = static_cast<size_t>(s.num_logit_rows);
  size_t used = 0;
  auto take = [&](auto*& p, size_t bytes) {
    using pointer = std::remove_reference_t<decltype(p)>;
    p = base ? reinterpret_cast<pointer>(base + used) : nullptr;
    used += (bytes + buffer_alignment - 1) / buffer_alignment * buffer_alignment;
  };
  b = step_buffers{};
  take(b.token_ids, T * sizeof(int32_t));
  take(b.positions, T * sizeof(int32_t));
  take(b.slots, T * sizeof(int64_t));
  if (s.decode) {
    take(b.block_table, S * static_cast<size_t>(s.max_blocks) * sizeof(int32_t));
    take(b.seq_lens, S * sizeof(int32_t));
  } else {
    take(b.cu_seqlens, (S + 1) * sizeof(int32_t));
    take(b.last_rows, S * sizeof(int32_t));
  }
  take(b.sampling, rows * sizeof(kcu::sample_row));
  b.metadata_bytes = used;

  const auto D = static_cast<size_t>(d.D), H = static_cast<size_t>(d.H);
  const auto R = static_cast<size_t>(d.R), k = static_cast<size_t>(d.top_k);
  // Block-scaled FP8 products write whole 32-row tiles: the buffers they write get Tp rows.
  const bool fp8_rows = m.fp8_block_scaled && m.weights->num_fp8_matrices() > 0;
  const size_t Tp = fp8_rows ? static_cast<size_t>(kcu::fp8_linear_rows(s.num_tokens)) : T;
  take(b.x, T * D * es);
  take(b.ffn_out, Tp * D * es);
  take(b.normed, T * D * es);
  take(b.mlp_in, T * D * es);
  int64_t widest_proj = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    widest_proj = std::max(widest_proj, m.weights->layer(l).attention.input_proj_rows);
  take(b.proj, Tp * static_cast<size_t>(widest_proj) * es);
  if (d.QR > 0) {
    take(b.q_a, Tp * static_cast<size_t>(d.QR) * es);
    take(b.q, Tp * H * static_cast<size_t>(d.qk) * es);
  }
  take(b.latent, T * R * es);
  take(b.attn, T * H * static_cast<size_t>(d.dv) * es);
  if (s.decode) {
    take(b.q_latent, T * H * R * es);
    take(b.out_latent, T * H * R * es);
    kcu::mla_decode_args shape;
    shape.layout = m.cache_layout;
    shape.max_blocks_per_seq = s.max_blocks;
    shape.batch = s.num_tokens;
    shape.num_heads = d.H;
    shape.max_seq_len = s.max_seq_len;
    shape.dt = m.dt;
    b.mla_workspace_bytes = kcu::mla_decode_workspace_bytes(shape);
    take(b.mla_workspace, b.mla_workspace_bytes);
  } else {
    take(b.kv, T * H * static_cast<size_t>(d.dn + d.dv) * es);
  }
  // The widest MLP's [gate | up] rows: a dense layer's, the shared experts' or the routed rows.
  size_t widest = Tp * static_cast<size_t>(c.intermediate_size);
  if (d.E > 0) {
    widest = std::max(widest, Tp * static_cast<size_t>(c.shared_intermediate_size()));
    if (m.dt != kernels::dtype::f32) take(b.mlp_in_f32, T * D * sizeof(float));
    take(b.router_logits, T * static_cast<size_t>(d.E) * sizeof(float));
    take(b.topk_idx, static_cast<size_t>(s.num_moe_layers) * T * k * sizeof(int32_t));
    take(b.topk_weight, T * k * sizeof(float));
  }
  // The routed rows' buffers, unless expert_parallel_moe runs them in its own.
  if (d.E > 0 && m.expert_parallel == nullptr) {
    widest = std::max(widest, T * k * static_cast<size_t>(c.moe_intermediate_size));
    take(b.expert_offsets, (static_cast<size_t>(d.E) + 1) * sizeof(int32_t));
    take(b.expert_positions, T * k * sizeof(int32_t));
    take(b.expert_inverse, T * k * sizeof(int32_t));
    // Only cuBLAS's grouped GEMM and the wgmma kernels (prefill) read a permuted copy.
    if (!s.decode && (m.blas != nullptr || m.wgmma_experts)) take(b.expert_rows, T * k * D * es);
    take(b.expert_out, T * k * D * es);
  }
  take(b.gate_up, 2 * widest * es);
  take(b.act, widest * es);
  if (s.decode && d.E > 0 && c.n_shared_experts > 0 && m.side_stream != nullptr) {
    const size_t shared = Tp * static_cast<size_t>(c.shared_intermediate_size());
    take(b.shared_gate_up, 2 * shared * es);
    take(b.shared_act, shared * es);
  }
  if (fp8_rows) {
    // The widest input of a projection: hidden, q_lora_rank, H * dv or an MLP's intermediate.
    const size_t widest_in = std::max(
        {D, static_cast<size_t>(d.QR), H * static_cast<size_t>(d.dv),
         static_cast<size_t>(c.intermediate_size),
         d.E > 0 ? static_cast<size_t>(c.shared_intermediate_size()) : size_t{0}});
    take(b.fp8_x, Tp * widest_in);
    take(b.fp8_x_scale, (widest_in + 127) / 128 * Tp * sizeof(float));
    take(b.fp8_y, Tp * D * es);
  }
  if (rows != T) take(b.head_in, rows * D * es);
  take(b.logits, rows * static_cast<size_t>(d.V) * sizeof(float));
  take(b.tokens, rows * sizeof(int32_t));
  return used;
}

caf::error run_forward(const model_state& m, const step_shape& shape, const step_buffers& b) {
  return forward(m, shape, b).run();
}

step_results_layout results_layout(const model_state& m, const step_shape& shape,
                                   bool return_logits, bool capture_routing) {
  const model::model_config& c = *m.config;
  step_results_layout r;
  r.rows = shape.num_logit_rows;
  const auto rows = static_cast<size_t>(shape.num_logit_rows);
  r.logits_bytes = return_logits ? rows * static_cast<size_t>(c.vocab_size) * sizeof(float) : 0;
  r.tokens_bytes = rows * sizeof(int32_t);
  r.routing_per_layer = static_cast<size_t>(shape.num_tokens * c.num_experts_per_tok);
  r.routing_bytes = capture_routing ? static_cast<size_t>(shape.num_moe_layers) *
                                          r.routing_per_layer * sizeof(int32_t)
                                    : 0;
  return r;
}

caf::error enqueue_step(const model_state& m, const step_shape& shape, const step_buffers& b,
                        const step_results_layout& r, void* staging) {
  char* host = static_cast<char*>(staging);
  // token_ids is carved first: the metadata starts at the arena's base.
  if (auto err = runtime::copy_async(b.token_ids, host, b.metadata_bytes, m.stream)) return err;
  if (auto err = run_forward(m, shape, b)) return err;
  if (r.logits_bytes > 0)
    if (auto err = runtime::copy_async(host, b.logits, r.logits_bytes, m.stream)) return err;
  if (auto err = runtime::copy_async(host + r.logits_bytes, b.tokens, r.tokens_bytes, m.stream))
    return err;
  if (r.routing_bytes > 0)
    return runtime::copy_async(host + r.logits_bytes + r.tokens_bytes, b.topk_idx,
                               r.routing_bytes, m.stream);
  return {};
}

}  // namespace moe::engine::detail
