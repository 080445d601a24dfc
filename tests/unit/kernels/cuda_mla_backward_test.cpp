// MLA attention's backward on the GPU (kernels/cuda/backward.hpp's mla_prefill_backward) against
// the CPU training reference (cpu::mla_prefill_backward, itself checked against finite
// differences in mla_attention_test.cpp), and the log-sum-exp the GPU forward now writes for it
// (mla_prefill.hpp) against the CPU forward's. f32 and bf16 storage; several packed sequences,
// lengths that are not multiples of the 16-token tiles, empty sequences, no nope or no rope
// part, strided views as the training block makes them. Each GPU comparison skips, with the
// reason, without a GPU (CI runs them in the emulator); the can_run tests are host code.
//
// Both sides start from the same values: inputs rounded to the storage dtype first, the forward's
// out as the kernel reads it (rounded to bf16 for bf16) and lse rounded to float32 (the GPU's
// type), widened back for the reference. What differs is the arithmetic: float32 on the GPU,
// double on the CPU. Tolerances, per element:
//  - f32: |got - want| <= 1e-5 * m, m the sum of the magnitudes of what makes up the value, so
//    that cancellation does not shrink the bound to nothing. Each dS_ij = P_ij (dP_ij - D_i) is
//    off by P_ij times the rounding of dP_ij and D_i (float32 dot products over dv terms, up to
//    dv u sum|dout v| and dv u sum|dout out|, u = 2^-24) plus |dS_ij| times P_ij's relative error
//    (exp of a score off by up to (dn + dr) u scale sum|q k|, and expf's 2 ulp). So with
//      a_ij = P_ij (sum|dout_i v_j| + sum|dout_i out_i| + |dP_ij - D_i| (1 + scale sum|q_i k_j|))
//    m(dq_ic) = scale sum_j a_ij |k_jc|, m(dk_jc) = scale sum_i a_ij |q_ic| (dk_pe also over
//    heads), m(dv_jc) = sum_i P_ij (1 + scale sum|q_i k_j|) |dout_ic|. The sums over keys or
//    queries add at most 130 float32 terms here and the dot products dn + dr, dv <= 192: the
//    worst-case bounds (n u for n terms, compounded) reach ~2e-5, but rounding errors of random
//    sign add like a random walk, ~sqrt(192) u ~ 1e-6; 1e-5 is that with a margin of 10 for the
//    device's FMA
//    contraction and expf (the emulated runs stay within 1e-7 m). A dropped term (a key at the
//    causal edge, one head's dk_pe, the D shift) moves a value by about its own size, far past
//    this;
//  - bf16: the float32 result (within the f32 bound) is rounded once to bf16 (8 significant
//    bits): |got - want| <= 2^-8 |want| + 2e-5 m;
//  - lse (float32 in both dtypes): its scores are float32 sums of up to dn + dr products (the
//    tensor-core kernel's of bf16 products, exact in float32), each score off by at most
//    (dn + dr) u sum|q k| scale, which moves the log-sum-exp by no more than its largest score's
//    error, plus the float32 sum of the exponentials and logf (a few u relative of lse itself):
//    |got - want| <= 1e-5 (1 + |want| + scale max_j sum|q k_j|), the same margin as above.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/cpu/mla_attention.hpp"
#include "kernels/cuda/backward.hpp"
#include "kernels/cuda/mla_prefill.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using cpu::testing::random_floats;
using namespace cuda_testing;

constexpr double f32_rel = 1e-5;  // of the magnitude m: see the header

// Elements of `dt` as raw bits (float32 or bf16 widened to 32 bits), so poison can be compared.
std::vector<uint32_t> bits_from_device(const device_buffer& d, size_t n, dtype dt) {
  std::vector<uint32_t> b(n);
  if (dt == dtype::bf16) {
    const auto h = fetch<uint16_t>(d, n);
    for (size_t i = 0; i < h.size(); ++i) b[i] = h[i];
  } else {
    const auto f = fetch<float>(d, n);
    if (!f.empty()) std::memcpy(b.data(), f.data(), n * 4);
  }
  return b;
}

float value_of(uint32_t bits, dtype dt) {
  if (dt == dtype::bf16) return from_bf16(static_cast<uint16_t>(bits));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint32_t poison_bits(dtype dt) {
  return dt == dtype::bf16 ? 0xffffu : 0xffffffffu;
}

void poison(device_buffer& d) {
  ASSERT_EQ(cudaMemset(d.get(), 0xff, d.bytes()), cudaSuccess);
}

::testing::AssertionResult close(float got, double want, double m, dtype dt) {
  const double tol =
      (dt == dtype::bf16 ? std::ldexp(std::fabs(want), -8) + 2 * f32_rel * m : f32_rel * m) + 1e-30;
  if (std::fabs(double{got} - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << got << ", want " << want << " (tolerance " << tol << ")";
}

struct bwd_case {
  size_t num_heads, nope_dim, rope_dim, v_dim;
  std::vector<int32_t> lengths;
  int64_t max_seqlen_hint = 0;
  // The training block's views (q rows padded, k_nope | v and their gradients interleaved in
  // (T, H, dn + dv), k_pe and dk_pe inside wider rows), else every tensor packed.
  bool strided = true;
};

// Host copies of one case's tensors, in the storage dtype's values, and the reference's result.
struct bwd_data {
  size_t T = 0, H = 0, dn = 0, dr = 0, dv = 0;
  bool strided = false;
  size_t q_ts = 0, kv_ts = 0, kv_hs = 0, v_off = 0, kpe_off = 0, kpe_ts = 0;
  float scale = 0.0f;
  std::vector<int32_t> cu;
  std::vector<float> q, kv_nope, kv_v, kpe_rows, out, dout;  // kv_v = kv_nope when strided
  std::vector<float> lse;                                    // float32, what the GPU reads
  std::vector<float> want_dq, want_dkn, want_dkpe, want_dv;  // (T, H, ..) / (T, dr), packed
};

bwd_data make_data(const bwd_case& c, dtype dt, uint64_t seed) {
  bwd_data d;
  d.H = c.num_heads, d.dn = c.nope_dim, d.dr = c.rope_dim, d.dv = c.v_dim;
  d.strided = c.strided;
  const size_t H = d.H, dn = d.dn, dr = d.dr, dv = d.dv;
  d.cu = {0};
  for (int32_t len : c.lengths) d.cu.push_back(d.cu.back() + len);
  d.T = static_cast<size_t>(d.cu.back());
  const size_t T = d.T, rows = std::max<size_t>(T, 1);
  d.q_ts = H * (dn + dr) + (c.strided ? 2 : 0);
  d.kv_ts = c.strided ? H * (dn + dv) : H * dn;
  d.kv_hs = c.strided ? dn + dv : dn;
  d.v_off = c.strided ? dn : 0;
  d.kpe_off = c.strided ? 9 : 0;
  d.kpe_ts = d.kpe_off + dr;
  d.scale = 1.0f / std::sqrt(static_cast<float>(std::max<size_t>(dn + dr, 1)));
  d.q = stored(random_floats(rows * d.q_ts, seed, -2.0f, 2.0f), dt);
  d.kv_nope = stored(random_floats(rows * d.kv_ts, seed + 1), dt);
  d.kv_v = c.strided ? d.kv_nope : stored(random_floats(rows * H * dv, seed + 2), dt);
  d.kpe_rows = stored(random_floats(rows * d.kpe_ts, seed + 3), dt);
  d.dout = stored(random_floats(T * H * dv, seed + 4), dt);

  // The forward on the CPU; out and lse as the GPU would hold them.
  cpu::mla_prefill_args f;
  f.q = d.q.data();
  f.q_token_stride = d.q_ts;
  f.k_nope = d.kv_nope.data();
  f.k_nope_token_stride = d.kv_ts;
  f.k_nope_head_stride = d.kv_hs;
  f.k_pe = d.kpe_rows.data() + d.kpe_off;
  f.k_pe_token_stride = d.kpe_ts;
  f.v = d.kv_v.data() + d.v_off;
  f.v_token_stride = c.strided ? d.kv_ts : H * dv;
  f.v_head_stride = c.strided ? d.kv_hs : dv;
  f.num_heads = H;
  f.nope_dim = dn;
  f.rope_dim = dr;
  f.v_dim = dv;
  f.softmax_scale = d.scale;
  std::vector<float> out(T * H * dv);
  std::vector<double> lse(T * H);
  f.out = out.data();
  f.lse = lse.data();
  EXPECT_EQ(cpu::mla_prefill(f, d.cu.data(), nullptr, c.lengths.size()), kernel_status::ok);
  d.out = stored(out, dt);
  d.lse.assign(lse.begin(), lse.end());

  std::vector<double> lse_f(d.lse.begin(), d.lse.end());
  d.want_dq.assign(T * H * (dn + dr), 0.0f);
  d.want_dkn.assign(T * H * dn, 0.0f);
  d.want_dkpe.assign(T * dr, 0.0f);
  d.want_dv.assign(T * H * dv, 0.0f);
  cpu::mla_prefill_backward_args b;
  b.q = f.q;
  b.q_token_stride = f.q_token_stride;
  b.k_nope = f.k_nope;
  b.k_nope_token_stride = f.k_nope_token_stride;
  b.k_nope_head_stride = f.k_nope_head_stride;
  b.k_pe = f.k_pe;
  b.k_pe_token_stride = f.k_pe_token_stride;
  b.v = f.v;
  b.v_token_stride = f.v_token_stride;
  b.v_head_stride = f.v_head_stride;
  b.out = d.out.data();
  b.lse = lse_f.data();
  b.dout = d.dout.data();
  b.dq = d.want_dq.data();
  b.dk_nope = d.want_dkn.data();
  b.dk_pe = d.want_dkpe.data();
  b.dv = d.want_dv.data();
  b.num_heads = H;
  b.nope_dim = dn;
  b.rope_dim = dr;
  b.v_dim = dv;
  b.softmax_scale = d.scale;
  EXPECT_EQ(cpu::mla_prefill_backward(b, d.cu.data(), c.lengths.size()), kernel_status::ok);
  return d;
}

// The magnitudes m of the header, per element of dq, dk_nope, dk_pe, dv.
struct magnitudes {
  std::vector<double> dq, dkn, dkpe, dv;
};

magnitudes magnitudes_of(const bwd_data& d) {
  const size_t H = d.H, dn = d.dn, dr = d.dr, dv = d.dv, qk = dn + dr;
  magnitudes m;
  m.dq.assign(d.T * H * qk, 0.0);
  m.dkn.assign(d.T * H * dn, 0.0);
  m.dkpe.assign(d.T * dr, 0.0);
  m.dv.assign(d.T * H * dv, 0.0);
  const auto q = [&](size_t t, size_t h, size_t c) { return double{d.q[t * d.q_ts + h * qk + c]}; };
  const auto k = [&](size_t t, size_t h, size_t c) {
    return c < dn ? double{d.kv_nope[t * d.kv_ts + h * d.kv_hs + c]}
                  : double{d.kpe_rows[t * d.kpe_ts + d.kpe_off + c - dn]};
  };
  const size_t v_ts = d.strided ? d.kv_ts : H * dv, v_hs = d.strided ? d.kv_hs : dv;
  const auto v = [&](size_t t, size_t h, size_t c) {
    return double{d.kv_v[t * v_ts + h * v_hs + d.v_off + c]};
  };
  for (size_t s = 0; s + 1 < d.cu.size(); ++s) {
    const auto begin = static_cast<size_t>(d.cu[s]), end = static_cast<size_t>(d.cu[s + 1]);
    for (size_t i = begin; i < end; ++i) {
      for (size_t h = 0; h < H; ++h) {
        const float* g = &d.dout[(i * H + h) * dv];
        double abs_delta = 0.0, delta = 0.0;
        for (size_t c = 0; c < dv; ++c) {
          abs_delta += std::fabs(double{g[c]} * d.out[(i * H + h) * dv + c]);
          delta += double{g[c]} * d.out[(i * H + h) * dv + c];
        }
        for (size_t j = begin; j <= i; ++j) {
          double s_ij = 0.0, abs_qk = 0.0, dp = 0.0, abs_dp = 0.0;
          for (size_t c = 0; c < qk; ++c) {
            s_ij += q(i, h, c) * k(j, h, c);
            abs_qk += std::fabs(q(i, h, c) * k(j, h, c));
          }
          for (size_t c = 0; c < dv; ++c) {
            dp += g[c] * v(j, h, c);
            abs_dp += std::fabs(g[c] * v(j, h, c));
          }
          const double p = std::exp(s_ij * d.scale - d.lse[i * H + h]);
          const double p_err = 1.0 + d.scale * abs_qk;
          const double a = p * (abs_dp + abs_delta + std::fabs(dp - delta) * p_err);
          for (size_t c = 0; c < qk; ++c) {
            m.dq[(i * H + h) * qk + c] += d.scale * a * std::fabs(k(j, h, c));
            if (c < dn)
              m.dkn[(j * H + h) * dn + c] += d.scale * a * std::fabs(q(i, h, c));
            else
              m.dkpe[j * dr + c - dn] += d.scale * a * std::fabs(q(i, h, c));
          }
          for (size_t c = 0; c < dv; ++c) m.dv[(j * H + h) * dv + c] += p * p_err * std::fabs(g[c]);
        }
      }
    }
  }
  return m;
}

// Device copies of a case and the argument block pointing at them; outputs poisoned.
struct bwd_device {
  std::unique_ptr<device_buffer> q, kv_nope, kv_v, kpe_rows, out, dout, lse, cu;
  std::unique_ptr<device_buffer> dq, dkv, dkpe_rows, dv_packed, workspace;
  cuda::mla_prefill_backward_args a;
};

std::unique_ptr<bwd_device> upload_case(const bwd_case& c, const bwd_data& d, dtype dt) {
  auto g = std::make_unique<bwd_device>();
  const size_t H = d.H, dn = d.dn, dr = d.dr, dv = d.dv, es = dtype_bytes(dt);
  const size_t rows = std::max<size_t>(d.T, 1);
  g->q = to_device(d.q, dt);
  g->kv_nope = to_device(d.kv_nope, dt);
  g->kv_v = to_device(d.kv_v, dt);
  g->kpe_rows = to_device(d.kpe_rows, dt);
  g->out = to_device(d.out, dt);
  g->dout = to_device(d.dout, dt);
  g->lse = to_device(d.lse);
  g->cu = to_device(d.cu);
  // Strided: dk_nope | dv interleaved in one (T, H, dn + dv) buffer, dk_pe inside (T, 9 + dr)
  // rows; packed: (T, H, dn), (T, dr) and (T, H, dv).
  g->dq = std::make_unique<device_buffer>(rows * H * (dn + dr) * es + es);
  g->dkv = std::make_unique<device_buffer>(rows * (c.strided ? H * (dn + dv) : H * dn) * es + es);
  g->dkpe_rows = std::make_unique<device_buffer>(rows * d.kpe_ts * es + es);
  g->dv_packed = std::make_unique<device_buffer>(rows * H * dv * es + es);
  for (auto* b : {g->dq.get(), g->dkv.get(), g->dkpe_rows.get(), g->dv_packed.get()}) poison(*b);

  auto& a = g->a;
  a.q = g->q->get();
  a.q_token_stride = static_cast<int64_t>(c.strided ? d.q_ts : 0);
  a.k_nope = g->kv_nope->get();
  a.k_nope_token_stride = static_cast<int64_t>(c.strided ? d.kv_ts : 0);
  a.k_nope_head_stride = static_cast<int64_t>(c.strided ? d.kv_hs : 0);
  a.k_pe = static_cast<const char*>(g->kpe_rows->get()) + d.kpe_off * es;
  a.k_pe_token_stride = static_cast<int64_t>(c.strided ? d.kpe_ts : 0);
  a.v = static_cast<const char*>(g->kv_v->get()) + d.v_off * es;
  a.v_token_stride = static_cast<int64_t>(c.strided ? d.kv_ts : 0);
  a.v_head_stride = static_cast<int64_t>(c.strided ? d.kv_hs : 0);
  a.out = g->out->get();
  a.lse = g->lse->as<float>();
  a.dout = g->dout->get();
  a.dq = g->dq->get();
  a.dk_nope = g->dkv->get();
  a.dk_nope_token_stride = static_cast<int64_t>(c.strided ? H * (dn + dv) : 0);
  a.dk_nope_head_stride = static_cast<int64_t>(c.strided ? dn + dv : 0);
  a.dk_pe = static_cast<char*>(g->dkpe_rows->get()) + d.kpe_off * es;
  a.dk_pe_token_stride = static_cast<int64_t>(c.strided ? d.kpe_ts : 0);
  a.dv = c.strided ? static_cast<char*>(g->dkv->get()) + dn * es : g->dv_packed->get();
  a.dv_token_stride = static_cast<int64_t>(c.strided ? H * (dn + dv) : 0);
  a.dv_head_stride = static_cast<int64_t>(c.strided ? dn + dv : 0);
  a.cu_seqlens = g->cu->as<int32_t>();
  a.num_seqs = static_cast<int64_t>(c.lengths.size());
  a.num_tokens = static_cast<int64_t>(d.T);
  a.max_seqlen = c.max_seqlen_hint;
  a.num_heads = static_cast<int64_t>(H);
  a.nope_dim = static_cast<int64_t>(dn);
  a.rope_dim = static_cast<int64_t>(dr);
  a.v_dim = static_cast<int64_t>(dv);
  a.softmax_scale = d.scale;
  a.dt = dt;
  g->workspace = std::make_unique<device_buffer>(cuda::mla_prefill_backward_workspace_bytes(a));
  return g;
}

void check_backward(const bwd_case& c, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "H " << c.num_heads << " dn " << c.nope_dim << " dr " << c.rope_dim << " dv "
               << c.v_dim << " seqs " << c.lengths.size() << " hint " << c.max_seqlen_hint
               << (c.strided ? " strided " : " packed ") << to_string(dt));
  const bwd_data d = make_data(c, dt, seed);
  const magnitudes m = magnitudes_of(d);
  auto g = upload_case(c, d, dt);
  ASSERT_EQ(
      cuda::mla_prefill_backward_run(g->a, g->workspace->get(), g->workspace->bytes(), nullptr),
      kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const size_t H = d.H, dn = d.dn, dr = d.dr, dv = d.dv, T = d.T;
  const auto dq = bits_from_device(*g->dq, T * H * (dn + dr), dt);
  for (size_t i = 0; i < d.want_dq.size(); ++i)
    ASSERT_TRUE(close(value_of(dq[i], dt), d.want_dq[i], m.dq[i], dt))
        << "dq token " << i / (H * (dn + dr)) << " head " << i / (dn + dr) % H << " col "
        << i % (dn + dr);
  const size_t kv_w = c.strided ? dn + dv : dn;
  const auto dkv = bits_from_device(*g->dkv, T * H * kv_w, dt);
  for (size_t t = 0; t < T; ++t) {
    for (size_t h = 0; h < H; ++h) {
      for (size_t i = 0; i < dn; ++i) {
        const size_t w = (t * H + h) * dn + i;
        ASSERT_TRUE(close(value_of(dkv[(t * H + h) * kv_w + i], dt), d.want_dkn[w], m.dkn[w], dt))
            << "dk_nope token " << t << " head " << h << " col " << i;
      }
    }
  }
  const auto dv_bits = c.strided ? dkv : bits_from_device(*g->dv_packed, T * H * dv, dt);
  const size_t dv_w = c.strided ? dn + dv : dv, dv_off = c.strided ? dn : 0;
  for (size_t t = 0; t < T; ++t) {
    for (size_t h = 0; h < H; ++h) {
      for (size_t i = 0; i < dv; ++i) {
        const size_t w = (t * H + h) * dv + i;
        ASSERT_TRUE(close(value_of(dv_bits[(t * H + h) * dv_w + dv_off + i], dt), d.want_dv[w],
                          m.dv[w], dt))
            << "dv token " << t << " head " << h << " col " << i;
      }
    }
  }
  const auto dkpe = bits_from_device(*g->dkpe_rows, T * d.kpe_ts, dt);
  for (size_t t = 0; t < T; ++t) {
    for (size_t i = 0; i < d.kpe_ts; ++i) {
      const uint32_t got = dkpe[t * d.kpe_ts + i];
      if (i < d.kpe_off) {
        ASSERT_EQ(got, poison_bits(dt)) << "written before dk_pe in its row " << t;
        continue;
      }
      const size_t w = t * dr + i - d.kpe_off;
      ASSERT_TRUE(close(value_of(got, dt), d.want_dkpe[w], m.dkpe[w], dt))
          << "dk_pe token " << t << " col " << i - d.kpe_off;
    }
  }

  // The same bits on a second run: no reduction depends on timing.
  for (auto* b : {g->dq.get(), g->dkv.get(), g->dkpe_rows.get(), g->dv_packed.get()}) poison(*b);
  ASSERT_EQ(
      cuda::mla_prefill_backward_run(g->a, g->workspace->get(), g->workspace->bytes(), nullptr),
      kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(bits_from_device(*g->dq, T * H * (dn + dr), dt), dq);
  EXPECT_EQ(bits_from_device(*g->dkv, T * H * kv_w, dt), dkv);
  EXPECT_EQ(bits_from_device(*g->dkpe_rows, T * d.kpe_ts, dt), dkpe);
}

TEST(cuda_mla_prefill_backward, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  std::vector<bwd_case> cases = {
      // Odd widths, 3 heads: a one-token sequence, one a token past a tile, one past two.
      {3, 24, 8, 20, {1, 17, 35}},
      // No nope part, an empty sequence first; packed views.
      {2, 0, 16, 24, {0, 20}, 0, false},
      // No rope part (dk_pe has nothing to write).
      {2, 16, 0, 16, {19}},
      // The host's bound on lengths is short: blocks loop over the extra tiles.
      {2, 16, 8, 16, {40, 3}, 16},
      // DeepSeek-V3's widths: strided, then packed and longer than a few tiles.
      {4, 128, 64, 128, {1, 33, 70}},
      {2, 128, 64, 128, {130}, 0, false},
  };
  uint64_t seed = 500;
  for (const auto& c : cases)
    for (dtype dt : {dtype::f32, dtype::bf16}) check_backward(c, dt, seed++);
}

// The forward's log-sum-exp on both kernels (bf16 with DeepSeek's widths and aligned views is the
// tensor-core one) against the CPU forward's.
void check_forward_lse(size_t H, size_t dn, size_t dr, size_t dv, std::vector<int32_t> lengths,
                       dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "H " << H << " dn " << dn << " dr " << dr << " dv " << dv
                                    << " " << to_string(dt));
  std::vector<int32_t> cu{0};
  for (int32_t len : lengths) cu.push_back(cu.back() + len);
  const auto T = static_cast<size_t>(cu.back());
  const auto q = stored(random_floats(T * H * (dn + dr), seed, -2.0f, 2.0f), dt);
  const auto kn = stored(random_floats(T * H * dn, seed + 1), dt);
  const auto kp = stored(random_floats(T * dr, seed + 2), dt);
  const auto v = stored(random_floats(T * H * dv, seed + 3), dt);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dn + dr));
  std::vector<float> out(T * H * dv);
  std::vector<double> want(T * H);
  cpu::mla_prefill_args f;
  f.q = q.data();
  f.k_nope = kn.data();
  f.k_pe = kp.data();
  f.v = v.data();
  f.out = out.data();
  f.lse = want.data();
  f.num_heads = H;
  f.nope_dim = dn;
  f.rope_dim = dr;
  f.v_dim = dv;
  f.softmax_scale = scale;
  ASSERT_EQ(cpu::mla_prefill(f, cu.data(), nullptr, lengths.size()), kernel_status::ok);

  auto d_q = to_device(q, dt), d_kn = to_device(kn, dt), d_kp = to_device(kp, dt),
       d_v = to_device(v, dt), d_cu = to_device(cu);
  device_buffer d_out(T * H * dv * dtype_bytes(dt)), d_lse(T * H * 4);
  poison(d_lse);
  cuda::mla_prefill_args a;
  a.q = d_q->get();
  a.k_nope = d_kn->get();
  a.k_pe = d_kp->get();
  a.v = d_v->get();
  a.out = d_out.get();
  a.lse = d_lse.as<float>();
  a.cu_seqlens_q = d_cu->as<int32_t>();
  a.num_seqs = static_cast<int64_t>(lengths.size());
  a.num_q_tokens = static_cast<int64_t>(T);
  a.num_heads = static_cast<int64_t>(H);
  a.nope_dim = static_cast<int64_t>(dn);
  a.rope_dim = static_cast<int64_t>(dr);
  a.v_dim = static_cast<int64_t>(dv);
  a.softmax_scale = scale;
  a.dt = dt;
  ASSERT_EQ(cuda::mla_prefill_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<float>(d_lse, T * H);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (auto t = static_cast<size_t>(cu[s]); t < static_cast<size_t>(cu[s + 1]); ++t) {
      for (size_t h = 0; h < H; ++h) {
        double max_abs_score = 0.0;
        for (auto j = static_cast<size_t>(cu[s]); j <= t; ++j) {
          double abs_qk = 0.0;
          for (size_t c = 0; c < dn + dr; ++c)
            abs_qk += std::fabs(double{q[(t * H + h) * (dn + dr) + c]} *
                                (c < dn ? kn[(j * H + h) * dn + c] : kp[j * dr + c - dn]));
          max_abs_score = std::max(max_abs_score, abs_qk * scale);
        }
        const double w = want[t * H + h];
        EXPECT_LE(std::fabs(double{got[t * H + h]} - w),
                  f32_rel * (1.0 + std::fabs(w) + max_abs_score))
            << "token " << t << " head " << h << ": got " << got[t * H + h] << ", want " << w;
      }
    }
  }
}

TEST(cuda_mla_prefill, writes_the_log_sum_exp_backward_needs) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  check_forward_lse(3, 24, 8, 20, {1, 17, 35}, dtype::f32, 600);  // CUDA cores
  check_forward_lse(3, 24, 8, 20, {1, 17, 35}, dtype::bf16, 601);
  // Packed DeepSeek widths in bf16: the tensor-core kernel (16-byte aligned rows).
  check_forward_lse(2, 128, 64, 128, {70, 5}, dtype::bf16, 602);
}

// A sequence whose offsets break the caller's guarantee (past num_tokens) is skipped on the
// device: its rows keep their poison, every other sequence is still right.
TEST(cuda_mla_prefill_backward, bad_offsets_skip_only_their_sequence) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const bwd_case c{2, 8, 4, 8, {6, 5}, 0, false};
  const bwd_data d = make_data(c, dtype::f32, 700);
  const magnitudes m = magnitudes_of(d);
  auto g = upload_case(c, d, dtype::f32);
  const std::vector<int32_t> bad_cu = {0, 6, 100};  // sequence 1 ends past the 11 tokens
  ASSERT_TRUE(upload(*g->cu, bad_cu));
  ASSERT_EQ(
      cuda::mla_prefill_backward_run(g->a, g->workspace->get(), g->workspace->bytes(), nullptr),
      kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const size_t H = 2, qk = 12;
  const auto dq = bits_from_device(*g->dq, 11 * H * qk, dtype::f32);
  const auto dkpe = bits_from_device(*g->dkpe_rows, 11 * 4, dtype::f32);
  const auto dv = bits_from_device(*g->dv_packed, 11 * H * 8, dtype::f32);
  for (size_t i = 0; i < dq.size(); ++i) {
    if (i < 6 * H * qk)
      ASSERT_TRUE(close(value_of(dq[i], dtype::f32), d.want_dq[i], m.dq[i], dtype::f32)) << i;
    else
      ASSERT_EQ(dq[i], poison_bits(dtype::f32)) << i;
  }
  for (size_t i = 0; i < dkpe.size(); ++i) {
    if (i < 6 * 4)
      ASSERT_TRUE(close(value_of(dkpe[i], dtype::f32), d.want_dkpe[i], m.dkpe[i], dtype::f32)) << i;
    else
      ASSERT_EQ(dkpe[i], poison_bits(dtype::f32)) << i;
  }
  for (size_t i = 6 * H * 8; i < dv.size(); ++i) ASSERT_EQ(dv[i], poison_bits(dtype::f32)) << i;
}

TEST(cuda_mla_prefill_backward, can_run_rejects_bad_arguments) {
  cuda::mla_prefill_backward_args a;
  a.q = fake_ptr();
  a.k_nope = fake_ptr();
  a.k_pe = fake_ptr();
  a.v = fake_ptr();
  a.out = fake_ptr();
  a.lse = fake<float>();
  a.dout = fake_ptr();
  a.dq = fake_ptr();
  a.cu_seqlens = fake<int32_t>();
  a.num_seqs = 2;
  a.num_tokens = 100;
  a.num_heads = 16;
  a.nope_dim = 128;
  a.rope_dim = 64;
  a.v_dim = 128;
  a.softmax_scale = 0.1f;
  EXPECT_EQ(cuda::mla_prefill_backward_can_run(a), kernel_status::ok);
  // D only, without dk_pe: T * H floats.
  EXPECT_EQ(cuda::mla_prefill_backward_workspace_bytes(a), size_t{6400});
  auto with_pe = a;
  with_pe.dk_pe = fake_ptr();
  EXPECT_EQ(cuda::mla_prefill_backward_workspace_bytes(with_pe), size_t{6400 + 409600});

  auto b = a;
  b.dt = dtype::f8_e4m3;
  EXPECT_EQ(cuda::mla_prefill_backward_can_run(b), kernel_status::unsupported_dtype);
  EXPECT_EQ(cuda::mla_prefill_backward_run(b, fake_ptr(), 1 << 20, nullptr),
            kernel_status::unsupported_dtype);

  const auto refused = [](const cuda::mla_prefill_backward_args& x) {
    return cuda::mla_prefill_backward_can_run(x) == kernel_status::unsupported_shape &&
           cuda::mla_prefill_backward_run(x, fake_ptr(), 1 << 20, nullptr) ==
               kernel_status::unsupported_shape;
  };
  b = a;
  b.num_heads = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_heads = 65536;
  EXPECT_TRUE(refused(b));
  b = a;
  b.v_dim = 513;
  EXPECT_TRUE(refused(b));
  b = a;
  b.rope_dim = 576 - 128 + 1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_tokens = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_tokens = int64_t{INT32_MAX} + 1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.dv_head_stride = -4;
  EXPECT_TRUE(refused(b));
  b = a;
  b.softmax_scale = nan_f;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_seqs = INT32_MAX;  // INT32_MAX sequences of 7 tiles: too many blocks
  EXPECT_TRUE(refused(b));
  for (auto field :
       {&cuda::mla_prefill_backward_args::q, &cuda::mla_prefill_backward_args::k_nope,
        &cuda::mla_prefill_backward_args::k_pe, &cuda::mla_prefill_backward_args::v,
        &cuda::mla_prefill_backward_args::out, &cuda::mla_prefill_backward_args::dout}) {
    b = a;
    b.*field = nullptr;
    EXPECT_TRUE(refused(b));
  }
  b = a;
  b.lse = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.cu_seqlens = nullptr;
  EXPECT_TRUE(refused(b));
  // A missing or short workspace.
  EXPECT_EQ(cuda::mla_prefill_backward_run(a, nullptr, 0, nullptr),
            kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::mla_prefill_backward_run(a, fake_ptr(), 6399, nullptr),
            kernel_status::unsupported_shape);

  // Nothing to compute: no sequences, no tokens, or no output asked for.
  b = a;
  b.k_nope = nullptr;
  b.nope_dim = 0;
  EXPECT_EQ(cuda::mla_prefill_backward_can_run(b), kernel_status::ok);
  cuda::mla_prefill_backward_args empty;
  empty.num_heads = 1;
  empty.v_dim = 1;
  EXPECT_EQ(cuda::mla_prefill_backward_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::mla_prefill_backward_workspace_bytes(empty), size_t{0});
  EXPECT_EQ(cuda::mla_prefill_backward_run(empty, nullptr, 0, nullptr), kernel_status::ok);
  b = a;
  b.dq = nullptr;
  EXPECT_EQ(cuda::mla_prefill_backward_workspace_bytes(b), size_t{0});
  EXPECT_EQ(cuda::mla_prefill_backward_run(b, nullptr, 0, nullptr), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels
