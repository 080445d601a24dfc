#include "kernels/cpu/mla_attention.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

struct mla_shape {
  size_t H, dn, dr, dv, R;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(dn + dr)); }
};

// Small, but with every width different so a swapped slice or stride cannot pass.
constexpr mla_shape small{3, 6, 4, 5, 7};
constexpr size_t H = small.H, dn = small.dn, dr = small.dr, dv = small.dv, R = small.R;
const float scale = small.scale();
// DeepSeek-V3's widths (with fewer heads), which fill the kernels' accumulators.
constexpr mla_shape deepseek_v3{2, 128, 64, 128, 512};

// Attention in double, straight from the definition (reference.py's einsum/tril/softmax):
// query i of a sequence (Lq queries after a prefix of Lk - Lq keys) sees keys [0, Lk - Lq + i].
// q: (Tq, H, dn + dr) packed; kv: (Tk, H, dn + dv) packed; k_pe: (Tk, dr) packed.
std::vector<double> reference_prefill(const mla_shape& m, const std::vector<float>& q,
                                      const std::vector<float>& kv,
                                      const std::vector<float>& k_pe,
                                      const std::vector<int64_t>& cu_q,
                                      const std::vector<int64_t>& cu_k) {
  const size_t H = m.H, dn = m.dn, dr = m.dr, dv = m.dv;
  const float scale = m.scale();
  std::vector<double> out(static_cast<size_t>(cu_q.back()) * H * dv, 0.0);
  for (size_t s = 0; s + 1 < cu_q.size(); ++s) {
    const auto q0 = static_cast<size_t>(cu_q[s]), k0 = static_cast<size_t>(cu_k[s]);
    const auto lq = static_cast<size_t>(cu_q[s + 1] - cu_q[s]);
    const auto lk = static_cast<size_t>(cu_k[s + 1] - cu_k[s]);
    for (size_t i = 0; i < lq; ++i) {
      for (size_t h = 0; h < H; ++h) {
        const float* qv = &q[((q0 + i) * H + h) * (dn + dr)];
        std::vector<double> scores;
        for (size_t j = 0; j <= lk - lq + i; ++j) {
          const float* kn = &kv[((k0 + j) * H + h) * (dn + dv)];
          double sc = 0.0;
          for (size_t d = 0; d < dn; ++d) sc += double{qv[d]} * kn[d];
          for (size_t d = 0; d < dr; ++d) sc += double{qv[dn + d]} * k_pe[(k0 + j) * dr + d];
          scores.push_back(sc * scale);
        }
        const double mx = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (auto& sc : scores) sum += (sc = std::exp(sc - mx));
        for (size_t j = 0; j < scores.size(); ++j)
          for (size_t d = 0; d < dv; ++d)
            out[((q0 + i) * H + h) * dv + d] +=
                scores[j] / sum * kv[((k0 + j) * H + h) * (dn + dv) + dn + d];
      }
    }
  }
  return out;
}

// k_nope and v read straight out of kv_b_proj's output (T, H, dn + dv), as the block does.
mla_prefill_args prefill_args(const mla_shape& m, const std::vector<float>& q,
                              const std::vector<float>& kv, const std::vector<float>& k_pe,
                              std::vector<float>& out) {
  const size_t H = m.H, dn = m.dn, dr = m.dr, dv = m.dv;
  mla_prefill_args a;
  a.q = q.data();
  a.k_nope = kv.data();
  a.k_nope_token_stride = H * (dn + dv);
  a.k_nope_head_stride = dn + dv;
  a.v = kv.data() + dn;
  a.v_token_stride = H * (dn + dv);
  a.v_head_stride = dn + dv;
  a.k_pe = k_pe.data();
  a.out = out.data();
  a.num_heads = H;
  a.nope_dim = dn;
  a.rope_dim = dr;
  a.v_dim = dv;
  a.softmax_scale = m.scale();
  return a;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "at " << i;
}

TEST(mla_prefill, packed_sequences_match_reference) {
  const std::vector<int64_t> cu{0, 1, 6, 14};
  const size_t T = 14;
  auto q = random_floats(T * H * (dn + dr), 1);
  auto kv = random_floats(T * H * (dn + dv), 2);
  auto k_pe = random_floats(T * dr, 3);
  const auto want = reference_prefill(small, q, kv, k_pe, cu, cu);

  std::vector<float> out(T * H * dv, -1.0f);
  const auto a = prefill_args(small, q, kv, k_pe, out);
  ASSERT_EQ(mla_prefill(a, cu.data(), nullptr, 3), kernel_status::ok);
  expect_close(out, want, 1e-6);

  const std::vector<int32_t> cu32(cu.begin(), cu.end());
  std::vector<float> out32(T * H * dv, -1.0f);
  ASSERT_EQ(mla_prefill(prefill_args(small, q, kv, k_pe, out32), cu32.data(), cu32.data(), 3),
            kernel_status::ok);
  EXPECT_EQ(out32, out);

  // The first token of a sequence sees only itself: its output is its own value.
  for (size_t h = 0; h < H; ++h)
    for (size_t d = 0; d < dv; ++d)
      EXPECT_NEAR(out[(1 * H + h) * dv + d], kv[(1 * H + h) * (dn + dv) + dn + d], 1e-6);
}

TEST(mla_prefill, cached_prefix_gives_the_last_rows_of_the_full_prefill) {
  const size_t T = 9, prefix = 6;
  auto q = random_floats(T * H * (dn + dr), 4);
  auto kv = random_floats(T * H * (dn + dv), 5);
  auto k_pe = random_floats(T * dr, 6);
  std::vector<float> full(T * H * dv);
  const int32_t cu_full[] = {0, static_cast<int32_t>(T)};
  ASSERT_EQ(mla_prefill(prefill_args(small, q, kv, k_pe, full), cu_full, nullptr, 1), kernel_status::ok);

  // Only the last T - prefix queries, against all T keys.
  std::vector<float> tail_q(q.begin() + prefix * H * (dn + dr), q.end());
  std::vector<float> tail(((T - prefix) * H * dv));
  const int32_t cu_q[] = {0, static_cast<int32_t>(T - prefix)};
  ASSERT_EQ(mla_prefill(prefill_args(small, tail_q, kv, k_pe, tail), cu_q, cu_full, 1),
            kernel_status::ok);
  for (size_t i = 0; i < tail.size(); ++i) EXPECT_EQ(tail[i], full[prefix * H * dv + i]);
}

TEST(mla_prefill, bad_arguments_are_refused_and_out_is_untouched) {
  const size_t T = 4;
  auto q = random_floats(T * H * (dn + dr), 7);
  auto kv = random_floats(T * H * (dn + dv), 8);
  auto k_pe = random_floats(T * dr, 9);
  std::vector<float> out(T * H * dv, 5.0f);
  const auto a = prefill_args(small, q, kv, k_pe, out);

  const int32_t decreasing[] = {0, 3, 2};
  EXPECT_EQ(mla_prefill(a, decreasing, nullptr, 2), kernel_status::unsupported_shape);
  const int32_t not_from_zero[] = {1, 4};
  EXPECT_EQ(mla_prefill(a, not_from_zero, nullptr, 1), kernel_status::unsupported_shape);
  const int32_t cu_q[] = {0, 4}, short_k[] = {0, 3};  // fewer keys than queries
  EXPECT_EQ(mla_prefill(a, cu_q, short_k, 1), kernel_status::unsupported_shape);
  auto bad = a;
  bad.v_dim = 0;
  EXPECT_EQ(mla_prefill(bad, cu_q, nullptr, 1), kernel_status::unsupported_shape);
  bad = a;
  bad.nope_dim = mla_max_dim + 1;
  EXPECT_EQ(mla_prefill(bad, cu_q, nullptr, 1), kernel_status::unsupported_shape);
  bad = a;
  bad.k_pe = nullptr;
  EXPECT_EQ(mla_prefill(bad, cu_q, nullptr, 1), kernel_status::unsupported_shape);
  bad = a;
  bad.softmax_scale = INFINITY;
  EXPECT_EQ(mla_prefill(bad, cu_q, nullptr, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(out, std::vector<float>(T * H * dv, 5.0f));

  EXPECT_EQ(mla_prefill(a, cu_q, nullptr, 0), kernel_status::ok);  // nothing to do
}

TEST(mla_prefill, lse_is_each_rows_log_sum_exp) {
  const std::vector<int64_t> cu{0, 1, 6, 14};
  const size_t T = 14;
  auto q = random_floats(T * H * (dn + dr), 21);
  auto kv = random_floats(T * H * (dn + dv), 22);
  auto k_pe = random_floats(T * dr, 23);
  std::vector<float> out(T * H * dv);
  std::vector<double> lse(T * H, 7.0);
  auto a = prefill_args(small, q, kv, k_pe, out);
  a.lse = lse.data();
  ASSERT_EQ(mla_prefill(a, cu.data(), nullptr, 3), kernel_status::ok);
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    for (auto t = static_cast<size_t>(cu[s]); t < static_cast<size_t>(cu[s + 1]); ++t) {
      for (size_t h = 0; h < H; ++h) {
        double sum = 0.0;  // unshifted: the scores here are small
        for (auto k = static_cast<size_t>(cu[s]); k <= t; ++k) {
          double sc = 0.0;
          for (size_t d = 0; d < dn; ++d)
            sc += double{q[(t * H + h) * (dn + dr) + d]} * kv[(k * H + h) * (dn + dv) + d];
          for (size_t d = 0; d < dr; ++d)
            sc += double{q[(t * H + h) * (dn + dr) + dn + d]} * k_pe[k * dr + d];
          sum += std::exp(sc * scale);
        }
        EXPECT_NEAR(lse[t * H + h], std::log(sum), 1e-12) << "token " << t << " head " << h;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// mla_prefill_backward: against central differences of the forward's definition
// (reference_prefill, in double), over L = sum(dout * out) for a random dout.

// The backward's views laid out as the training block lays them out: k_nope and v read from,
// and their gradients written into, (T, H, dn + dv) buffers; k_pe and its gradient inside
// wider rows (offset 3, stride dr + 5), so a packed-stride slip shows.
constexpr size_t k_pe_offset = 3, k_pe_row = dr + 5;

struct backward_case {
  std::vector<float> q, kv, k_pe_rows, dout;  // inputs (k_pe inside its rows)
  std::vector<float> out;                     // the forward's
  std::vector<double> lse;
  std::vector<float> dq, dkv, dk_pe_rows;     // gradients

  explicit backward_case(size_t T, uint64_t seed)
      : q(random_floats(T * H * (dn + dr), seed)),
        kv(random_floats(T * H * (dn + dv), seed + 1)),
        k_pe_rows(random_floats(T * k_pe_row, seed + 2)),
        dout(random_floats(T * H * dv, seed + 3)),
        out(T * H * dv),
        lse(T * H),
        dq(T * H * (dn + dr), 9.0f),
        dkv(T * H * (dn + dv), 9.0f),
        dk_pe_rows(T * k_pe_row, 9.0f) {}

  std::vector<float> k_pe() const {  // packed (T, dr), for reference_prefill
    std::vector<float> v;
    for (size_t t = 0; t < k_pe_rows.size() / k_pe_row; ++t)
      for (size_t d = 0; d < dr; ++d) v.push_back(k_pe_rows[t * k_pe_row + k_pe_offset + d]);
    return v;
  }

  mla_prefill_backward_args args() {
    mla_prefill_backward_args a;
    a.q = q.data();
    a.k_nope = kv.data();
    a.k_nope_token_stride = H * (dn + dv);
    a.k_nope_head_stride = dn + dv;
    a.k_pe = k_pe_rows.data() + k_pe_offset;
    a.k_pe_token_stride = k_pe_row;
    a.v = kv.data() + dn;
    a.v_token_stride = H * (dn + dv);
    a.v_head_stride = dn + dv;
    a.out = out.data();
    a.lse = lse.data();
    a.dout = dout.data();
    a.dq = dq.data();
    a.dk_nope = dkv.data();
    a.dk_nope_token_stride = H * (dn + dv);
    a.dk_nope_head_stride = dn + dv;
    a.dk_pe = dk_pe_rows.data() + k_pe_offset;
    a.dk_pe_token_stride = k_pe_row;
    a.dv = dkv.data() + dn;
    a.dv_token_stride = H * (dn + dv);
    a.dv_head_stride = dn + dv;
    a.num_heads = H;
    a.nope_dim = dn;
    a.rope_dim = dr;
    a.v_dim = dv;
    a.softmax_scale = scale;
    return a;
  }

  void forward(const std::vector<int32_t>& cu) {
    auto a = prefill_args(small, q, kv, k_pe_rows, out);
    a.k_pe = k_pe_rows.data() + k_pe_offset;
    a.k_pe_token_stride = k_pe_row;
    a.lse = lse.data();
    ASSERT_EQ(mla_prefill(a, cu.data(), nullptr, cu.size() - 1), kernel_status::ok);
  }
};

// d/dx of sum(dout * reference_prefill(...)) for every element of x, x one of q, kv, k_pe.
// The reference is double, so the error is truncation alone, O(step^2) relative.
std::vector<double> numeric_gradient(std::vector<float>& x, const std::function<double()>& loss) {
  constexpr double step = 1e-3;
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    const auto hi = static_cast<float>(x0 + step), lo = static_cast<float>(x0 - step);
    x[i] = hi;
    const double f_hi = loss();
    x[i] = lo;
    const double f_lo = loss();
    x[i] = x0;
    g[i] = (f_hi - f_lo) / (double{hi} - double{lo});
  }
  return g;
}

double relative_error(const std::vector<float>& got, const std::vector<double>& want) {
  double diff = 0.0, ref = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    ref += want[i] * want[i];
  }
  return std::sqrt(diff / ref);
}

TEST(mla_prefill_backward, matches_finite_differences) {
  // Three packed sequences (one of a single token): dk_pe sums over heads and queries of its own
  // sequence only.
  const std::vector<int32_t> cu{0, 1, 6, 14};
  const std::vector<int64_t> cu64(cu.begin(), cu.end());
  const size_t T = 14;
  backward_case c(T, 31);
  c.forward(cu);
  ASSERT_EQ(mla_prefill_backward(c.args(), cu.data(), cu.size() - 1), kernel_status::ok);

  std::vector<float> k_pe = c.k_pe();
  const auto loss = [&] {
    const auto out = reference_prefill(small, c.q, c.kv, k_pe, cu64, cu64);
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * c.dout[i];
    return l;
  };
  const auto want_dq = numeric_gradient(c.q, loss);
  const auto want_dkv = numeric_gradient(c.kv, loss);
  const auto want_dk_pe = numeric_gradient(k_pe, loss);

  // Central differences with step 1e-3 leave a truncation error of order step^2 = 1e-6 times
  // the third derivative's size relative to the first (small here: |q|, |k| <= 1 and scale
  // ~0.3); the outputs' float rounding adds ~1e-7. Measured: 4e-8. A dropped term (the -D
  // shift, a head's share of dk_pe, the scale) is off by 10% or more.
  EXPECT_LT(relative_error(c.dq, want_dq), 1e-6);
  EXPECT_LT(relative_error(c.dkv, want_dkv), 1e-6);
  std::vector<float> got_dk_pe;
  for (size_t t = 0; t < T; ++t)
    for (size_t d = 0; d < dr; ++d) got_dk_pe.push_back(c.dk_pe_rows[t * k_pe_row + k_pe_offset + d]);
  EXPECT_LT(relative_error(got_dk_pe, want_dk_pe), 1e-6);
  // Around dk_pe inside its rows nothing was written.
  for (size_t t = 0; t < T; ++t)
    for (size_t i = 0; i < k_pe_row; ++i)
      if (i < k_pe_offset || i >= k_pe_offset + dr) {
        EXPECT_EQ(c.dk_pe_rows[t * k_pe_row + i], 9.0f);
      }
}

TEST(mla_prefill_backward, each_output_may_be_skipped) {
  const std::vector<int32_t> cu{0, 5, 9};
  backward_case all(9, 41);
  all.forward(cu);
  ASSERT_EQ(mla_prefill_backward(all.args(), cu.data(), 2), kernel_status::ok);

  backward_case only_dq(9, 41), only_dk(9, 41);
  only_dq.forward(cu);
  only_dk.forward(cu);
  auto a = only_dq.args();
  a.dk_nope = a.dk_pe = a.dv = nullptr;
  ASSERT_EQ(mla_prefill_backward(a, cu.data(), 2), kernel_status::ok);
  EXPECT_EQ(only_dq.dq, all.dq);
  EXPECT_EQ(only_dq.dkv, std::vector<float>(all.dkv.size(), 9.0f));
  EXPECT_EQ(only_dq.dk_pe_rows, std::vector<float>(all.dk_pe_rows.size(), 9.0f));

  a = only_dk.args();
  a.dq = nullptr;
  a.dv = nullptr;
  ASSERT_EQ(mla_prefill_backward(a, cu.data(), 2), kernel_status::ok);
  EXPECT_EQ(only_dk.dq, std::vector<float>(all.dq.size(), 9.0f));
  EXPECT_EQ(only_dk.dk_pe_rows, all.dk_pe_rows);
  for (size_t i = 0; i < all.dkv.size(); ++i)  // k_nope columns written, v columns untouched
    EXPECT_EQ(only_dk.dkv[i], i % (dn + dv) < dn ? all.dkv[i] : 9.0f) << i;
}

TEST(mla_prefill_backward, bad_arguments_are_refused_and_nothing_written) {
  const std::vector<int32_t> cu{0, 4};
  backward_case c(4, 51);
  c.forward(cu);
  const auto a = c.args();
  const int32_t decreasing[] = {0, 3, 2};
  EXPECT_EQ(mla_prefill_backward(a, decreasing, 2), kernel_status::unsupported_shape);
  const int32_t not_from_zero[] = {1, 4};
  EXPECT_EQ(mla_prefill_backward(a, not_from_zero, 1), kernel_status::unsupported_shape);
  EXPECT_EQ(mla_prefill_backward(a, nullptr, 1), kernel_status::unsupported_shape);
  auto bad = a;
  bad.num_heads = 0;
  EXPECT_EQ(mla_prefill_backward(bad, cu.data(), 1), kernel_status::unsupported_shape);
  bad = a;
  bad.v_dim = mla_max_dim + 1;
  EXPECT_EQ(mla_prefill_backward(bad, cu.data(), 1), kernel_status::unsupported_shape);
  for (auto field : {&mla_prefill_backward_args::q, &mla_prefill_backward_args::k_nope,
                     &mla_prefill_backward_args::k_pe, &mla_prefill_backward_args::v,
                     &mla_prefill_backward_args::out, &mla_prefill_backward_args::dout}) {
    bad = a;
    bad.*field = nullptr;
    EXPECT_EQ(mla_prefill_backward(bad, cu.data(), 1), kernel_status::unsupported_shape);
  }
  bad = a;
  bad.lse = nullptr;
  EXPECT_EQ(mla_prefill_backward(bad, cu.data(), 1), kernel_status::unsupported_shape);
  bad = a;
  bad.softmax_scale = NAN;
  EXPECT_EQ(mla_prefill_backward(bad, cu.data(), 1), kernel_status::unsupported_shape);
  EXPECT_EQ(c.dq, std::vector<float>(c.dq.size(), 9.0f));
  EXPECT_EQ(c.dkv, std::vector<float>(c.dkv.size(), 9.0f));
  EXPECT_EQ(c.dk_pe_rows, std::vector<float>(c.dk_pe_rows.size(), 9.0f));

  EXPECT_EQ(mla_prefill_backward(a, cu.data(), 0), kernel_status::ok);  // nothing to do
}

mla_cache_layout small_cache() {
  mla_cache_layout l;
  l.num_blocks = 8;
  l.block_size = 4;
  l.latent_dim = R;
  l.rope_dim = dr;
  return l;
}

TEST(mla_cache, append_then_gather_round_trips_through_scattered_blocks) {
  const auto layout = small_cache();
  std::vector<float> pool(layout.num_blocks * layout.block_size * (R + dr), 0.0f);
  const size_t n = 6;
  // Latent and k_pe read from inside kv_a_proj's output row (R + dr), as the block has them.
  auto ckv = random_floats(n * (R + dr), 10);
  const int32_t blocks[] = {5, 2};
  std::vector<int64_t> slots(n);
  for (size_t j = 0; j < n; ++j)
    slots[j] = blocks[j / layout.block_size] * 4 + static_cast<int64_t>(j % layout.block_size);
  ASSERT_EQ(mla_cache_append(layout, pool.data(), ckv.data(), R + dr, ckv.data() + R, R + dr,
                             slots.data(), n),
            kernel_status::ok);

  std::vector<float> latent(n * R), k_pe(n * dr);
  ASSERT_EQ(mla_cache_gather(layout, pool.data(), blocks, n, latent.data(), k_pe.data()),
            kernel_status::ok);
  for (size_t j = 0; j < n; ++j) {
    for (size_t i = 0; i < R; ++i) EXPECT_EQ(latent[j * R + i], ckv[j * (R + dr) + i]);
    for (size_t i = 0; i < dr; ++i) EXPECT_EQ(k_pe[j * dr + i], ckv[j * (R + dr) + R + i]);
  }
  // Token 0 sits at the start of block 5.
  EXPECT_EQ(pool[5 * 4 * (R + dr)], ckv[0]);
}

TEST(mla_cache, negative_slots_are_skipped_and_bad_slots_refused) {
  const auto layout = small_cache();
  std::vector<float> pool(layout.num_blocks * layout.block_size * (R + dr), 0.0f);
  auto latent = random_floats(2 * R, 11);
  auto k_pe = random_floats(2 * dr, 12);
  const int64_t padded[] = {-1, 3};
  ASSERT_EQ(mla_cache_append(layout, pool.data(), latent.data(), 0, k_pe.data(), 0, padded, 2),
            kernel_status::ok);
  EXPECT_EQ(pool[0], 0.0f);
  EXPECT_EQ(pool[3 * (R + dr)], latent[R]);  // the second token's latent

  const auto before = pool;
  const int64_t out_of_range[] = {0, 32};  // 8 blocks * 4 slots
  EXPECT_EQ(mla_cache_append(layout, pool.data(), latent.data(), 0, k_pe.data(), 0, out_of_range,
                             2),
            kernel_status::unsupported_shape);
  EXPECT_EQ(pool, before);  // the valid first token was not written either
  const int32_t bad_block[] = {8};
  std::vector<float> l(R), p(dr);
  EXPECT_EQ(mla_cache_gather(layout, pool.data(), bad_block, 1, l.data(), p.data()),
            kernel_status::unsupported_shape);
  auto bad_layout = layout;
  bad_layout.block_size = 0;
  EXPECT_EQ(mla_cache_append(bad_layout, pool.data(), latent.data(), 0, k_pe.data(), 0, padded,
                             2),
            kernel_status::unsupported_shape);
}

TEST(mla_absorb, q_uses_the_key_rows_of_each_head) {
  const size_t T = 2;
  auto q = random_floats(T * H * (dn + dr), 13);
  auto w = random_floats(H * (dn + dv) * R, 14);
  std::vector<float> q_latent(T * H * R);
  const mla_absorb_dims d{H, dn, dv, R};
  ASSERT_EQ(mla_absorb_q(d, q.data(), H * (dn + dr), dn + dr, w.data(), q_latent.data(), T),
            kernel_status::ok);
  for (size_t t = 0; t < T; ++t)
    for (size_t h = 0; h < H; ++h)
      for (size_t r = 0; r < R; ++r) {
        double s = 0.0;
        for (size_t i = 0; i < dn; ++i)
          s += double{q[(t * H + h) * (dn + dr) + i]} * w[(h * (dn + dv) + i) * R + r];
        EXPECT_NEAR(q_latent[(t * H + h) * R + r], s, 1e-5);
      }
}

TEST(mla_absorb, out_uses_the_value_rows_of_each_head) {
  const size_t T = 2;
  auto lat = random_floats(T * H * R, 15);
  auto w = random_floats(H * (dn + dv) * R, 16);
  std::vector<float> out(T * H * dv);
  const mla_absorb_dims d{H, dn, dv, R};
  ASSERT_EQ(mla_absorb_out(d, lat.data(), w.data(), out.data(), T), kernel_status::ok);
  for (size_t t = 0; t < T; ++t)
    for (size_t h = 0; h < H; ++h)
      for (size_t j = 0; j < dv; ++j) {
        double s = 0.0;
        for (size_t r = 0; r < R; ++r)
          s += double{lat[(t * H + h) * R + r]} * w[(h * (dn + dv) + dn + j) * R + r];
        EXPECT_NEAR(out[(t * H + h) * dv + j], s, 1e-5);
      }
}

// The key property: attention over the compressed, paged cache with kv_b_proj absorbed into the
// query and the output equals ordinary attention over the decompressed keys and values.
// table: (lens.size(), max_blocks) block ids; entries past a sequence's need may hold garbage.
void expect_absorbed_decode_equals_prefill(const mla_shape& m, const std::vector<int64_t>& lens,
                                           const mla_cache_layout& layout,
                                           const std::vector<int32_t>& table, uint64_t seed) {
  const size_t H = m.H, dn = m.dn, dr = m.dr, dv = m.dv, R = m.R;
  const size_t B = lens.size(), max_blocks = table.size() / B, bs = layout.block_size;
  std::vector<int64_t> cu{0};
  for (auto l : lens) cu.push_back(cu.back() + l);
  const auto T = static_cast<size_t>(cu.back());

  auto latent = random_floats(T * R, seed);  // normed latent c, as the cache stores it
  auto k_pe = random_floats(T * dr, seed + 1);
  const float w_range = 1.5f / std::sqrt(static_cast<float>(R));  // keeps the scores O(1)
  auto w = random_floats(H * (dn + dv) * R, seed + 2, -w_range, w_range);  // kv_b_proj
  auto q = random_floats(T * H * (dn + dr), seed + 3);

  // Decompress: kv = latent . w^T, (T, H*(dn+dv)).
  std::vector<float> kv(T * H * (dn + dv));
  for (size_t t = 0; t < T; ++t)
    for (size_t o = 0; o < H * (dn + dv); ++o) {
      double s = 0.0;
      for (size_t r = 0; r < R; ++r) s += double{latent[t * R + r]} * w[o * R + r];
      kv[t * H * (dn + dv) + o] = static_cast<float>(s);
    }
  std::vector<float> prefill_out(T * H * dv);
  ASSERT_EQ(mla_prefill(prefill_args(m, q, kv, k_pe, prefill_out), cu.data(), nullptr, B),
            kernel_status::ok);

  // Fill the paged cache.
  std::vector<float> pool(layout.num_blocks * bs * (R + dr), 0.0f);
  std::vector<int64_t> slots;
  for (size_t b = 0; b < B; ++b)
    for (size_t j = 0; j < static_cast<size_t>(lens[b]); ++j)
      slots.push_back(int64_t{table[b * max_blocks + j / bs]} * static_cast<int64_t>(bs) +
                      static_cast<int64_t>(j % bs));
  ASSERT_EQ(mla_cache_append(layout, pool.data(), latent.data(), 0, k_pe.data(), 0, slots.data(),
                             T),
            kernel_status::ok);

  // Each sequence's last query, kept in q's (B, H, dn + dr) layout.
  std::vector<float> q_last(B * H * (dn + dr));
  for (size_t b = 0; b < B; ++b)
    std::copy_n(q.begin() + (cu[b + 1] - 1) * static_cast<int64_t>(H * (dn + dr)),
                H * (dn + dr), q_last.begin() + static_cast<int64_t>(b * H * (dn + dr)));
  const mla_absorb_dims d{H, dn, dv, R};
  std::vector<float> q_latent(B * H * R), out_latent(B * H * R, -3.0f), out(B * H * dv);
  ASSERT_EQ(mla_absorb_q(d, q_last.data(), H * (dn + dr), dn + dr, w.data(), q_latent.data(), B),
            kernel_status::ok);
  const std::vector<int32_t> seq_lens(lens.begin(), lens.end());
  mla_decode_args a;
  a.q_latent = q_latent.data();
  a.q_pe = q_last.data() + dn;
  a.q_pe_token_stride = H * (dn + dr);
  a.q_pe_head_stride = dn + dr;
  a.block_table = table.data();
  a.max_blocks_per_seq = max_blocks;
  a.seq_lens = seq_lens.data();
  a.out_latent = out_latent.data();
  a.batch = B;
  a.num_heads = H;
  a.softmax_scale = m.scale();
  ASSERT_EQ(mla_decode(layout, pool.data(), a), kernel_status::ok);
  ASSERT_EQ(mla_absorb_out(d, out_latent.data(), w.data(), out.data(), B), kernel_status::ok);

  for (size_t b = 0; b < B; ++b)
    for (size_t i = 0; i < H * dv; ++i)
      EXPECT_NEAR(out[b * H * dv + i],
                  prefill_out[static_cast<size_t>(cu[b + 1] - 1) * H * dv + i], 2e-5)
          << "sequence " << b << " element " << i;
}

TEST(mla_decode, absorbed_decode_equals_decompressed_prefill_on_the_last_token) {
  // Scattered, shuffled blocks of 4; sequence 0's unused table entries hold garbage on purpose.
  expect_absorbed_decode_equals_prefill(small, {1, 7, 13}, small_cache(),
                                        {6, -1, 99, -7, 3, 0, -1, -1, 7, 1, 4, 2}, 20);
}

TEST(mla_decode, absorbed_decode_equals_prefill_at_deepseek_v3_widths) {
  mla_cache_layout layout;
  layout.num_blocks = 5;
  layout.block_size = 16;
  layout.latent_dim = deepseek_v3.R;
  layout.rope_dim = deepseek_v3.dr;
  expect_absorbed_decode_equals_prefill(deepseek_v3, {3, 40}, layout, {4, 0, 0, 2, 0, 3}, 30);
}

TEST(mla_decode, idle_slots_and_bad_tables) {
  const auto layout = small_cache();
  std::vector<float> pool(layout.num_blocks * layout.block_size * (R + dr), 1.0f);
  auto q_latent = random_floats(2 * H * R, 30);
  auto q_pe = random_floats(2 * H * dr, 31);
  const int32_t table[] = {0, 1, 2, 3};
  int32_t seq_lens[] = {0, 5};
  std::vector<float> out(2 * H * R, 9.0f);
  mla_decode_args a;
  a.q_latent = q_latent.data();
  a.q_pe = q_pe.data();
  a.block_table = table;
  a.max_blocks_per_seq = 2;
  a.seq_lens = seq_lens;
  a.out_latent = out.data();
  a.batch = 2;
  a.num_heads = H;
  a.softmax_scale = scale;
  ASSERT_EQ(mla_decode(layout, pool.data(), a), kernel_status::ok);
  for (size_t i = 0; i < H * R; ++i) EXPECT_EQ(out[i], 0.0f);  // an empty sequence
  for (size_t i = H * R; i < 2 * H * R; ++i) EXPECT_NEAR(out[i], 1.0f, 1e-6);  // all-ones cache

  std::fill(out.begin(), out.end(), 9.0f);
  seq_lens[1] = 9;  // needs 3 blocks, the table row has 2
  EXPECT_EQ(mla_decode(layout, pool.data(), a), kernel_status::unsupported_shape);
  seq_lens[1] = 5;
  const int32_t bad_table[] = {0, 1, 2, 8};  // block 8 of 8
  a.block_table = bad_table;
  EXPECT_EQ(mla_decode(layout, pool.data(), a), kernel_status::unsupported_shape);
  a.block_table = table;
  seq_lens[0] = -1;
  EXPECT_EQ(mla_decode(layout, pool.data(), a), kernel_status::unsupported_shape);
  EXPECT_EQ(out, std::vector<float>(2 * H * R, 9.0f));
}

}  // namespace
}  // namespace moe::kernels::cpu
