// The GPU engine with expert parallelism (gpu_engine_options::expert_parallel) on tiny-v3: worlds
// of 1, 2 and 4 ranks, each an engine on its own device holding its share of the 16 routed
// experts and running its own sequences, every MoE layer a round of the world. Each rank's steps
// must give what one engine holding every expert gives for the same steps (the yardstick, run
// first with the same inputs): the same tokens, the same experts for every token, and logits
// within float32 rounding (the experts' products run on the same kernel over the same rows, only
// gathered in another order; measured identical in the emulator). The ranks' steps differ: one
// rank idles (empty batches) while the others prefill, a prefill on one rank meets decode steps
// on the others, and a step one rank refuses (bad input, too many tokens) leaves its peers'
// steps and the world's next steps as they would have been.
//
// Built against the emulator's CUDA runtime, kernels and NCCL (label unit, CI: worlds of up to
// four emulated devices) and against the real ones (label gpu), where a world larger than the
// machine's GPU count is skipped with the reason (one H200 runs the world of one).
#include <gtest/gtest.h>

#ifdef MOE_HAVE_CUDA
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "engine/gpu_engine.hpp"
#include "engine/gpu_step_engine.hpp"
#include "model/model_errc.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/kernels/cuda_test_support.hpp"
#include "tests/unit/runtime/nccl_world.hpp"

using namespace moe;
using engine::gpu_engine;
using kernels::dtype;
using moe::test_support::cannot_form;
using moe::test_support::rank_ctx;
using moe::test_support::run_world;

namespace {

constexpr int64_t max_tokens = 32;

/// A prompt with its tokens (model::sequence_input only views them).
struct owned_prompt {
  uint64_t id = 0;
  std::vector<int32_t> tokens;
};

/// One rank's part of one step of the world.
struct action {
  enum class kind { idle, prefill, decode } what = kind::idle;
  std::vector<owned_prompt> prompts;  ///< prefill
  std::vector<uint64_t> ids;          ///< decode: the sequences, fed their last token
  /// Input this rank's engine must refuse (a token outside the vocabulary, or more tokens than
  /// max_tokens): the yardstick skips it, and the sequences stay as they were.
  bool refused = false;
};

/// What one rank's step gave, and with what input (decode: the tokens fed).
struct outcome {
  std::vector<model::decode_input> batch;
  std::vector<float> logits;
  std::vector<int32_t> tokens;
  std::vector<std::vector<int32_t>> routing;
};

using script = std::vector<std::vector<action>>;  // [step][rank]

owned_prompt prompt(uint64_t id, size_t length) {
  owned_prompt q{id, {}};
  for (size_t i = 0; i < length; ++i)
    q.tokens.push_back(static_cast<int32_t>((37 * i + 11 * id + 5) % 512));
  return q;
}

/// Rank 1 idles until step 2, then prefills while the others decode; rank 0 prefills a second
/// time at step 4 while the others decode; everyone decodes at the last step.
script mixed_steps(int world) {
  script s(6, std::vector<action>(static_cast<size_t>(world)));
  for (int r = 0; r < world; ++r) {
    const auto base = static_cast<uint64_t>(100 * r);
    auto& steps = s;
    const auto at = static_cast<size_t>(r);
    std::vector<uint64_t> own;
    auto prefill = [&](size_t step, std::vector<owned_prompt> prompts) {
      for (const auto& q : prompts) own.push_back(q.id);
      steps[step][at] = {action::kind::prefill, std::move(prompts), {}, false};
    };
    auto decode = [&](size_t step) {
      if (!own.empty()) steps[step][at] = {action::kind::decode, {}, own, false};
    };
    if (r != 1) {
      prefill(0, r == 0 ? std::vector{prompt(base + 1, 5), prompt(base + 2, 9)}
                        : std::vector{prompt(base + 1, 6 + static_cast<size_t>(r))});
    }
    decode(1);
    if (r == 1)
      prefill(2, {prompt(base + 1, 7)});
    else
      decode(2);
    decode(3);
    if (r == 0)
      prefill(4, {prompt(base + 3, 4)});
    else
      decode(4);
    decode(5);
  }
  return s;
}

model::model_errc code_of(const caf::error& e) {
  return static_cast<model::model_errc>(e.code());
}

struct world_case {
  int world = 1;
  dtype dt = dtype::f32;
  friend void PrintTo(const world_case& c, std::ostream* os) {
    *os << "world of " << c.world << ", " << kernels::to_string(c.dt);
  }
};

class gpu_engine_expert_parallel_test : public ::testing::TestWithParam<world_case> {
 protected:
  void SetUp() override {
    MOE_KERNELS_SKIP_WITHOUT_GPU();
    ckpt_ = moe::testing::load_fixture("tiny-v3");
    ASSERT_TRUE(ckpt_);
  }

  engine::gpu_engine_options options(int device, ncclComm_t comm) const {
    engine::gpu_engine_options o;
    o.dtype = GetParam().dt;
    o.device = device;
    o.cache.num_blocks = 64;
    o.cache.block_size = 4;
    o.decode_graphs = false;  // expert parallelism runs eagerly; the yardstick at the same shapes
    o.expert_parallel = {comm, max_tokens};
    return o;
  }

  /// The action on `e`, decode steps fed `last` (each sequence's last token), which it updates.
  static caf::expected<outcome> run(gpu_engine& e, const action& a,
                                    std::map<uint64_t, int32_t>& last, int64_t vocab) {
    outcome out;
    caf::expected<engine::gpu_step_result> r = engine::gpu_step_result{};
    if (a.what == action::kind::prefill) {
      std::vector<owned_prompt> owned = a.prompts;
      if (a.refused) owned.push_back(prompt(999, max_tokens));  // past max_tokens in all
      std::vector<model::sequence_input> prompts;
      for (const auto& q : owned) prompts.push_back({q.id, q.tokens});
      engine::gpu_prefill_options o;
      o.capture_routing = true;
      r = e.prefill(prompts, o);
    } else if (a.what == action::kind::decode) {
      for (const uint64_t id : a.ids) {
        // A sequence whose earlier step failed (a test failure already) is fed token 0.
        const int32_t token = last.count(id) ? last[id] : 0;
        out.batch.push_back({id, a.refused ? static_cast<int32_t>(vocab) : token});
      }
      engine::gpu_decode_options o;
      o.capture_routing = true;
      r = e.decode(out.batch, o);
    } else {
      r = e.decode({});  // this rank's part of the world's step
    }
    if (!r) return r.error();
    out.logits = std::move(r->logits);
    out.tokens = std::move(r->tokens);
    out.routing = std::move(r->routing);
    const std::vector<uint64_t> ids = [&] {
      std::vector<uint64_t> v;
      for (const auto& q : a.prompts) v.push_back(q.id);
      return a.what == action::kind::prefill ? v : a.ids;
    }();
    for (size_t i = 0; i < ids.size() && i < out.tokens.size(); ++i) last[ids[i]] = out.tokens[i];
    return out;
  }

  /// Every rank's accepted actions on one engine holding every expert, step by step.
  std::vector<std::vector<outcome>> yardstick(const script& s, int world) {
    engine::gpu_engine_options o = options(0, nullptr);
    auto e = gpu_engine::create(ckpt_, o);
    EXPECT_TRUE(e) << error_text(e.error());
    std::vector<std::vector<outcome>> want(s.size(),
                                           std::vector<outcome>(static_cast<size_t>(world)));
    if (!e) return want;
    std::map<uint64_t, int32_t> last;
    for (size_t step = 0; step < s.size(); ++step)
      for (size_t r = 0; r < static_cast<size_t>(world); ++r) {
        const action& a = s[step][r];
        if (a.refused || a.what == action::kind::idle) continue;
        auto got = run(*e, a, last, ckpt_->config.vocab_size);
        EXPECT_TRUE(got) << "step " << step << " rank " << r << ": " << error_text(got.error());
        if (got) want[step][r] = std::move(*got);
      }
    return want;
  }

  /// The script on a world of `world` ranks, each rank's steps against the yardstick's.
  void run_script(const script& s, int world) {
    if (const auto why = cannot_form(world); !why.empty()) GTEST_SKIP() << why;
    const auto want = yardstick(s, world);
    const int64_t moe_layers = 2;  // tiny-v3: 3 layers, the first dense
    run_world(world, [&](const rank_ctx& ctx) {
      auto e = gpu_engine::create(ckpt_, options(ctx.rank, ctx.comm));
      ASSERT_TRUE(e) << "rank " << ctx.rank << ": " << error_text(e.error());
      std::map<uint64_t, int32_t> last;
      int64_t ran = 0;
      for (size_t step = 0; step < s.size(); ++step) {
        const auto r = static_cast<size_t>(ctx.rank);
        const action& a = s[step][r];
        const std::string where = "step " + std::to_string(step) + ", rank " + std::to_string(r);
        auto got = run(*e, a, last, ckpt_->config.vocab_size);
        if (a.refused) {
          EXPECT_FALSE(got) << where << ": bad input was taken";
          if (!got) {
            EXPECT_EQ(code_of(got.error()), model::model_errc::bad_input) << where;
          }
          continue;
        }
        EXPECT_TRUE(got) << where << ": " << error_text(got.error());
        if (!got) continue;
        const outcome& w = want[step][r];
        if (a.what == action::kind::idle) {
          EXPECT_TRUE(got->tokens.empty()) << where;
          continue;
        }
        ++ran;
        EXPECT_EQ(got->tokens, w.tokens) << where;
        EXPECT_EQ(got->routing, w.routing) << where << ": every token's experts";
        ASSERT_EQ(got->logits.size(), w.logits.size()) << where;
        float worst = 0.0f;
        for (size_t i = 0; i < w.logits.size(); ++i)
          worst = std::max(worst, std::abs(got->logits[i] - w.logits[i]));
        // The same products of the same rows, in float32 sums whose order the gather does not
        // change: within a few float32 roundings of logits below ~5 in either dtype.
        EXPECT_LE(worst, 1e-5f) << where;
      }
      const auto stats = e->kernel_stats();
      EXPECT_EQ(stats.experts_parallel, static_cast<uint64_t>(ran * moe_layers))
          << "rank " << ctx.rank;
      EXPECT_EQ(stats.experts_grouped_gemm, 0u) << "rank " << ctx.rank;
    });
  }

  std::shared_ptr<const model::checkpoint> ckpt_;
};

TEST_P(gpu_engine_expert_parallel_test, each_rank_gets_what_one_engine_with_every_expert_gives) {
  const int world = GetParam().world;
  run_script(mixed_steps(world), world);
}

TEST_P(gpu_engine_expert_parallel_test, a_step_one_rank_refuses_leaves_the_others_and_the_next) {
  const int world = GetParam().world;
  script s = mixed_steps(world);
  // Rank 0 refuses its decode at step 1 (a token outside the vocabulary) and its prefill at
  // step 4 (more tokens than max_tokens); the last rank refuses its decode at step 3.
  s[1][0].refused = true;
  s[4][0].refused = true;
  s[3][static_cast<size_t>(world - 1)].refused = true;
  auto& after = s[5][0].ids;  // the refused prefill's sequence is not there to decode
  after.erase(std::find(after.begin(), after.end(), s[4][0].prompts[0].id));
  run_script(s, world);
}

// The step engine over an expert-parallel engine (what an engine shard drives): a step its own
// check refuses (check_step: sampling out of range) never reaches the engine, and the rank
// still takes its part in the world's step, so its peers' prefills go through; so do every
// rank's next steps. The tokens are those of one step engine holding every expert running each
// rank's accepted steps.
TEST_P(gpu_engine_expert_parallel_test, a_step_engines_own_refusal_still_takes_part) {
  const int world = GetParam().world;
  if (const auto why = cannot_form(world); !why.empty()) GTEST_SKIP() << why;
  std::vector<owned_prompt> prompts;  // rank r's sequence
  for (int r = 0; r < world; ++r)
    prompts.push_back(prompt(static_cast<uint64_t>(100 * r + 1), 5 + static_cast<size_t>(r)));
  auto greedy = [](const owned_prompt& q) { return model::step_sequence{q.id, q.tokens}; };
  // Step 0: every rank prefills its prompt but rank 0, refused; step 1: rank 0 prefills again,
  // the others decode; steps 2 and 3: every rank decodes. Tokens by rank, step by step.
  auto steps_of = [&](model::step_engine& e, int r, bool refuse_first,
                      const std::function<void(caf::expected<model::step_output>&)>& first)
      -> std::vector<int32_t> {
    const owned_prompt& q = prompts[static_cast<size_t>(r)];
    std::vector<int32_t> tokens;
    std::vector<model::step_sequence> step{greedy(q)};
    if (refuse_first) step[0].sampling.temperature = -1.0f;
    auto got = e.prefill(step, false);
    first(got);
    bool cached = !refuse_first && got;
    if (cached) tokens.push_back(got->tokens.at(0));
    for (int i = 1; i < 4; ++i) {
      std::vector<int32_t> fed;
      if (cached) {
        fed = {tokens.back()};
        got = e.decode(std::vector<model::step_sequence>{{q.id, fed}}, false);
      } else {
        got = e.prefill(std::vector<model::step_sequence>{greedy(q)}, false);
        cached = static_cast<bool>(got);
      }
      EXPECT_TRUE(got) << "rank " << r << ", step " << i << ": " << error_text(got.error());
      if (!got) break;
      tokens.push_back(got->tokens.at(0));
    }
    return tokens;
  };
  std::vector<std::vector<int32_t>> want(static_cast<size_t>(world));
  {
    auto one = gpu_engine::create(ckpt_, options(0, nullptr));
    ASSERT_TRUE(one) << error_text(one.error());
    engine::gpu_step_engine e(std::move(*one), 0);
    for (int r = 0; r < world; ++r)
      want[static_cast<size_t>(r)] = steps_of(e, r, r == 0, [](auto&) {});
  }
  std::vector<std::vector<int32_t>> got(static_cast<size_t>(world));
  run_world(world, [&](const rank_ctx& ctx) {
    auto e = gpu_engine::create(ckpt_, options(ctx.rank, ctx.comm));
    ASSERT_TRUE(e) << "rank " << ctx.rank << ": " << error_text(e.error());
    engine::gpu_step_engine se(std::move(*e), ctx.rank);
    got[static_cast<size_t>(ctx.rank)] =
        steps_of(se, ctx.rank, ctx.rank == 0, [&](caf::expected<model::step_output>& first) {
          if (ctx.rank == 0) {
            ASSERT_FALSE(first) << "rank 0: sampling out of range was taken";
            EXPECT_EQ(code_of(first.error()), model::model_errc::bad_input)
                << error_text(first.error());
          } else {
            EXPECT_TRUE(first) << "rank " << ctx.rank << ": " << error_text(first.error());
          }
        });
  });
  for (int r = 0; r < world; ++r)
    EXPECT_EQ(got[static_cast<size_t>(r)], want[static_cast<size_t>(r)]) << "rank " << r;
}

std::string case_name(const ::testing::TestParamInfo<world_case>& info) {
  return "world" + std::to_string(info.param.world) + "_" +
         std::string(kernels::to_string(info.param.dt));
}

INSTANTIATE_TEST_SUITE_P(worlds, gpu_engine_expert_parallel_test,
                         ::testing::Values(world_case{1, dtype::f32}, world_case{1, dtype::bf16},
                                           world_case{2, dtype::f32}, world_case{2, dtype::bf16},
                                           world_case{4, dtype::f32}, world_case{4, dtype::bf16}),
                         case_name);

TEST(gpu_engine_expert_parallel, options_it_cannot_honour_are_refused_with_the_reason) {
  MOE_KERNELS_SKIP_WITHOUT_GPU();
  auto ckpt = moe::testing::load_fixture("tiny-v3");
  ASSERT_TRUE(ckpt);
  auto refused = [&](const engine::gpu_engine_options& o, const std::string& says) {
    auto e = gpu_engine::create(ckpt, o);
    ASSERT_FALSE(e) << "created with " << says;
    EXPECT_EQ(code_of(e.error()), model::model_errc::bad_input);
    EXPECT_NE(error_text(e.error()).find(says), std::string::npos) << error_text(e.error());
  };
  run_world(1, [&](const rank_ctx& ctx) {
    engine::gpu_engine_options o;
    o.cache.num_blocks = 8;
    o.cache.block_size = 4;
    o.decode_graphs = false;
    o.expert_parallel = {ctx.comm, 16};
    auto graphs = o;
    graphs.decode_graphs = true;
    refused(graphs, "decode_graphs must be off");
    auto wgmma = o;
    wgmma.wgmma_experts = true;
    refused(wgmma, "wgmma_experts must be off");
    auto no_tokens = o;
    no_tokens.expert_parallel.max_tokens = 0;
    refused(no_tokens, "max_tokens must be positive");
    auto fp8 = o;  // small-v3-fp8's experts kept FP8 in bf16
    auto fp8_ckpt = moe::testing::load_fixture("small-v3-fp8", /*keep_fp8=*/true);
    ASSERT_TRUE(fp8_ckpt);
    auto e = gpu_engine::create(fp8_ckpt, fp8);
    ASSERT_FALSE(e) << "FP8 experts taken";
    EXPECT_NE(error_text(e.error()).find("not FP8"), std::string::npos) << error_text(e.error());
    // The same options without the world are an engine like any other.
    auto plain = o;
    plain.expert_parallel = {};
    EXPECT_TRUE(gpu_engine::create(ckpt, plain));
  });
  // 16 experts do not split over 3 ranks.
  if (const auto why = cannot_form(3); !why.empty()) GTEST_SKIP() << why;
  run_world(3, [&](const rank_ctx& ctx) {
    engine::gpu_engine_options o;
    o.device = ctx.rank;
    o.cache.num_blocks = 8;
    o.cache.block_size = 4;
    o.decode_graphs = false;
    o.expert_parallel = {ctx.comm, 16};
    refused(o, "do not split evenly over a world of 3");
  });
}

}  // namespace

#else
TEST(gpu_engine_expert_parallel, needs_the_cuda_backend) {
  GTEST_SKIP() << "built without MOE_CUDA";
}
#endif
