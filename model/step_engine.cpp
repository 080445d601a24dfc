#include "model/step_engine.hpp"

#include <cmath>
#include <string>

#include "model/model_errc.hpp"

namespace moe::model {

caf::error check_step(std::span<const step_sequence> seqs, bool decode) {
  for (const auto& s : seqs) {
    if (decode && s.tokens.size() != 1)
      return make_error(model_errc::bad_input, "sequence " + std::to_string(s.id) +
                                                   ": a decode step takes exactly one token");
    if (!(s.sampling.temperature >= 0.0f) || !(s.sampling.top_p > 0.0f && s.sampling.top_p <= 1.0f))
      return make_error(
          model_errc::bad_input,
          "sequence " + std::to_string(s.id) +
              ": sampling parameters out of range (temperature >= 0, top_p in (0, 1])");
  }
  return {};
}

reference_step_engine::reference_step_engine(reference_engine engine)
    : engine_(std::move(engine)), sampler_(static_cast<size_t>(engine_.config().vocab_size)) {}

caf::expected<step_output> reference_step_engine::prefill(std::span<const step_sequence> seqs,
                                                          bool want_logits) {
  if (auto err = check_step(seqs, false)) return err;
  std::vector<sequence_input> in;
  in.reserve(seqs.size());
  for (const auto& s : seqs) in.push_back({s.id, s.tokens});
  auto r = engine_.prefill(in);
  if (!r) return r.error();
  auto out = sample(seqs, std::move(r->logits), want_logits);
  if (!out)
    for (const auto& s : seqs) engine_.release(s.id);
  return out;
}

caf::expected<step_output> reference_step_engine::decode(std::span<const step_sequence> seqs,
                                                         bool want_logits) {
  if (auto err = check_step(seqs, true)) return err;
  std::vector<decode_input> in;
  in.reserve(seqs.size());
  for (const auto& s : seqs) in.push_back({s.id, s.tokens[0]});
  auto logits = engine_.decode(in);
  if (!logits) return logits.error();
  return sample(seqs, std::move(*logits), want_logits);
}

caf::expected<step_output> reference_step_engine::sample(std::span<const step_sequence> seqs,
                                                         std::vector<float> logits,
                                                         bool want_logits) {
  const size_t V = sampler_.vocab();
  step_output out;
  out.tokens.resize(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (sampler_.draw(logits.data() + i * V, seqs[i].sampling, seqs[i].seed, seqs[i].offset,
                      &out.tokens[i]) != kernels::kernel_status::ok)
      return make_error(model_errc::bad_input, "sequence " + std::to_string(seqs[i].id) +
                                                   ": sampling parameters rejected");
  }
  if (want_logits) out.logits = std::move(logits);
  return out;
}

void reference_step_engine::release(uint64_t id) {
  engine_.release(id);
}

int64_t reference_step_engine::cached_tokens(uint64_t id) const {
  return engine_.cached_tokens(id);
}

const model_config& reference_step_engine::config() const {
  return engine_.config();
}

}  // namespace moe::model
