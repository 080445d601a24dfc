// trunk_training on tiny-v3 (layer 0 dense, layers 1 and 2 MoE): a pass driven phase by phase
// with local mlp_training_blocks against transformers' loss and gradients and against
// training_model, loss_scale, the phase order, and argument errors.
#include "model/trunk_training.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "model/model_errc.hpp"
#include "model/training_model.hpp"
#include "model/weight_lookup.hpp"
#include "tests/golden/golden_data.hpp"
#include "tests/unit/model/tiny_training_data.hpp"

namespace moe::model {
namespace {

using testing::golden_batch;
using testing::load_tiny;
using testing::tiny_dir;

model_errc code(const caf::error& e) { return static_cast<model_errc>(e.code()); }

// The trunk of tiny-v3 with each MoE layer's MLP local, as training_model runs it.
struct local_model {
  std::shared_ptr<checkpoint> weights;
  trunk_training trunk;
  std::map<int64_t, mlp_training_block> moe;
  std::map<int64_t, mlp_half_grads> moe_grads;
  std::vector<float> y, dmlp_in;
  double balance_loss = 0;

  static local_model bind(std::shared_ptr<checkpoint> w) {
    const auto& c = w->config;
    auto trunk = trunk_training::bind(c, lookup_in(*w));
    EXPECT_TRUE(trunk) << error_text(trunk.error());
    local_model m{w, std::move(*trunk), {}, {}, {}, {}};
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      if (!c.is_moe_layer(l)) continue;
      auto mlp = mlp_training_block::bind(c, l, lookup_in(*w));
      EXPECT_TRUE(mlp) << error_text(mlp.error());
      m.moe.emplace(l, std::move(*mlp));
      m.moe_grads.emplace(l, mlp_half_grads::zeros(c, l));
    }
    return m;
  }

  // One whole pass, every phase in order; the cross-entropy.
  caf::expected<double> pass(std::span<const std::vector<int32_t>> batch, double alpha = 0.0, double scale = 1.0) {
    const auto& c = weights->config;
    if (auto err = trunk.begin(batch)) return err;
    const size_t T = trunk.num_tokens();
    y.resize(T * static_cast<size_t>(c.hidden_size));
    dmlp_in.resize(y.size());
    balance_loss = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      if (!c.is_moe_layer(l)) {
        if (auto err = trunk.forward_dense_layer(l)) return err;
        continue;
      }
      if (auto err = trunk.forward_attention(l)) return err;
      auto& mlp = moe.at(l);
      if (auto err = mlp.forward(trunk.mlp_input().data(), y.data(), T, trunk.cu_seqlens(), alpha)) return err;
      balance_loss += mlp.balance_loss();
      if (auto err = trunk.add_moe_output(y)) return err;
    }
    auto loss = trunk.loss(scale);
    if (!loss) return loss;
    for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
      if (!c.is_moe_layer(l)) {
        if (auto err = trunk.backward_dense_layer(l)) return err;
        continue;
      }
      if (auto err = moe.at(l).backward(trunk.hidden_grad().data(), dmlp_in.data(), moe_grads.at(l))) return err;
      if (auto err = trunk.backward_attention(l, dmlp_in)) return err;
    }
    if (auto err = trunk.end_backward()) return err;
    return loss;
  }

  // Every gradient by hub name: the trunk's and the MoE layers'.
  std::map<std::string, std::vector<float>> grads() {
    std::map<std::string, std::vector<float>> out;
    trunk.for_each_grad([&](const std::string& name, std::vector<float>& g) {
      EXPECT_TRUE(out.emplace(name, g).second) << name << " twice";
    });
    for (auto& [l, g] : moe_grads) {
      const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
      out[p + "gate.weight"] = g.gate;
      for (size_t e = 0; e < g.experts.size(); ++e) {
        const std::string pe = p + "experts." + std::to_string(e) + ".";
        out[pe + "gate_proj.weight"] = g.experts[e].gate_proj;
        out[pe + "up_proj.weight"] = g.experts[e].up_proj;
        out[pe + "down_proj.weight"] = g.experts[e].down_proj;
      }
      out[p + "shared_experts.gate_proj.weight"] = g.shared.gate_proj;
      out[p + "shared_experts.up_proj.weight"] = g.shared.up_proj;
      out[p + "shared_experts.down_proj.weight"] = g.shared.down_proj;
    }
    return out;
  }
};

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

// A trunk at the start of a pass over the golden batch.
struct begun {
  local_model m = local_model::bind(load_tiny());
  std::vector<std::vector<int32_t>> batch = golden_batch();
  size_t values() const { return m.trunk.num_tokens() * static_cast<size_t>(m.weights->config.hidden_size); }

  begun() { EXPECT_FALSE(m.trunk.begin(batch)); }
  void forward_all() {
    ASSERT_FALSE(m.trunk.forward_dense_layer(0));
    for (int64_t l : {1, 2}) {
      ASSERT_FALSE(m.trunk.forward_attention(l));
      ASSERT_FALSE(m.trunk.add_moe_output(std::vector<float>(values(), 0.0f)));
    }
  }
};

TEST(trunk_training, a_pass_matches_transformers_loss_and_gradients) {
  auto m = local_model::bind(load_tiny());
  auto loss = m.pass(golden_batch());
  ASSERT_TRUE(loss) << error_text(loss.error());
  std::ifstream in(tiny_dir() / "golden.json");
  EXPECT_NEAR(*loss, nlohmann::json::parse(in)["loss"].get<double>(), 1e-4);
  const auto want = moe::testing::golden_file::open(tiny_dir() / "grads.safetensors");
  const auto got = m.grads();
  EXPECT_EQ(got.size(), 137u);  // every parameter transformers has a gradient for
  for (const auto& [name, g] : got) {
    const auto w = want.floats(name);
    ASSERT_EQ(w.size(), g.size()) << name;
    EXPECT_LE(relative_error(g, w), 1e-4) << name;
  }
}

TEST(trunk_training, a_pass_with_local_moe_blocks_is_training_models) {
  for (bool tied : {false, true}) {
    auto tiny = [&] {
      auto w = load_tiny();
      w->config.tie_word_embeddings = tied;
      return w;
    };
    auto m = local_model::bind(tiny());
    auto reference = training_model::bind(tiny());
    ASSERT_TRUE(reference) << error_text(reference.error());
    // Two passes accumulate, with a balance loss and a loss scale: every term of the step.
    const auto batch = golden_batch();
    const std::vector<std::vector<int32_t>> micro = {batch[0]};
    for (const auto& [part, scale] : {std::pair{batch, 0.75}, std::pair{micro, 0.25}}) {
      auto loss = m.pass(part, 0.01, scale);
      auto want = reference->forward_backward(part, 0.01, scale);
      ASSERT_TRUE(loss && want);
      EXPECT_EQ(*loss, *want);
      EXPECT_EQ(m.balance_loss, reference->balance_loss());
    }
    auto got = m.grads();
    size_t checked = 0;
    for (const auto& p : reference->parameters()) {
      ASSERT_TRUE(got.count(p.name)) << p.name;
      const auto& g = got.at(p.name);
      ASSERT_EQ(g.size(), p.grad.size()) << p.name;
      size_t differ = 0;
      for (size_t i = 0; i < g.size(); ++i) differ += std::abs(g[i] - p.grad[i]) > 1e-6f * (1 + std::abs(p.grad[i]));
      EXPECT_EQ(differ, 0u) << p.name << (tied ? " (tied)" : "");
      ++checked;
    }
    EXPECT_EQ(checked, got.size());
    if (tied) {
      EXPECT_EQ(&m.trunk.head_grad(), &m.trunk.embedding_grad());
      EXPECT_EQ(got.count("lm_head.weight"), 0u);
    }
  }
}

TEST(trunk_training, loss_scale_scales_every_gradient_not_the_loss) {
  auto plain = local_model::bind(load_tiny());
  auto scaled = local_model::bind(load_tiny());
  auto a = plain.pass(golden_batch());
  auto b = scaled.pass(golden_batch(), 0.0, 0.3);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(*a, *b);
  const auto ga = plain.grads(), gb = scaled.grads();
  for (const auto& [name, g] : ga) {
    std::vector<float> want(g.size());
    for (size_t i = 0; i < g.size(); ++i) want[i] = 0.3f * g[i];
    EXPECT_LE(relative_error(gb.at(name), want), 1e-5) << name;
    if (name == "lm_head.weight") {
      EXPECT_NE(gb.at(name), g);  // the test can tell
    }
  }
}

TEST(trunk_training, phases_out_of_order_are_refused_and_end_the_pass) {
  {  // nothing before begin()
    auto m = local_model::bind(load_tiny());
    EXPECT_EQ(code(m.trunk.forward_dense_layer(0)), model_errc::bad_input);
    EXPECT_EQ(code(m.trunk.loss().error()), model_errc::bad_input);
    EXPECT_EQ(code(m.trunk.end_backward()), model_errc::bad_input);
  }
  {  // a layer of the wrong kind; and the pass is over after the error
    begun p;
    const auto err = p.m.trunk.forward_attention(0);
    EXPECT_EQ(code(err), model_errc::bad_input);
    EXPECT_NE(error_text(err).find("dense"), std::string::npos) << error_text(err);
    EXPECT_EQ(code(p.m.trunk.forward_dense_layer(0)), model_errc::bad_input);
    ASSERT_FALSE(p.m.trunk.begin(p.batch));
    EXPECT_FALSE(p.m.trunk.forward_dense_layer(0));
    EXPECT_EQ(code(p.m.trunk.forward_dense_layer(1)), model_errc::bad_input);  // MoE
  }
  {  // a layer skipped
    begun p;
    EXPECT_EQ(code(p.m.trunk.forward_attention(1)), model_errc::bad_input);
  }
  {  // add_moe_output without forward_attention, and twice
    begun p;
    const std::vector<float> y(p.values(), 0.0f);
    EXPECT_EQ(code(p.m.trunk.add_moe_output(y)), model_errc::bad_input);
    ASSERT_FALSE(p.m.trunk.begin(p.batch));
    ASSERT_FALSE(p.m.trunk.forward_dense_layer(0));
    ASSERT_FALSE(p.m.trunk.forward_attention(1));
    ASSERT_FALSE(p.m.trunk.add_moe_output(y));
    EXPECT_EQ(code(p.m.trunk.add_moe_output(y)), model_errc::bad_input);
  }
  {  // the next layer before the MoE output
    begun p;
    ASSERT_FALSE(p.m.trunk.forward_dense_layer(0));
    ASSERT_FALSE(p.m.trunk.forward_attention(1));
    EXPECT_EQ(code(p.m.trunk.forward_attention(2)), model_errc::bad_input);
  }
  {  // loss() before the last layer, and after it
    begun p;
    ASSERT_FALSE(p.m.trunk.forward_dense_layer(0));
    ASSERT_FALSE(p.m.trunk.forward_attention(1));
    EXPECT_EQ(code(p.m.trunk.loss().error()), model_errc::bad_input);
    ASSERT_FALSE(p.m.trunk.begin(p.batch));
    p.forward_all();
    EXPECT_EQ(code(p.m.trunk.forward_attention(2)), model_errc::bad_input);  // past the last layer
  }
  {  // backward of the wrong layer or kind, loss() twice, end_backward() early
    const std::vector<std::function<caf::error(begun&)>> wrong = {
        [](begun& p) { return p.m.trunk.backward_attention(1, std::vector<float>(p.values())); },
        [](begun& p) { return p.m.trunk.backward_dense_layer(2); },
        [](begun& p) { return p.m.trunk.end_backward(); },
        [](begun& p) { return p.m.trunk.loss().error(); },
        [](begun& p) { return p.m.trunk.forward_dense_layer(0); },
    };
    for (size_t i = 0; i < wrong.size(); ++i) {
      begun p;
      p.forward_all();
      ASSERT_TRUE(p.m.trunk.loss());
      EXPECT_EQ(code(wrong[i](p)), model_errc::bad_input) << i;
      // The pass is over: even the right next step is refused.
      EXPECT_EQ(code(p.m.trunk.backward_attention(2, std::vector<float>(p.values()))), model_errc::bad_input) << i;
    }
  }
  {  // end_backward() once, after layer 0; a new pass may follow
    auto m = local_model::bind(load_tiny());
    ASSERT_TRUE(m.pass(golden_batch()));
    EXPECT_EQ(code(m.trunk.end_backward()), model_errc::bad_input);
    EXPECT_EQ(code(m.trunk.backward_dense_layer(0)), model_errc::bad_input);
    EXPECT_TRUE(m.pass(golden_batch()));
  }
}

TEST(trunk_training, bad_input_is_refused) {
  auto m = local_model::bind(load_tiny());
  auto refused = [&](std::vector<std::vector<int32_t>> batch) {
    const auto err = m.trunk.begin(batch);
    EXPECT_EQ(code(err), model_errc::bad_input);
    return error_text(err);
  };
  refused({});
  refused({{1, 2}, {}});
  EXPECT_NE(refused({{1, 512}}).find("outside the vocabulary"), std::string::npos);
  refused({{-1, 2}});
  refused({{1}, {2}});  // nothing predicted
  // A refused begin() leaves no pass to continue.
  EXPECT_EQ(code(m.trunk.forward_dense_layer(0)), model_errc::bad_input);

  {  // misshapen MoE output and input gradient; non-finite loss scale
    begun p;
    ASSERT_FALSE(p.m.trunk.forward_dense_layer(0));
    ASSERT_FALSE(p.m.trunk.forward_attention(1));
    EXPECT_EQ(code(p.m.trunk.add_moe_output(std::vector<float>(p.values() - 1))), model_errc::bad_input);
  }
  {
    begun p;
    p.forward_all();
    EXPECT_EQ(code(p.m.trunk.loss(std::numeric_limits<double>::quiet_NaN()).error()), model_errc::bad_input);
  }
  {
    begun p;
    p.forward_all();
    ASSERT_TRUE(p.m.trunk.loss());
    EXPECT_EQ(code(p.m.trunk.backward_attention(2, std::vector<float>(p.values() + 1))), model_errc::bad_input);
  }
  {
    begun p;
    p.forward_all();
    ASSERT_TRUE(p.m.trunk.loss());
    auto dx = p.m.trunk.hidden_grad();
    EXPECT_EQ(code(p.m.trunk.backward_attention(2, dx)), model_errc::bad_input);  // overlaps what it updates
  }
}

TEST(trunk_training, bind_reports_the_missing_tensor) {
  auto w = load_tiny();
  const auto inner = lookup_in(*w);
  const weight_lookup without_head = [&](const std::string& name, std::span<const int64_t> shape) {
    if (name == "lm_head.weight") return caf::expected<const float*>(make_error(model_errc::missing_tensor, name));
    return inner(name, shape);
  };
  auto t = trunk_training::bind(w->config, without_head);
  ASSERT_FALSE(t);
  EXPECT_EQ(code(t.error()), model_errc::missing_tensor);
  // Tied embeddings need no head.
  auto tied = w->config;
  tied.tie_word_embeddings = true;
  auto u = trunk_training::bind(tied, without_head);
  ASSERT_TRUE(u) << error_text(u.error());
  EXPECT_EQ(u->head(), u->embedding());
}

TEST(trunk_training, parameters_are_the_checkpoints_tensors_with_the_trunks_gradients) {
  auto m = local_model::bind(load_tiny());
  ASSERT_TRUE(m.pass(golden_batch()));
  const auto params = m.trunk.parameters(*m.weights);
  // Embedding, 3 x 9 attention tensors, layer 0's dense MLP (3), final norm, head.
  ASSERT_EQ(params.size(), 33u);
  EXPECT_EQ(params.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(params.back().name, "lm_head.weight");
  std::set<std::string> names;
  for (const auto& p : params) {
    EXPECT_TRUE(names.insert(p.name).second) << p.name;
    EXPECT_EQ(p.value.data(), m.weights->find(p.name)->data().data()) << p.name;
    EXPECT_EQ(p.name.find(".mlp.gate"), p.name.find(".mlp.gate_proj")) << p.name;  // no MoE tensor
  }
  EXPECT_TRUE(names.count("model.layers.0.mlp.down_proj.weight"));
  EXPECT_EQ(params.back().grad.data(), m.trunk.head_grad().data());
  m.trunk.zero_grads();
  for (const auto& p : params)
    EXPECT_TRUE(std::all_of(p.grad.begin(), p.grad.end(), [](float g) { return g == 0.0f; })) << p.name;
}

}  // namespace
}  // namespace moe::model
