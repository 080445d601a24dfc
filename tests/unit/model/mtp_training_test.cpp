// mtp_training_module on tiny-v3 plus random MTP weights (layers 3 and 4): its forward against a
// composition of the inference blocks, its backward against central finite differences of a
// scalar objective, the per-row token bookkeeping, and argument errors.
#include "model/mtp_training.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/attention_block.hpp"
#include "model/checkpoint.hpp"
#include "model/latent_cache.hpp"
#include "model/mlp_block.hpp"
#include "model/model_errc.hpp"
#include "model/moe_blocks.hpp"
#include "tests/unit/model/scratch_dir.hpp"

namespace moe::model {
namespace {

namespace kc = kernels::cpu;
using kernels::kernel_status;
using testing::code_of;
using testing::error_of;

const std::filesystem::path tiny_dir = std::filesystem::path(MOE_TEST_DATA_DIR) / "tiny-v3";

// Three packed sequences of lengths 6, 4 and 1: at depth 1 they keep 5, 3 and 0 rows, at depth
// 2 they keep 4, 2 and 0.
const std::vector<int32_t> seqs = {0, 6, 10, 11};
constexpr size_t num_tokens = 11;

model_errc code(const caf::error& e) { return static_cast<model_errc>(e.code()); }

std::vector<float> random_normal(size_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// tiny-v3 with num_nextn_predict_layers = 2 and random weights for both MTP modules.
struct tiny_mtp {
  checkpoint ckpt;

  static tiny_mtp load() {
    tiny_mtp m;
    auto c = load_config(tiny_dir);
    EXPECT_TRUE(c) << error_of(c);
    if (!c) return m;
    auto k = load_checkpoint(tiny_dir, *c);
    EXPECT_TRUE(k) << error_of(k);
    if (!k) return m;
    m.ckpt = std::move(*k);
    m.ckpt.config.num_nextn_predict_layers = 2;
    EXPECT_FALSE(add_random_mtp_weights(m.ckpt, 1, 101));
    EXPECT_FALSE(add_random_mtp_weights(m.ckpt, 2, 102));
    return m;
  }
  const model_config& config() const { return ckpt.config; }
  size_t hidden() const { return static_cast<size_t>(ckpt.config.hidden_size); }
  std::span<float> tensor(const std::string& name) {
    host_tensor* t = ckpt.find(name);
    EXPECT_NE(t, nullptr) << name;
    return t ? t->data() : std::span<float>{};
  }
};

// Rows of the full layout that depth k uses, and the packed sequences over them (empty
// sequences dropped: the inference prefill has no use for them).
struct depth_rows {
  std::vector<int32_t> rows, cu_seqlens;
};

depth_rows rows_of_depth(int64_t depth) {
  depth_rows d;
  d.cu_seqlens = {0};
  for (size_t s = 0; s + 1 < seqs.size(); ++s) {
    const int32_t n = seqs[s + 1] - seqs[s] - static_cast<int32_t>(depth);
    if (n <= 0) continue;
    for (int32_t i = 0; i < n; ++i) d.rows.push_back(seqs[s] + i);
    d.cu_seqlens.push_back(static_cast<int32_t>(d.rows.size()));
  }
  return d;
}

// The MTP module written from its definition with the inference blocks, over depth k's rows:
// h = block(eh_proj([enorm(e) | hnorm(h_prev)])), normed = shared_head.norm(h). Returns the
// packed h and normed (rows of rows_of_depth(k)).
std::pair<std::vector<float>, std::vector<float>> reference_forward(tiny_mtp& m, int64_t depth,
                                                                    const std::vector<float>& h_prev,
                                                                    const std::vector<float>& next_emb) {
  const auto& c = m.config();
  const size_t D = m.hidden();
  const int64_t layer = c.num_hidden_layers + depth - 1;
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const auto lookup = lookup_in(m.ckpt);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const auto dr = rows_of_depth(depth);
  const size_t R = dr.rows.size();

  std::vector<float> e(R * D), h(R * D), en(R * D), hn(R * D), cat(R * 2 * D), x(R * D);
  for (size_t r = 0; r < R; ++r) {
    std::copy_n(next_emb.data() + dr.rows[r] * D, D, e.data() + r * D);
    std::copy_n(h_prev.data() + dr.rows[r] * D, D, h.data() + r * D);
  }
  EXPECT_EQ(kc::rmsnorm(e.data(), m.tensor(p + "enorm.weight").data(), en.data(), R, D, eps), kernel_status::ok);
  EXPECT_EQ(kc::rmsnorm(h.data(), m.tensor(p + "hnorm.weight").data(), hn.data(), R, D, eps), kernel_status::ok);
  for (size_t r = 0; r < R; ++r) {
    std::copy_n(en.data() + r * D, D, cat.data() + r * 2 * D);      // embedding first,
    std::copy_n(hn.data() + r * D, D, cat.data() + r * 2 * D + D);  // then the hidden state
  }
  EXPECT_EQ(kc::linear(cat.data(), m.tensor(p + "eh_proj.weight").data(), x.data(), R, 2 * D, D),
            kernel_status::ok);

  // Attention: prefill through a latent cache that has room for the MTP layers.
  auto attention = attention_block::bind(c, layer, lookup);
  EXPECT_TRUE(attention) << error_of(attention);
  latent_cache cache(c.num_hidden_layers + c.num_nextn_predict_layers, c.kv_lora_rank, c.qk_rope_head_dim,
                     {.num_blocks = 8, .block_size = 4});
  std::vector<int64_t> positions, slots;
  for (size_t s = 0; s + 1 < dr.cu_seqlens.size(); ++s) {
    const int64_t len = dr.cu_seqlens[s + 1] - dr.cu_seqlens[s];
    EXPECT_FALSE(cache.reserve(s, len));
    for (int64_t i = 0; i < len; ++i) {
      positions.push_back(i);
      slots.push_back(cache.slot(s, i));
    }
  }
  std::vector<float> mlp_in(R * D);
  EXPECT_FALSE(attention->prefill(x.data(), mlp_in.data(), R, prefill_layout{dr.cu_seqlens, positions, slots},
                                  cache));

  // MoE, composed as the reference engine composes it.
  EXPECT_TRUE(c.is_moe_layer(layer));
  auto router = router_block::bind(c, layer, lookup);
  EXPECT_TRUE(router) << error_of(router);
  std::vector<int64_t> all(c.n_routed_experts);
  std::iota(all.begin(), all.end(), 0);
  auto experts = expert_set::bind(c, layer, all, lookup);
  EXPECT_TRUE(experts) << error_of(experts);
  auto shared = mlp_block::bind(p + "mlp.shared_experts.", D, c.shared_intermediate_size(), lookup);
  EXPECT_TRUE(shared) << error_of(shared);
  const size_t k = router->top_k();
  std::vector<int32_t> idx(R * k);
  std::vector<float> w(R * k);
  EXPECT_FALSE(router->route(mlp_in.data(), R, idx.data(), w.data()));
  const auto rows = make_expert_rows(idx, w, k);
  std::vector<float> rows_in(rows.size() * D), rows_out(rows.size() * D);
  for (size_t r = 0; r < rows.size(); ++r)
    std::copy_n(mlp_in.data() + rows.token_of_row[r] * D, D, rows_in.data() + r * D);
  EXPECT_FALSE(experts->run(rows_in.data(), rows.size(), rows.expert_of_row.data(), rows.weight_of_row.data(),
                            rows_out.data()));
  std::vector<float> shared_out(R * D), mlp_out(R * D);
  mlp_scratch scratch;
  EXPECT_FALSE(shared->forward(mlp_in.data(), R, shared_out.data(), 0.0f, scratch));
  EXPECT_FALSE(moe_layer_output(rows_out.data(), rows, shared_out.data(), mlp_out.data(), R, D));
  for (size_t i = 0; i < R * D; ++i) x[i] += mlp_out[i];

  std::vector<float> normed(R * D);
  EXPECT_EQ(kc::rmsnorm(x.data(), m.tensor(p + "shared_head.norm.weight").data(), normed.data(), R, D, eps),
            kernel_status::ok);
  return {x, normed};
}

// Module outputs (full layout) against the packed reference; rows outside the depth must be 0.
void expect_matches(const std::vector<float>& full, const std::vector<float>& packed, int64_t depth,
                    size_t D, const char* what) {
  const auto dr = rows_of_depth(depth);
  std::vector<bool> inside(num_tokens, false);
  double max_err = 0, max_abs = 0;
  for (size_t r = 0; r < dr.rows.size(); ++r) {
    inside[dr.rows[r]] = true;
    for (size_t d = 0; d < D; ++d) {
      max_err = std::max(max_err, std::abs(double(full[dr.rows[r] * D + d]) - packed[r * D + d]));
      max_abs = std::max(max_abs, std::abs(double(packed[r * D + d])));
    }
  }
  EXPECT_LT(max_err, 1e-5) << what << ", depth " << depth;
  EXPECT_GT(max_abs, 1e-1) << what << ": vacuous comparison";
  for (size_t t = 0; t < num_tokens; ++t) {
    if (inside[t]) continue;
    for (size_t d = 0; d < D; ++d) ASSERT_EQ(full[t * D + d], 0.0f) << what << ", row " << t;
  }
}

TEST(mtp_training, forward_matches_the_inference_blocks) {
  auto m = tiny_mtp::load();
  const size_t D = m.hidden(), n = num_tokens * D;
  const auto lookup = lookup_in(m.ckpt);
  auto d1 = mtp_training_module::bind(m.config(), 1, lookup);
  ASSERT_TRUE(d1) << error_of(d1);
  auto d2 = mtp_training_module::bind(m.config(), 2, lookup);
  ASSERT_TRUE(d2) << error_of(d2);
  EXPECT_EQ(d1->layer(), 3);
  EXPECT_EQ(d2->layer(), 4);

  // next_emb rows from the real embedding of token i + k; rows outside the depth hold NaN, which
  // must not leak into anything.
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(m.config().vocab_size) - 1);
  std::vector<int32_t> ids(num_tokens);
  for (auto& t : ids) t = token(rng);
  const auto embed = m.tensor("model.embed_tokens.weight");
  auto embed_rows = [&](int64_t depth) {
    auto rows = make_mtp_token_rows(ids, seqs, depth);
    EXPECT_TRUE(rows) << error_of(rows);
    std::vector<float> e(n, NAN);
    for (size_t t = 0; t < num_tokens; ++t)
      if (rows->next_tokens[t] >= 0) std::copy_n(embed.data() + rows->next_tokens[t] * D, D, e.data() + t * D);
    return e;
  };
  const auto h0 = random_normal(n, 17);  // stands in for the main model's last hidden state
  const auto e1 = embed_rows(1), e2 = embed_rows(2);

  std::vector<float> h1(n, NAN), normed1(n, NAN), h2(n, NAN), normed2(n, NAN);
  ASSERT_FALSE(d1->forward(h0.data(), e1.data(), h1.data(), normed1.data(), num_tokens, seqs));
  ASSERT_EQ(d1->rows().size(), rows_of_depth(1).rows.size());
  const auto [want_h1, want_n1] = reference_forward(m, 1, h0, e1);
  expect_matches(h1, want_h1, 1, D, "h_out");
  expect_matches(normed1, want_n1, 1, D, "normed");

  // Depth 2 chains on depth 1's output as is.
  ASSERT_FALSE(d2->forward(h1.data(), e2.data(), h2.data(), normed2.data(), num_tokens, seqs));
  const auto [want_h2, want_n2] = reference_forward(m, 2, h1, e2);
  expect_matches(h2, want_h2, 2, D, "h_out");
  expect_matches(normed2, want_n2, 2, D, "normed");
}

TEST(mtp_training, token_rows) {
  const std::vector<int32_t> ids = {10, 11, 12, 13, 20, 21, 30};
  const std::vector<int32_t> cu = {0, 4, 6, 7};
  auto r1 = make_mtp_token_rows(ids, cu, 1);
  ASSERT_TRUE(r1) << error_of(r1);
  EXPECT_EQ(r1->next_tokens, (std::vector<int32_t>{11, 12, 13, -1, 21, -1, -1}));
  EXPECT_EQ(r1->targets, (std::vector<int32_t>{12, 13, -1, -1, -1, -1, -1}));
  auto r2 = make_mtp_token_rows(ids, cu, 2);
  ASSERT_TRUE(r2) << error_of(r2);
  EXPECT_EQ(r2->next_tokens, (std::vector<int32_t>{12, 13, -1, -1, -1, -1, -1}));
  EXPECT_EQ(r2->targets, (std::vector<int32_t>{13, -1, -1, -1, -1, -1, -1}));
  EXPECT_FALSE(make_mtp_token_rows(ids, cu, 0));
  EXPECT_FALSE(make_mtp_token_rows(ids, std::vector<int32_t>{0, 4, 6}, 1));
}

// ------------------------------------------------------------------------------------------
// backward against central differences of forward: L = sum(a * normed) + sum(b * h_out).

// Central differences, Richardson-extrapolated (steps h and h/2), as attention_training_test.
template <class Eval>
double derivative(float& value, float h, Eval&& eval) {
  const float saved = value;
  auto central = [&](float step) {
    const float up_value = saved + step, down_value = saved - step;
    value = up_value;
    const double up = eval();
    value = down_value;
    const double down = eval();
    value = saved;
    return (up - down) / (double(up_value) - double(down_value));
  };
  const double d1 = central(h), d2 = central(h / 2);
  return (4.0 * d2 - d1) / 3.0;
}

double rms(std::span<const float> v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s / static_cast<double>(v.size()));
}

// Forward is float32, so the objective carries ~1e-6 relative rounding noise that the difference
// quotient divides by the step: steps of 0.2 x the tensor's RMS keep it well under the tolerance
// with Richardson keeping the truncation error small (as in attention_training_test).
constexpr double fd_tolerance = 2e-3;
constexpr float fd_step = 0.2f;
constexpr size_t fd_samples = 20;

class gradient_check {
 public:
  explicit gradient_check(tiny_mtp& m) : m_(m) {
    const auto& c = m.config();
    const size_t D = m.hidden(), n = num_tokens * D;
    const std::string p = "model.layers.3.";
    // Norm scales away from 1 so that their gradients are not a special case.
    std::mt19937_64 rng(77);
    std::uniform_real_distribution<float> scale(0.8f, 1.2f);
    for (const char* norm : {"enorm.weight", "hnorm.weight", "input_layernorm.weight",
                             "self_attn.q_a_layernorm.weight", "self_attn.kv_a_layernorm.weight",
                             "post_attention_layernorm.weight", "shared_head.norm.weight"})
      for (auto& v : m.tensor(p + norm)) v = scale(rng);
    // A correction bias that fixes the choice (groups 0 and 1, experts 0, 1, 4, 5) with margins
    // of ~9, so no perturbation flips the routing; the routing weights, which do not see the
    // bias, still carry the gate's gradient.
    auto bias = m.tensor(p + "mlp.gate.e_score_correction_bias");
    std::ranges::fill(bias, 0.0f);
    for (int e : {0, 1, 4, 5}) bias[e] = 10.0f;
    EXPECT_EQ(c.n_routed_experts, 16);

    auto module = mtp_training_module::bind(c, 1, lookup_in(m.ckpt));
    EXPECT_TRUE(module) << error_of(module);
    module_.emplace(std::move(*module));
    h_prev_ = random_normal(n, 31);
    next_emb_ = random_normal(n, 32);
    a_ = random_normal(n, 33);
    b_ = random_normal(n, 34);
    std::vector<float> h_out(n), normed(n);
    EXPECT_FALSE(module_->forward(h_prev_.data(), next_emb_.data(), h_out.data(), normed.data(), num_tokens, seqs));
    routing_ = chosen_experts();
    EXPECT_EQ(routing_.size(), rows_of_depth(1).rows.size() * module_->mlp().top_k());

    grads_ = mtp_grads::zeros(c, 1);
    grads_.enorm.assign(D, 0.5f);  // backward accumulates: start from a known offset
    dh_prev_.assign(n, NAN);
    dnext_emb_.assign(n, NAN);
    EXPECT_FALSE(module_->backward(a_.data(), b_.data(), dh_prev_.data(), dnext_emb_.data(), grads_));
    for (auto& g : grads_.enorm) g -= 0.5f;
  }

  double objective() {
    const size_t n = h_prev_.size();
    std::vector<float> h_out(n), normed(n);
    EXPECT_FALSE(module_->forward(h_prev_.data(), next_emb_.data(), h_out.data(), normed.data(), num_tokens, seqs));
    EXPECT_EQ(chosen_experts(), routing_) << "a perturbation flipped the routing";
    double l = 0;
    for (size_t i = 0; i < n; ++i) l += double(a_[i]) * normed[i] + double(b_[i]) * h_out[i];
    return l;
  }

  // Each row's chosen experts as a set (sorted): the router orders them by score, and that
  // order may change without changing the function.
  std::vector<int32_t> chosen_experts() const {
    std::vector<int32_t> out(module_->mlp().routing().begin(), module_->mlp().routing().end());
    const size_t k = module_->mlp().top_k();
    for (size_t r = 0; r + k <= out.size(); r += k) std::sort(out.begin() + r, out.begin() + r + k);
    return out;
  }

  // ||numeric - analytic|| / ||analytic|| over sampled entries of `param`.
  double check(std::span<float> param, std::span<const float> analytic, const std::string& what,
               float step_factor = fd_step) {
    EXPECT_EQ(param.size(), analytic.size()) << what;
    if (param.size() != analytic.size() || param.empty()) return INFINITY;
    std::mt19937_64 rng(std::hash<std::string>{}(what));
    std::uniform_int_distribution<size_t> pick(0, param.size() - 1);
    const float step = step_factor * static_cast<float>(rms(param));
    double diff = 0, ref = 0;
    std::set<size_t> seen;
    for (int tries = 0; seen.size() < fd_samples && tries < 1000; ++tries) {
      const size_t i = pick(rng);
      if (!seen.insert(i).second) continue;
      const double fd = derivative(param[i], step, [&] { return objective(); });
      diff += (fd - analytic[i]) * (fd - analytic[i]);
      ref += double(analytic[i]) * analytic[i];
    }
    EXPECT_GT(ref, 0.0) << what << ": every sampled gradient is zero";
    const double rel = ref > 0 ? std::sqrt(diff / ref) : INFINITY;
    EXPECT_LT(rel, fd_tolerance) << what;
    std::printf("  %-40s relative error %.2e\n", what.c_str(), rel);
    return rel;
  }

  void check_weight(const std::string& suffix, std::span<const float> analytic, float step_factor = fd_step) {
    check(m_.tensor("model.layers.3." + suffix), analytic, suffix, step_factor);
  }

  std::vector<float> h_prev_, next_emb_, dh_prev_, dnext_emb_;
  mtp_grads grads_;

 private:
  tiny_mtp& m_;
  std::optional<mtp_training_module> module_;
  std::vector<float> a_, b_;
  std::vector<int32_t> routing_;
};

TEST(mtp_training, backward_matches_finite_differences) {
  auto m = tiny_mtp::load();
  gradient_check g(m);
  const size_t D = m.hidden();

  // Rows outside depth 1 get exactly zero input gradients.
  const auto inside = rows_of_depth(1).rows;
  for (size_t t = 0; t < num_tokens; ++t) {
    if (std::ranges::find(inside, static_cast<int32_t>(t)) != inside.end()) continue;
    for (size_t d = 0; d < D; ++d) {
      ASSERT_EQ(g.dh_prev_[t * D + d], 0.0f) << t;
      ASSERT_EQ(g.dnext_emb_[t * D + d], 0.0f) << t;
    }
  }

  g.check(g.h_prev_, g.dh_prev_, "dh_prev");
  g.check(g.next_emb_, g.dnext_emb_, "dnext_emb");
  auto& gr = g.grads_;
  g.check_weight("enorm.weight", gr.enorm);
  g.check_weight("hnorm.weight", gr.hnorm);
  g.check_weight("eh_proj.weight", gr.eh_proj);
  g.check_weight("input_layernorm.weight", gr.attention.input_layernorm);
  // q_a_layernorm makes q invariant to the scale of each q_a_proj output, so its gradient is
  // small against forward's rounding noise: a larger step (0.2 gives ~1e-3, 1.0 ~2e-4).
  g.check_weight("self_attn.q_a_proj.weight", gr.attention.q_a_proj, 1.0f);
  g.check_weight("self_attn.kv_b_proj.weight", gr.attention.kv_b_proj);
  g.check_weight("self_attn.o_proj.weight", gr.attention.o_proj);
  g.check_weight("post_attention_layernorm.weight", gr.attention.post_attention_layernorm);
  g.check_weight("mlp.gate.weight", gr.mlp.gate);
  g.check_weight("mlp.experts.4.up_proj.weight", gr.mlp.experts[4].up_proj);
  g.check_weight("mlp.shared_experts.down_proj.weight", gr.mlp.shared.down_proj);
  g.check_weight("shared_head.norm.weight", gr.shared_head_norm);
}

TEST(mtp_training, gradient_names_are_the_checkpoints) {
  auto m = tiny_mtp::load();
  for (int64_t depth : {1, 2}) {
    auto g = mtp_grads::zeros(m.config(), depth);
    size_t count = 0;
    std::set<std::string> names;
    g.for_each([&](std::string_view suffix, std::vector<float>& v) {
      const std::string name = layer_weight_name(mtp_layer(m.config(), depth), suffix);
      const host_tensor* t = m.ckpt.find(name);
      ASSERT_NE(t, nullptr) << name;
      EXPECT_EQ(static_cast<size_t>(t->num_elements()), v.size()) << name;
      names.insert(name);
      ++count;
    });
    EXPECT_EQ(names.size(), count);
    // Every MTP tensor of that layer but the correction bias has a gradient.
    size_t expected = 0;
    for (const auto& [name, t] : m.ckpt.tensors)
      if (name.starts_with(layer_weight_name(mtp_layer(m.config(), depth), "")) &&
          !name.ends_with("e_score_correction_bias"))
        ++expected;
    EXPECT_EQ(count, expected) << "depth " << depth;
  }
}

TEST(mtp_training, argument_errors) {
  auto m = tiny_mtp::load();
  const auto& c = m.config();
  const size_t D = m.hidden(), n = num_tokens * D;
  const auto lookup = lookup_in(m.ckpt);

  for (int64_t depth : {0, 3}) {
    auto b = mtp_training_module::bind(c, depth, lookup);
    ASSERT_FALSE(b) << depth;
    EXPECT_EQ(code_of(b), model_errc::bad_input);
    EXPECT_NE(error_of(b).find("num_nextn_predict_layers"), std::string::npos) << error_of(b);
  }
  {
    checkpoint no_mtp;
    no_mtp.config = c;
    for (const auto& [name, t] : m.ckpt.tensors)
      if (name != "model.layers.3.hnorm.weight") no_mtp.tensors.emplace(name, t);
    auto b = mtp_training_module::bind(c, 1, lookup_in(no_mtp));
    ASSERT_FALSE(b);
    EXPECT_EQ(code_of(b), model_errc::missing_tensor);
    EXPECT_NE(error_of(b).find("model.layers.3.hnorm.weight"), std::string::npos) << error_of(b);
  }
  {
    checkpoint k;
    k.config = c;
    EXPECT_EQ(code(add_random_mtp_weights(k, 0, 1)), model_errc::bad_input);
    EXPECT_EQ(code(add_random_mtp_weights(k, 3, 1)), model_errc::bad_input);
  }

  auto mod = mtp_training_module::bind(c, 1, lookup);
  ASSERT_TRUE(mod) << error_of(mod);
  const auto x = random_normal(n, 3);
  std::vector<float> h(n), normed(n), dh(n), de(n);
  auto grads = mtp_grads::zeros(c, 1);

  auto err = mod->backward(x.data(), nullptr, dh.data(), de.data(), grads);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_NE(error_text(err).find("without a successful forward"), std::string::npos) << error_text(err);

  for (const std::vector<int32_t>& bad : {std::vector<int32_t>{}, std::vector<int32_t>{1, 11},
                                          std::vector<int32_t>{0, 6, 4, 11}, std::vector<int32_t>{0, 10}}) {
    err = mod->forward(x.data(), x.data(), h.data(), normed.data(), num_tokens, bad);
    ASSERT_TRUE(err);
    EXPECT_EQ(code(err), model_errc::bad_input);
  }
  err = mod->forward(x.data(), nullptr, h.data(), normed.data(), num_tokens, seqs);
  ASSERT_TRUE(err);
  EXPECT_EQ(code(err), model_errc::bad_input);
  EXPECT_TRUE(mod->backward(x.data(), nullptr, dh.data(), de.data(), grads));  // no state kept

  ASSERT_FALSE(mod->forward(x.data(), x.data(), h.data(), normed.data(), num_tokens, seqs));
  auto misshapen = grads;
  misshapen.eh_proj.pop_back();
  EXPECT_EQ(code(mod->backward(x.data(), nullptr, dh.data(), de.data(), misshapen)), model_errc::bad_input);
  misshapen = grads;
  misshapen.mlp = mlp_half_grads::zeros(c, 0);  // a dense layer's
  EXPECT_EQ(code(mod->backward(x.data(), nullptr, dh.data(), de.data(), misshapen)), model_errc::bad_input);
  EXPECT_EQ(code(mod->backward(x.data(), nullptr, nullptr, de.data(), grads)), model_errc::bad_input);
  // Both upstream gradients null: all zero.
  EXPECT_FALSE(mod->backward(nullptr, nullptr, dh.data(), de.data(), grads));
  EXPECT_TRUE(std::ranges::all_of(dh, [](float v) { return v == 0.0f; }));
  EXPECT_TRUE(std::ranges::all_of(grads.eh_proj, [](float v) { return v == 0.0f; }));

  // Sequences all too short for the depth: nothing computed, zeros out, zeros back.
  const std::vector<int32_t> ones = {0, 1, 2};
  std::vector<float> h2(2 * D, NAN), n2(2 * D, NAN), dh2(2 * D, NAN), de2(2 * D, NAN);
  ASSERT_FALSE(mod->forward(x.data(), x.data(), h2.data(), n2.data(), 2, ones));
  EXPECT_TRUE(mod->rows().empty());
  EXPECT_TRUE(std::ranges::all_of(h2, [](float v) { return v == 0.0f; }));
  ASSERT_FALSE(mod->backward(x.data(), x.data(), dh2.data(), de2.data(), grads));
  EXPECT_TRUE(std::ranges::all_of(de2, [](float v) { return v == 0.0f; }));
}

}  // namespace
}  // namespace moe::model
