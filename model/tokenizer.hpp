// Text to token ids and back. The interface a real tokenizer (BPE from a checkpoint's
// tokenizer.json) will implement; the embedded default model is trained and served with the
// byte-level one: every byte of the UTF-8 text is one token, id = byte value, so any text
// round-trips exactly and the model needs a vocabulary of at least 256.
// Thread safety: encode/decode are const and safe from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace moe::model {

class tokenizer {
 public:
  virtual ~tokenizer() = default;
  [[nodiscard]] virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  /// model_errc::bad_input for an id the tokenizer does not know.
  [[nodiscard]] virtual caf::expected<std::string> decode(std::span<const int32_t> ids) const = 0;
  /// Ids encode() produces lie in [0, vocab_size()).
  [[nodiscard]] virtual int64_t vocab_size() const noexcept = 0;
  [[nodiscard]] virtual std::string name() const = 0;
};

class byte_tokenizer final : public tokenizer {
 public:
  [[nodiscard]] std::vector<int32_t> encode(std::string_view text) const override;
  [[nodiscard]] caf::expected<std::string> decode(std::span<const int32_t> ids) const override;
  [[nodiscard]] int64_t vocab_size() const noexcept override { return 256; }
  [[nodiscard]] std::string name() const override { return "byte"; }
};

/// The tokenizer for a model of `model_vocab_size` ids: the byte-level one (a vocabulary below
/// 256 cannot hold it: model_errc::bad_config).
[[nodiscard]] caf::expected<std::unique_ptr<tokenizer>> make_tokenizer(int64_t model_vocab_size);

}  // namespace moe::model
