// MLA attention on the GPU (kernels/cuda/mla_decode.hpp, mla_prefill.hpp) against the CPU
// reference (kernels/cpu/mla_attention.hpp) on random data of DeepSeek-like and odd shapes, in
// f32 and bf16: scattered cache blocks, odd block sizes, sequences of 0, 1, one block and a few,
// and a 3000-token sequence cut into many splits. The GPU comparisons skip, with the reason,
// without a GPU; the can_run tests are host code and run wherever the CUDA backend is built.
//
// Tolerances:
//  - mla_cache_append: exact (a copy of the storage type), and every slot not written stays as
//    it was;
//  - attention, f32 storage: |got - want| <= 5e-6 * max|value| (the values are the latents for
//    decode, v for prefill; all in [-1, 1] here). The GPU accumulates in float32 where the CPU
//    uses double: each score is a float32 dot product of up to R + dr = 576 terms, each output
//    a float32 sum of up to 3000 weighted values and one division, each operation off by at
//    most 2^-24 relative. Independent rounding errors add like a random walk, ~sqrt(n) * 2^-24
//    times the partial sums: ~1e-5 on a raw dot product of 576 terms of up to 2 (the queries are
//    in [-2, 2]), 1e-6 after the softmax scale, which moves a weight by that relative amount and
//    an output by about as much; 3000-term sums of weights <= 1 add ~3e-6 relative before the
//    normalisation cancels most of it. The emulated runs measure at most 3.3e-7 (prefill) and
//    2.0e-7 (decode); 5e-6 keeps a margin of 15 over that for CUDA's exp2f (2 ulp) and FMA
//    contraction on the device. A single token dropped from or added to a 3000-token softmax
//    moves an output by ~|c_j - out| / 3000 ~ 2e-4, far above it;
//  - attention, bf16 storage: inputs are rounded to bf16 before the reference runs, so both
//    sides start from the same values; the kernel's float32 result (within the f32 tolerance)
//    is rounded once to bf16: |got - want| <= tol + 2^-8 * (|want| + tol) (bf16 keeps 8
//    significant bits, so rounding to nearest moves a value by at most 2^-8 of it);
//  - prefill, bf16 storage: the tensor-core kernel (mla_prefill.hpp) also rounds each
//    probability p_j to bf16 for the P.V product, p_j (1 + d_j) with |d_j| <= 2^-8 (bf16's unit
//    roundoff), and divides by the float32 sum of the unrounded p_j. With w_j the exact weights
//    (summing to 1) its result is sum_j w_j (1 + d_j) v_j, off from the exact one by
//    |sum_j w_j d_j v_j| <= 2^-8 sum_j w_j |v_j| <= 2^-8 max|v| (max|v| = 1 here). So
//    tol' = tol + 2^-8 max|v| before the final rounding, and |got - want| <= tol' + 2^-8 *
//    (|want| + tol'). Its scores are float32 sums of exact products of bf16 values (the tensor
//    cores' alignment truncates where the CPU rounds), within tol's share as on CUDA cores. The
//    2^-8 term is a worst case (every d_j at its bound with the sign of v_j); the emulated runs
//    measure at most 3.1e-3 with out's rounding included, which alone gives 2.0e-3 (the
//    dv = 200 case on CUDA cores). An off-by-one at the causal edge still shows: row i sees
//    i + 1 keys, so a key dropped or added moves its output by ~|v_j - out| / (i + 1), 0.1 and
//    more in a sequence's first rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/mla_attention.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cuda/mla_decode.hpp"
#include "kernels/cuda/mla_prefill.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/kernels/random_tensor.hpp"

using namespace moe;
using namespace moe::kernels;
using namespace moe::kernels::cuda_testing;
using cpu::testing::random_floats;

namespace {

constexpr double f32_tolerance = 5e-6;  // of the values' magnitude (1 here), see the header
constexpr double prefill_probabilities_bf16 = 1.0 / 256;  // 2^-8 max|v|, max|v| = 1: the header

// A host tensor in the storage dtype under test: f32 values, or their bf16 bits. The float
// view is what the kernel reads (bf16-rounded for bf16), and what the reference is given.
struct host_tensor {
  std::vector<float> values;
  std::vector<uint16_t> bf16;

  host_tensor(std::vector<float> v, dtype dt) : values(std::move(v)) {
    if (dt == dtype::bf16) {
      bf16 = to_bf16(values);
      values = from_bf16(bf16);
    }
  }
  [[nodiscard]] size_t bytes(dtype dt) const { return values.size() * dtype_bytes(dt); }
  [[nodiscard]] bool upload_to(device_buffer& d, dtype dt) const {
    return dt == dtype::bf16 ? upload(d, bf16) : upload(d, values);
  }
};

// The device result widened to float32 (bf16 bits widen exactly).
std::vector<float> fetch_as_float(const device_buffer& d, size_t n, dtype dt) {
  if (dt == dtype::bf16) return from_bf16(fetch<uint16_t>(d, n));
  return fetch<float>(d, n);
}

// probabilities_bf16: prefill's bound on the bf16 rounding of the probabilities (2^-8 max|v|,
// see the header), added to the f32 tolerance in bf16 only.
::testing::AssertionResult attention_close(float got, float want, dtype dt,
                                           double probabilities_bf16 = 0.0) {
  double tol = f32_tolerance;
  if (dt == dtype::bf16) {
    tol += probabilities_bf16;
    tol += std::ldexp(std::fabs(double{want}) + tol, -8);
  }
  if (std::fabs(double{got} - double{want}) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want << " (tolerance "
                                       << tol << ")";
}

// Fills a buffer with 0xff bytes: NaN in either dtype, so an element the kernel should have
// written and did not, or a partial it should not have read, shows up.
void poison(device_buffer& d) {
  if (d.bytes() > 0) {
    ASSERT_EQ(cudaMemset(d.get(), 0xff, d.bytes()), cudaSuccess);
  }
}

// ---------------------------------------------------------------------------------------------
// The paged cache: a random, scattered assignment of blocks to sequences.

struct paged_cache {
  cpu::mla_cache_layout layout;
  std::vector<int32_t> block_table;  // (B, max_blocks_per_seq); unused entries hold junk ids
  size_t max_blocks_per_seq = 0;
};

paged_cache make_paged_cache(size_t latent_dim, size_t rope_dim, size_t block_size,
                             const std::vector<int32_t>& seq_lens, size_t spare_blocks,
                             uint64_t seed) {
  paged_cache c;
  c.layout.block_size = block_size;
  c.layout.latent_dim = latent_dim;
  c.layout.rope_dim = rope_dim;
  size_t total = 0;
  for (int32_t len : seq_lens) {
    const size_t n = (static_cast<size_t>(std::max(len, 0)) + block_size - 1) / block_size;
    c.max_blocks_per_seq = std::max(c.max_blocks_per_seq, n);
    total += n;
  }
  c.max_blocks_per_seq += 1;  // a column no sequence needs: it holds junk the kernel must not use
  c.layout.num_blocks = total + spare_blocks;
  std::vector<int32_t> ids(c.layout.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(seed));
  c.block_table.assign(seq_lens.size() * c.max_blocks_per_seq, 1 << 30);
  size_t next = 0;
  for (size_t b = 0; b < seq_lens.size(); ++b) {
    const size_t n = (static_cast<size_t>(std::max(seq_lens[b], 0)) + block_size - 1) / block_size;
    for (size_t i = 0; i < n; ++i) c.block_table[b * c.max_blocks_per_seq + i] = ids[next++];
  }
  return c;
}

size_t pool_floats(const cpu::mla_cache_layout& l) {
  return l.num_blocks * l.block_size * (l.latent_dim + l.rope_dim);
}

// ---------------------------------------------------------------------------------------------
// mla_cache_append

void check_append(size_t latent_dim, size_t rope_dim, size_t block_size, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "R " << latent_dim << " dr " << rope_dim << " block "
                                    << block_size << " " << to_string(dt));
  cpu::mla_cache_layout layout{7, block_size, latent_dim, rope_dim};
  const size_t num_slots = layout.num_blocks * layout.block_size;
  // The latent and k_pe as kv_a_proj leaves them: one row [c (R) | k_pe (dr)] per token, plus
  // 3 elements of padding, so both strides differ from their packed widths.
  const size_t num_tokens = 2 * block_size + 3, row = latent_dim + rope_dim + 3;
  const host_tensor ckv(random_floats(num_tokens * row, seed, -1.0f, 1.0f), dt);
  host_tensor pool(random_floats(pool_floats(layout), seed + 1, -1.0f, 1.0f), dt);
  // Distinct slots in a scattered order, some tokens padding (-1), one slot past the pool
  // (outside the caller's guarantee: the device skips it, the CPU would refuse the call).
  std::vector<int64_t> slots(num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937_64(seed + 2));
  slots.resize(num_tokens);
  slots[1] = -1;
  slots[num_tokens - 1] = -5;
  std::vector<int64_t> device_slots = slots;
  device_slots[2] = static_cast<int64_t>(num_slots);
  slots[2] = -1;  // what the device does with it

  std::vector<float> want = pool.values;
  ASSERT_EQ(cpu::mla_cache_append(layout, want.data(), ckv.values.data(), row,
                                  ckv.values.data() + latent_dim, row, slots.data(), num_tokens),
            kernel_status::ok);

  MOE_KERNELS_SKIP_WITHOUT_GPU();
  device_buffer d_pool(pool.bytes(dt)), d_ckv(ckv.bytes(dt)), d_slots(num_tokens * 8);
  ASSERT_TRUE(pool.upload_to(d_pool, dt) && ckv.upload_to(d_ckv, dt) && upload(d_slots, device_slots));
  cuda::mla_cache_append_args a;
  a.layout = layout;
  a.pool = d_pool.get();
  a.latent = d_ckv.get();
  a.latent_stride = static_cast<int64_t>(row);
  a.k_pe = static_cast<const char*>(d_ckv.get()) + latent_dim * dtype_bytes(dt);
  a.k_pe_stride = static_cast<int64_t>(row);
  a.slot_mapping = d_slots.as<int64_t>();
  a.num_tokens = static_cast<int64_t>(num_tokens);
  a.dt = dt;
  ASSERT_EQ(cuda::mla_cache_append_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch_as_float(d_pool, want.size(), dt);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "pool element " << i;
}

// With latent_norm: the latent RMSNormed on the way in (cpu::rmsnorm's values within rmsnorm's
// bounds: 4e-6 relative in f32, one bf16 ulp), into the entry and into latent_out for every
// token, the padding's too; k_pe and every other slot exact.
void check_normed_append(size_t latent_dim, size_t rope_dim, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "normed: R " << latent_dim << " dr " << rope_dim << " " << to_string(dt));
  cpu::mla_cache_layout layout{5, 4, latent_dim, rope_dim};
  const size_t num_slots = layout.num_blocks * layout.block_size;
  const size_t num_tokens = 9, row = 3 + latent_dim + rope_dim + 2;  // [q.. | c | k_pe | ..]
  const host_tensor rows(random_floats(num_tokens * row, seed, -2.0f, 2.0f), dt);
  const host_tensor pool(random_floats(pool_floats(layout), seed + 1, -1.0f, 1.0f), dt);
  const auto weight = random_floats(latent_dim, seed + 2, 0.5f, 1.5f);
  std::vector<int64_t> slots(num_tokens);
  for (size_t t = 0; t < num_tokens; ++t) slots[t] = static_cast<int64_t>((t * 7) % num_slots);
  slots[4] = -1;

  std::vector<float> normed(num_tokens * latent_dim);
  for (size_t t = 0; t < num_tokens; ++t)
    ASSERT_EQ(cpu::rmsnorm(rows.values.data() + t * row + 3, weight.data(),
                           normed.data() + t * latent_dim, 1, latent_dim, 1e-6f),
              kernel_status::ok);
  std::vector<float> want = pool.values;
  ASSERT_EQ(
      cpu::mla_cache_append(layout, want.data(), normed.data(), latent_dim,
                            rows.values.data() + 3 + latent_dim, row, slots.data(), num_tokens),
      kernel_status::ok);

  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t es = dtype_bytes(dt);
  device_buffer d_pool(pool.bytes(dt)), d_rows(rows.bytes(dt)), d_slots(num_tokens * 8),
      d_weight(latent_dim * 4), d_out(num_tokens * latent_dim * es);
  ASSERT_TRUE(pool.upload_to(d_pool, dt) && rows.upload_to(d_rows, dt) && upload(d_slots, slots) &&
              upload(d_weight, weight));
  cuda::mla_cache_append_args a;
  a.layout = layout;
  a.pool = d_pool.get();
  a.latent = static_cast<const char*>(d_rows.get()) + 3 * es;
  a.latent_stride = static_cast<int64_t>(row);
  a.k_pe = static_cast<const char*>(d_rows.get()) + (3 + latent_dim) * es;
  a.k_pe_stride = static_cast<int64_t>(row);
  a.slot_mapping = d_slots.as<int64_t>();
  a.num_tokens = static_cast<int64_t>(num_tokens);
  a.dt = dt;
  a.latent_norm = d_weight.as<float>();
  a.latent_out = d_out.get();
  ASSERT_EQ(cuda::mla_cache_append_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto close = [&](const device_buffer& d, const std::vector<float>& w, const char* what) {
    if (dt == dtype::f32) {
      const auto got = fetch<float>(d, w.size());
      for (size_t i = 0; i < w.size(); ++i)
        ASSERT_TRUE(f32_close(got[i], w[i], 4.0 * std::fabs(w[i]))) << what << " " << i;
    } else {
      const auto got = fetch<uint16_t>(d, w.size());
      for (size_t i = 0; i < w.size(); ++i)
        ASSERT_TRUE(bf16_within_one_ulp(got[i], w[i])) << what << " " << i;
    }
  };
  close(d_pool, want, "pool element");
  close(d_out, normed, "latent_out element");
}

TEST(cuda_mla_cache_append, a_normed_latent_matches_cpu_rmsnorm_then_append) {
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_normed_append(512, 64, dt, 4);  // DeepSeek's, a lane's 16 values in two rounds
    check_normed_append(37, 5, dt, 5);    // odd widths
  }
}

TEST(cuda_mla_cache_append, matches_cpu_reference) {
  for (dtype dt : {dtype::f32, dtype::bf16}) {
    check_append(512, 64, 64, dt, 1);  // DeepSeek-V3
    check_append(40, 6, 5, dt, 2);     // odd widths and block size
    check_append(33, 0, 3, dt, 3);     // no rotary part
  }
}

TEST(cuda_mla_cache_append, can_run_rejects_bad_arguments) {
  cuda::mla_cache_append_args a;
  a.layout = {4, 16, 512, 64};
  a.pool = fake_ptr();
  a.latent = fake_ptr();
  a.k_pe = fake_ptr();
  a.slot_mapping = fake<int64_t>();
  a.num_tokens = 3;
  EXPECT_EQ(cuda::mla_cache_append_can_run(a), kernel_status::ok);
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::mla_cache_append_can_run(a), kernel_status::ok);
  for (dtype bad : {dtype::f16, dtype::i32, dtype::f8_e4m3}) {
    auto b = a;
    b.dt = bad;
    EXPECT_EQ(cuda::mla_cache_append_can_run(b), kernel_status::unsupported_dtype);
    EXPECT_EQ(cuda::mla_cache_append_run(b, nullptr), kernel_status::unsupported_dtype);
  }
  const auto refused = [](const cuda::mla_cache_append_args& b) {
    return cuda::mla_cache_append_can_run(b) == kernel_status::unsupported_shape &&
           cuda::mla_cache_append_run(b, nullptr) == kernel_status::unsupported_shape;
  };
  auto b = a;
  b.latent_norm = fake<float>();  // without latent_out
  EXPECT_TRUE(refused(b));
  b.latent_out = fake_ptr();
  EXPECT_EQ(cuda::mla_cache_append_can_run(b), kernel_status::ok);
  b.latent_norm_eps = -1.0f;
  EXPECT_TRUE(refused(b));
  b.latent_norm_eps = std::nanf("");
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.num_blocks = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.block_size = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.latent_dim = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.rope_dim = cpu::mla_max_dim + 1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.num_blocks = size_t{1} << 60;  // elements past int64
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_tokens = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_tokens = int64_t{INT32_MAX} + 1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.latent_stride = 511;  // narrower than a latent row
  EXPECT_TRUE(refused(b));
  b = a;
  b.k_pe_stride = -1;
  EXPECT_TRUE(refused(b));
  for (auto field : {&cuda::mla_cache_append_args::latent, &cuda::mla_cache_append_args::k_pe}) {
    b = a;
    b.*field = nullptr;
    EXPECT_TRUE(refused(b));
  }
  b = a;
  b.pool = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.slot_mapping = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.rope_dim = 0;
  b.k_pe = nullptr;  // nothing to read
  EXPECT_EQ(cuda::mla_cache_append_can_run(b), kernel_status::ok);
  cuda::mla_cache_append_args empty;
  empty.layout = a.layout;
  EXPECT_EQ(cuda::mla_cache_append_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::mla_cache_append_run(empty, nullptr), kernel_status::ok);
}

// ---------------------------------------------------------------------------------------------
// mla_decode

struct decode_case {
  size_t latent_dim, rope_dim, num_heads, block_size;
  std::vector<int32_t> seq_lens;
  int64_t max_seq_len_hint = 0;
  // q_pe lives inside q (B, H, dn + dr) after each head's dn nope values, as the model leaves it.
  size_t nope_dim = 128;
  int64_t min_split_tokens = 0;
};

void check_decode(const decode_case& c, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "R " << c.latent_dim << " dr " << c.rope_dim << " H " << c.num_heads
               << " block " << c.block_size << " B " << c.seq_lens.size() << " hint "
               << c.max_seq_len_hint << " " << to_string(dt));
  const size_t batch = c.seq_lens.size(), H = c.num_heads, R = c.latent_dim, dr = c.rope_dim;
  const paged_cache cache = make_paged_cache(R, dr, c.block_size, c.seq_lens, 3, seed);
  const host_tensor pool(random_floats(pool_floats(cache.layout), seed + 1, -1.0f, 1.0f), dt);
  // Queries of a few units, so the scores spread (std ~1) and the softmax is far from uniform.
  const host_tensor q_latent(random_floats(batch * H * R, seed + 2, -2.0f, 2.0f), dt);
  const size_t q_row = c.nope_dim + dr;
  const host_tensor q(random_floats(batch * H * q_row, seed + 3, -2.0f, 2.0f), dt);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.nope_dim + dr));

  std::vector<float> want(batch * H * R);
  cpu::mla_decode_args ref;
  ref.q_latent = q_latent.values.data();
  ref.q_pe = q.values.data() + c.nope_dim;
  ref.q_pe_token_stride = H * q_row;
  ref.q_pe_head_stride = q_row;
  ref.block_table = cache.block_table.data();
  ref.max_blocks_per_seq = cache.max_blocks_per_seq;
  ref.seq_lens = c.seq_lens.data();
  ref.out_latent = want.data();
  ref.batch = batch;
  ref.num_heads = H;
  ref.softmax_scale = scale;
  ASSERT_EQ(cpu::mla_decode(cache.layout, pool.values.data(), ref), kernel_status::ok);

  MOE_KERNELS_SKIP_WITHOUT_GPU();
  cuda::mla_decode_args a;
  a.layout = cache.layout;
  a.q_pe_token_stride = static_cast<int64_t>(H * q_row);
  a.q_pe_head_stride = static_cast<int64_t>(q_row);
  a.max_blocks_per_seq = static_cast<int64_t>(cache.max_blocks_per_seq);
  a.batch = static_cast<int64_t>(batch);
  a.num_heads = static_cast<int64_t>(H);
  a.softmax_scale = scale;
  a.max_seq_len = c.max_seq_len_hint;
  a.min_split_tokens = c.min_split_tokens;
  a.dt = dt;
  const size_t workspace_bytes = cuda::mla_decode_workspace_bytes(a);
  device_buffer d_pool(pool.bytes(dt)), d_q_latent(q_latent.bytes(dt)), d_q(q.bytes(dt)),
      d_table(cache.block_table.size() * 4), d_lens(batch * 4), d_out(want.size() * dtype_bytes(dt)),
      d_workspace(workspace_bytes);
  ASSERT_TRUE(pool.upload_to(d_pool, dt) && q_latent.upload_to(d_q_latent, dt) &&
              q.upload_to(d_q, dt) && upload(d_table, cache.block_table) &&
              upload(d_lens, c.seq_lens));
  poison(d_out);
  poison(d_workspace);
  a.pool = d_pool.get();
  a.q_latent = d_q_latent.get();
  a.q_pe = static_cast<const char*>(d_q.get()) + c.nope_dim * dtype_bytes(dt);
  a.block_table = d_table.as<int32_t>();
  a.seq_lens = d_lens.as<int32_t>();
  a.out_latent = d_out.get();
  ASSERT_EQ(cuda::mla_decode_run(a, d_workspace.get(), workspace_bytes, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch_as_float(d_out, want.size(), dt);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_TRUE(attention_close(got[i], want[i], dt))
        << "sequence " << i / (H * R) << " head " << i / R % H << " column " << i % R;
}

TEST(cuda_mla_decode, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const std::vector<decode_case> cases = {
      // v2lite-8L / DeepSeek-V3 widths: empty, one token, one full block, one past it, several.
      {512, 64, 16, 64, {0, 1, 64, 65, 200, 1000}},
      // Odd widths (an entry of 46: no 16-byte vectors in bf16), an odd block size, 3 heads.
      {40, 6, 3, 5, {7, 0, 1, 13, 5}},
      // Two head groups, the second partial; entry of 80 (vectors in both dtypes).
      {64, 16, 20, 16, {33, 300, 2}},
      // No rotary part; one sequence.
      {32, 0, 2, 7, {50}},
      // DeepSeek-V3's 128 heads per rank: 8 head groups.
      {512, 64, 128, 64, {5, 33}},
      // A tensor-core width (R 128) whose q_pe rows are not 16-byte vectors (nope dim 4): the
      // queries come in element by element.
      {128, 16, 16, 16, {40, 70}, 0, 4},
  };
  uint64_t seed = 10;
  for (const auto& c : cases)
    for (dtype dt : {dtype::f32, dtype::bf16}) check_decode(c, dt, seed++);
}

TEST(cuda_mla_decode, long_sequence_across_many_splits) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  decode_case c{512, 64, 16, 64, {3000, 17}};
  cuda::mla_decode_args shape;  // what check_decode passes: 47 blocks of 64 tokens and a spare
  shape.layout = {50, 64, 512, 64};
  shape.max_blocks_per_seq = 48;
  shape.batch = 2;
  shape.num_heads = 16;
  ASSERT_GT(cuda::mla_decode_make_plan(shape).num_splits, 8);
  for (dtype dt : {dtype::f32, dtype::bf16}) check_decode(c, dt, 40);
  // A bound from the host that is too small: the last split must take the rest.
  c.max_seq_len_hint = 200;
  check_decode(c, dtype::f32, 41);
  // Short splits: twice the default's 24 (48 of two tiles, the most splits would be 64 of 48
  // tokens), the short sequence's past its end empty (their poisoned partials loaded by the
  // combine and left out).
  c.max_seq_len_hint = 0;
  c.min_split_tokens = 32;
  shape.min_split_tokens = 32;
  ASSERT_EQ(cuda::mla_decode_make_plan(shape).num_splits, 48);
  for (dtype dt : {dtype::f32, dtype::bf16}) check_decode(c, dt, 43);
  // An odd block size across splits.
  check_decode({40, 8, 3, 5, {1000, 0, 999}}, dtype::bf16, 42);
}

// Broken device data: a block id outside the pool, a length past the table and a negative one.
// The kernel reads nothing outside its buffers and leaves the bad tokens out; the CPU refuses
// such calls, so the expectation is the CPU result on the repaired input.
TEST(cuda_mla_decode, bad_device_data_is_contained) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t R = 64, dr = 16, H = 4, bs = 8;
  const std::vector<int32_t> seq_lens = {300, 144, 5};
  paged_cache cache = make_paged_cache(R, dr, bs, seq_lens, 2, 50);
  const host_tensor pool(random_floats(pool_floats(cache.layout), 51, -1.0f, 1.0f), dtype::f32);
  const auto q_latent = random_floats(seq_lens.size() * H * R, 52, -2.0f, 2.0f);
  const auto q_pe = random_floats(seq_lens.size() * H * dr, 53, -2.0f, 2.0f);
  const size_t width = cache.max_blocks_per_seq;  // 39: 38 needed by the first sequence, 1 junk

  // What the device sees: sequence 0's first 4 block ids (its whole first 32-token tile) and
  // its 10th are outside the pool or negative; sequence 1 claims more tokens than its table
  // row holds, its row past its 18 blocks being junk ids; sequence 2 has a negative length.
  const std::vector<size_t> bad_columns = {0, 1, 2, 3, 9};
  std::vector<int32_t> device_table = cache.block_table;
  for (size_t col : bad_columns)
    device_table[col] = col % 2 == 0 ? static_cast<int32_t>(cache.layout.num_blocks) + 7 : -1;
  device_table[1 * width + 20] = -3;
  const std::vector<int32_t> device_lens = {300, static_cast<int32_t>(width * bs) + 9, -4};

  // The repaired input: sequence 0 without its bad blocks (300 - 5 * 8 tokens), sequence 1 with
  // only its 18 blocks, sequence 2 empty.
  std::vector<int32_t> table = cache.block_table;
  std::vector<int32_t> kept;
  for (size_t col = 0; col < width; ++col)
    if (std::find(bad_columns.begin(), bad_columns.end(), col) == bad_columns.end())
      kept.push_back(cache.block_table[col]);
  std::copy(kept.begin(), kept.end(), table.begin());
  const std::vector<int32_t> lens = {260, 144, 0};
  std::vector<float> want(seq_lens.size() * H * R);
  cpu::mla_decode_args ref;
  ref.q_latent = q_latent.data();
  ref.q_pe = q_pe.data();
  ref.block_table = table.data();
  ref.max_blocks_per_seq = width;
  ref.seq_lens = lens.data();
  ref.out_latent = want.data();
  ref.batch = seq_lens.size();
  ref.num_heads = H;
  ref.softmax_scale = 0.125f;
  ASSERT_EQ(cpu::mla_decode(cache.layout, pool.values.data(), ref), kernel_status::ok);

  for (int64_t hint : {int64_t{0}, int64_t{8}}) {
    SCOPED_TRACE(::testing::Message() << "hint " << hint);
    cuda::mla_decode_args a;
    a.layout = cache.layout;
    a.max_blocks_per_seq = static_cast<int64_t>(width);
    a.batch = static_cast<int64_t>(seq_lens.size());
    a.num_heads = H;
    a.softmax_scale = 0.125f;
    a.max_seq_len = hint;
    const size_t workspace_bytes = cuda::mla_decode_workspace_bytes(a);
    device_buffer d_pool(pool.bytes(dtype::f32)), d_ql(q_latent.size() * 4), d_qp(q_pe.size() * 4),
        d_table(device_table.size() * 4), d_lens(device_lens.size() * 4), d_out(want.size() * 4),
        d_workspace(workspace_bytes);
    ASSERT_TRUE(pool.upload_to(d_pool, dtype::f32) && upload(d_ql, q_latent) &&
                upload(d_qp, q_pe) && upload(d_table, device_table) && upload(d_lens, device_lens));
    poison(d_out);
    poison(d_workspace);
    a.pool = d_pool.get();
    a.q_latent = d_ql.get();
    a.q_pe = d_qp.get();
    a.block_table = d_table.as<int32_t>();
    a.seq_lens = d_lens.as<int32_t>();
    a.out_latent = d_out.get();
    ASSERT_EQ(cuda::mla_decode_run(a, d_workspace.get(), workspace_bytes, nullptr),
              kernel_status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = fetch<float>(d_out, want.size());
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_TRUE(attention_close(got[i], want[i], dtype::f32)) << i;
  }
}

cuda::mla_decode_args valid_decode_args() {
  cuda::mla_decode_args a;
  a.layout = {8, 64, 512, 64};
  a.pool = fake_ptr();
  a.q_latent = fake_ptr();
  a.q_pe = fake_ptr();
  a.block_table = fake<int32_t>();
  a.max_blocks_per_seq = 4;
  a.seq_lens = fake<int32_t>();
  a.out_latent = fake_ptr();
  a.batch = 2;
  a.num_heads = 16;
  a.softmax_scale = 0.07f;
  return a;
}

TEST(cuda_mla_decode, can_run_rejects_bad_arguments) {
  auto a = valid_decode_args();
  EXPECT_EQ(cuda::mla_decode_can_run(a), kernel_status::ok);
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::mla_decode_can_run(a), kernel_status::ok);
  for (dtype bad : {dtype::f16, dtype::i64, dtype::u8}) {
    auto b = a;
    b.dt = bad;
    EXPECT_EQ(cuda::mla_decode_can_run(b), kernel_status::unsupported_dtype);
    EXPECT_EQ(cuda::mla_decode_run(b, nullptr, 0, nullptr), kernel_status::unsupported_dtype);
  }
  const auto refused = [](const cuda::mla_decode_args& b) {
    return cuda::mla_decode_can_run(b) == kernel_status::unsupported_shape &&
           cuda::mla_decode_run(b, nullptr, 0, nullptr) == kernel_status::unsupported_shape;
  };
  auto b = a;
  b.layout.latent_dim = 513;  // past the accumulators
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.rope_dim = 65;  // entry of 577
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.latent_dim = 256;
  b.layout.rope_dim = 320;  // entry of exactly 576
  EXPECT_EQ(cuda::mla_decode_can_run(b), kernel_status::ok);
  b = a;
  b.layout.block_size = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_heads = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.batch = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.max_blocks_per_seq = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.max_blocks_per_seq = INT32_MAX;  // a row of more tokens than an int32 length can count
  EXPECT_TRUE(refused(b));
  b = a;
  b.q_pe_head_stride = -2;
  EXPECT_TRUE(refused(b));
  b = a;
  b.max_seq_len = -1;
  EXPECT_TRUE(refused(b));
  for (float scale : {nan_f, inf_f}) {
    b = a;
    b.softmax_scale = scale;
    EXPECT_TRUE(refused(b));
  }
  b = a;
  b.batch = INT32_MAX;  // more than INT32_MAX (sequence, head) pairs
  EXPECT_TRUE(refused(b));
  for (auto field : {&cuda::mla_decode_args::pool, &cuda::mla_decode_args::q_latent,
                     &cuda::mla_decode_args::q_pe}) {
    b = a;
    b.*field = nullptr;
    EXPECT_TRUE(refused(b));
  }
  b = a;
  b.out_latent = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.block_table = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.seq_lens = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.layout.rope_dim = 0;
  b.q_pe = nullptr;  // nothing to read
  EXPECT_EQ(cuda::mla_decode_can_run(b), kernel_status::ok);
  b = a;
  b.max_blocks_per_seq = 0;
  b.block_table = nullptr;  // every sequence must be empty: nothing to look up
  EXPECT_EQ(cuda::mla_decode_can_run(b), kernel_status::ok);
  // The workspace is checked before anything is queued.
  b = a;
  b.max_blocks_per_seq = 64;  // 4096 tokens: several splits
  ASSERT_GT(cuda::mla_decode_workspace_bytes(b), 0u);
  EXPECT_EQ(cuda::mla_decode_run(b, fake_ptr(), cuda::mla_decode_workspace_bytes(b) - 1, nullptr),
            kernel_status::unsupported_shape);
  EXPECT_EQ(cuda::mla_decode_run(b, nullptr, 1 << 30, nullptr), kernel_status::unsupported_shape);
  cuda::mla_decode_args empty;  // no sequences: no pointer is needed
  empty.layout = a.layout;
  empty.num_heads = 16;
  EXPECT_EQ(cuda::mla_decode_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::mla_decode_run(empty, nullptr, 0, nullptr), kernel_status::ok);
}

TEST(cuda_mla_decode, plan_splits_long_sequences_and_sizes_the_workspace) {
  auto a = valid_decode_args();
  a.batch = 1;
  a.max_blocks_per_seq = 64;  // 4096 tokens
  auto plan = cuda::mla_decode_make_plan(a);
  EXPECT_EQ(plan.num_head_groups, 1);
  EXPECT_GT(plan.num_splits, 1);
  EXPECT_LE(plan.num_splits, cuda::mla_decode_max_splits);
  EXPECT_EQ(plan.split_len % 32, 0);
  EXPECT_GE(plan.num_splits * plan.split_len, 4096);
  EXPECT_LT((plan.num_splits - 1) * plan.split_len, 4096);  // no split is empty by design
  EXPECT_EQ(cuda::mla_decode_workspace_bytes(a),
            static_cast<size_t>(plan.num_splits) * 16 * (512 + 2) * 4);
  // A host bound shortens the splits; heads come in groups of 16.
  a.max_seq_len = 300;
  a.num_heads = 128;
  plan = cuda::mla_decode_make_plan(a);
  EXPECT_EQ(plan.num_head_groups, 8);
  EXPECT_GE(plan.num_splits * plan.split_len, 300);
  // Short sequences need no second kernel and no workspace.
  a.max_seq_len = 100;
  EXPECT_EQ(cuda::mla_decode_make_plan(a).num_splits, 1);
  EXPECT_EQ(cuda::mla_decode_workspace_bytes(a), 0u);
  // A large batch fills the GPU without splitting.
  a.max_seq_len = 0;
  a.num_heads = 16;
  a.batch = 512;
  EXPECT_EQ(cuda::mla_decode_make_plan(a).num_splits, 1);
  // Shorter splits on request: a 160-token context at batch 1 in one-tile splits (rounded up
  // to the tile), and the workspace they need.
  a.batch = 1;
  a.max_seq_len = 160;
  EXPECT_EQ(cuda::mla_decode_make_plan(a).num_splits, 2);
  a.min_split_tokens = 20;
  plan = cuda::mla_decode_make_plan(a);
  EXPECT_EQ(plan.split_len, 32);
  EXPECT_EQ(plan.num_splits, 5);
  EXPECT_EQ(cuda::mla_decode_workspace_bytes(a), size_t{5} * 16 * (512 + 2) * 4);
  a.min_split_tokens = -1;
  EXPECT_EQ(cuda::mla_decode_can_run(a), kernel_status::unsupported_shape);
}

// ---------------------------------------------------------------------------------------------
// mla_prefill

struct prefill_case {
  size_t num_heads, nope_dim, rope_dim, v_dim;
  std::vector<std::pair<int32_t, int32_t>> lengths;  // (Lq, Lk) per sequence
  bool separate_k = false;  // pass cu_seqlens_k (else null: the same as q, Lk == Lq)
  int64_t max_seqlen_q_hint = 0;
  // q rows padded by 8 and k_pe 8 elements into its rows (else 2 and 9): every view 16-byte
  // aligned, as the engine's, so the bf16 tensor-core kernel takes its cp.async path.
  bool aligned_views = false;
};

void check_prefill(const prefill_case& c, dtype dt, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "H " << c.num_heads << " dn " << c.nope_dim << " dr "
                                    << c.rope_dim << " dv " << c.v_dim << " seqs "
                                    << c.lengths.size() << " hint " << c.max_seqlen_q_hint
                                    << (c.aligned_views ? " aligned " : " ") << to_string(dt));
  const size_t H = c.num_heads, dn = c.nope_dim, dr = c.rope_dim, dv = c.v_dim;
  std::vector<int32_t> cu_q{0}, cu_k{0};
  for (auto [lq, lk] : c.lengths) {
    cu_q.push_back(cu_q.back() + lq);
    cu_k.push_back(cu_k.back() + (c.separate_k ? lk : lq));
  }
  const auto tq = static_cast<size_t>(cu_q.back()), tk = static_cast<size_t>(cu_k.back());
  // Strided views as the model makes them: q rows padded by 2; k_nope and v inside kv_b_proj's
  // output (Tk, H, dn + dv); k_pe inside kv_a_proj's output (Tk, 9 + dr). Aligned: 8 and 8.
  const size_t q_pad = c.aligned_views ? 8 : 2, kpe_off = c.aligned_views ? 8 : 9;
  const size_t q_ts = H * (dn + dr) + q_pad, kv_ts = H * (dn + dv), kpe_ts = kpe_off + dr;
  const host_tensor q(random_floats(std::max<size_t>(tq, 1) * q_ts, seed, -2.0f, 2.0f), dt);
  const host_tensor kv(random_floats(std::max<size_t>(tk, 1) * kv_ts, seed + 1, -1.0f, 1.0f), dt);
  const host_tensor ckv(random_floats(std::max<size_t>(tk, 1) * kpe_ts, seed + 2, -1.0f, 1.0f), dt);
  const float scale = 1.0f / std::sqrt(static_cast<float>(std::max<size_t>(dn + dr, 1)));

  std::vector<float> want(tq * H * dv);
  cpu::mla_prefill_args ref;
  ref.q = q.values.data();
  ref.q_token_stride = q_ts;
  ref.q_head_stride = dn + dr;
  ref.k_nope = kv.values.data();
  ref.k_nope_token_stride = kv_ts;
  ref.k_nope_head_stride = dn + dv;
  ref.k_pe = ckv.values.data() + kpe_off;
  ref.k_pe_token_stride = kpe_ts;
  ref.v = kv.values.data() + dn;
  ref.v_token_stride = kv_ts;
  ref.v_head_stride = dn + dv;
  ref.out = want.data();
  ref.num_heads = H;
  ref.nope_dim = dn;
  ref.rope_dim = dr;
  ref.v_dim = dv;
  ref.softmax_scale = scale;
  ASSERT_EQ(cpu::mla_prefill(ref, cu_q.data(), c.separate_k ? cu_k.data() : nullptr,
                             c.lengths.size()),
            kernel_status::ok);

  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t es = dtype_bytes(dt);
  device_buffer d_q(q.bytes(dt)), d_kv(kv.bytes(dt)), d_ckv(ckv.bytes(dt)),
      d_out(want.size() * es), d_cu_q(cu_q.size() * 4), d_cu_k(cu_k.size() * 4);
  ASSERT_TRUE(q.upload_to(d_q, dt) && kv.upload_to(d_kv, dt) && ckv.upload_to(d_ckv, dt) &&
              upload(d_cu_q, cu_q) && upload(d_cu_k, cu_k));
  poison(d_out);
  cuda::mla_prefill_args a;
  a.q = d_q.get();
  a.q_token_stride = static_cast<int64_t>(q_ts);
  a.q_head_stride = static_cast<int64_t>(dn + dr);
  a.k_nope = d_kv.get();
  a.k_nope_token_stride = static_cast<int64_t>(kv_ts);
  a.k_nope_head_stride = static_cast<int64_t>(dn + dv);
  a.k_pe = static_cast<const char*>(d_ckv.get()) + kpe_off * es;
  a.k_pe_token_stride = static_cast<int64_t>(kpe_ts);
  a.v = static_cast<const char*>(d_kv.get()) + dn * es;
  a.v_token_stride = static_cast<int64_t>(kv_ts);
  a.v_head_stride = static_cast<int64_t>(dn + dv);
  a.out = d_out.get();
  a.cu_seqlens_q = d_cu_q.as<int32_t>();
  a.cu_seqlens_k = c.separate_k ? d_cu_k.as<int32_t>() : nullptr;
  a.num_seqs = static_cast<int64_t>(c.lengths.size());
  a.num_q_tokens = static_cast<int64_t>(tq);
  a.num_k_tokens = static_cast<int64_t>(tk);
  a.max_seqlen_q = c.max_seqlen_q_hint;
  a.num_heads = static_cast<int64_t>(H);
  a.nope_dim = static_cast<int64_t>(dn);
  a.rope_dim = static_cast<int64_t>(dr);
  a.v_dim = static_cast<int64_t>(dv);
  a.softmax_scale = scale;
  a.dt = dt;
  ASSERT_EQ(cuda::mla_prefill_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch_as_float(d_out, want.size(), dt);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_TRUE(attention_close(got[i], want[i], dt, prefill_probabilities_bf16))
        << "token " << i / (H * dv) << " head " << i / dv % H << " column " << i % dv;
}

TEST(cuda_mla_prefill, matches_cpu_reference) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const std::vector<prefill_case> cases = {
      // DeepSeek-V3 widths, 16 heads: one token, a partial tile, several tiles.
      {16, 128, 64, 128, {{1, 1}, {17, 17}, {70, 70}}},
      // Cached prefixes (Lk > Lq), an empty sequence between, a prefix longer than a key tile.
      {4, 128, 64, 128, {{5, 40}, {0, 3}, {33, 33}, {1, 70}, {20, 21}}, true},
      // Odd widths, 3 heads, an empty sequence first.
      {3, 24, 8, 20, {{0, 0}, {9, 9}, {31, 31}}},
      // Values wider than 128 (the wide-row kernel), no nope part.
      {2, 0, 16, 200, {{12, 12}, {40, 40}}},
      // No rotary part.
      {2, 16, 0, 16, {{19, 19}}},
      // Aligned views (bf16: the tensor-core kernel's cp.async copies): DeepSeek's widths; then
      // cached prefixes with several query and key tiles and a prefix of no whole key tile;
      // then widths padded to the next 16 (q/k 24 of 32, values 16 and 24 of 32).
      {16, 128, 64, 128, {{1, 1}, {17, 17}, {70, 70}}, false, 0, true},
      {4, 128, 64, 128, {{5, 40}, {0, 3}, {33, 33}, {1, 70}, {130, 230}}, true, 0, true},
      {2, 16, 8, 16, {{19, 19}, {66, 66}}, false, 0, true},
      {3, 24, 8, 24, {{9, 9}, {31, 31}}, false, 0, true},
  };
  uint64_t seed = 100;
  for (const auto& c : cases)
    for (dtype dt : {dtype::f32, dtype::bf16}) check_prefill(c, dt, seed++);
}

TEST(cuda_mla_prefill, short_grid_bound_still_covers_every_query) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  // The host bound says 16 queries; one sequence has 75 (and a prefix): its blocks must loop.
  check_prefill({2, 32, 16, 24, {{75, 80}, {3, 3}}, true, 16}, dtype::f32, 200);
  check_prefill({2, 32, 16, 24, {{75, 80}, {3, 3}}, true, 1}, dtype::bf16, 201);
}

// A sequence whose offsets break the caller's guarantee (Lk < Lq) is skipped on the device:
// its rows of out stay as they were and every other sequence is still right.
TEST(cuda_mla_prefill, bad_offsets_skip_only_their_sequence) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  const size_t H = 2, dn = 8, dr = 4, dv = 8;
  const std::vector<int32_t> cu_q = {0, 6, 10}, cu_k = {0, 3, 7};  // sequence 0: Lq 6 > Lk 3
  const auto q = random_floats(10 * H * (dn + dr), 300, -2.0f, 2.0f);
  const auto kn = random_floats(7 * H * dn, 301);
  const auto kp = random_floats(7 * dr, 302);
  const auto v = random_floats(7 * H * dv, 303);
  // Sequence 1 alone, for the reference.
  std::vector<float> want(4 * H * dv);
  cpu::mla_prefill_args ref;
  ref.q = q.data() + 6 * H * (dn + dr);
  ref.k_nope = kn.data() + 3 * H * dn;
  ref.k_pe = kp.data() + 3 * dr;
  ref.v = v.data() + 3 * H * dv;
  ref.out = want.data();
  ref.num_heads = H;
  ref.nope_dim = dn;
  ref.rope_dim = dr;
  ref.v_dim = dv;
  ref.softmax_scale = 0.3f;
  const int32_t one_q[] = {0, 4}, one_k[] = {0, 4};
  ASSERT_EQ(cpu::mla_prefill(ref, one_q, one_k, 1), kernel_status::ok);

  device_buffer d_q(q.size() * 4), d_kn(kn.size() * 4), d_kp(kp.size() * 4), d_v(v.size() * 4),
      d_out(10 * H * dv * 4), d_cu_q(12), d_cu_k(12);
  ASSERT_TRUE(upload(d_q, q) && upload(d_kn, kn) && upload(d_kp, kp) && upload(d_v, v) &&
              upload(d_cu_q, cu_q) && upload(d_cu_k, cu_k));
  const std::vector<float> sentinel(10 * H * dv, 7.0f);
  ASSERT_TRUE(upload(d_out, sentinel));
  cuda::mla_prefill_args a;
  a.q = d_q.get();
  a.k_nope = d_kn.get();
  a.k_pe = d_kp.get();
  a.v = d_v.get();
  a.out = d_out.get();
  a.cu_seqlens_q = d_cu_q.as<int32_t>();
  a.cu_seqlens_k = d_cu_k.as<int32_t>();
  a.num_seqs = 2;
  a.num_q_tokens = 10;
  a.num_k_tokens = 7;
  a.num_heads = H;
  a.nope_dim = dn;
  a.rope_dim = dr;
  a.v_dim = dv;
  a.softmax_scale = 0.3f;
  ASSERT_EQ(cuda::mla_prefill_run(a, nullptr), kernel_status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = fetch<float>(d_out, sentinel.size());
  ASSERT_EQ(got.size(), sentinel.size());
  for (size_t i = 0; i < 6 * H * dv; ++i) ASSERT_EQ(got[i], 7.0f) << i;
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_TRUE(attention_close(got[6 * H * dv + i], want[i], dtype::f32)) << i;
}

TEST(cuda_mla_prefill, can_run_rejects_bad_arguments) {
  cuda::mla_prefill_args a;
  a.q = fake_ptr();
  a.k_nope = fake_ptr();
  a.k_pe = fake_ptr();
  a.v = fake_ptr();
  a.out = fake_ptr();
  a.cu_seqlens_q = fake<int32_t>();
  a.num_seqs = 2;
  a.num_q_tokens = 100;
  a.num_heads = 16;
  a.nope_dim = 128;
  a.rope_dim = 64;
  a.v_dim = 128;
  a.softmax_scale = 0.07f;
  EXPECT_EQ(cuda::mla_prefill_can_run(a), kernel_status::ok);
  a.dt = dtype::bf16;
  EXPECT_EQ(cuda::mla_prefill_can_run(a), kernel_status::ok);
  for (dtype bad : {dtype::f16, dtype::i32, dtype::f8_e4m3}) {
    auto b = a;
    b.dt = bad;
    EXPECT_EQ(cuda::mla_prefill_can_run(b), kernel_status::unsupported_dtype);
    EXPECT_EQ(cuda::mla_prefill_run(b, nullptr), kernel_status::unsupported_dtype);
  }
  const auto refused = [](const cuda::mla_prefill_args& b) {
    return cuda::mla_prefill_can_run(b) == kernel_status::unsupported_shape &&
           cuda::mla_prefill_run(b, nullptr) == kernel_status::unsupported_shape;
  };
  auto b = a;
  b.num_heads = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_heads = 65536;  // the grid's y dimension
  EXPECT_TRUE(refused(b));
  b = a;
  b.v_dim = 0;
  EXPECT_TRUE(refused(b));
  b = a;
  b.v_dim = 513;
  EXPECT_TRUE(refused(b));
  b = a;
  b.nope_dim = 512;
  b.rope_dim = 65;  // q/k rows of 577
  EXPECT_TRUE(refused(b));
  b = a;
  b.rope_dim = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_q_tokens = int64_t{INT32_MAX} + 1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.v_head_stride = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_seqs = -1;
  EXPECT_TRUE(refused(b));
  b = a;
  b.num_seqs = INT32_MAX;  // with 7 query tiles each: a grid past INT32_MAX blocks
  EXPECT_TRUE(refused(b));
  for (float scale : {nan_f, -inf_f}) {
    b = a;
    b.softmax_scale = scale;
    EXPECT_TRUE(refused(b));
  }
  for (auto field : {&cuda::mla_prefill_args::q, &cuda::mla_prefill_args::k_nope,
                     &cuda::mla_prefill_args::k_pe, &cuda::mla_prefill_args::v}) {
    b = a;
    b.*field = nullptr;
    EXPECT_TRUE(refused(b));
  }
  b = a;
  b.out = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.cu_seqlens_q = nullptr;
  EXPECT_TRUE(refused(b));
  b = a;
  b.nope_dim = 0;
  b.k_nope = nullptr;  // nothing to read
  EXPECT_EQ(cuda::mla_prefill_can_run(b), kernel_status::ok);
  cuda::mla_prefill_args empty;
  empty.num_heads = 1;
  empty.v_dim = 1;
  EXPECT_EQ(cuda::mla_prefill_can_run(empty), kernel_status::ok);
  EXPECT_EQ(cuda::mla_prefill_run(empty, nullptr), kernel_status::ok);
}

}  // namespace
