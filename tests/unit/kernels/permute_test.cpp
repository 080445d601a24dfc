#include "kernels/cpu/permute.hpp"

#include <climits>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

struct plan {
  std::vector<int32_t> offsets, positions, inverse;
};

plan make_plan(const std::vector<int32_t>& idx, size_t num_tokens, size_t top_k,
               size_t num_experts) {
  plan p{std::vector<int32_t>(num_experts + 1, 7), std::vector<int32_t>(idx.size(), 7),
         std::vector<int32_t>(idx.size(), 7)};
  EXPECT_EQ(permute_plan(idx.data(), num_tokens, top_k, num_experts, p.offsets.data(),
                         p.positions.data(), p.inverse.data()),
            kernel_status::ok);
  return p;
}

// The definition, the slow way: entries sorted by (expert, entry index) with a stable sort.
plan reference_plan(const std::vector<int32_t>& idx, size_t num_experts) {
  const auto in_range = [&](int32_t e) { return e >= 0 && static_cast<size_t>(e) < num_experts; };
  std::vector<int32_t> kept;
  for (size_t j = 0; j < idx.size(); ++j)
    if (in_range(idx[j])) kept.push_back(static_cast<int32_t>(j));
  std::stable_sort(kept.begin(), kept.end(), [&](int32_t a, int32_t b) { return idx[a] < idx[b]; });
  plan p{std::vector<int32_t>(num_experts + 1, 0), std::vector<int32_t>(idx.size(), -1),
         std::vector<int32_t>(idx.size(), -1)};
  for (size_t r = 0; r < kept.size(); ++r) {
    p.positions[kept[r]] = static_cast<int32_t>(r);
    p.inverse[r] = kept[r];
  }
  for (int32_t e : idx)
    if (in_range(e)) ++p.offsets[e + 1];
  std::partial_sum(p.offsets.begin(), p.offsets.end(), p.offsets.begin());
  return p;
}

std::vector<int32_t> random_ids(size_t n, int32_t lo, int32_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(lo, hi);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(permute, plan_by_hand) {
  // 3 tokens, top_k 2, 4 experts; token 2's second choice (5) is not local: skipped.
  const std::vector<int32_t> idx = {2, 0,  //
                                    0, 3,  //
                                    2, 5};
  const auto p = make_plan(idx, 3, 2, 4);
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 2, 2, 4, 5}));
  // expert 0: entries 1, 2; expert 2: entries 0, 4; expert 3: entry 3.
  EXPECT_EQ(p.positions, (std::vector<int32_t>{2, 0, 1, 4, 3, -1}));
  EXPECT_EQ(p.inverse, (std::vector<int32_t>{1, 2, 0, 4, 3, -1}));
}

TEST(permute, plan_matches_stable_sort_and_is_a_bijection) {
  for (const auto& [num_tokens, top_k, num_experts] :
       {std::tuple<size_t, size_t, size_t>{1, 1, 1}, {37, 4, 16}, {513, 8, 256}, {129, 8, 33}}) {
    // Some ids fall outside [0, num_experts): skipped.
    const auto idx = random_ids(num_tokens * top_k, -2, static_cast<int32_t>(num_experts) + 2,
                                num_tokens * 31 + num_experts);
    const auto got = make_plan(idx, num_tokens, top_k, num_experts);
    const auto want = reference_plan(idx, num_experts);
    EXPECT_EQ(got.offsets, want.offsets) << num_tokens;
    EXPECT_EQ(got.positions, want.positions) << num_tokens;
    EXPECT_EQ(got.inverse, want.inverse) << num_tokens;
    for (size_t j = 0; j < idx.size(); ++j)
      if (got.positions[j] >= 0) {
        EXPECT_EQ(got.inverse[got.positions[j]], static_cast<int32_t>(j));
        EXPECT_GE(got.positions[j], got.offsets[idx[j]]);
        EXPECT_LT(got.positions[j], got.offsets[idx[j] + 1]);
      }
  }
}

TEST(permute, empty_batch_still_writes_offsets) {
  std::vector<int32_t> offsets(5, 9);
  ASSERT_EQ(permute_plan(nullptr, 0, 8, 4, offsets.data(), nullptr, nullptr), kernel_status::ok);
  EXPECT_EQ(offsets, (std::vector<int32_t>(5, 0)));
}

TEST(permute, rows_copy_and_combine) {
  const size_t num_tokens = 21, top_k = 3, num_experts = 5, dim = 13;
  const auto idx = random_ids(num_tokens * top_k, -1, 5, 4);
  const auto p = make_plan(idx, num_tokens, top_k, num_experts);
  const auto x = random_floats(num_tokens * dim, 5);
  const size_t num_rows = num_tokens * top_k;
  std::vector<float> permuted(num_rows * dim, -7.0f);
  ASSERT_EQ(
      permute_rows(x.data(), num_tokens, top_k, dim, p.positions.data(), permuted.data(), num_rows),
      kernel_status::ok);
  const size_t rows_in_use = static_cast<size_t>(p.offsets[num_experts]);
  for (size_t r = 0; r < num_rows; ++r)
    for (size_t i = 0; i < dim; ++i) {
      if (r < rows_in_use)
        EXPECT_EQ(permuted[r * dim + i], x[(p.inverse[r] / top_k) * dim + i]) << r;
      else
        EXPECT_EQ(permuted[r * dim + i], -7.0f) << r;  // untouched
    }

  // Combine: each row scaled by a weight, summed per token in k order.
  const auto y = random_floats(num_rows * dim, 6);
  const auto weight = random_floats(num_tokens * top_k, 7, 0.0f, 1.0f);
  std::vector<float> out(num_tokens * dim, 99.0f);
  ASSERT_EQ(unpermute(y.data(), num_rows, weight.data(), p.positions.data(), num_tokens, top_k, dim,
                      out.data()),
            kernel_status::ok);
  for (size_t t = 0; t < num_tokens; ++t)
    for (size_t i = 0; i < dim; ++i) {
      float want = 0.0f;
      for (size_t k = 0; k < top_k; ++k) {
        const int32_t r = p.positions[t * top_k + k];
        if (r >= 0) want += weight[t * top_k + k] * y[r * dim + i];
      }
      EXPECT_EQ(out[t * dim + i], want) << t << "," << i;  // the same float32 order
    }
}

TEST(permute, round_trip_with_unit_weights_multiplies_by_the_kept_count) {
  const size_t num_tokens = 9, top_k = 4, num_experts = 6, dim = 5;
  const auto idx = random_ids(num_tokens * top_k, 0, 7, 8);  // 6 and 7 skipped
  const auto p = make_plan(idx, num_tokens, top_k, num_experts);
  const auto x = random_floats(num_tokens * dim, 9);
  std::vector<float> permuted(num_tokens * top_k * dim), out(num_tokens * dim);
  ASSERT_EQ(permute_rows(x.data(), num_tokens, top_k, dim, p.positions.data(), permuted.data(),
                         num_tokens * top_k),
            kernel_status::ok);
  ASSERT_EQ(unpermute(permuted.data(), num_tokens * top_k, nullptr, p.positions.data(), num_tokens,
                      top_k, dim, out.data()),
            kernel_status::ok);
  for (size_t t = 0; t < num_tokens; ++t) {
    int kept = 0;
    for (size_t k = 0; k < top_k; ++k) kept += idx[t * top_k + k] < 6 ? 1 : 0;
    for (size_t i = 0; i < dim; ++i) {
      float want = 0.0f;
      for (int k = 0; k < kept; ++k) want += x[t * dim + i];
      EXPECT_EQ(out[t * dim + i], want);
    }
  }
}

TEST(permute, rejects_bad_arguments_and_writes_nothing) {
  const std::vector<int32_t> idx = {0, 1};
  std::vector<int32_t> offsets(3), positions(2), inverse(2);
  EXPECT_EQ(permute_plan(idx.data(), 1, 2, 0, offsets.data(), positions.data(), inverse.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_plan(idx.data(), 1, 2, 2, nullptr, positions.data(), inverse.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_plan(nullptr, 1, 2, 2, offsets.data(), positions.data(), inverse.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_plan(idx.data(), 1, 2, 2, offsets.data(), nullptr, inverse.data()),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_plan(idx.data(), 1, 2, 2, offsets.data(), positions.data(), nullptr),
            kernel_status::unsupported_shape);
  EXPECT_EQ(permute_plan(idx.data(), size_t{1} << 30, 4, 2, offsets.data(), positions.data(),
                         inverse.data()),
            kernel_status::unsupported_shape);  // more than INT32_MAX entries

  const float x[4] = {1, 2, 3, 4};
  float dst[4] = {5, 5, 5, 5};
  const int32_t bad_high[2] = {0, 2};  // row 2 of a 2-row buffer
  const int32_t bad_low[2] = {-2, 0};
  EXPECT_EQ(permute_rows(x, 1, 2, 2, bad_high, dst, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(permute_rows(x, 1, 2, 2, bad_low, dst, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(unpermute(x, 2, nullptr, bad_high, 1, 2, 2, dst), kernel_status::unsupported_shape);
  EXPECT_EQ(unpermute(x, 2, nullptr, bad_low, 1, 2, 2, dst), kernel_status::unsupported_shape);
  for (float v : dst) EXPECT_EQ(v, 5.0f);
  const int32_t good[2] = {1, 0};
  EXPECT_EQ(permute_rows(nullptr, 1, 2, 2, good, dst, 2), kernel_status::unsupported_shape);
  EXPECT_EQ(unpermute(x, 2, nullptr, nullptr, 1, 2, 2, dst), kernel_status::unsupported_shape);
  EXPECT_EQ(unpermute(x, 2, nullptr, good, 1, 2, 2, nullptr), kernel_status::unsupported_shape);
}

}  // namespace
}  // namespace moe::kernels::cpu
