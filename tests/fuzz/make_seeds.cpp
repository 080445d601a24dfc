// Writes the seed corpora of tests/fuzz/corpus/<target>/: small valid inputs made by our own
// encoders (so that the fuzzer starts from the formats as they are, not from noise) and a few
// malformed ones, each file named for what it is. Run it when a format changes and commit the
// result:
//   build-asan/tests/fuzz/fuzz_make_seeds tests/fuzz/corpus
// It replaces the files it writes and leaves others (regression inputs from fuzzing) alone.
#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/safetensors_writer.hpp"
#include "model/weights.hpp"
#include "protocol/api.capnp.h"
#include "protocol/api_codec.hpp"
#include "protocol/frame_codec.hpp"
#include "protocol/load_report.capnp.h"
#include "protocol/load_report_codec.hpp"
#include "protocol/tensor_frame.capnp.h"

namespace {

namespace fs = std::filesystem;
namespace schema = moe::protocol::capnp;
using bytes = std::vector<uint8_t>;

fs::path corpus_root;
int num_written = 0;

void write(const std::string& target, const std::string& name, const bytes& content) {
  const fs::path dir = corpus_root / target;
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(content.data()), static_cast<std::streamsize>(content.size()));
  if (!out) {
    std::cerr << "fuzz_make_seeds: cannot write " << (dir / name) << "\n";
    std::exit(1);
  }
  ++num_written;
}

bytes of(const std::vector<std::byte>& b) {
  bytes out(b.size());
  std::memcpy(out.data(), b.data(), b.size());
  return out;
}

bytes of(const std::string& s) { return {s.begin(), s.end()}; }

bytes flat(::capnp::MessageBuilder& message) {
  const auto words = ::capnp::messageToFlatArray(message);
  const auto b = words.asBytes();
  return {b.begin(), b.end()};
}

bytes read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "fuzz_make_seeds: cannot read " << path << "\n";
    std::exit(1);
  }
  std::ostringstream text;
  text << in.rdbuf();
  return of(text.str());
}

bytes truncated(bytes b) {
  b.resize((b.size() / 2) & ~size_t{7});
  return b;
}

bytes prefixed(uint8_t first, const bytes& rest) {
  bytes out{first};
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

// --- tensor frames ---------------------------------------------------------------------------

void tensor_frames() {
  moe::protocol::tensor_frame_header a;
  a.kind = moe::protocol::frame_kind::activations;
  a.dt = moe::kernels::dtype::f32;
  a.shape = {4, 8};
  a.layer = 2;
  a.step = 17;
  a.placement_version = 3;
  a.token_indices = {0, 1, 2, 3};
  a.expert_indices = {5, 5, 7, 7};
  a.transfer_tag = 42;
  a.byte_length = 4 * 8 * 4;
  const bytes activations = of(moe::protocol::encode_frame_header(a));
  write("tensor_frame", "valid_activations", activations);

  moe::protocol::tensor_frame_header kv;
  kv.kind = moe::protocol::frame_kind::kv_block;
  kv.dt = moe::kernels::dtype::bf16;
  kv.shape = {2, 1, 2};
  kv.byte_length = 8;
  kv.inline_payload = std::vector<std::byte>(8, std::byte{0x3f});
  write("tensor_frame", "valid_inline_bf16", of(moe::protocol::encode_frame_header(kv)));

  moe::protocol::tensor_frame_header scalar;
  scalar.kind = moe::protocol::frame_kind::parameters;
  scalar.dt = moe::kernels::dtype::u8;
  scalar.byte_length = 1;
  write("tensor_frame", "valid_scalar_u8", of(moe::protocol::encode_frame_header(scalar)));

  auto bad = a;
  bad.byte_length = 100;
  write("tensor_frame", "bad_byte_length", of(moe::protocol::encode_frame_header(bad)));
  bad = a;
  bad.expert_indices = {1};
  write("tensor_frame", "bad_expert_count", of(moe::protocol::encode_frame_header(bad)));
  bad = a;
  bad.shape = {1, 1, 1, 1, 1, 1, 1, 1, 128};
  write("tensor_frame", "bad_rank", of(moe::protocol::encode_frame_header(bad)));
  bad = a;
  bad.shape = {uint64_t{1} << 62, 8};
  write("tensor_frame", "bad_shape_overflow", of(moe::protocol::encode_frame_header(bad)));

  ::capnp::MallocMessageBuilder message;
  auto b = message.initRoot<schema::TensorFrame>();
  b.setVersion(static_cast<uint16_t>(moe::protocol::tensor_frame_version() + 1));
  b.initTransfer().setByteLength(4);
  write("tensor_frame", "bad_version", flat(message));

  write("tensor_frame", "truncated", truncated(activations));
  bytes ragged = activations;
  ragged.insert(ragged.end(), {1, 2, 3});
  write("tensor_frame", "not_whole_words", ragged);
}

// --- load reports ----------------------------------------------------------------------------

void load_reports() {
  moe::protocol::expert_load_report r;
  r.shard = 1;
  r.placement_version = 4;
  r.first_step = 100;
  r.last_step = 163;
  r.window_steps = 64;
  r.layers = {{1, {5, 0, 9, 2}, {5, 0, 9, 1, 1}}, {2, {1, 1, 1, 13}, {1, 1, 1, 6, 7}}};
  const bytes valid = of(moe::protocol::encode_load_report(r));
  write("load_report", "valid_two_layers", valid);

  auto empty = r;
  empty.layers.clear();
  write("load_report", "valid_no_layers", of(moe::protocol::encode_load_report(empty)));

  auto bad = r;
  std::swap(bad.first_step, bad.last_step);
  write("load_report", "bad_reversed_steps", of(moe::protocol::encode_load_report(bad)));
  bad = r;
  bad.window_steps = 0;
  write("load_report", "bad_zero_window", of(moe::protocol::encode_load_report(bad)));
  bad = r;
  bad.layers[1].layer = 1;
  write("load_report", "bad_duplicate_layer", of(moe::protocol::encode_load_report(bad)));
  bad = r;
  bad.layers[1].logical.push_back(3);
  write("load_report", "bad_unequal_lengths", of(moe::protocol::encode_load_report(bad)));

  ::capnp::MallocMessageBuilder message;
  auto b = message.initRoot<schema::LoadReport>();
  b.setVersion(static_cast<uint16_t>(moe::protocol::load_report_version() + 1));
  b.setWindowSteps(1);
  write("load_report", "bad_version", flat(message));

  write("load_report", "truncated", truncated(valid));
}

// --- the job API -----------------------------------------------------------------------------
// The first byte picks the message (api_codec_fuzz.cpp: enum message).

enum : uint8_t {
  submit,
  train,
  checkpoint,
  job_event,
  job_status,
  cluster,
  rebalance,
  training_event,
  error_description
};

void api_messages() {
  moe::protocol::api_generation_spec spec;
  spec.prompt = {1, 5, 17, 42};
  spec.max_new_tokens = 8;
  spec.temperature = 0.7f;
  spec.top_k = 40;
  spec.top_p = 0.9f;
  spec.seed = 7;
  spec.stop_token_ids = {1};
  auto submit_of = [](const moe::protocol::api_generation_spec& s) {
    ::capnp::MallocMessageBuilder message;
    auto p = message.initRoot<schema::JobService::SubmitParams>();
    moe::protocol::to_wire(s, p.initJob().initGeneration());
    return prefixed(submit, flat(message));
  };
  write("api_codec", "submit_valid", submit_of(spec));
  auto bad = spec;
  bad.prompt = {3, -1};
  write("api_codec", "submit_negative_token", submit_of(bad));
  bad = spec;
  bad.temperature = std::nanf("");
  write("api_codec", "submit_nan_temperature", submit_of(bad));
  {
    ::capnp::MallocMessageBuilder message;
    message.initRoot<schema::JobService::SubmitParams>().initJob().initTraining();
    write("api_codec", "submit_training_placeholder", prefixed(submit, flat(message)));
  }

  auto train_of = [](const moe::protocol::api_training_spec& s) {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::to_wire(s, message.initRoot<schema::JobService::TrainParams>().initJob());
    return prefixed(train, flat(message));
  };
  moe::protocol::api_training_spec tokens;
  tokens.corpus = std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8};
  tokens.sequence_length = 4;
  tokens.batch_sequences = 2;
  tokens.steps = 3;
  write("api_codec", "train_tokens", train_of(tokens));
  moe::protocol::api_training_spec text;
  text.corpus = std::string("Licensed under the Apache License, Version 2.0");
  text.sequence_length = 8;
  write("api_codec", "train_text", train_of(text));
  auto bad_train = tokens;
  bad_train.beta1 = 1.5;
  write("api_codec", "train_bad_beta1", train_of(bad_train));

  auto checkpoint_of = [](const std::string& dir) {
    ::capnp::MallocMessageBuilder message;
    message.initRoot<schema::JobService::CheckpointParams>().setDirectory(dir);
    return prefixed(checkpoint, flat(message));
  };
  write("api_codec", "checkpoint_absolute", checkpoint_of("/var/lib/moe/ckpt"));
  write("api_codec", "checkpoint_relative", checkpoint_of("ckpt"));

  {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::api_job_event e{9, {4, 5}, true, moe::protocol::api_job_state::finished, "length", ""};
    moe::protocol::to_wire(e, message.initRoot<schema::TokenSink::EventParams>().initEvent());
    write("api_codec", "job_event", prefixed(job_event, flat(message)));
  }
  {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::api_job_status s{9, moe::protocol::api_job_state::failed, {4}, "error", "node n1 is down", 0};
    moe::protocol::to_wire(s, message.initRoot<schema::JobService::StatusResults>().initStatus());
    write("api_codec", "job_status", prefixed(job_status, flat(message)));
  }
  {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::api_cluster_description c;
    c.name = "local-demo";
    c.nodes = {{"local", "127.0.0.1", {"local/cpu0", "local/cpu1"}}};
    c.actors = {{"attention", "0", "local", "local/cpu0"}, {"expert_group", "1", "local", "local/cpu1"}};
    c.placement_version = 2;
    c.placement_json = R"({"attention": [0]})";
    moe::protocol::to_wire(c, message.initRoot<schema::JobService::DescribeResults>().initCluster());
    write("api_codec", "cluster", prefixed(cluster, flat(message)));
  }
  {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::api_rebalance_report r;
    r.changed = true;
    r.version_before = 1;
    r.version_after = 2;
    r.balance_before = 1.8;
    r.balance_after = 1.1;
    r.layer_balance_before = {1.9, 1.7};
    r.layer_balance_after = {1.1, 1.1};
    r.tokens_counted = 4096;
    r.replicas_moved = 3;
    r.bytes_moved = 1 << 20;
    r.duration_seconds = 0.25;
    r.trigger = "on_demand";
    moe::protocol::to_wire(r, message.initRoot<schema::JobService::RebalanceResults>().initReport());
    write("api_codec", "rebalance", prefixed(rebalance, flat(message)));
  }
  {
    ::capnp::MallocMessageBuilder message;
    moe::protocol::api_training_event e;
    e.job_id = 3;
    e.step = 2;
    e.steps = 4;
    e.loss = 5.5;
    e.learning_rate = 1e-3;
    e.grad_norm = 0.7;
    e.tokens_per_second = 1200;
    e.load_balance = {1.2, 1.4};
    e.state = moe::protocol::api_job_state::running;
    e.checkpoint = "/tmp/ckpt";
    moe::protocol::to_wire(e, message.initRoot<schema::TrainingSink::EventParams>().initEvent());
    write("api_codec", "training_event", prefixed(training_event, flat(message)));
  }
  write("api_codec", "error_overloaded", prefixed(error_description, of(std::string("overloaded: 3 waiting"))));
  write("api_codec", "error_remote",
        prefixed(error_description, of(std::string("remote exception: invalid_request: prompt: is empty"))));
}

// --- config.json -----------------------------------------------------------------------------

// The smallest config the parser accepts with every layer kind (a dense layer, a MoE layer with a
// shared expert): its checkpoint is a few KiB.
std::string micro_config_text(bool fp8, int64_t num_mtp) {
  nlohmann::json j = {
      {"model_type", "deepseek_v3"}, {"vocab_size", 8}, {"hidden_size", 4},
      {"intermediate_size", 6}, {"moe_intermediate_size", 2}, {"num_hidden_layers", 2},
      {"num_attention_heads", 1}, {"num_key_value_heads", 1}, {"n_shared_experts", 1},
      {"n_routed_experts", 4}, {"routed_scaling_factor", 2.5}, {"kv_lora_rank", 2},
      {"q_lora_rank", nullptr}, {"qk_rope_head_dim", 2}, {"v_head_dim", 2},
      {"qk_nope_head_dim", 2}, {"n_group", 2}, {"topk_group", 1}, {"num_experts_per_tok", 2},
      {"first_k_dense_replace", 1}, {"norm_topk_prob", true}, {"max_position_embeddings", 64},
      {"rope_theta", 10000.0}, {"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"},
      {"hidden_act", "silu"}, {"rms_norm_eps", 1e-6}, {"tie_word_embeddings", false},
      {"bos_token_id", 0}, {"eos_token_id", 1}, {"torch_dtype", "float32"},
      {"num_nextn_predict_layers", num_mtp}};
  if (fp8) {
    j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}}};
  }
  auto config = moe::model::parse_config(std::string_view(j.dump()));
  if (!config) {
    std::cerr << "fuzz_make_seeds: the micro config does not parse: " << moe::error_text(config.error()) << "\n";
    std::exit(1);
  }
  return moe::model::to_json(*config).dump(1);
}

void model_configs(const fs::path& source) {
  for (const char* name : {"tiny-v3", "small-v3-fp8", "deepseek-v3"}) {
    const bytes text = read_file(source / "tests/data" / name / "config.json");
    write("model_config", std::string(name), prefixed(0, text));
  }
  write("model_config", "micro_unknown_keys_allowed", prefixed(1, of(micro_config_text(false, 0))));
  write("model_config", "micro_fp8_mtp", prefixed(0, of(micro_config_text(true, 1))));
  std::string bad = micro_config_text(false, 0);
  bad.replace(bad.find("\"n_group\": 2"), 12, "\"n_group\": 3");
  write("model_config", "bad_n_group", prefixed(0, of(bad)));
  write("model_config", "bad_not_json", prefixed(0, of(std::string("{\"vocab_size\": 8,"))));
}

// --- cluster config --------------------------------------------------------------------------

void cluster_configs(const fs::path& source) {
  write("cluster_config", "deploy_local", read_file(source / "deploy/local.yaml"));
  write("cluster_config", "deploy_local_2shards", read_file(source / "deploy/local-2shards.yaml"));
  write("cluster_config", "two_nodes_tls_lists", of(std::string(R"(cluster:
  name: prod
  secret: 3d5f0a
  heartbeat_interval_ms: 200
  failure_timeout_ms: 1000
  tls:
    certificate: tls/node.pem
    key: tls/node.key
    ca_file: tls/ca.pem
    passphrase: pass
nodes:
  - name: n0
    host: 10.0.0.10
    devices: {gpus: 8}
    gpu_memory: 80GiB
    memory: 1TiB
    control_port: 9000
    metrics_port: 9001
  - name: n1
    host: 10.0.0.11
    devices: {gpus: 8, cpu_slots: 2}
    gpu_memory: 80 GiB
model:
  path: /models/deepseek-v3
attention_shards: 4
expert_groups:
  count: 4
  experts:
    - [0-71]
    - [72-127]
    - [128-191, 0]
    - [192-255]
redundant_expert_slots: 1
rebalancing: {period_s: 300, load_window_steps: 512, max_moved_replicas: 8, min_improvement_pct: 5}
batching: {max_running_requests: 256, max_batch_tokens: 8192, max_queue: 1024, max_new_tokens_limit: 4096}
ports: {control: 7100, api: 7101, metrics: 7102}
)")));
  write("cluster_config", "bad_unknown_key", of(std::string(R"(cluster:
  name: test
  secret: s3cret
nodes:
  - name: n0
    devices: {cpu_slots: 1}
    memory: 1.5GB
model:
  preset: tiny
batching:
  max_queue_len: 4
)")));
  write("cluster_config", "bad_yaml", of(std::string("cluster: [name: test\n  secret: {\n")));
}

// --- safetensors -----------------------------------------------------------------------------

bytes safetensors_bytes(const std::vector<moe::model::tensor_to_write>& tensors,
                        const moe::model::safetensors_metadata& metadata) {
  const fs::path dir = fs::temp_directory_path() / "moe_fuzz_make_seeds";
  fs::create_directories(dir);
  const fs::path file = dir / "model.safetensors";
  if (auto ok = moe::model::save_safetensors(file, tensors, metadata); !ok) {
    std::cerr << "fuzz_make_seeds: " << moe::error_text(ok.error()) << "\n";
    std::exit(1);
  }
  bytes out = read_file(file);
  fs::remove_all(dir);
  return out;
}

bytes with_header(const std::string& json, size_t data_bytes) {
  bytes out(8);
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), json.begin(), json.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

void safetensors_files() {
  const std::vector<float> f32(6, 0.5f);
  const std::vector<uint16_t> bf16(4, 0x3f80);
  const std::vector<uint8_t> f8(4, 0x38);
  const float scale = 0.01f;
  auto span_of = [](const auto& v) { return std::as_bytes(std::span(v)); };
  using moe::kernels::dtype;
  const bytes mixed = safetensors_bytes(
      {{"a.weight", dtype::f32, {2, 3}, span_of(f32), {}},
       {"b.weight", dtype::bf16, {4}, span_of(bf16), {}},
       {"c.weight", dtype::f8_e4m3, {2, 2}, span_of(f8), {}},
       {"c.weight_scale_inv", dtype::f32, {1, 1}, std::as_bytes(std::span(&scale, 1)), {}},
       {"empty", dtype::f32, {0, 3}, {}, {}}},
      {{"format", "pt"}, {"note", "seed"}});
  write("safetensors", "valid_mixed", mixed);
  write("safetensors", "valid_no_tensors", safetensors_bytes({}, {}));
  bytes cut = mixed;
  cut.resize(cut.size() - 3);
  write("safetensors", "bad_truncated_data", cut);
  bytes long_header = mixed;
  long_header[7] = 0x10;
  write("safetensors", "bad_header_length", long_header);
  write("safetensors", "bad_overlap",
        with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                    12));
  write("safetensors", "bad_dtype",
        with_header(R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8));
}

// --- checkpoints -----------------------------------------------------------------------------
// Flags byte, 2-byte little-endian config length, config.json, model.safetensors
// (checkpoint_fuzz.cpp).

bytes checkpoint_input(uint8_t flags, const std::string& config, const bytes& safetensors) {
  bytes out{flags, static_cast<uint8_t>(config.size() & 0xff), static_cast<uint8_t>(config.size() >> 8)};
  out.insert(out.end(), config.begin(), config.end());
  out.insert(out.end(), safetensors.begin(), safetensors.end());
  return out;
}

bytes init_model_bytes(const std::string& config_text, moe::kernels::dtype dt) {
  auto config = moe::model::parse_config(std::string_view(config_text));
  const fs::path dir = fs::temp_directory_path() / "moe_fuzz_make_seeds_model";
  moe::model::init_options options;
  options.dtype = dt;
  options.progress = false;
  if (auto ok = moe::model::init_model(dir, *config, options); !ok) {
    std::cerr << "fuzz_make_seeds: " << moe::error_text(ok.error()) << "\n";
    std::exit(1);
  }
  bytes out = read_file(dir / "model.safetensors");
  fs::remove_all(dir);
  return out;
}

// Projections in F8_E4M3 with one block scale each (every matrix is smaller than a 128x128
// block), everything else in F32.
bytes fp8_model_bytes(const std::string& config_text) {
  auto config = moe::model::parse_config(std::string_view(config_text));
  // Moving an inner vector (when `storage` grows) keeps its buffer, so the spans stay valid.
  std::vector<std::vector<std::byte>> storage;
  std::vector<moe::model::tensor_to_write> tensors;
  const float scale = 0.01f;
  for (const auto& spec : moe::model::expected_weights(*config)) {
    if (spec.optional) continue;
    const size_t n = static_cast<size_t>(spec.num_elements());
    if (spec.kind == moe::model::weight_kind::projection) {
      storage.emplace_back(n, std::byte{0x38});
      tensors.push_back({spec.name, moe::kernels::dtype::f8_e4m3, spec.shape, storage.back(), {}});
      tensors.push_back({moe::model::scale_name(spec.name), moe::kernels::dtype::f32, {1, 1},
                         std::as_bytes(std::span(&scale, 1)), {}});
    } else {
      storage.emplace_back(n * sizeof(float), std::byte{0});
      tensors.push_back({spec.name, moe::kernels::dtype::f32, spec.shape, storage.back(), {}});
    }
  }
  return safetensors_bytes(tensors, {{"format", "pt"}});
}

void checkpoints() {
  const std::string f32_config = micro_config_text(false, 0);
  const bytes f32_model = init_model_bytes(f32_config, moe::kernels::dtype::f32);
  write("checkpoint", "valid_f32", checkpoint_input(0, f32_config, f32_model));
  write("checkpoint", "valid_f32_one_expert", checkpoint_input(4, f32_config, f32_model));
  const std::string mtp_config = micro_config_text(false, 1);
  write("checkpoint", "valid_bf16_mtp",
        checkpoint_input(1, mtp_config, init_model_bytes(mtp_config, moe::kernels::dtype::bf16)));
  const std::string fp8_config = micro_config_text(true, 0);
  write("checkpoint", "valid_fp8", checkpoint_input(0, fp8_config, fp8_model_bytes(fp8_config)));
  // The same weights under a config with one more layer: every tensor of layer 2 is missing.
  std::string deeper = f32_config;
  deeper.replace(deeper.find("\"num_hidden_layers\": 2"), 22, "\"num_hidden_layers\": 3");
  write("checkpoint", "bad_missing_layer", checkpoint_input(0, deeper, f32_model));
  write("checkpoint", "bad_truncated", checkpoint_input(0, f32_config, bytes(f32_model.begin(), f32_model.end() - 9)));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: fuzz_make_seeds CORPUS_DIR (tests/fuzz/corpus)\n";
    return 2;
  }
  corpus_root = argv[1];
  const fs::path source = MOE_SOURCE_DIR;
  tensor_frames();
  load_reports();
  api_messages();
  model_configs(source);
  cluster_configs(source);
  safetensors_files();
  checkpoints();
  std::cout << "fuzz_make_seeds: wrote " << num_written << " files under " << corpus_root << "\n";
  return 0;
}
