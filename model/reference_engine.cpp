#include "model/reference_engine.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/gather.hpp"
#include "kernels/cpu/gemm.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "model/model_errc.hpp"
#include "model/scratch.hpp"

namespace moe::model {

namespace kc = kernels::cpu;
using kernels::kernel_status;

namespace {

using detail::ensure_size;

caf::error kernel_error(const char* what) {
  return make_error(model_errc::kernel_failed, std::string(what) + ": a kernel rejected its arguments");
}

}  // namespace

// --- embedding_head -----------------------------------------------------------------------------

caf::expected<embedding_head> embedding_head::bind(const model_config& c,
                                                   const weight_lookup& weights) {
  embedding_head h;
  h.vocab_ = c.vocab_size;
  h.hidden_ = c.hidden_size;
  h.eps_ = static_cast<float>(c.rms_norm_eps);
  const int64_t table[] = {c.vocab_size, c.hidden_size};
  const int64_t norm[] = {c.hidden_size};
  auto e = weights("model.embed_tokens.weight", table);
  if (!e) return e.error();
  auto n = weights("model.norm.weight", norm);
  if (!n) return n.error();
  auto l = weights(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", table);
  if (!l) return l.error();
  h.embed_ = *e;
  h.norm_ = *n;
  h.head_ = *l;
  return h;
}

caf::error embedding_head::embed(std::span<const int32_t> ids, float* out) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_) {
      return make_error(model_errc::bad_input, "token id " + std::to_string(ids[i]) +
                                                   " is outside the vocabulary [0, " +
                                                   std::to_string(vocab_) + ")");
    }
  }
  if (kc::gather_rows(embed_, vocab_, hidden_, ids.data(), ids.size(), out) != kernel_status::ok)
    return kernel_error("embedding");
  return {};
}

caf::error embedding_head::final_norm(const float* x, size_t rows, float* out) const {
  if (kc::rmsnorm(x, norm_, out, rows, hidden_, eps_) != kernel_status::ok)
    return kernel_error("final norm");
  return {};
}

caf::error embedding_head::logits(const float* x, size_t rows, float* out, float* normed) const {
  std::vector<float> local;
  if (!normed) {
    local.resize(rows * hidden_);
    normed = local.data();
  }
  if (kc::rmsnorm(x, norm_, normed, rows, hidden_, eps_) != kernel_status::ok ||
      kc::linear(normed, head_, out, rows, hidden_, vocab_) != kernel_status::ok)
    return kernel_error("lm head");
  return {};
}

// --- reference_engine ---------------------------------------------------------------------------

caf::expected<reference_engine> reference_engine::create(std::shared_ptr<const checkpoint> ckpt,
                                                         const engine_options& options) {
  reference_engine e;
  e.ckpt_ = std::move(ckpt);
  const model_config& c = e.ckpt_->config;
  const weight_lookup lookup = lookup_in(*e.ckpt_);
  auto head = embedding_head::bind(c, lookup);
  if (!head) return head.error();
  e.head_ = *head;
  std::vector<int64_t> all_experts(static_cast<size_t>(c.n_routed_experts));
  std::iota(all_experts.begin(), all_experts.end(), 0);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto attn = attention_block::bind(c, l, lookup);
    if (!attn) return attn.error();
    e.attention_.push_back(std::move(*attn));
    if (!c.is_moe_layer(l)) {
      auto mlp = mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.", c.hidden_size,
                                 c.intermediate_size, lookup);
      if (!mlp) return mlp.error();
      e.dense_.emplace_back(*mlp);
      e.moe_.emplace_back();
      continue;
    }
    auto router = router_block::bind(c, l, lookup);
    if (!router) return router.error();
    auto experts = expert_set::bind(c, l, all_experts, lookup);
    if (!experts) return experts.error();
    std::optional<mlp_block> shared;
    if (c.n_shared_experts > 0) {
      auto s = mlp_block::bind("model.layers." + std::to_string(l) + ".mlp.shared_experts.",
                               c.hidden_size, c.shared_intermediate_size(), lookup);
      if (!s) return s.error();
      shared = *s;
    }
    e.dense_.emplace_back();
    e.moe_.emplace_back(moe_layer_blocks{std::move(*router), std::move(*experts), shared});
  }
  e.expert_counts_.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (e.moe_[l]) e.expert_counts_[l].assign(static_cast<size_t>(c.n_routed_experts), 0);
  e.cache_ = std::make_unique<latent_cache>(c.num_hidden_layers, c.kv_lora_rank,
                                            c.qk_rope_head_dim, options.cache);
  return e;
}

int64_t reference_engine::cached_tokens(uint64_t id) const noexcept {
  auto it = lengths_.find(id);
  return it == lengths_.end() ? 0 : it->second;
}

void reference_engine::release(uint64_t id) {
  cache_->release(id);
  lengths_.erase(id);
}

caf::error reference_engine::run_ffn(int64_t layer, const float* mlp_in, float* x, size_t T,
                                     std::vector<int32_t>* routing) {
  const size_t D = config().hidden_size;
  if (auto& dense = dense_[layer]) return dense->forward(mlp_in, T, x, 1.0f, scratch_);
  auto& m = *moe_[layer];
  const size_t k = m.router.top_k();
  ensure_size(topk_idx_, T * k);
  ensure_size(topk_weight_, T * k);
  if (auto err = m.router.route(mlp_in, T, topk_idx_.data(), topk_weight_.data())) return err;
  if (routing) routing->assign(topk_idx_.begin(), topk_idx_.begin() + T * k);
  auto& counts = expert_counts_[layer];
  for (size_t i = 0; i < T * k; ++i) ++counts[static_cast<size_t>(topk_idx_[i])];
  const expert_rows rows = make_expert_rows(std::span(topk_idx_).first(T * k),
                                            std::span(topk_weight_).first(T * k), k);
  ensure_size(rows_in_, rows.size() * D);
  ensure_size(rows_out_, rows.size() * D);
  if (kc::gather_rows(mlp_in, T, D, rows.token_of_row.data(), rows.size(), rows_in_.data()) !=
      kernel_status::ok)
    return kernel_error("expert dispatch");
  if (auto err = m.experts.run(rows_in_.data(), rows.size(), rows.expert_of_row.data(),
                               rows.weight_of_row.data(), rows_out_.data()))
    return err;
  ensure_size(y_, T * D);
  const float* shared = nullptr;
  if (m.shared) {
    ensure_size(shared_, T * D);
    if (auto err = m.shared->forward(mlp_in, T, shared_.data(), 0.0f, scratch_)) return err;
    shared = shared_.data();
  }
  if (auto err = moe_layer_output(rows_out_.data(), rows, shared, y_.data(), T, D)) return err;
  if (kc::add(x, y_.data(), x, T * D) != kernel_status::ok) return kernel_error("residual");
  return {};
}

caf::expected<prefill_result> reference_engine::prefill(std::span<const sequence_input> seqs,
                                                        const prefill_options& options) {
  const model_config& c = config();
  const size_t D = c.hidden_size;
  std::vector<int32_t> cu{0};
  std::vector<int32_t> ids;
  std::vector<int64_t> positions;
  for (const auto& s : seqs) {
    if (s.tokens.empty())
      return make_error(model_errc::bad_input, "sequence " + std::to_string(s.id) + " is empty");
    if (lengths_.count(s.id) || std::count_if(seqs.begin(), seqs.end(), [&](const auto& o) {
          return o.id == s.id;
        }) > 1)
      return make_error(model_errc::bad_input,
                        "sequence " + std::to_string(s.id) + " is already in the batch or cache");
    if (static_cast<int64_t>(s.tokens.size()) > c.max_position_embeddings)
      return make_error(model_errc::bad_input, "sequence longer than max_position_embeddings");
    ids.insert(ids.end(), s.tokens.begin(), s.tokens.end());
    for (size_t p = 0; p < s.tokens.size(); ++p) positions.push_back(static_cast<int64_t>(p));
    cu.push_back(static_cast<int32_t>(ids.size()));
  }
  const size_t T = ids.size();
  ensure_size(x_, T * D);
  ensure_size(mlp_in_, T * D);
  if (auto err = head_->embed(ids, x_.data())) return err;
  // Reserve every sequence's blocks before touching the cache, so a full cache changes nothing.
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (auto err = cache_->reserve(seqs[i].id, static_cast<int64_t>(seqs[i].tokens.size()))) {
      for (size_t j = 0; j <= i; ++j) cache_->release(seqs[j].id);
      return err;
    }
  }
  std::vector<int64_t> slots(T);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int32_t t = cu[i]; t < cu[i + 1]; ++t)
      slots[t] = cache_->slot(seqs[i].id, positions[t]);

  prefill_result result;
  const prefill_layout layout{cu, positions, slots};
  auto fail = [&](caf::error err) -> caf::expected<prefill_result> {
    for (const auto& s : seqs) cache_->release(s.id);
    return err;
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (options.capture_hidden) result.hidden.emplace_back(x_.begin(), x_.begin() + T * D);
    if (auto err = attention_[l].prefill(x_.data(), mlp_in_.data(), T, layout, *cache_))
      return fail(err);
    std::vector<int32_t>* routing = nullptr;
    if (options.capture_routing && moe_[l]) routing = &result.routing.emplace_back();
    if (auto err = run_ffn(l, mlp_in_.data(), x_.data(), T, routing)) return fail(err);
  }
  const size_t V = c.vocab_size;
  std::vector<float> normed(T * D);
  if (options.all_logits) {
    result.logits.resize(T * V);
    if (auto err = head_->logits(x_.data(), T, result.logits.data(), normed.data()))
      return fail(err);
  } else {
    std::vector<float> last(seqs.size() * D);
    for (size_t i = 0; i < seqs.size(); ++i)
      std::memcpy(last.data() + i * D, x_.data() + (cu[i + 1] - 1) * D, D * sizeof(float));
    result.logits.resize(seqs.size() * V);
    if (auto err = head_->logits(last.data(), seqs.size(), result.logits.data(), nullptr))
      return fail(err);
  }
  if (options.capture_hidden) {
    if (!options.all_logits) {
      if (auto err = head_->final_norm(x_.data(), T, normed.data())) return fail(err);
    }
    result.hidden.emplace_back(normed.begin(), normed.end());
  }
  for (const auto& s : seqs) lengths_[s.id] = static_cast<int64_t>(s.tokens.size());
  return result;
}

caf::expected<std::vector<float>> reference_engine::decode(std::span<const decode_input> batch) {
  const model_config& c = config();
  const size_t D = c.hidden_size, B = batch.size();
  if (B == 0) return std::vector<float>{};
  std::vector<int32_t> ids(B);
  std::vector<int64_t> positions(B), slots(B);
  std::vector<int32_t> seq_lens(B);
  for (size_t b = 0; b < B; ++b) {
    auto it = lengths_.find(batch[b].id);
    if (it == lengths_.end())
      return make_error(model_errc::bad_input,
                        "sequence " + std::to_string(batch[b].id) + " has no prefill");
    if (it->second >= c.max_position_embeddings)
      return make_error(model_errc::bad_input, "sequence reached max_position_embeddings");
    ids[b] = batch[b].token;
    positions[b] = it->second;
    seq_lens[b] = static_cast<int32_t>(it->second + 1);
  }
  ensure_size(x_, B * D);
  ensure_size(mlp_in_, B * D);
  if (auto err = head_->embed(ids, x_.data())) return err;
  for (size_t b = 0; b < B; ++b) {
    if (auto err = cache_->reserve(batch[b].id, positions[b] + 1)) return err;
    slots[b] = cache_->slot(batch[b].id, positions[b]);
  }
  size_t max_blocks = 1;
  for (const auto& d : batch) max_blocks = std::max(max_blocks, cache_->blocks(d.id).size());
  std::vector<int32_t> table(B * max_blocks, 0);
  for (size_t b = 0; b < B; ++b) {
    const auto& blocks = cache_->blocks(batch[b].id);
    std::copy(blocks.begin(), blocks.end(), table.begin() + b * max_blocks);
  }
  const decode_layout layout{positions, slots, table, max_blocks, seq_lens};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (auto err = attention_[l].decode(x_.data(), mlp_in_.data(), B, layout, *cache_)) return err;
    if (auto err = run_ffn(l, mlp_in_.data(), x_.data(), B, nullptr)) return err;
  }
  std::vector<float> logits(B * c.vocab_size);
  if (auto err = head_->logits(x_.data(), B, logits.data(), nullptr)) return err;
  for (size_t b = 0; b < B; ++b) lengths_[batch[b].id] = positions[b] + 1;
  return logits;
}

// --- generate -----------------------------------------------------------------------------------

caf::expected<std::vector<std::vector<int32_t>>> generate(
    reference_engine& engine, std::span<const generation_request> requests) {
  const size_t V = engine.config().vocab_size;
  const size_t n = requests.size();
  std::vector<std::vector<int32_t>> out(n);
  if (n == 0) return out;
  // Sequence ids private to this call.
  std::vector<uint64_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = (uint64_t{1} << 62) + i;
  std::vector<sequence_input> seqs;
  for (size_t i = 0; i < n; ++i) seqs.push_back({ids[i], requests[i].prompt});
  auto release_all = [&] {
    for (auto id : ids) engine.release(id);
  };
  auto pre = engine.prefill(seqs);
  if (!pre) return pre.error();
  kc::sampler sampler(V);
  std::vector<bool> done(n, false);
  auto take = [&](size_t i, const float* logits) -> caf::error {
    int32_t token = 0;
    if (sampler.draw(logits, requests[i].sampling, requests[i].seed, out[i].size(), &token) !=
        kernel_status::ok)
      return make_error(model_errc::bad_input, "sampling parameters rejected");
    out[i].push_back(token);
    const auto& stops = requests[i].stop_token_ids;
    if (static_cast<int64_t>(out[i].size()) >= requests[i].max_new_tokens ||
        std::find(stops.begin(), stops.end(), token) != stops.end())
      done[i] = true;
    return {};
  };
  for (size_t i = 0; i < n; ++i) {
    if (requests[i].max_new_tokens <= 0) {
      done[i] = true;
      continue;
    }
    if (auto err = take(i, pre->logits.data() + i * V)) {
      release_all();
      return err;
    }
  }
  for (;;) {
    std::vector<decode_input> batch;
    std::vector<size_t> who;
    for (size_t i = 0; i < n; ++i) {
      if (!done[i]) {
        batch.push_back({ids[i], out[i].back()});
        who.push_back(i);
      }
    }
    if (batch.empty()) break;
    auto logits = engine.decode(batch);
    if (!logits) {
      release_all();
      return logits.error();
    }
    for (size_t b = 0; b < who.size(); ++b) {
      if (auto err = take(who[b], logits->data() + b * V)) {
        release_all();
        return err;
      }
    }
  }
  release_all();
  return out;
}

}  // namespace moe::model
