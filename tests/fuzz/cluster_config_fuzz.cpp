// libFuzzer target: the cluster config (runtime/cluster_config.hpp), YAML text an operator
// writes or a deployment tool generates; every `moe` process parses it at start.
// Properties: parse_cluster_config returns a config or a clustercfg error with a text, whatever
// the text (yaml-cpp's exceptions never leave it); a parsed config renders (to_string,
// to_json), and neither rendering depends on the secret or the TLS key's passphrase (they are
// redacted, never shown).
// The first line of the input also goes to parse_size, the parser of every size field.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "runtime/cluster_config.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

void check_redacted(const moe::runtime::cluster_config& config) {
  auto other = config;
  other.secret += "#other";
  if (other.tls) other.tls->passphrase += "#other";
  MOE_FUZZ_CHECK(moe::runtime::to_string(config) == moe::runtime::to_string(other));
  MOE_FUZZ_CHECK(moe::runtime::to_json(config) == moe::runtime::to_json(other));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)moe::runtime::parse_size(text.substr(0, text.find('\n')));
  auto config = moe::runtime::parse_cluster_config(text, "fuzz.yaml");
  if (!config) {
    moe::fuzz::check_rejection(config.error(), "clustercfg");
    return 0;
  }
  MOE_FUZZ_CHECK(!config->secret.empty());
  check_redacted(*config);
  for (size_t i = 0; i < config->nodes.size(); ++i) {
    (void)moe::runtime::node_control_port(*config, i);
    (void)moe::runtime::node_metrics_port(*config, i);
  }
  return 0;
}
