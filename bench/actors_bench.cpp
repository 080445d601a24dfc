// The actor runtime against the reference engine on the same checkpoint, in one run: decode
// tokens/s and time to first token at several batch sizes. The actor path goes through the
// controller (continuous batching), the attention shard, its router and the expert groups.
// Prints one JSON object; `overhead` = 1 - actor decode tokens/s / reference decode tokens/s.
//
//   moe_bench_actors --model DIR [--groups N] [--batch 1,32] [--prompt-len 64] [--new-tokens 17]
#include <caf/all.hpp>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>

#include "actors/actor_types.hpp"
#include "actors/controller.hpp"
#include "actors/local_cluster.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/reference_engine.hpp"
#include "runtime/actor_system.hpp"

using clock_type = std::chrono::steady_clock;
using nlohmann::json;
namespace ma = moe::actors;

namespace {

double since(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct figures {
  double ttft_seconds = 0;  // mean over requests
  double decode_tokens_per_second = 0;
};

figures run_reference(std::shared_ptr<const moe::model::checkpoint> ckpt,
                      const std::vector<std::vector<int32_t>>& prompts, int64_t new_tokens,
                      int64_t block_size) {
  moe::model::engine_options eo;
  eo.cache.block_size = block_size;
  eo.cache.num_blocks = static_cast<int64_t>(prompts.size()) *
                        ((static_cast<int64_t>(prompts[0].size()) + new_tokens) / block_size + 2);
  auto engine = moe::model::reference_engine::create(ckpt, eo);
  std::vector<moe::model::sequence_input> seqs;
  for (size_t b = 0; b < prompts.size(); ++b) seqs.push_back({b, prompts[b]});
  const auto t0 = clock_type::now();
  auto pre = engine->prefill(seqs);
  const auto t1 = clock_type::now();
  const size_t V = static_cast<size_t>(ckpt->config.vocab_size);
  std::vector<moe::model::decode_input> step(prompts.size());
  std::vector<int32_t> last(prompts.size());
  for (size_t b = 0; b < prompts.size(); ++b)
    last[b] = static_cast<int32_t>(std::max_element(pre->logits.begin() + b * V,
                                                    pre->logits.begin() + (b + 1) * V) -
                                   (pre->logits.begin() + b * V));
  for (int64_t s = 1; s < new_tokens; ++s) {
    for (size_t b = 0; b < prompts.size(); ++b) step[b] = {b, last[b]};
    auto logits = engine->decode(step);
    for (size_t b = 0; b < prompts.size(); ++b)
      last[b] = static_cast<int32_t>(std::max_element(logits->begin() + b * V,
                                                      logits->begin() + (b + 1) * V) -
                                     (logits->begin() + b * V));
  }
  const auto t2 = clock_type::now();
  figures f;
  f.ttft_seconds = since(t0, t1);
  f.decode_tokens_per_second =
      static_cast<double>(prompts.size() * static_cast<size_t>(new_tokens - 1)) / since(t1, t2);
  return f;
}

figures run_actors(caf::actor_system& sys, const std::filesystem::path& dir, int groups,
                   const moe::model::model_config& cfg,
                   const std::vector<std::vector<int32_t>>& prompts, int64_t new_tokens,
                   int64_t block_size) {
  auto layout = ma::even_layout(1, groups, cfg.n_routed_experts);
  layout.cache.block_size = block_size;
  layout.cache.num_blocks = static_cast<int64_t>(prompts.size()) *
                            ((static_cast<int64_t>(prompts[0].size()) + new_tokens) / block_size + 2);
  auto cluster = ma::local_cluster::start(sys, dir, layout);
  if (!cluster) {
    std::fprintf(stderr, "%s\n", moe::error_text(cluster.error()).c_str());
    std::exit(1);
  }
  ma::controller_options co;
  co.shards = (*cluster)->shards();
  co.vocab_size = cfg.vocab_size;
  co.limits.max_running_requests = static_cast<int64_t>(prompts.size());
  co.limits.max_batch_tokens = static_cast<int64_t>(prompts.size() * prompts[0].size());
  auto controller = ma::spawn_controller(sys, co);
  caf::scoped_actor self{sys};
  std::map<uint64_t, clock_type::time_point> first;
  size_t finished = 0;
  const auto t0 = clock_type::now();
  for (const auto& p : prompts) {
    ma::generation_job j;
    j.prompt = p;
    j.max_new_tokens = new_tokens;
    self->request(controller, caf::infinite, ma::submit_atom::value, j, caf::actor{self})
        .receive([](uint64_t) {}, [](const caf::error& e) {
          std::fprintf(stderr, "%s\n", moe::error_text(e).c_str());
          std::exit(1);
        });
  }
  clock_type::time_point last_first, end;
  while (finished < prompts.size()) {
    self->receive([&](ma::job_event_atom, const ma::job_event& ev) {
      const auto now = clock_type::now();
      if (!ev.tokens.empty() && !first.count(ev.job)) {
        first[ev.job] = now;
        last_first = now;
      }
      if (ev.finished) {
        ++finished;
        end = now;
      }
    });
  }
  double ttft = 0;
  for (const auto& [id, t] : first) ttft += since(t0, t);
  figures f;
  f.ttft_seconds = ttft / static_cast<double>(first.size());
  f.decode_tokens_per_second =
      static_cast<double>(prompts.size() * static_cast<size_t>(new_tokens - 1)) / since(last_first, end);
  caf::anon_send_exit(controller, caf::exit_reason::user_shutdown);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Actor runtime vs reference engine (JSON on stdout)"};
  std::string model_dir, work_dir = "bench-models";
  std::vector<int64_t> batches = {1, 32};
  int64_t prompt_len = 64, new_tokens = 17, block_size = 16;
  int groups = 1;
  std::string caf_policy;
  app.add_option("--model", model_dir, "Checkpoint directory (default: preset small in --work-dir)");
  app.add_option("--work-dir", work_dir, "Where the default model is written");
  app.add_option("--batch", batches, "Batch sizes")->delimiter(',');
  app.add_option("--prompt-len", prompt_len, "Prompt tokens per request");
  app.add_option("--new-tokens", new_tokens, "Tokens generated per request (>= 2)");
  app.add_option("--groups", groups, "Expert groups of the actor layout");
  app.add_option("--caf-policy", caf_policy, "CAF scheduler policy: sharing (default) or stealing");
  CLI11_PARSE(app, argc, argv);
  if (model_dir.empty()) {
    model_dir = (std::filesystem::path(work_dir) / "small").string();
    if (!std::filesystem::exists(std::filesystem::path(model_dir) / "config.json")) {
      auto cfg = moe::model::model_preset("small");
      if (!cfg || !moe::model::init_model(model_dir, *cfg)) return 1;
    }
  }
  auto cfg = moe::model::load_config(model_dir);
  if (!cfg) return 1;
  moe::model::load_options lo;
  lo.mtp = moe::model::mtp_policy::skip;
  auto ckpt = moe::model::load_checkpoint(model_dir, *cfg, lo);
  if (!ckpt) return 1;
  auto shared = std::make_shared<const moe::model::checkpoint>(std::move(*ckpt));

  moe::runtime::actor_system_config::options so;
  so.load_middleman = false;
  if (!caf_policy.empty()) so.scheduler_policy = caf_policy;
  moe::runtime::actor_system_config sys_cfg{so};
  ma::add_actor_message_types(sys_cfg);
  caf::actor_system sys{sys_cfg};

  std::mt19937 rng(11);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg->vocab_size - 1));
  json runs = json::array();
  for (int64_t batch : batches) {
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch),
                                              std::vector<int32_t>(static_cast<size_t>(prompt_len)));
    for (auto& p : prompts)
      for (auto& t : p) t = token(rng);
    const auto ref = run_reference(shared, prompts, new_tokens, block_size);
    const auto act = run_actors(sys, model_dir, groups, *cfg, prompts, new_tokens, block_size);
    runs.push_back({{"batch", batch},
                    {"reference", {{"ttft_seconds", ref.ttft_seconds},
                                   {"decode_tokens_per_second", ref.decode_tokens_per_second}}},
                    {"actors", {{"ttft_seconds", act.ttft_seconds},
                                {"decode_tokens_per_second", act.decode_tokens_per_second}}},
                    {"decode_overhead", 1.0 - act.decode_tokens_per_second / ref.decode_tokens_per_second},
                    {"ttft_ratio", act.ttft_seconds / ref.ttft_seconds}});
  }
  json report = {{"benchmark", "actors_vs_reference"},
                 {"model", model_dir},
                 {"expert_groups", groups},
                 {"caf_scheduler_policy", so.scheduler_policy},
                 {"prompt_len", prompt_len},
                 {"new_tokens", new_tokens},
                 {"runs", runs}};
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
