#include "engine/gpu_step_engine.hpp"

#include <string>

#include "model/model_errc.hpp"

namespace moe::engine {

namespace {

model::step_output output_of(gpu_step_result&& r) {
  return {std::move(r.tokens), std::move(r.logits)};
}

}  // namespace

void gpu_step_engine::fill_sampling(std::span<const model::step_sequence> seqs) {
  sampling_.clear();
  for (const auto& s : seqs) sampling_.push_back({s.sampling, s.seed, s.offset});
}

std::string gpu_step_engine::device() const {
  return "cuda:" + std::to_string(device_) + " " +
         std::string(kernels::to_string(engine_.storage_dtype()));
}

caf::error gpu_step_engine::refused(caf::error refusal, bool decode) {
  if (!engine_.expert_parallel()) return refusal;
  auto idle = decode ? engine_.decode({}) : engine_.prefill({});
  if (idle) return refusal;
  // The world is broken (a failed collective); the refusal (check_step's, a model error) is
  // still this step's answer.
  return model::make_error(static_cast<model::model_errc>(refusal.code()),
                           error_text(refusal) +
                               "; and this rank's empty part of the expert-parallel step failed: " +
                               error_text(idle.error()));
}

caf::expected<model::step_output> gpu_step_engine::prefill(
    std::span<const model::step_sequence> seqs, bool want_logits) {
  if (auto err = model::check_step(seqs, false)) return refused(std::move(err), false);
  std::vector<model::sequence_input> in;
  in.reserve(seqs.size());
  for (const auto& s : seqs) in.push_back({s.id, s.tokens});
  fill_sampling(seqs);
  gpu_prefill_options o;
  o.return_logits = want_logits;
  o.sampling = sampling_;
  auto r = engine_.prefill(in, o);
  if (!r) return r.error();
  return output_of(std::move(*r));
}

caf::expected<model::step_output> gpu_step_engine::decode(
    std::span<const model::step_sequence> seqs, bool want_logits) {
  if (auto err = model::check_step(seqs, true)) return refused(std::move(err), true);
  std::vector<model::decode_input> in;
  in.reserve(seqs.size());
  for (const auto& s : seqs) in.push_back({s.id, s.tokens[0]});
  fill_sampling(seqs);
  gpu_decode_options o;
  o.return_logits = want_logits;
  o.sampling = sampling_;
  auto r = engine_.decode(in, o);
  if (!r) return r.error();
  return output_of(std::move(*r));
}

}  // namespace moe::engine
