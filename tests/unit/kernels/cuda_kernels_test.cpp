// The CUDA kernels against their CPU references (kernels/cpu/), on random inputs of odd and
// DeepSeek-like shapes, in f32 and bf16. Each comparison needs a GPU and skips, with the reason,
// without one; the can_run tests are host code and run wherever the CUDA backend is built.
//
// Tolerances:
//  - exact: expert indices, permute offsets/positions/inverse/rows, argmax tokens, and every
//    element a kernel must leave untouched;
//  - f32 elementwise: 1e-6 relative (of the result, or of the sum of the magnitudes of the terms
//    where terms can cancel): a few float32 ulps (2^-23 ~ 1.2e-7) for CUDA's expf (2 ulp) against
//    glibc's, where the kernels do not already reproduce the host's arithmetic bit for bit;
//  - bf16: inputs are rounded to bf16 on the host before the reference runs, so reference and
//    kernel compute from the same values and differ only where the kernel's float32 result
//    (within the f32 tolerance of the reference) rounds to the neighbouring bf16: at most
//    1 bf16 ulp (bf16 keeps 8 significant bits: an ulp is 2^-7 of the leading power of two,
//    the rounding error at most 2^-8 of the value).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/moe_gate.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cpu/sampling.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "kernels/cuda/moe_gate.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/sampling.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels {
namespace {

using cpu::testing::random_floats;
using namespace cuda_testing;


// ---------------------------------------------------------------------------------------------
// swiglu

std::vector<float> swiglu_gate_values(size_t n, uint64_t seed) {
  auto v = random_floats(n, seed, -10.0f, 10.0f);
  // The extremes of silu: exp overflow (-100, -1000), saturation, zero.
  const float extremes[] = {0.0f, -100.0f, 100.0f, -1000.0f, -88.5f, 1e-30f};
  for (size_t i = 0; i < std::size(extremes) && i < n; ++i) v[(i * 7919) % n] = extremes[i];
  return v;
}

void check_swiglu(size_t rows, size_t dim, bool fused, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << rows << " dim " << dim << " fused " << fused << " " << to_string(dt));
  auto gate = swiglu_gate_values(rows * dim, seed);
  auto up = random_floats(rows * dim, seed + 1, -3.0f, 3.0f);
  if (dt == dtype::bf16) {
    gate = bf16_rounded(gate);
    up = bf16_rounded(up);
  }
  std::vector<float> want(rows * dim);
  ASSERT_EQ(cpu::swiglu(gate.data(), up.data(), want.data(), rows, dim), kernel_status::ok);

  // The fused layout: each row [gate | up].
  std::vector<float> gate_up(rows * 2 * dim);
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < dim; ++i) {
      gate_up[r * 2 * dim + i] = gate[r * dim + i];
      gate_up[r * 2 * dim + dim + i] = up[r * dim + i];
    }

  const size_t esize = dtype_bytes(dt);
  device_buffer d_gate(gate.size() * esize), d_up(up.size() * esize),
      d_gate_up(gate_up.size() * esize), d_out(want.size() * esize);
  const auto put = [&](device_buffer& d, const std::vector<float>& v) {
    return dt == dtype::bf16 ? upload(d, to_bf16(v)) : upload(d, v);
  };
  ASSERT_TRUE(put(d_gate, gate) && put(d_up, up) && put(d_gate_up, gate_up));

  cuda::swiglu_args a;
  if (fused) {
    a.gate_up = d_gate_up.get();
  } else {
    a.gate = d_gate.get();
    a.up = d_up.get();
  }
  a.out = d_out.get();
  a.rows = static_cast<int64_t>(rows);
  a.dim = static_cast<int64_t>(dim);
  a.dt = dt;
  ASSERT_EQ(cuda::swiglu_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  if (dt == dtype::f32) {
    std::vector<float> got(want.size());
    ASSERT_TRUE(download(d_out, got));
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_TRUE(f32_close(got[i], want[i], std::fabs(want[i]))) << i;
  } else {
    std::vector<uint16_t> got(want.size());
    ASSERT_TRUE(download(d_out, got));
    for (size_t i = 0; i < got.size(); ++i) ASSERT_TRUE(bf16_within_one_ulp(got[i], want[i])) << i;
  }
}

TEST(cuda_swiglu, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // tiny-v3's expert (32) and dense (128) widths, DeepSeek-V3's expert width (2048), v2-lite's
  // (1408: a row's vectors over two blocks), odd sizes (one element a thread).
  for (const auto& [rows, dim] : {std::pair<size_t, size_t>{1, 1}, {7, 32}, {37, 1000}, {5, 2048},
                                  {12, 1408}, {129, 33}, {3, 128}})
    for (bool fused : {false, true})
      for (dtype dt : {dtype::f32, dtype::bf16}) check_swiglu(rows, dim, fused, dt, rows * dim);
}

// An odd width (one element a thread) and one of whole 16-byte vectors.
TEST(cuda_swiglu, in_place_over_gate) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (const size_t dim : {size_t{301}, size_t{304}}) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim);
    const size_t rows = 19;
    const auto gate = swiglu_gate_values(rows * dim, 3);
    const auto up = random_floats(rows * dim, 4);
    std::vector<float> want(rows * dim), got(rows * dim);
    ASSERT_EQ(cpu::swiglu(gate.data(), up.data(), want.data(), rows, dim), kernel_status::ok);
    device_buffer d_gate(gate.size() * 4), d_up(up.size() * 4);
    ASSERT_TRUE(upload(d_gate, gate) && upload(d_up, up));
    cuda::swiglu_args a;
    a.gate = d_gate.get();
    a.up = d_up.get();
    a.out = d_gate.get();
    a.rows = rows;
    a.dim = dim;
    ASSERT_EQ(cuda::swiglu_run(a, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_TRUE(download(d_gate, got));
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_TRUE(f32_close(got[i], want[i], std::fabs(want[i]))) << i;
  }
}

TEST(cuda_swiglu, can_run_rejects_bad_arguments) {
  cuda::swiglu_args a;
  a.gate = fake_ptr();
  a.up = fake_ptr();
  a.out = fake_ptr();
  a.rows = 3;
  a.dim = 5;
  EXPECT_EQ(cuda::swiglu_can_run(a), kernel_status::ok);
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::swiglu_can_run(a), kernel_status::ok);
  for (dtype bad : {dtype::f16, dtype::i64, dtype::i32, dtype::f8_e4m3}) {
    a.dt = bad;
    EXPECT_EQ(cuda::swiglu_can_run(a), kernel_status::unsupported_dtype);
    // run checks first and touches no device.
    EXPECT_EQ(cuda::swiglu_run(a, nullptr), kernel_status::unsupported_dtype);
  }
  a.dt = dtype::f32;

  auto b = a;
  b.rows = -1;
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.dim = -1;
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.dim = INT64_MAX / 2;
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.out = nullptr;
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::swiglu_run(b, nullptr), kernel_status::unsupported_shape);
  b = a;
  b.up = nullptr;  // gate alone is neither form
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b = a;
  b.gate_up = fake_ptr();  // both forms
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b.up = nullptr;  // fused plus a stray gate
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::unsupported_shape);
  b.gate = nullptr;
  EXPECT_EQ(cuda::swiglu_can_run(b), kernel_status::ok);  // fused alone
  cuda::swiglu_args empty;
  EXPECT_EQ(cuda::swiglu_can_run(empty), kernel_status::ok);  // nothing to do, nothing needed
  EXPECT_EQ(cuda::swiglu_run(empty, nullptr), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// rope

cpu::rope_params tiny_v3_rope() {  // tests/data/tiny-v3/config.json
  cpu::rope_params p;
  p.head_dim = 8;
  p.theta = 10000.0;
  p.has_yarn = true;
  p.factor = 40.0;
  p.original_max_pos = 4096.0;
  p.beta_fast = 32.0;
  p.beta_slow = 1.0;
  p.mscale = 1.0;
  p.mscale_all_dim = 1.0;
  return p;
}

cpu::rope_params deepseek_v3_rope() {
  auto p = tiny_v3_rope();
  p.head_dim = 64;
  return p;
}

cpu::rope_params plain_rope(size_t head_dim) {
  cpu::rope_params p;
  p.head_dim = head_dim;
  return p;
}

struct rope_case {
  cpu::rope_params params;
  size_t num_tokens, num_heads, nope_dim;  // vectors at q + nope_dim in (T, H, nope + rope)
};

void check_rope(const rope_case& c, dtype dt, uint64_t seed) {
  const size_t dr = c.params.head_dim, head_stride = c.nope_dim + dr;
  const size_t token_stride = c.num_heads * head_stride, half = dr / 2;
  SCOPED_TRACE(::testing::Message() << "head_dim " << dr << " tokens " << c.num_tokens << " heads "
                                    << c.num_heads << " " << to_string(dt));
  const size_t table_positions = 300;
  std::vector<float> cos(table_positions * half), sin(table_positions * half);
  ASSERT_EQ(cpu::rope_cos_sin_table(c.params, 0, table_positions, cos.data(), sin.data()),
            kernel_status::ok);
  auto positions = random_ints(c.num_tokens, 0, static_cast<int32_t>(table_positions) - 1, seed);
  // Outside the table: the kernel must leave these tokens untouched.
  if (c.num_tokens > 3) {
    positions[1] = static_cast<int32_t>(table_positions);
    positions[2] = -1;
    positions[c.num_tokens - 1] = 1 << 30;
  }
  if (c.num_tokens > 4) positions[3] = static_cast<int32_t>(table_positions) - 1;  // last row

  auto q = random_floats(c.num_tokens * token_stride, seed + 1, -2.0f, 2.0f);
  if (dt == dtype::bf16) q = bf16_rounded(q);
  auto want = q;
  for (size_t t = 0; t < c.num_tokens; ++t) {
    if (positions[t] < 0 || static_cast<size_t>(positions[t]) >= table_positions) continue;
    cpu::rope_apply_args r;
    r.x = want.data() + t * token_stride + c.nope_dim;
    r.num_tokens = 1;
    r.num_heads = c.num_heads;
    r.token_stride = token_stride;
    r.head_stride = head_stride;
    ASSERT_EQ(
        cpu::rope_apply_table(c.params, r, &positions[t], cos.data(), sin.data(), table_positions),
        kernel_status::ok);
  }

  const size_t esize = dtype_bytes(dt);
  device_buffer d_q(q.size() * esize), d_pos(positions.size() * 4), d_cos(cos.size() * 4),
      d_sin(sin.size() * 4);
  ASSERT_TRUE(upload(d_pos, positions) && upload(d_cos, cos) && upload(d_sin, sin));
  ASSERT_TRUE(dt == dtype::bf16 ? upload(d_q, to_bf16(q)) : upload(d_q, q));

  cuda::rope_args a;
  a.x = static_cast<char*>(d_q.get()) + c.nope_dim * esize;
  a.num_tokens = c.num_tokens;
  a.num_heads = c.num_heads;
  a.token_stride = token_stride;
  a.head_stride = head_stride;
  a.head_dim = dr;
  a.positions = d_pos.as<int32_t>();
  a.cos = d_cos.as<float>();
  a.sin = d_sin.as<float>();
  a.table_positions = table_positions;
  a.dt = dt;
  ASSERT_EQ(cuda::rope_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // A rotated element is a two-term sum of products: the tolerance scales with the terms.
  const auto term_scale = [&](size_t t, size_t h, size_t i) {
    const size_t in_vec = i - c.nope_dim;
    const size_t pair = in_vec % half;
    const float* x = q.data() + t * token_stride + h * head_stride + c.nope_dim;
    const size_t row = static_cast<size_t>(positions[t]) * half + pair;
    return (std::fabs(x[2 * pair]) + std::fabs(x[2 * pair + 1])) *
           std::max(std::fabs(cos[row]), std::fabs(sin[row]));
  };
  std::vector<float> got_f(q.size());
  std::vector<uint16_t> got_h(q.size());
  ASSERT_TRUE(dt == dtype::bf16 ? download(d_q, got_h) : download(d_q, got_f));
  for (size_t t = 0; t < c.num_tokens; ++t)
    for (size_t h = 0; h < c.num_heads; ++h)
      for (size_t i = 0; i < head_stride; ++i) {
        const size_t k = t * token_stride + h * head_stride + i;
        const bool rotated = i >= c.nope_dim && positions[t] >= 0 &&
                             static_cast<size_t>(positions[t]) < table_positions;
        if (dt == dtype::f32) {
          if (rotated)
            ASSERT_TRUE(f32_close(got_f[k], want[k], term_scale(t, h, i)))
                << t << "," << h << "," << i;
          else
            ASSERT_EQ(got_f[k], want[k]) << "untouched " << t << "," << h << "," << i;
        } else {
          if (rotated)
            ASSERT_TRUE(bf16_within_one_ulp(got_h[k], want[k])) << t << "," << h << "," << i;
          else
            ASSERT_EQ(got_h[k], to_bf16(want[k])) << "untouched " << t << "," << h << "," << i;
        }
      }
}

TEST(cuda_rope, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const rope_case cases[] = {
      {tiny_v3_rope(), 37, 4, 16},         // tiny-v3's q: 4 heads, nope 16, rope 8
      {tiny_v3_rope(), 5, 1, 16},          // tiny-v3's k_pe after the kv latent (R = 16)
      {deepseek_v3_rope(), 29, 128, 128},  // DeepSeek-V3's q
      {deepseek_v3_rope(), 1, 1, 512},     // DeepSeek-V3's k_pe, one decode token
      {plain_rope(512), 9, 3, 0},          // the largest head_dim, vectors back to back
      {plain_rope(2), 11, 5, 1},           // the smallest
      {plain_rope(96), 13, 2, 7},          // half = 48: a lane holds 2 pairs, some lanes 1
  };
  for (const auto& c : cases)
    for (dtype dt : {dtype::f32, dtype::bf16}) check_rope(c, dt, c.num_tokens * 131 + c.num_heads);
}

// q's heads and k_pe in one launch, laid out as the engine's input projection rows without
// q_lora_rank ([q (H, dn + dr) | latent (R) | k_pe (dr)]): the same bits as two rope_run calls,
// and nothing else in the rows touched.
TEST(cuda_rope, a_pair_of_sets_gives_the_bits_of_two_launches) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const auto params = deepseek_v3_rope();
  const size_t T = 19, H = 3, dn = 16, dr = 64, R = 40, half = dr / 2, table_positions = 64;
  const size_t row = H * (dn + dr) + R + dr;
  std::vector<float> cos(table_positions * half), sin(table_positions * half);
  ASSERT_EQ(cpu::rope_cos_sin_table(params, 0, table_positions, cos.data(), sin.data()),
            kernel_status::ok);
  const auto positions = random_ints(T, 0, static_cast<int32_t>(table_positions) - 1, 3);
  device_buffer d_pos(T * 4), d_cos(cos.size() * 4), d_sin(sin.size() * 4);
  ASSERT_TRUE(upload(d_pos, positions) && upload(d_cos, cos) && upload(d_sin, sin));
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    SCOPED_TRACE(to_string(dt));
    const auto rows = stored(random_floats(T * row, 7, -2.0f, 2.0f), dt);
    auto one = to_device(rows, dt), two = to_device(rows, dt);
    const size_t es = dtype_bytes(dt);
    const auto args = [&](device_buffer& b) {
      cuda::rope_args q;
      q.x = static_cast<char*>(b.get()) + dn * es;
      q.num_tokens = static_cast<int64_t>(T);
      q.num_heads = static_cast<int64_t>(H);
      q.token_stride = static_cast<int64_t>(row);
      q.head_stride = static_cast<int64_t>(dn + dr);
      q.head_dim = static_cast<int64_t>(dr);
      q.positions = d_pos.as<int32_t>();
      q.cos = d_cos.as<float>();
      q.sin = d_sin.as<float>();
      q.table_positions = static_cast<int64_t>(table_positions);
      q.dt = dt;
      cuda::rope_args k = q;
      k.x = static_cast<char*>(b.get()) + (H * (dn + dr) + R) * es;
      k.num_heads = 1;
      k.head_stride = static_cast<int64_t>(dr);
      return std::pair{q, k};
    };
    const auto [q1, k1] = args(*one);
    ASSERT_EQ(cuda::rope_pair_run(q1, k1, nullptr), kernel_status::ok);
    const auto [q2, k2] = args(*two);
    ASSERT_EQ(cuda::rope_run(q2, nullptr), kernel_status::ok);
    ASSERT_EQ(cuda::rope_run(k2, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint8_t> a(T * row * es), b(T * row * es), before(T * row * es);
    ASSERT_TRUE(download(*one, a) && download(*two, b));
    EXPECT_EQ(a, b);
    // The latent and the nope parts stayed as they were; the rotated parts changed.
    ASSERT_TRUE(download(*to_device(rows, dt), before));
    size_t changed = 0;
    for (size_t t = 0; t < T; ++t)
      for (size_t i = 0; i < row * es; ++i) {
        const size_t col = i / es;
        const bool rotated =
            col >= H * (dn + dr) + R || (col < H * (dn + dr) && col % (dn + dr) >= dn);
        const size_t at = t * row * es + i;
        if (!rotated) {
          ASSERT_EQ(a[at], before[at]) << "token " << t << " column " << col;
        }
        changed += a[at] != before[at] ? 1 : 0;
      }
    EXPECT_GT(changed, T * (H + 1) * dr * es / 2);

    auto other = k1;  // a set that does not share the positions
    other.positions = q1.positions + 1;
    EXPECT_EQ(cuda::rope_pair_can_run(q1, other), kernel_status::unsupported_shape);
    other = k1;
    other.head_dim = 32;
    EXPECT_EQ(cuda::rope_pair_run(q1, other, nullptr), kernel_status::unsupported_shape);
    other = k1;
    other.dt = dt == dtype::f32 ? dtype::bf16 : dtype::f32;
    EXPECT_EQ(cuda::rope_pair_can_run(q1, other), kernel_status::unsupported_dtype);
  }
}

TEST(cuda_rope, can_run_rejects_bad_arguments) {
  cuda::rope_args a;
  a.x = fake_ptr();
  a.num_tokens = 4;
  a.num_heads = 2;
  a.head_dim = 8;
  a.head_stride = 10;
  a.token_stride = 20;
  a.positions = fake<int32_t>();
  a.cos = fake<float>();
  a.sin = fake<float>();
  a.table_positions = 16;
  EXPECT_EQ(cuda::rope_can_run(a), kernel_status::ok);
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::rope_can_run(a), kernel_status::ok);
  a.dt = dtype::f16;
  EXPECT_EQ(cuda::rope_can_run(a), kernel_status::unsupported_dtype);
  EXPECT_EQ(cuda::rope_run(a, nullptr), kernel_status::unsupported_dtype);
  a.dt = dtype::f32;

  const auto expect_shape = [&](auto mutate) {
    auto b = a;
    mutate(b);
    EXPECT_EQ(cuda::rope_can_run(b), kernel_status::unsupported_shape);
    EXPECT_EQ(cuda::rope_run(b, nullptr), kernel_status::unsupported_shape);
  };
  expect_shape([](cuda::rope_args& b) { b.head_dim = 7; });
  expect_shape([](cuda::rope_args& b) { b.head_dim = 0; });
  expect_shape([](cuda::rope_args& b) { b.head_dim = 514; });
  expect_shape([](cuda::rope_args& b) { b.num_tokens = -1; });
  expect_shape([](cuda::rope_args& b) { b.head_stride = 6; });    // heads overlap
  expect_shape([](cuda::rope_args& b) { b.token_stride = 17; });  // tokens overlap
  expect_shape([](cuda::rope_args& b) { b.token_stride = INT64_MAX; });
  expect_shape([](cuda::rope_args& b) { b.table_positions = -1; });
  expect_shape([](cuda::rope_args& b) { b.num_tokens = INT32_MAX; });  // too many vectors
  expect_shape([](cuda::rope_args& b) { b.x = nullptr; });
  expect_shape([](cuda::rope_args& b) { b.positions = nullptr; });
  expect_shape([](cuda::rope_args& b) { b.cos = nullptr; });
  expect_shape([](cuda::rope_args& b) { b.sin = nullptr; });
  auto one = a;  // a single vector needs no strides
  one.num_tokens = 1;
  one.num_heads = 1;
  one.head_stride = 0;
  one.token_stride = 0;
  EXPECT_EQ(cuda::rope_can_run(one), kernel_status::ok);
  cuda::rope_args empty;
  empty.head_dim = 64;
  EXPECT_EQ(cuda::rope_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::rope_run(empty, nullptr), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// moe_gate

cpu::moe_gate_params gate_params(size_t experts, size_t groups, size_t topk_group, size_t top_k,
                                 bool norm = true, float scale = 2.5f) {
  cpu::moe_gate_params p;
  p.num_experts = experts;
  p.num_groups = groups;
  p.topk_group = topk_group;
  p.top_k = top_k;
  p.norm_topk_prob = norm;
  p.routed_scaling_factor = scale;
  return p;
}

// Adds to *bit_identical and *num_weights how many of the weights match the CPU's to the bit.
// Random gate logits with special rows where there are enough tokens: all equal (every tie goes
// by index), some NaN, all NaN, infinities.
std::vector<float> gate_logits(size_t num_tokens, size_t E, uint64_t seed) {
  auto logits = random_floats(num_tokens * E, seed, -6.0f, 6.0f);
  if (num_tokens > 4) {
    std::fill(logits.begin(), logits.begin() + E, 0.25f);
    for (size_t e = 0; e < E; e += 3) logits[E + e] = nan_f;
    std::fill(logits.begin() + 2 * E, logits.begin() + 3 * E, nan_f);
    logits[3 * E] = inf_f;
    logits[3 * E + 1] = -inf_f;
    logits[3 * E + E / 2] = inf_f;
  }
  return logits;
}

void check_moe_gate(const cpu::moe_gate_params& p, size_t num_tokens, bool with_bias, uint64_t seed,
                    size_t* bit_identical, size_t* num_weights) {
  const size_t E = p.num_experts;
  SCOPED_TRACE(::testing::Message()
               << "E " << E << " groups " << p.num_groups << " topk_group " << p.topk_group
               << " top_k " << p.top_k << " tokens " << num_tokens << " bias " << with_bias);
  const auto logits = gate_logits(num_tokens, E, seed);
  std::vector<float> bias;
  if (with_bias) bias = random_floats(E, seed + 1, -0.05f, 0.05f);

  std::vector<int32_t> want_idx(num_tokens * p.top_k);
  std::vector<float> want_w(num_tokens * p.top_k);
  ASSERT_EQ(cpu::moe_gate(p, logits.data(), with_bias ? bias.data() : nullptr, num_tokens,
                          want_idx.data(), want_w.data()),
            kernel_status::ok);

  device_buffer d_logits(logits.size() * 4), d_bias(E * 4), d_idx(want_idx.size() * 4),
      d_w(want_w.size() * 4);
  ASSERT_TRUE(upload(d_logits, logits) && upload(d_bias, bias));
  cuda::moe_gate_args a;
  a.params = p;
  a.logits = d_logits.as<float>();
  a.bias = with_bias ? d_bias.as<float>() : nullptr;
  a.topk_idx = d_idx.as<int32_t>();
  a.topk_weight = d_w.as<float>();
  a.num_tokens = num_tokens;
  ASSERT_EQ(cuda::moe_gate_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> got_idx(want_idx.size());
  std::vector<float> got_w(want_w.size());
  ASSERT_TRUE(download(d_idx, got_idx) && download(d_w, got_w));

  for (size_t i = 0; i < got_idx.size(); ++i) {
    ASSERT_EQ(got_idx[i], want_idx[i]) << "token " << i / p.top_k << " k " << i % p.top_k;
    ASSERT_TRUE(f32_close(got_w[i], want_w[i], std::fabs(want_w[i])))
        << "token " << i / p.top_k << " k " << i % p.top_k;
    const bool same = std::memcmp(&got_w[i], &want_w[i], 4) == 0 ||
                      (std::isnan(got_w[i]) && std::isnan(want_w[i]));
    *bit_identical += same ? 1 : 0;
  }
  *num_weights += got_w.size();
}

TEST(cuda_moe_gate, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const cpu::moe_gate_params configs[] = {
      gate_params(256, 8, 4, 8),               // DeepSeek-V3
      gate_params(16, 4, 2, 4),                // tiny-v3
      gate_params(64, 1, 1, 6),                // v2-lite: one group, kept whole
      gate_params(1024, 1, 1, 32),             // the limits, one group of 1024
      gate_params(1024, 512, 100, 32),         // 512 groups of 2
      gate_params(64, 32, 5, 7, false, 1.0f),  // no normalisation
      gate_params(6, 3, 3, 6, true, 1.0f),     // every expert chosen
  };
  size_t bit_identical = 0, num_weights = 0;
  for (const auto& p : configs)
    for (size_t num_tokens : {size_t{1}, size_t{37}, size_t{300}})
      for (bool with_bias : {true, false})
        check_moe_gate(p, num_tokens, with_bias, p.num_experts * 7 + num_tokens, &bit_identical,
                       &num_weights);
  // The arithmetic is the host's, step for step; only glibc's rare last-ulp expf rounding
  // (~6e-4 of inputs) separates the two, and it can move every weight of the token it hits by
  // an ulp (through the shared sum). A different order of operations would miss far more.
  EXPECT_GE(bit_identical * 100, num_weights * 95) << bit_identical << " of " << num_weights;
}

TEST(cuda_moe_gate, can_run_rejects_bad_arguments) {
  cuda::moe_gate_args a;
  a.params = gate_params(256, 8, 4, 8);
  a.logits = fake<float>();
  a.topk_idx = fake<int32_t>();
  a.topk_weight = fake<float>();
  a.num_tokens = 5;
  EXPECT_EQ(cuda::moe_gate_can_run(a), kernel_status::ok);

  const auto expect_shape = [&](auto mutate) {
    auto b = a;
    mutate(b);
    EXPECT_EQ(cuda::moe_gate_can_run(b), kernel_status::unsupported_shape);
    EXPECT_EQ(cuda::moe_gate_run(b, nullptr), kernel_status::unsupported_shape);
  };
  expect_shape([](cuda::moe_gate_args& b) { b.params.num_experts = 0; });
  expect_shape([](cuda::moe_gate_args& b) {
    b.params.num_experts = 2048;
    b.params.num_groups = 8;
  });
  expect_shape([](cuda::moe_gate_args& b) { b.params.num_experts = 250; });  // 8 does not divide
  expect_shape([](cuda::moe_gate_args& b) { b.params.num_groups = 0; });
  expect_shape([](cuda::moe_gate_args& b) { b.params.num_groups = 256; });  // groups of 1
  expect_shape([](cuda::moe_gate_args& b) { b.params.topk_group = 0; });
  expect_shape([](cuda::moe_gate_args& b) { b.params.topk_group = 9; });
  expect_shape([](cuda::moe_gate_args& b) { b.params.top_k = 0; });
  expect_shape([](cuda::moe_gate_args& b) {
    b.params.topk_group = 1;
    b.params.top_k = 33;
  });
  expect_shape([](cuda::moe_gate_args& b) { b.params.top_k = 33; });  // past the device limit
  expect_shape([](cuda::moe_gate_args& b) { b.num_tokens = -1; });
  expect_shape([](cuda::moe_gate_args& b) { b.num_tokens = int64_t{INT32_MAX} + 1; });
  expect_shape([](cuda::moe_gate_args& b) { b.logits = nullptr; });
  expect_shape([](cuda::moe_gate_args& b) { b.topk_idx = nullptr; });
  expect_shape([](cuda::moe_gate_args& b) { b.topk_weight = nullptr; });
  auto limits = a;
  limits.params = gate_params(1024, 1, 1, 32);
  EXPECT_EQ(cuda::moe_gate_can_run(limits), kernel_status::ok);
  cuda::moe_gate_args empty;
  empty.params = gate_params(16, 4, 2, 4);
  EXPECT_EQ(cuda::moe_gate_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::moe_gate_run(empty, nullptr), kernel_status::ok);
}

// The gate and the plan in one launch (moe_gate_plan_run) against moe_gate_run and then
// permute_plan_run: every output bit for bit. The same logits as above (gate_logits), with and
// without a bias; token counts from one to the 1024-entry limit, several rounds of token slots
// (v2-lite's 64 experts: 16 tokens a round), a slot count that does not divide the block (96
// threads a token), and the widest gate (four slots over 51 KiB of shared memory: the kernel's
// opt-in).
void check_moe_gate_plan(const cpu::moe_gate_params& p, size_t num_tokens, bool with_bias,
                         uint64_t seed) {
  const size_t E = p.num_experts, n = num_tokens * p.top_k;
  SCOPED_TRACE(::testing::Message()
               << "E " << E << " groups " << p.num_groups << " topk_group " << p.topk_group
               << " top_k " << p.top_k << " tokens " << num_tokens << " bias " << with_bias);
  const auto logits = gate_logits(num_tokens, E, seed);
  const auto bias = random_floats(E, seed + 1, -0.05f, 0.05f);
  device_buffer d_logits(logits.size() * 4), d_bias(E * 4);
  ASSERT_TRUE(upload(d_logits, logits) && upload(d_bias, bias));
  // Each output's bytes after a run (every buffer starts as 0x5a bytes).
  const auto run = [&](bool fused) {
    device_buffer idx(n * 4), w(n * 4), offsets((E + 1) * 4), positions(n * 4), inverse(n * 4);
    for (auto* b : {&idx, &w, &offsets, &positions, &inverse})
      EXPECT_EQ(cudaMemset(b->get(), 0x5a, b->bytes()), cudaSuccess);
    cuda::moe_gate_args g;
    g.params = p;
    g.logits = d_logits.as<float>();
    g.bias = with_bias ? d_bias.as<float>() : nullptr;
    g.topk_idx = idx.as<int32_t>();
    g.topk_weight = w.as<float>();
    g.num_tokens = static_cast<int64_t>(num_tokens);
    cuda::permute_plan_args pl;
    pl.topk_idx = g.topk_idx;
    pl.num_tokens = g.num_tokens;
    pl.top_k = static_cast<int64_t>(p.top_k);
    pl.num_experts = static_cast<int64_t>(E);
    pl.expert_offsets = offsets.as<int32_t>();
    pl.positions = positions.as<int32_t>();
    pl.inverse = inverse.as<int32_t>();
    if (fused) {
      EXPECT_EQ(cuda::moe_gate_plan_run(g, pl, nullptr), kernel_status::ok);
    } else {
      EXPECT_EQ(cuda::moe_gate_run(g, nullptr), kernel_status::ok);
      EXPECT_EQ(cuda::permute_plan_run(pl, nullptr), kernel_status::ok);
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<std::vector<uint8_t>> out;
    for (auto* b : {&idx, &w, &offsets, &positions, &inverse}) {
      out.emplace_back(b->bytes());
      EXPECT_TRUE(download(*b, out.back()));
    }
    return out;
  };
  const auto want = run(false), got = run(true);
  const char* names[] = {"topk_idx", "topk_weight", "expert_offsets", "positions", "inverse"};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << names[i];
}

TEST(cuda_moe_gate, gate_and_plan_in_one_launch_match_the_two_kernels) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  for (size_t tokens : {size_t{1}, size_t{5}, size_t{16}, size_t{17}, size_t{170}})
    check_moe_gate_plan(gate_params(64, 1, 1, 6), tokens, tokens % 2 == 1, 900 + tokens);
  for (size_t tokens : {size_t{1}, size_t{9}, size_t{128}})
    check_moe_gate_plan(gate_params(256, 8, 4, 8), tokens, true, 910 + tokens);
  check_moe_gate_plan(gate_params(96, 8, 3, 5), 33, true, 920);        // 96 threads a token
  check_moe_gate_plan(gate_params(16, 4, 2, 4), 7, false, 921);        // tiny-v3
  check_moe_gate_plan(gate_params(1024, 512, 16, 32), 32, true, 922);  // 1024 entries, 51 KiB
}

TEST(cuda_moe_gate, gate_and_plan_can_run_rejects_a_plan_of_other_entries) {
  cuda::moe_gate_args g;
  g.params = gate_params(64, 1, 1, 6);
  g.logits = fake<float>();
  g.topk_idx = fake<int32_t>();
  g.topk_weight = fake<float>();
  g.num_tokens = 5;
  cuda::permute_plan_args pl;
  pl.topk_idx = g.topk_idx;
  pl.num_tokens = 5;
  pl.top_k = 6;
  pl.num_experts = 64;
  pl.expert_offsets = fake<int32_t>();
  pl.positions = fake<int32_t>();
  pl.inverse = fake<int32_t>();
  EXPECT_EQ(cuda::moe_gate_plan_can_run(g, pl), kernel_status::ok);
  const auto refused = [&](auto mutate) {
    auto gg = g;
    auto pp = pl;
    mutate(gg, pp);
    EXPECT_EQ(cuda::moe_gate_plan_can_run(gg, pp), kernel_status::unsupported_shape);
    EXPECT_EQ(cuda::moe_gate_plan_run(gg, pp, nullptr), kernel_status::unsupported_shape);
  };
  static const int32_t elsewhere[1] = {};
  refused([](auto&, auto& pp) { pp.topk_idx = elsewhere; });
  refused([](auto&, auto& pp) { pp.num_tokens = 4; });
  refused([](auto&, auto& pp) { pp.top_k = 5; });
  refused([](auto& gg, auto& pp) { gg.num_tokens = pp.num_tokens = 171; });  // 1026 entries
  refused([](auto& gg, auto&) { gg.params.top_k = 0; });                     // the gate's own
  refused([](auto&, auto& pp) { pp.expert_offsets = nullptr; });             // the plan's own
}

// ---------------------------------------------------------------------------------------------
// permute

struct host_plan {
  std::vector<int32_t> offsets, positions, inverse;
};

// The plan of `idx` (num_tokens x top_k ids), then the rows and the combine through it, against
// the CPU's.
void check_permute_ids(const std::vector<int32_t>& idx, size_t num_tokens, size_t top_k,
                       size_t num_experts, size_t dim, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "tokens " << num_tokens << " top_k " << top_k << " experts "
                                    << num_experts << " dim " << dim);
  const size_t n = num_tokens * top_k;
  ASSERT_EQ(idx.size(), n);
  host_plan want{std::vector<int32_t>(num_experts + 1), std::vector<int32_t>(n),
                 std::vector<int32_t>(n)};
  ASSERT_EQ(cpu::permute_plan(idx.data(), num_tokens, top_k, num_experts, want.offsets.data(),
                              want.positions.data(), want.inverse.data()),
            kernel_status::ok);

  device_buffer d_idx(n * 4), d_offsets((num_experts + 1) * 4), d_pos(n * 4), d_inv(n * 4);
  ASSERT_TRUE(upload(d_idx, idx));
  // Poison the outputs: every element must be written.
  ASSERT_EQ(cudaMemset(d_offsets.get(), 0x5a, d_offsets.bytes()), cudaSuccess);
  if (n > 0) {
    ASSERT_EQ(cudaMemset(d_pos.get(), 0x5a, d_pos.bytes()), cudaSuccess);
    ASSERT_EQ(cudaMemset(d_inv.get(), 0x5a, d_inv.bytes()), cudaSuccess);
  }
  cuda::permute_plan_args pa;
  pa.topk_idx = d_idx.as<int32_t>();
  pa.num_tokens = num_tokens;
  pa.top_k = top_k;
  pa.num_experts = num_experts;
  pa.expert_offsets = d_offsets.as<int32_t>();
  pa.positions = d_pos.as<int32_t>();
  pa.inverse = d_inv.as<int32_t>();
  ASSERT_EQ(cuda::permute_plan_run(pa, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  host_plan got{std::vector<int32_t>(num_experts + 1), std::vector<int32_t>(n),
                std::vector<int32_t>(n)};
  ASSERT_TRUE(download(d_offsets, got.offsets) && download(d_pos, got.positions) &&
              download(d_inv, got.inverse));
  ASSERT_EQ(got.offsets, want.offsets);
  ASSERT_EQ(got.positions, want.positions);
  ASSERT_EQ(got.inverse, want.inverse);
  if (n == 0 || dim == 0) return;

  const size_t num_rows = n;
  const auto x = random_floats(num_tokens * dim, seed + 1, -4.0f, 4.0f);
  const auto y = random_floats(num_rows * dim, seed + 2, -4.0f, 4.0f);
  const auto weight = random_floats(n, seed + 3, 0.0f, 2.5f);

  for (dtype dt : {dtype::f32, dtype::bf16}) {
    SCOPED_TRACE(to_string(dt));
    const bool bf16 = dt == dtype::bf16;
    const auto xs = bf16 ? bf16_rounded(x) : x;
    const auto ys = bf16 ? bf16_rounded(y) : y;
    // Rows nothing maps to keep what was there.
    std::vector<float> want_permuted(num_rows * dim, -7.0f);
    ASSERT_EQ(cpu::permute_rows(xs.data(), num_tokens, top_k, dim, want.positions.data(),
                                want_permuted.data(), num_rows),
              kernel_status::ok);
    std::vector<float> want_out(num_tokens * dim);
    ASSERT_EQ(cpu::unpermute(ys.data(), num_rows, weight.data(), want.positions.data(), num_tokens,
                             top_k, dim, want_out.data()),
              kernel_status::ok);

    const size_t esize = dtype_bytes(dt);
    device_buffer d_x(xs.size() * esize), d_y(ys.size() * esize), d_w(weight.size() * 4),
        d_permuted(num_rows * dim * esize), d_out(num_tokens * dim * esize);
    const std::vector<float> sentinel(num_rows * dim, -7.0f);
    ASSERT_TRUE(bf16 ? upload(d_x, to_bf16(xs)) && upload(d_y, to_bf16(ys)) &&
                           upload(d_permuted, to_bf16(sentinel))
                     : upload(d_x, xs) && upload(d_y, ys) && upload(d_permuted, sentinel));
    ASSERT_TRUE(upload(d_w, weight));

    cuda::permute_rows_args ra;
    ra.x = d_x.get();
    ra.positions = d_pos.as<int32_t>();
    ra.permuted = d_permuted.get();
    ra.num_tokens = num_tokens;
    ra.top_k = top_k;
    ra.dim = dim;
    ra.num_rows = num_rows;
    ra.dt = dt;
    ASSERT_EQ(cuda::permute_rows_run(ra, nullptr), kernel_status::ok);
    cuda::unpermute_args ua;
    ua.y = d_y.get();
    ua.weight = d_w.as<float>();
    ua.positions = d_pos.as<int32_t>();
    ua.out = d_out.get();
    ua.num_tokens = num_tokens;
    ua.top_k = top_k;
    ua.dim = dim;
    ua.num_rows = num_rows;
    ua.dt = dt;
    ASSERT_EQ(cuda::unpermute_run(ua, nullptr), kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    // The combine's terms can cancel: the tolerance scales with the sum of their magnitudes.
    const auto term_scale = [&](size_t t, size_t i) {
      double s = 0.0;
      for (size_t k = 0; k < top_k; ++k) {
        const int32_t r = want.positions[t * top_k + k];
        if (r >= 0) s += std::fabs(double{weight[t * top_k + k]} * ys[r * dim + i]);
      }
      return s;
    };
    if (!bf16) {
      std::vector<float> got_permuted(num_rows * dim), got_out(num_tokens * dim);
      ASSERT_TRUE(download(d_permuted, got_permuted) && download(d_out, got_out));
      ASSERT_EQ(got_permuted, want_permuted);  // an exact copy
      for (size_t k = 0; k < got_out.size(); ++k)
        ASSERT_TRUE(f32_close(got_out[k], want_out[k], term_scale(k / dim, k % dim))) << k;
    } else {
      std::vector<uint16_t> got_permuted(num_rows * dim), got_out(num_tokens * dim);
      ASSERT_TRUE(download(d_permuted, got_permuted) && download(d_out, got_out));
      ASSERT_EQ(got_permuted, to_bf16(want_permuted));  // an exact copy
      for (size_t k = 0; k < got_out.size(); ++k)
        ASSERT_TRUE(bf16_within_one_ulp(got_out[k], want_out[k])) << k;
    }
  }
}

void check_permute(size_t num_tokens, size_t top_k, size_t num_experts, size_t dim, uint64_t seed) {
  // A few ids fall outside [0, num_experts): skipped.
  check_permute_ids(
      random_ints(num_tokens * top_k, -2, static_cast<int32_t>(num_experts) + 1, seed), num_tokens,
      top_k, num_experts, dim, seed);
}

TEST(cuda_permute, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // (tokens, top_k, experts, dim): tiny-v3 (16 experts, top 4, hidden 64), DeepSeek-V3
  // (256, top 8, hidden 7168), many 256-entry chunks, the expert limit, odd sizes, empty.
  for (const auto& [num_tokens, top_k, num_experts, dim] :
       {std::tuple<size_t, size_t, size_t, size_t>{1, 1, 1, 1},
        {37, 4, 16, 64},
        {3, 6, 64, 2048},
        {5, 8, 256, 7168},
        {513, 8, 256, 33},
        {2000, 8, 256, 7},
        {64, 8, 1024, 5},
        {33, 3, 7, 129},
        {0, 8, 16, 64}})
    check_permute(num_tokens, top_k, num_experts, dim, num_tokens * 17 + num_experts);
}

// Skewed routings of prefill-sized batches (more than one block's entries: the three-launch
// plan): every entry on one expert, every entry but the last skipped, and each of the place
// kernel's warp spans ending inside an expert's run (runs of 37, a prime, across the spans).
TEST(cuda_permute, skewed_routings_match_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t tokens = 1031, top_k = 6, experts = 64, n = tokens * top_k;
  std::vector<int32_t> one(n, 17), last_only(n, -1), runs(n);
  last_only.back() = 63;
  for (size_t j = 0; j < n; ++j) runs[j] = static_cast<int32_t>(j / 37 % experts);
  for (const auto* idx : {&one, &last_only, &runs})
    check_permute_ids(*idx, tokens, top_k, experts, 9, n);
}

TEST(cuda_permute, can_run_rejects_bad_arguments) {
  cuda::permute_plan_args pa;
  pa.topk_idx = fake<int32_t>();
  pa.num_tokens = 4;
  pa.top_k = 8;
  pa.num_experts = 256;
  pa.expert_offsets = fake<int32_t>();
  pa.positions = fake<int32_t>();
  pa.inverse = fake<int32_t>();
  EXPECT_EQ(cuda::permute_plan_can_run(pa), kernel_status::ok);
  const auto expect_plan_shape = [&](auto mutate) {
    auto b = pa;
    mutate(b);
    EXPECT_EQ(cuda::permute_plan_can_run(b), kernel_status::unsupported_shape);
    EXPECT_EQ(cuda::permute_plan_run(b, nullptr), kernel_status::unsupported_shape);
  };
  expect_plan_shape([](cuda::permute_plan_args& b) { b.num_experts = 0; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.num_experts = 1025; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.num_tokens = -1; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.top_k = -1; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.num_tokens = int64_t{1} << 29; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.expert_offsets = nullptr; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.topk_idx = nullptr; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.positions = nullptr; });
  expect_plan_shape([](cuda::permute_plan_args& b) { b.inverse = nullptr; });
  auto empty = pa;  // no entries: only the offsets are needed
  empty.num_tokens = 0;
  empty.topk_idx = nullptr;
  empty.positions = nullptr;
  empty.inverse = nullptr;
  EXPECT_EQ(cuda::permute_plan_can_run(empty), kernel_status::ok);

  cuda::permute_rows_args ra;
  ra.x = fake_ptr();
  ra.positions = fake<int32_t>();
  ra.permuted = fake_ptr();
  ra.num_tokens = 4;
  ra.top_k = 8;
  ra.dim = 64;
  ra.num_rows = 32;
  EXPECT_EQ(cuda::permute_rows_can_run(ra), kernel_status::ok);
  const auto expect_rows = [&](kernel_status want, auto mutate) {
    auto b = ra;
    mutate(b);
    EXPECT_EQ(cuda::permute_rows_can_run(b), want);
    EXPECT_EQ(cuda::permute_rows_run(b, nullptr), want);
  };
  expect_rows(kernel_status::unsupported_dtype,
              [](cuda::permute_rows_args& b) { b.dt = dtype::i32; });
  expect_rows(kernel_status::unsupported_shape, [](cuda::permute_rows_args& b) { b.dim = -1; });
  expect_rows(kernel_status::unsupported_shape,
              [](cuda::permute_rows_args& b) { b.num_rows = -1; });
  expect_rows(kernel_status::unsupported_shape,
              [](cuda::permute_rows_args& b) { b.num_tokens = int64_t{INT32_MAX} + 1; });
  expect_rows(kernel_status::unsupported_shape,
              [](cuda::permute_rows_args& b) { b.dim = INT64_MAX / 8; });
  expect_rows(kernel_status::unsupported_shape, [](cuda::permute_rows_args& b) { b.x = nullptr; });
  expect_rows(kernel_status::unsupported_shape,
              [](cuda::permute_rows_args& b) { b.positions = nullptr; });
  expect_rows(kernel_status::unsupported_shape,
              [](cuda::permute_rows_args& b) { b.permuted = nullptr; });

  cuda::unpermute_args ua;
  ua.y = fake_ptr();
  ua.weight = nullptr;  // optional
  ua.positions = fake<int32_t>();
  ua.out = fake_ptr();
  ua.num_tokens = 4;
  ua.top_k = 8;
  ua.dim = 64;
  ua.num_rows = 32;
  ua.dt = dtype::bf16;
  EXPECT_EQ(cuda::unpermute_can_run(ua), kernel_status::ok);
  const auto expect_unpermute = [&](kernel_status want, auto mutate) {
    auto b = ua;
    mutate(b);
    EXPECT_EQ(cuda::unpermute_can_run(b), want);
    EXPECT_EQ(cuda::unpermute_run(b, nullptr), want);
  };
  expect_unpermute(kernel_status::unsupported_dtype,
                   [](cuda::unpermute_args& b) { b.dt = dtype::f16; });
  expect_unpermute(kernel_status::unsupported_shape, [](cuda::unpermute_args& b) { b.top_k = -1; });
  expect_unpermute(kernel_status::unsupported_shape,
                   [](cuda::unpermute_args& b) { b.top_k = int64_t{INT32_MAX}; });
  expect_unpermute(kernel_status::unsupported_shape,
                   [](cuda::unpermute_args& b) { b.y = nullptr; });
  expect_unpermute(kernel_status::unsupported_shape,
                   [](cuda::unpermute_args& b) { b.positions = nullptr; });
  expect_unpermute(kernel_status::unsupported_shape,
                   [](cuda::unpermute_args& b) { b.out = nullptr; });
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, fused with the residual add: residual += x (stored in dt), then the norm of the stored
// sum. The residual comes back exactly (one float32 add rounded once, as cpu::add and the
// storage rounding); the norm within the f32 bound (float32 partial sums of at most 32 squares
// a thread, then a tree: ~2^-18 of the sum of squares, half of that on the scale, a few ulps
// more for rsqrtf and the two products: 4e-6 of the value) or, in bf16, one bf16 ulp.

// x_stride > dim: x's rows are slices of wider rows whose other columns hold 1e30 (any of them
// read would show).
void check_rmsnorm(size_t rows, size_t dim, dtype dt, bool with_residual, size_t x_stride = 0) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << rows << " dim " << dim << " " << to_string(dt)
               << (with_residual ? " with residual" : "") << " x stride " << x_stride);
  const auto x = stored(random_floats(rows * dim, rows * 31 + dim, -2.0f, 2.0f), dt);
  std::vector<float> wide = x;
  if (x_stride > 0) {
    wide.assign(rows * x_stride, 1e30f);
    for (size_t r = 0; r < rows; ++r)
      std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(r * dim), dim,
                  wide.begin() + static_cast<std::ptrdiff_t>(r * x_stride));
    wide = stored(wide, dt);
  }
  const auto r0 = stored(random_floats(rows * dim, rows * 37 + dim, -3.0f, 3.0f), dt);
  const auto w = random_floats(dim, dim, 0.5f, 1.5f);
  std::vector<float> sum = x;
  if (with_residual) {
    ASSERT_EQ(cpu::add(x.data(), r0.data(), sum.data(), sum.size()), kernel_status::ok);
    sum = stored(sum, dt);
  }
  std::vector<float> want(rows * dim);
  ASSERT_EQ(cpu::rmsnorm(sum.data(), w.data(), want.data(), rows, dim, 1e-6f), kernel_status::ok);

  auto dx = to_device(wide, dt), dr = to_device(r0, dt), dw = to_device(w, dtype::f32);
  auto dout = to_device(std::vector<float>(rows * dim, nan_f), dt);
  cuda::rmsnorm_args a;
  a.x = dx->get();
  a.residual = with_residual ? dr->get() : nullptr;
  a.weight = dw->as<float>();
  a.out = dout->get();
  a.rows = static_cast<int64_t>(rows);
  a.dim = static_cast<int64_t>(dim);
  a.x_stride = static_cast<int64_t>(x_stride);
  a.eps = 1e-6f;
  a.dt = dt;
  ASSERT_EQ(cuda::rmsnorm_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (dt == dtype::f32) {
    const auto got = fetch<float>(*dout, want.size());
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_TRUE(f32_close(got[i], want[i], 4.0 * std::fabs(want[i]))) << "element " << i;
    if (with_residual) {
      EXPECT_EQ(fetch<float>(*dr, sum.size()), sum);
    }
  } else {
    const auto got = fetch<uint16_t>(*dout, want.size());
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_TRUE(bf16_within_one_ulp(got[i], want[i])) << "element " << i;
    if (with_residual) {
      EXPECT_EQ(fetch<uint16_t>(*dr, sum.size()), to_bf16(sum));
    }
  }
}

// Widths the vectorized kernel takes (v2-lite's 2048, DeepSeek-V3's 7168 in bf16 with a last
// vector round only some threads fill, f32 up to 4096) and those it leaves to the scalar one
// (7168 in f32, odd widths), each with and without the residual.
TEST(cuda_rmsnorm, matches_cpu_reference_with_and_without_the_residual) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  struct shape {
    size_t rows, dim;
    dtype dt;
  };
  for (const shape& c :
       {shape{3, 2048, dtype::bf16}, shape{2, 7168, dtype::bf16}, shape{5, 1000, dtype::f32},
        shape{2, 4096, dtype::f32}, shape{2, 7168, dtype::f32}, shape{2, 1001, dtype::bf16},
        shape{1, 64, dtype::bf16}, shape{3, 13, dtype::f32}})
    for (const bool with_residual : {false, true})
      check_rmsnorm(c.rows, c.dim, c.dt, with_residual);
}

// The latent's slice of the layer's fused input projection (v2-lite: 512 of 3648 columns), on
// the vectorized kernel and, with a row stride no 16-byte vector divides, on the scalar one.
TEST(cuda_rmsnorm, a_slice_of_wider_rows_reads_only_its_columns) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  check_rmsnorm(3, 512, dtype::bf16, false, 3648);
  check_rmsnorm(3, 512, dtype::bf16, false, 517);
  check_rmsnorm(2, 256, dtype::f32, true, 260);
  check_rmsnorm(2, 256, dtype::f32, false, 257);
}

TEST(cuda_rmsnorm, can_run_rejects_a_stride_below_the_row) {
  cuda::rmsnorm_args a;
  a.x = fake_ptr();
  a.weight = fake<float>();
  a.out = fake_ptr();
  a.rows = 2;
  a.dim = 512;
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::rmsnorm_can_run(a), kernel_status::ok);
  a.x_stride = 511;
  EXPECT_EQ(cuda::rmsnorm_can_run(a), kernel_status::unsupported_shape);
  a.x_stride = 512;
  EXPECT_EQ(cuda::rmsnorm_can_run(a), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// greedy sampling

void check_sample_greedy(size_t rows, size_t vocab, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << rows << " vocab " << vocab << " " << to_string(dt));
  auto logits = random_floats(rows * vocab, seed, -20.0f, 20.0f);
  std::mt19937_64 rng(seed + 1);
  const auto at = [&](size_t r) { return logits.begin() + static_cast<std::ptrdiff_t>(r * vocab); };
  // Row patterns: 0 random; 1 a tied maximum at two places; 2 NaNs sprinkled with the maximum
  // after them; 3 all NaN (answer 0); 4 all -inf (all tied: answer 0); 5 +inf late; 6 the
  // maximum at the last index; the rest random.
  if (rows > 6 && vocab > 4) {
    const size_t a = rng() % (vocab / 2), b = vocab / 2 + rng() % (vocab / 2);
    at(1)[a] = at(1)[b] = 100.0f;
    for (size_t i = 0; i < vocab; i += 5) at(2)[i] = nan_f;
    at(2)[vocab - 2] = 50.0f;
    std::fill(at(3), at(4), nan_f);
    std::fill(at(4), at(5), -inf_f);
    at(5)[vocab - 3] = inf_f;
    at(6)[vocab - 1] = 1000.0f;
  }
  if (dt == dtype::bf16) logits = bf16_rounded(logits);  // bf16 adds many ties of its own

  std::vector<int32_t> want(rows);
  for (size_t r = 0; r < rows; ++r)
    ASSERT_EQ(cpu::sample_greedy(logits.data() + r * vocab, vocab, &want[r]), kernel_status::ok);

  const size_t esize = dtype_bytes(dt);
  device_buffer d_logits(logits.size() * esize), d_tokens(rows * 4);
  ASSERT_TRUE(dt == dtype::bf16 ? upload(d_logits, to_bf16(logits)) : upload(d_logits, logits));
  cuda::sample_greedy_args a;
  a.logits = d_logits.get();
  a.tokens = d_tokens.as<int32_t>();
  a.rows = rows;
  a.vocab = vocab;
  a.dt = dt;
  ASSERT_EQ(cuda::sample_greedy_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> got(rows);
  ASSERT_TRUE(download(d_tokens, got));
  EXPECT_EQ(got, want);
}

TEST(cuda_sample_greedy, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // DeepSeek-V3's vocabulary (129280), v2-lite's (102400: several full rounds of vector loads),
  // tiny-v3's (512), odd (one element at a time) and tiny ones.
  for (const auto& [rows, vocab] : {std::pair<size_t, size_t>{9, 129280}, {1, 102400}, {8, 512},
                                    {7, 1000}, {3, 1}, {2, 513}, {11, 31}})
    for (dtype dt : {dtype::f32, dtype::bf16}) check_sample_greedy(rows, vocab, dt, rows + vocab);
}

TEST(cuda_sample_greedy, can_run_rejects_bad_arguments) {
  cuda::sample_greedy_args a;
  a.logits = fake_ptr();
  a.tokens = fake<int32_t>();
  a.rows = 4;
  a.vocab = 129280;
  EXPECT_EQ(cuda::sample_greedy_can_run(a), kernel_status::ok);
  const auto expect = [&](kernel_status want, auto mutate) {
    auto b = a;
    mutate(b);
    EXPECT_EQ(cuda::sample_greedy_can_run(b), want);
    EXPECT_EQ(cuda::sample_greedy_run(b, nullptr), want);
  };
  expect(kernel_status::unsupported_dtype, [](cuda::sample_greedy_args& b) { b.dt = dtype::u8; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_greedy_args& b) { b.vocab = 0; });
  expect(kernel_status::unsupported_shape,
         [](cuda::sample_greedy_args& b) { b.vocab = INT32_MAX; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_greedy_args& b) { b.rows = -1; });
  expect(kernel_status::unsupported_shape,
         [](cuda::sample_greedy_args& b) { b.rows = int64_t{INT32_MAX} + 1; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_greedy_args& b) { b.logits = nullptr; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_greedy_args& b) { b.tokens = nullptr; });
  expect(kernel_status::ok, [](cuda::sample_greedy_args& b) {
    b.rows = 0;
    b.logits = nullptr;
    b.tokens = nullptr;
  });
}

// ---------------------------------------------------------------------------------------------
// sampling (temperature, top-k, top-p)

// What cpu::sample draws for this row, and whether the device must leave the row to the host:
// cpu::sample refuses the parameters, or top-k above the candidates (and the vocabulary).
struct sample_expectation {
  int32_t token = 0;
  bool on_host = false;
};

sample_expectation expected_sample(const float* row, size_t vocab, const cuda::sample_row& p) {
  sample_expectation e;
  cpu::sampler sampler(vocab);
  if (p.top_k < 0 ||
      sampler.draw(row, {p.temperature, static_cast<size_t>(std::max(p.top_k, 0)), p.top_p}, p.seed,
                   p.offset, &e.token) != kernel_status::ok) {
    e.on_host = true;
    return e;
  }
  const auto cap = static_cast<size_t>(cuda::sample_max_candidates);
  const bool greedy = p.temperature == 0.0f || p.top_k == 1;
  int32_t best = 0;
  EXPECT_EQ(cpu::sample_greedy(row, vocab, &best), kernel_status::ok);
  // No candidates are ranked for a greedy row, nor for one whose best logit is not finite.
  if (greedy || vocab <= cap || !std::isfinite(row[best])) return e;
  e.on_host = static_cast<size_t>(p.top_k) > cap;
  return e;
}

// sample_run over (rows, vocab) logits with one parameter row each: the tokens it draws, in
// `got` (left as it was on a fatal failure).
void sample_on_device(const std::vector<float>& logits, const std::vector<cuda::sample_row>& p,
                      size_t vocab, std::vector<int32_t>& got) {
  const size_t rows = p.size();
  device_buffer d_logits(logits.size() * 4), d_params(rows * sizeof(cuda::sample_row)),
      d_tokens(rows * 4);
  ASSERT_TRUE(upload(d_logits, logits));
  ASSERT_EQ(
      cudaMemcpy(d_params.get(), p.data(), rows * sizeof(cuda::sample_row), cudaMemcpyHostToDevice),
      cudaSuccess);
  cuda::sample_args a;
  a.logits = d_logits.as<float>();
  a.params = static_cast<const cuda::sample_row*>(d_params.get());
  a.tokens = d_tokens.as<int32_t>();
  a.rows = static_cast<int64_t>(rows);
  a.vocab = static_cast<int64_t>(vocab);
  ASSERT_EQ(cuda::sample_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  got.resize(rows);
  ASSERT_TRUE(download(d_tokens, got));
}

void check_sample(size_t vocab, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "vocab " << vocab);
  struct params {
    float temperature;
    int32_t top_k;
    float top_p;
  };
  const float nan_param = std::numeric_limits<float>::quiet_NaN();
  const std::vector<params> kinds = {
      {0.0f, 0, 1.0f},    {1.0f, 0, 1.0f},   {0.7f, 0, 1.0f},      {0.7f, 50, 1.0f},
      {1.3f, 0, 0.9f},    {0.8f, 200, 0.5f}, {1.0f, 1, 1.0f},      {2.0f, 1024, 1.0f},
      {1.0f, 1025, 1.0f}, {1.0f, 7, 0.3f},   {0.5f, 0, 0.999f},    {1.0f, 0, 1e-6f},
      {-1.0f, 0, 1.0f},   {1.0f, 0, 0.0f},   {nan_param, 0, 1.0f}, {1.0f, -3, 1.0f},
      {1e-3f, 0, 1.0f},   {50.0f, 3, 0.7f},
  };
  // Row patterns: random logits of a few spreads (flat rows have large nuclei), ties at the top,
  // NaNs and -inf among them, one finite value among -inf, all NaN.
  const size_t patterns = 7;
  const size_t rows = patterns * kinds.size();
  std::vector<float> logits(rows * vocab);
  std::vector<cuda::sample_row> p(rows);
  std::mt19937_64 rng(seed);
  for (size_t r = 0; r < rows; ++r) {
    float* row = logits.data() + r * vocab;
    const size_t pattern = r / kinds.size();
    const float spread = pattern == 0 ? 0.5f : pattern == 1 ? 3.0f : 12.0f;
    const auto values = random_floats(vocab, seed + r, -spread, spread);
    std::copy(values.begin(), values.end(), row);
    if (pattern == 3)  // a tie at the top, and many below
      for (size_t i = 0; i < vocab; i += 3) row[i] = i % 2 == 0 ? 4.0f : 3.0f;
    if (pattern == 4)
      for (size_t i = 0; i < vocab; i += 4) row[i] = i % 8 == 0 ? nan_f : -inf_f;
    if (pattern == 5) {
      std::fill(row, row + vocab, -inf_f);
      row[rng() % vocab] = 1.0f;
    }
    if (pattern == 6) std::fill(row, row + vocab, nan_f);
    const params& k = kinds[r % kinds.size()];
    p[r].temperature = k.temperature;
    p[r].top_k = k.top_k;
    p[r].top_p = k.top_p;
    p[r].seed = rng();
    p[r].offset = rng() % 1000;
  }

  std::vector<int32_t> got;
  ASSERT_NO_FATAL_FAILURE(sample_on_device(logits, p, vocab, got));
  size_t drawn = 0, left = 0, wide = 0;
  for (size_t r = 0; r < rows; ++r) {
    SCOPED_TRACE(::testing::Message() << "row " << r << " (pattern " << r / kinds.size()
                                      << ", parameters " << r % kinds.size() << ")");
    const float* row = logits.data() + r * vocab;
    const auto want = expected_sample(row, vocab, p[r]);
    if (want.on_host) {
      EXPECT_EQ(got[r], cuda::sample_on_host);
      ++left;
    } else {
      EXPECT_EQ(got[r], want.token);
      drawn += p[r].temperature > 0.0f && p[r].top_k != 1;
      if (p[r].top_k == 0 && p[r].top_p < 1.0f && p[r].temperature > 0.0f)
        wide += top_p_nucleus_size(row, vocab, p[r].temperature, p[r].top_p) >
                static_cast<size_t>(cuda::sample_max_candidates);
    }
  }
  // The cases are not all refusals or greedy: most rows drew; past the candidates, some top-p
  // nuclei were found by their mass, and top_k 1025 went to the host.
  EXPECT_GT(drawn, rows / 2);
  if (vocab > static_cast<size_t>(cuda::sample_max_candidates)) {
    EXPECT_GT(left, patterns);
    EXPECT_GT(wide, 2u);
  }
}

TEST(cuda_sample, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // DeepSeek-V3's vocabulary, one past the candidates, a few below them (every row ranked on
  // the device), and odd sizes (element loads).
  for (size_t vocab : {size_t{129280}, size_t{3001}, size_t{1024}, size_t{700}, size_t{37}})
    check_sample(vocab, 500 + vocab);
}

TEST(cuda_sample, the_same_draw_whatever_the_rows_around_it) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // A row's token depends on its logits and (seed, offset) only: drawn alone or among others,
  // and again, it is the same.
  const size_t vocab = 5000, rows = 6;
  auto logits = random_floats(rows * vocab, 91, -4.0f, 4.0f);
  std::vector<cuda::sample_row> p(rows);
  for (size_t r = 0; r < rows; ++r) {
    p[r].temperature = 0.9f;
    p[r].top_k = r % 2 == 0 ? 40 : 0;
    p[r].seed = 1234;
    p[r].offset = r;
  }
  const auto run = [&](size_t first, size_t count) {
    const std::vector<float> part(
        logits.begin() + static_cast<std::ptrdiff_t>(first * vocab),
        logits.begin() + static_cast<std::ptrdiff_t>((first + count) * vocab));
    const std::vector<cuda::sample_row> params(
        p.begin() + static_cast<std::ptrdiff_t>(first),
        p.begin() + static_cast<std::ptrdiff_t>(first + count));
    std::vector<int32_t> got;
    sample_on_device(part, params, vocab, got);
    return got;
  };
  const auto all = run(0, rows);
  EXPECT_EQ(run(0, rows), all);
  for (size_t r = 0; r < rows; ++r) EXPECT_EQ(run(r, 1).at(0), all[r]) << "row " << r;
}

TEST(cuda_sample, can_run_rejects_bad_arguments) {
  cuda::sample_args a;
  a.logits = fake<float>();
  a.params = fake<cuda::sample_row>();
  a.tokens = fake<int32_t>();
  a.rows = 4;
  a.vocab = 129280;
  EXPECT_EQ(cuda::sample_can_run(a), kernel_status::ok);
  const auto expect = [&](kernel_status want, auto mutate) {
    auto b = a;
    mutate(b);
    EXPECT_EQ(cuda::sample_can_run(b), want);
    EXPECT_EQ(cuda::sample_run(b, nullptr), want);
  };
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.vocab = 0; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.vocab = INT32_MAX; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.rows = -1; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.params = nullptr; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.logits = nullptr; });
  expect(kernel_status::unsupported_shape, [](cuda::sample_args& b) { b.tokens = nullptr; });
  expect(kernel_status::ok, [](cuda::sample_args& b) {
    b.rows = 0;
    b.logits = nullptr;
    b.params = nullptr;
    b.tokens = nullptr;
  });
}

}  // namespace
}  // namespace moe::kernels
