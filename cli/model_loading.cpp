#include "cli/model_loading.hpp"

#include "model/config.hpp"

namespace moe::cli {

caf::expected<model::checkpoint> open_model(const std::filesystem::path& dir, bool fp8) {
  auto cfg = model::load_config(dir);
  if (!cfg) return cfg.error();
  return open_model(dir, *cfg, fp8);
}

caf::expected<model::checkpoint> open_model(const std::filesystem::path& dir,
                                            const model::model_config& config, bool fp8) {
  model::load_options lo;
  lo.keep_fp8 = fp8;
  auto ckpt = model::load_checkpoint(dir, config, lo);
  if (!ckpt) return ckpt.error();
  if (fp8 && ckpt->fp8.empty())
    if (auto err = model::quantize_fp8(*ckpt)) return err;
  return ckpt;
}

#ifdef MOE_HAVE_ENGINE
engine::gpu_engine_options gpu_engine_options_of(const std::string& gpu_dtype,
                                                 const std::string& fp8) {
  engine::gpu_engine_options o;
  o.dtype = gpu_dtype == "f32" ? kernels::dtype::f32 : kernels::dtype::bf16;
  o.fp8 = fp8 == "expand" ? engine::gpu_engine_options::fp8_products::expand
                          : engine::gpu_engine_options::fp8_products::block_scaled;
  return o;
}
#endif

}  // namespace moe::cli
