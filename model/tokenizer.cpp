#include "model/tokenizer.hpp"

#include "model/model_errc.hpp"

namespace moe::model {

std::vector<int32_t> byte_tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

caf::expected<std::string> byte_tokenizer::decode(std::span<const int32_t> ids) const {
  std::string out(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > 255)
      return make_error(model_errc::bad_input,
                        "byte tokenizer: id " + std::to_string(ids[i]) + " is not a byte (0..255)");
    out[i] = static_cast<char>(ids[i]);
  }
  return out;
}

caf::expected<std::unique_ptr<tokenizer>> make_tokenizer(int64_t model_vocab_size) {
  if (model_vocab_size < 256)
    return make_error(model_errc::bad_config, "the byte-level tokenizer needs a vocabulary of at least 256 ids; the "
                                              "model has " + std::to_string(model_vocab_size));
  return std::unique_ptr<tokenizer>(std::make_unique<byte_tokenizer>());
}

}  // namespace moe::model
