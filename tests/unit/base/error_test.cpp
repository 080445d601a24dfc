#include "base/error.hpp"

#include <caf/sec.hpp>
#include <gtest/gtest.h>

namespace {

using moe::error_text;
using moe::with_context;

TEST(base_error, error_text_is_the_reason_or_cafs_rendering) {
  EXPECT_EQ(error_text(caf::error{}), "no error");
  EXPECT_EQ(error_text(caf::make_error(caf::sec::runtime_error, std::string("disk full"))),
            "disk full");
  // No single string as context: CAF's own rendering still names the code.
  EXPECT_NE(error_text(caf::make_error(caf::sec::request_timeout)).find("request_timeout"),
            std::string::npos);
}

TEST(base_error, with_context_prefixes_the_reason_and_keeps_the_code) {
  const caf::error inner = caf::make_error(caf::sec::cannot_open_file, std::string("weights.bin"));
  const caf::error outer = with_context(with_context(inner, "shard 2"), "serving");
  EXPECT_EQ(error_text(outer), "serving: shard 2: weights.bin");
  EXPECT_EQ(outer.category(), inner.category());
  EXPECT_EQ(outer.code(), inner.code());
  EXPECT_EQ(outer, caf::sec::cannot_open_file);

  // An error without a string reason keeps CAF's rendering of it after the prefix.
  const caf::error bare = with_context(caf::make_error(caf::sec::request_timeout), "fetch");
  EXPECT_EQ(bare, caf::sec::request_timeout);
  EXPECT_EQ(error_text(bare).rfind("fetch: ", 0), 0u) << error_text(bare);

  EXPECT_FALSE(with_context(caf::error{}, "nothing failed"));
}

}  // namespace
