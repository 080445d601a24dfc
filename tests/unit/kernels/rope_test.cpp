#include "kernels/cpu/rope.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/unit/kernels/random_tensor.hpp"

namespace moe::kernels::cpu {
namespace {

using testing::random_floats;

// tiny-v3's rope_scaling, with mscale 0.7 so the cos/sin factor is not 1.
rope_params tiny_yarn() {
  rope_params p;
  p.head_dim = 8;
  p.theta = 10000.0;
  p.has_yarn = true;
  p.factor = 40.0;
  p.original_max_pos = 4096.0;
  p.beta_fast = 32.0;
  p.beta_slow = 1.0;
  p.mscale = 0.7;
  p.mscale_all_dim = 1.0;
  return p;
}

const std::vector<float> interleaved_x{0.5f, -1.25f, 2.0f, 0.75f, -0.3f, 1.1f, 0.9f, -2.2f};

// Expected values below come from rope_tables/apply_rope in shared/fixtures/reference.py
// (float64), evaluated for the parameters above.
TEST(rope, factors_match_reference) {
  EXPECT_DOUBLE_EQ(yarn_mscale(1.0, 1.0), 1.0);
  EXPECT_DOUBLE_EQ(yarn_mscale(0.5, 1.0), 1.0);
  EXPECT_NEAR(yarn_mscale(40.0, 1.0), 0.1 * std::log(40.0) + 1.0, 1e-15);
  EXPECT_NEAR(rope_attention_factor(tiny_yarn()), 0.9191559952044436, 1e-15);

  rope_params p = tiny_yarn();
  p.mscale = 1.0;
  EXPECT_DOUBLE_EQ(rope_attention_factor(p), 1.0);  // DeepSeek-V3's config: they cancel
  EXPECT_NEAR(rope_softmax_scale_multiplier(p), 1.8738542070926265, 1e-14);
  p.mscale_all_dim = 0.0;  // absent: cos/sin get mscale(factor), softmax scale is unchanged
  EXPECT_NEAR(rope_attention_factor(p), yarn_mscale(40.0, 1.0), 1e-15);
  EXPECT_DOUBLE_EQ(rope_softmax_scale_multiplier(p), 1.0);
  p.has_yarn = false;
  EXPECT_DOUBLE_EQ(rope_attention_factor(p), 1.0);
  EXPECT_DOUBLE_EQ(rope_softmax_scale_multiplier(p), 1.0);
}

TEST(rope, yarn_inverse_frequencies_match_reference) {
  double inv[32];
  ASSERT_EQ(rope_inv_freq(tiny_yarn(), inv), kernel_status::ok);
  const double want8[] = {1.0, 0.1, 0.005125, 2.5e-05};  // the third one is on the ramp
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(inv[i], want8[i], 1e-15 * want8[i]) << i;

  rope_params v3 = tiny_yarn();
  v3.head_dim = 64;  // DeepSeek-V3's qk_rope_head_dim
  ASSERT_EQ(rope_inv_freq(v3, inv), kernel_status::ok);
  EXPECT_NEAR(inv[0], 1.0, 1e-15);
  EXPECT_NEAR(inv[10], 0.056234132519034905, 1e-15);
  EXPECT_NEAR(inv[11], 0.03900692656714386, 1e-15);
  EXPECT_NEAR(inv[16], 0.0055, 1e-15);
  EXPECT_NEAR(inv[23], 3.33380358040831e-05, 1e-18);
  EXPECT_NEAR(inv[31], 3.3338035804083097e-06, 1e-19);
}

void expect_rotated(std::vector<float> x, int64_t position, const rope_params& p,
                    const std::vector<double>& want, double tol) {
  rope_apply_args a;
  a.x = x.data();
  a.num_tokens = 1;
  ASSERT_EQ(rope_apply(p, a, &position), kernel_status::ok);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(x[i], want[i], tol) << "dim " << i;
}

TEST(rope, yarn_rotation_matches_reference) {
  expect_rotated(interleaved_x, 0, tiny_yarn(),
                 {0.4595779976022218, 1.8383119904088872, -0.27574679856133305,
                  0.8272403956839992, -1.1489449940055545, 0.6893669964033327, 1.011071594724888,
                  -2.022143189449776},
                 1e-6);
  expect_rotated(interleaved_x, 7, tiny_yarn(),
                 {1.1013183521655856, 0.9619161515746859, -0.3118337858540652,
                  0.8275942580732281, -0.5642556356065667, 1.7115300602533927, 1.000530737447018,
                  -2.0219983914172026},
                 1e-6);
  // The last position of a 163840-token context: the angle is exact because it is formed in
  // double; a float32 angle would be off by ~1e-2 rad here.
  expect_rotated(interleaved_x, 163839, tiny_yarn(),
                 {-1.0134001568132835, -1.2912044345800138, 0.9504396888873823,
                  -2.1282198318851306, -0.7101455183983798, -1.478989160856882,
                  -0.441550070053226, 0.4940345110013663},
                 2e-6);
}

TEST(rope, plain_rotation_matches_reference) {
  rope_params p;
  p.head_dim = 8;
  expect_rotated(interleaved_x, 7, p,
                 {1.1981843755701387, 1.0465211091407083, -0.3762024321472699,
                  0.9153778243236789, -0.6138845185697362, 1.8620670149387486,
                  1.0763232460773478, -2.1936461516699657},
                 1e-6);
}

TEST(rope, rotates_the_rope_part_of_q_in_place_for_every_head) {
  const size_t tokens = 3, heads = 2, nope = 5, dr = 8, width = nope + dr;
  auto q = random_floats(tokens * heads * width, 11);
  const auto original = q;
  const int32_t positions[] = {4, 0, 163839};
  rope_apply_args a;
  a.x = q.data() + nope;
  a.num_tokens = tokens;
  a.num_heads = heads;
  a.token_stride = heads * width;
  a.head_stride = width;
  ASSERT_EQ(rope_apply(tiny_yarn(), a, positions), kernel_status::ok);
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t h = 0; h < heads; ++h) {
      const size_t base = (t * heads + h) * width;
      for (size_t i = 0; i < nope; ++i) EXPECT_EQ(q[base + i], original[base + i]);
      // The same as rotating that head's vector alone.
      std::vector<float> alone(original.begin() + base + nope, original.begin() + base + width);
      rope_apply_args one;
      one.x = alone.data();
      one.num_tokens = 1;
      const int64_t pos = positions[t];
      ASSERT_EQ(rope_apply(tiny_yarn(), one, &pos), kernel_status::ok);
      for (size_t i = 0; i < dr; ++i) EXPECT_EQ(q[base + nope + i], alone[i]);
    }
  }
}

// What RoPE is for: the score of a rotated query and key depends only on their distance.
TEST(rope, scores_depend_only_on_relative_position) {
  rope_params p;
  p.head_dim = 16;
  const auto q0 = random_floats(16, 12), k0 = random_floats(16, 13);
  auto score = [&](int64_t qpos, int64_t kpos) {
    auto q = q0, k = k0;
    rope_apply_args a;
    a.num_tokens = 1;
    a.x = q.data();
    EXPECT_EQ(rope_apply(p, a, &qpos), kernel_status::ok);
    a.x = k.data();
    EXPECT_EQ(rope_apply(p, a, &kpos), kernel_status::ok);
    double s = 0.0;
    for (size_t i = 0; i < 16; ++i) s += double{q[i]} * k[i];
    return s;
  };
  EXPECT_NEAR(score(5, 0), score(105, 100), 1e-5);
  EXPECT_NEAR(score(5, 0), score(1005, 1000), 1e-5);
}

TEST(rope, table_gives_the_same_result_as_on_demand) {
  const rope_params p = tiny_yarn();
  const size_t max_pos = 64, half = 4;
  std::vector<float> cos(max_pos * half), sin(max_pos * half);
  ASSERT_EQ(rope_cos_sin_table(p, 0, max_pos, cos.data(), sin.data()), kernel_status::ok);
  const int64_t positions[] = {0, 63, 17};
  auto x = random_floats(3 * 8, 14);
  auto y = x;
  rope_apply_args a;
  a.x = x.data();
  a.num_tokens = 3;
  a.token_stride = 8;
  ASSERT_EQ(rope_apply(p, a, positions), kernel_status::ok);
  a.x = y.data();
  ASSERT_EQ(rope_apply_table(p, a, positions, cos.data(), sin.data(), max_pos),
            kernel_status::ok);
  EXPECT_EQ(x, y);

  // A table starting elsewhere is the same rows shifted.
  std::vector<float> cos2(2 * half), sin2(2 * half);
  ASSERT_EQ(rope_cos_sin_table(p, 62, 2, cos2.data(), sin2.data()), kernel_status::ok);
  for (size_t i = 0; i < 2 * half; ++i) EXPECT_EQ(cos2[i], cos[62 * half + i]);

  const int64_t too_far = 64;
  const auto before = y;
  a.num_tokens = 1;
  EXPECT_EQ(rope_apply_table(p, a, &too_far, cos.data(), sin.data(), max_pos),
            kernel_status::unsupported_shape);
  EXPECT_EQ(y, before);
}

TEST(rope, bad_arguments_are_refused_and_x_is_untouched) {
  auto x = random_floats(2 * 8, 15);
  const auto before = x;
  rope_apply_args a;
  a.x = x.data();
  a.num_tokens = 2;
  a.token_stride = 8;
  const int64_t positions[] = {3, -1};
  EXPECT_EQ(rope_apply(tiny_yarn(), a, positions), kernel_status::unsupported_shape);
  EXPECT_EQ(x, before);  // the first token was not rotated either

  const int64_t ok_positions[] = {3, 4};
  a.token_stride = 7;  // the two vectors would overlap
  EXPECT_EQ(rope_apply(tiny_yarn(), a, ok_positions), kernel_status::unsupported_shape);
  a.token_stride = 8;
  EXPECT_EQ(rope_apply(tiny_yarn(), a, static_cast<const int64_t*>(nullptr)),
            kernel_status::unsupported_shape);

  rope_params p = tiny_yarn();
  p.head_dim = 7;
  EXPECT_EQ(rope_apply(p, a, ok_positions), kernel_status::unsupported_shape);
  p.head_dim = 0;
  EXPECT_EQ(rope_check(p), kernel_status::unsupported_shape);
  p.head_dim = rope_max_dim + 2;
  EXPECT_EQ(rope_check(p), kernel_status::unsupported_shape);
  p = tiny_yarn();
  p.factor = 0.0;
  EXPECT_EQ(rope_check(p), kernel_status::unsupported_shape);
  p = tiny_yarn();
  p.theta = std::nan("");
  EXPECT_EQ(rope_check(p), kernel_status::unsupported_shape);
  EXPECT_EQ(x, before);

  a.num_tokens = 0;
  EXPECT_EQ(rope_apply(tiny_yarn(), a, ok_positions), kernel_status::ok);
}

}  // namespace
}  // namespace moe::kernels::cpu
