#include "cli/prompt_ids.hpp"

#include <charconv>
#include <climits>
#include <cmath>
#include <string>

#include "cli/flag_checks.hpp"
#include "model/model_errc.hpp"

namespace moe::cli {

caf::expected<std::vector<int32_t>> parse_token_ids(std::string_view text, std::string_view flag) {
  std::vector<int32_t> ids;
  size_t begin = 0;
  while (true) {
    const size_t end = std::min(text.find(',', begin), text.size());
    const std::string_view item = text.substr(begin, end - begin);
    int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec == std::errc::invalid_argument || ptr != item.data() + item.size()) {
      return model::make_error(model::model_errc::bad_input,
                               std::string(flag) + ": '" + std::string(item) +
                                   "' is not a token id (expected e.g. 5,17,42)");
    }
    if (ec == std::errc::result_out_of_range || v < 0 || v > INT32_MAX) {
      return model::make_error(model::model_errc::bad_input,
                               std::string(flag) + ": token id " + std::string(item) +
                                   " is out of range");
    }
    ids.push_back(static_cast<int32_t>(v));
    if (end == text.size()) break;
    begin = end + 1;
  }
  return ids;
}

void add_generation_flags(CLI::App& cmd, generation_flags& f) {
  cmd.add_option("--prompt-ids", f.prompt_ids, "Prompt token ids, comma-separated")->required();
  cmd.add_option("--max-new-tokens", f.max_new_tokens, "Tokens to generate (0: none)")
      ->check(whole_number(0));
  cmd.add_option("--temperature", f.temperature, "Sampling temperature (default: greedy)")
      ->check(real_number(0.0, HUGE_VAL));
  cmd.add_option("--top-p", f.top_p, "Nucleus sampling mass, in (0, 1]")
      ->check(real_number(0.0, 1.0, /*low_open=*/true));
  cmd.add_option("--top-k", f.top_k, "Sample among the k most likely tokens (0: all)")
      ->check(whole_number(0, UINT32_MAX));
  cmd.add_option("--seed", f.seed, "Sampling seed")->check(seed_number());
  cmd.add_option("--stop-ids", f.stop_ids, "Stop token ids, comma-separated");
}

}  // namespace moe::cli
