#include "model/weight_lookup.hpp"

#include <algorithm>

#include "model/checkpoint.hpp"
#include "model/model_errc.hpp"
#include "model/safetensors.hpp"

namespace moe::model {

weight_lookup lookup_in(const checkpoint& ckpt) {
  return [&ckpt](const std::string& name,
                 std::span<const int64_t> shape) -> caf::expected<const float*> {
    const host_tensor* t = ckpt.find(name);
    if (!t && ckpt.find_fp8(name)) {
      return make_error(model_errc::bad_tensor,
                        name + ": kept as FP8 (load_options::keep_fp8), but this consumer needs "
                               "float32 weights; load the checkpoint without keep_fp8");
    }
    if (!t) return make_error(model_errc::missing_tensor, name + ": not loaded");
    if (!std::equal(shape.begin(), shape.end(), t->shape().begin(), t->shape().end())) {
      return make_error(model_errc::bad_tensor, name + ": shape " + shape_string(t->shape()) +
                                                    ", expected " + shape_string(shape));
    }
    return t->data().data();
  };
}

}  // namespace moe::model
