// The reference engine against Hugging Face transformers' outputs (tests/data/*/golden.*):
// logits and every hidden state, greedy tokens through the latent-cache decode path, batches of
// different lengths, expert choices, and the FP8 checkpoint.
#include <gtest/gtest.h>

#include <numeric>

#include "golden_data.hpp"
#include "model/model_errc.hpp"
#include "model/reference_engine.hpp"

using namespace moe;
using namespace moe::testing;

namespace {

constexpr int64_t rows = 2, seq_len = 16;

struct fixture_case {
  std::string name;
  float tolerance;
  friend void PrintTo(const fixture_case& c, std::ostream* os) { *os << c.name; }
};

class golden : public ::testing::TestWithParam<fixture_case> {};

std::vector<int32_t> row_of(const std::vector<int32_t>& ids, int64_t r, int64_t len = seq_len) {
  return {ids.begin() + r * seq_len, ids.begin() + r * seq_len + len};
}

}  // namespace

TEST_P(golden, logits_and_hidden_states_match_transformers) {
  const auto& param = GetParam();
  auto ckpt = load_fixture(param.name);
  ASSERT_TRUE(ckpt);
  auto engine = model::reference_engine::create(ckpt);
  ASSERT_TRUE(engine) << error_text(engine.error());
  const auto g = golden_file::open(fixture_dir(param.name) / "golden.safetensors");
  const auto ids = g.ids("input_ids");
  const auto logits = g.floats("logits");
  const auto& c = ckpt->config;
  const size_t V = c.vocab_size, D = c.hidden_size;

  // Both rows in one batch, as transformers ran them.
  const auto r0 = row_of(ids, 0), r1 = row_of(ids, 1);
  const model::sequence_input seqs[] = {{10, r0}, {11, r1}};
  model::prefill_options opts;
  opts.all_logits = true;
  opts.capture_hidden = true;
  auto out = engine->prefill(seqs, opts);
  ASSERT_TRUE(out) << error_text(out.error());
  ASSERT_EQ(out->logits.size(), logits.size());
  EXPECT_LE(max_abs_diff(out->logits.data(), logits.data(), logits.size()), param.tolerance);
  ASSERT_EQ(out->hidden.size(), static_cast<size_t>(c.num_hidden_layers + 1));
  for (size_t i = 0; i < out->hidden.size(); ++i) {
    const auto want = g.floats("hidden_states." + std::to_string(i));
    ASSERT_EQ(want.size(), rows * seq_len * D);
    EXPECT_LE(max_abs_diff(out->hidden[i].data(), want.data(), want.size()), param.tolerance)
        << "hidden_states." << i;
  }
  (void)V;
}

TEST_P(golden, greedy_tokens_through_the_latent_cache_decode_path) {
  const auto& param = GetParam();
  auto ckpt = load_fixture(param.name);
  ASSERT_TRUE(ckpt);
  auto engine = model::reference_engine::create(ckpt);
  ASSERT_TRUE(engine);
  const auto g = golden_file::open(fixture_dir(param.name) / "golden.safetensors");
  model::generation_request req;
  req.prompt = g.ids("greedy_prompt");
  const auto want = g.ids("greedy_tokens");
  req.max_new_tokens = static_cast<int64_t>(want.size());
  auto got = model::generate(*engine, std::span(&req, 1));
  ASSERT_TRUE(got) << error_text(got.error());
  EXPECT_EQ((*got)[0], want);
}

TEST_P(golden, decode_logits_equal_prefill_logits_at_every_position) {
  // The absorbed decode over the compressed cache is the same function as the decompressed
  // prefill: feed row 0 token by token after an 4-token prefill and compare with the goldens.
  const auto& param = GetParam();
  auto ckpt = load_fixture(param.name);
  ASSERT_TRUE(ckpt);
  auto engine = model::reference_engine::create(ckpt);
  ASSERT_TRUE(engine);
  const auto g = golden_file::open(fixture_dir(param.name) / "golden.safetensors");
  const auto ids = g.ids("input_ids");
  const auto logits = g.floats("logits");
  const size_t V = ckpt->config.vocab_size;
  const auto prompt = row_of(ids, 0, 4);
  const model::sequence_input seq[] = {{1, prompt}};
  ASSERT_TRUE(engine->prefill(seq));
  for (int64_t pos = 4; pos < seq_len; ++pos) {
    const model::decode_input step[] = {{1, ids[pos]}};
    auto out = engine->decode(step);
    ASSERT_TRUE(out) << error_text(out.error());
    EXPECT_LE(max_abs_diff(out->data(), logits.data() + pos * V, V), param.tolerance) << pos;
  }
  EXPECT_EQ(engine->cached_tokens(1), seq_len);
}

TEST_P(golden, sequences_of_different_lengths_in_one_batch_get_what_they_get_alone) {
  const auto& param = GetParam();
  auto ckpt = load_fixture(param.name);
  ASSERT_TRUE(ckpt);
  const auto g = golden_file::open(fixture_dir(param.name) / "golden.safetensors");
  const auto ids = g.ids("input_ids");
  const auto a = row_of(ids, 0, 16), b = row_of(ids, 1, 9);
  const size_t V = ckpt->config.vocab_size;

  auto alone = [&](const std::vector<int32_t>& p) {
    auto e = model::reference_engine::create(ckpt);
    const model::sequence_input s[] = {{7, p}};
    model::prefill_options o;
    o.all_logits = true;
    return e->prefill(s, o)->logits;
  };
  const auto la = alone(a), lb = alone(b);
  auto engine = model::reference_engine::create(ckpt);
  const model::sequence_input both[] = {{1, a}, {2, b}};
  model::prefill_options o;
  o.all_logits = true;
  auto together = engine->prefill(both, o);
  ASSERT_TRUE(together);
  EXPECT_LE(max_abs_diff(together->logits.data(), la.data(), a.size() * V), 1e-5f);
  EXPECT_LE(max_abs_diff(together->logits.data() + a.size() * V, lb.data(), b.size() * V), 1e-5f);

  // And greedy generation of both together equals each alone, token for token.
  model::generation_request ra, rb;
  ra.prompt = a;
  rb.prompt = b;
  ra.max_new_tokens = 12;
  rb.max_new_tokens = 7;
  auto e2 = model::reference_engine::create(ckpt);
  const model::generation_request reqs[] = {ra, rb};
  auto gen_both = model::generate(*e2, reqs);
  auto gen_a = model::generate(*e2, std::span(&ra, 1));
  auto gen_b = model::generate(*e2, std::span(&rb, 1));
  ASSERT_TRUE(gen_both && gen_a && gen_b);
  EXPECT_EQ((*gen_both)[0], (*gen_a)[0]);
  EXPECT_EQ((*gen_both)[1], (*gen_b)[0]);
}

INSTANTIATE_TEST_SUITE_P(fixtures, golden,
                         ::testing::Values(fixture_case{"tiny-v3", 1e-4f},
                                           fixture_case{"small-v3-fp8", 2e-3f}),
                         [](const auto& info) {
                           std::string n = info.param.name;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(golden_errors, prompt_ids_outside_the_vocabulary_are_rejected) {
  auto ckpt = load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  auto engine = model::reference_engine::create(ckpt);
  const std::vector<int32_t> bad = {5, 17, 512};
  const model::sequence_input s[] = {{1, bad}};
  auto out = engine->prefill(s);
  ASSERT_FALSE(out);
  EXPECT_NE(error_text(out.error()).find("outside the vocabulary"), std::string::npos);
  // Nothing was cached: the same id can be used again.
  const std::vector<int32_t> good = {5, 17, 42};
  const model::sequence_input s2[] = {{1, good}};
  EXPECT_TRUE(engine->prefill(s2));
}

TEST_P(golden, expert_choices_equal_transformers_from_the_router) {
  // routing.safetensors holds transformers' router inputs and top-k choices per MoE layer
  // (tests/tools/make_routing_golden.py). Its columns come from torch.topk(sorted=False), so
  // each token's experts are compared as a set.
  const auto& param = GetParam();
  auto ckpt = load_fixture(param.name);
  ASSERT_TRUE(ckpt);
  const auto& c = ckpt->config;
  const auto r = golden_file::open(fixture_dir(param.name) / "routing.safetensors");
  const auto lookup = model::lookup_in(*ckpt);
  const size_t k = c.num_experts_per_tok;
  int64_t checked_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    auto router = model::router_block::bind(c, l, lookup);
    ASSERT_TRUE(router) << error_text(router.error());
    const auto x = r.floats("router_input." + std::to_string(l));
    const auto want_idx = r.ids("topk_idx." + std::to_string(l));
    const auto want_w = r.floats("topk_weight." + std::to_string(l));
    const size_t T = x.size() / c.hidden_size;
    std::vector<int32_t> idx(T * k);
    std::vector<float> w(T * k);
    ASSERT_FALSE(router->route(x.data(), T, idx.data(), w.data()));
    for (size_t t = 0; t < T; ++t) {
      for (size_t j = 0; j < k; ++j) {
        // Find transformers' column for our j-th expert; its weight must match too.
        const auto* row = want_idx.data() + t * k;
        const auto* hit = std::find(row, row + k, idx[t * k + j]);
        ASSERT_NE(hit, row + k) << "layer " << l << " token " << t << ": expert "
                                << idx[t * k + j] << " not chosen by transformers";
        EXPECT_NEAR(w[t * k + j], want_w[t * k + (hit - row)], 1e-5f);
      }
    }
    ++checked_layers;
  }
  EXPECT_GT(checked_layers, 0);
}
