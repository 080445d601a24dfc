// `moe train`, two ways:
//
// On a cluster (the actors; actors/trainer.hpp):
//   moe train --config FILE --data FILE [--steps N --seq-len L --batch B --lr ... --save DIR]
// starts the config's cluster (in this process, or --join-nodes for `moe node` processes),
// trains on FILE (text, tokenised byte-level; or a .safetensors file of pre-tokenised
// input_ids) with a progress line and a summary, and optionally writes a training checkpoint.
//
// On this process with the reference training step (model/training_model.hpp) and AdamW
// (model/optimizer.hpp):
//
// The check contract, used to compare against the reference implementation on any checkpoint:
//   moe train --model DIR --batch-ids FILE.safetensors --steps N --lr 1e-3 --betas 0.9,0.95
//             --eps 1e-8 --weight-decay 0.1 --bias-update-speed 0 --mtp-weight 0 --print-losses
//             [--dump-grads G.safetensors]
// trains full-batch on FILE's int64 tensor `input_ids` (B, S): every row is a sequence, the labels
// are the inputs shifted by one, and the loss is the mean cross-entropy over every predicted
// position of every row (transformers' causal-LM loss). --print-losses prints the loss before
// each step, one per line; --dump-grads writes the first step's gradients under hub names.
// --model may also be a training checkpoint (--save wrote it): training resumes its optimizer
// state and step, giving the losses an uninterrupted run would have.
#include <fmt/format.h>

#include <charconv>
#include <cstring>
#include <memory>
#include <optional>

#include <caf/all.hpp>

#include "actors/serving_cluster.hpp"
#include "cli/cluster_training.hpp"
#include "cli/command.hpp"
#include "cli/flag_checks.hpp"
#include "cli/node_support.hpp"
#include "model/tokenizer.hpp"
#include "kernels/dtype.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/model_errc.hpp"
#include "model/optimizer.hpp"
#include "model/safetensors.hpp"
#include "model/safetensors_writer.hpp"
#include "model/training_checkpoint.hpp"
#include "model/training_model.hpp"

namespace moe::cli {

namespace {

struct train_options {
  std::string model;
  std::string batch_ids;
  std::optional<int64_t> steps;  // unset: 1 for the check contract, 200 on a cluster
  double lr = 1e-3;
  std::string betas = "0.9,0.95";
  double eps = 1e-8;
  double weight_decay = 0.1;
  double bias_update_speed = 0.001;
  std::optional<double> mtp_weight;  // unset: 0.3 where the checkpoint has MTP modules, else 0
  std::optional<double> grad_clip;  // unset: 0 (off) for the check contract, 1.0 on a cluster
  bool print_losses = false;
  std::string dump_grads;
  std::optional<double> balance_loss_weight;  // unset: 0 for the check contract, 0.0001 on a cluster
  int64_t mtp_depth = -1;  // -1: every MTP module the checkpoint has, when mtp_weight > 0
  std::string save;        // a training checkpoint written after the last step
  int64_t micro_batches = 1;
  // Cluster mode.
  std::string config;
  std::string data;
  int64_t seq_len = 64;
  int64_t batch = 8;
  int64_t warmup_steps = 0;
  double min_lr = 0.0;
  uint64_t seed = 0;
  bool join_nodes = false;
  std::string secret_file;
};

int fail(const std::string& text) {
  fmt::print(stderr, "moe train: error: {}\n", text);
  return 1;
}

caf::expected<std::pair<double, double>> parse_betas(const std::string& text) {
  const auto comma = text.find(',');
  double b1 = 0, b2 = 0;
  const char* end = text.data() + text.size();
  if (comma == std::string::npos ||
      std::from_chars(text.data(), text.data() + comma, b1).ec != std::errc{} ||
      std::from_chars(text.data() + comma + 1, end, b2).ec != std::errc{} || !(b1 >= 0 && b1 < 1) ||
      !(b2 >= 0 && b2 < 1))
    return model::make_error(model::model_errc::bad_input,
                             "--betas " + text + ": expected two numbers in [0, 1) separated by a comma, e.g. 0.9,0.95");
  return std::make_pair(b1, b2);
}

// FILE's `input_ids` (B, S) int64 (or int32) as B sequences.
caf::expected<std::vector<std::vector<int32_t>>> read_batch(const std::string& file) {
  auto f = model::safetensors_file::open(file);
  if (!f) return f.error();
  const auto* ids = f->find("input_ids");
  if (!ids)
    return model::make_error(model::model_errc::missing_tensor, file + ": no tensor named input_ids");
  if (ids->shape.size() != 2 || ids->shape[0] < 1 || ids->shape[1] < 2)
    return model::make_error(model::model_errc::bad_tensor,
                             file + ": input_ids must be (batch, sequence) with sequences of 2 tokens or more, is " +
                                 model::shape_string(ids->shape));
  const auto rows = static_cast<size_t>(ids->shape[0]), cols = static_cast<size_t>(ids->shape[1]);
  std::vector<std::vector<int32_t>> out(rows, std::vector<int32_t>(cols));
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) {
      const size_t i = r * cols + c;
      int64_t v = 0;
      if (ids->dtype == kernels::dtype::i64) {
        std::memcpy(&v, ids->data.data() + i * 8, 8);
      } else if (ids->dtype == kernels::dtype::i32) {
        int32_t w = 0;
        std::memcpy(&w, ids->data.data() + i * 4, 4);
        v = w;
      } else {
        return model::make_error(model::model_errc::bad_tensor, file + ": input_ids must be int64 or int32");
      }
      if (v < 0 || v > INT32_MAX)
        return model::make_error(model::model_errc::bad_tensor, file + ": token id " + std::to_string(v) + " out of range");
      out[r][c] = static_cast<int32_t>(v);
    }
  }
  return out;
}

caf::expected<void> dump_grads(const std::string& file, model::training_model& m) {
  std::vector<model::tensor_to_write> tensors;
  for (const auto& p : m.parameters()) {
    model::tensor_to_write t;
    t.name = p.name;
    t.dtype = kernels::dtype::f32;
    t.shape = m.weights().find(p.name)->shape();  // the parameter's own shape
    t.bytes = std::as_bytes(p.grad);
    tensors.push_back(std::move(t));
  }
  return model::save_safetensors(file, tensors);
}

int run_cluster_train(const train_options& o) {
  if (!o.model.empty() || !o.batch_ids.empty() || !o.dump_grads.empty() || o.print_losses || o.micro_batches != 1)
    return fail("--config trains on a cluster: --model, --batch-ids, --dump-grads, --print-losses and --micro-batches "
                "belong to the single-process check contract");
  if (o.data.empty()) return fail("--config needs --data FILE (a text file, or a .safetensors file of input_ids)");
  auto betas = parse_betas(o.betas);
  if (!betas) return fail(error_text(betas.error()));
  auto cfg = load_cluster_with_secret(o.config, o.secret_file);
  if (!cfg) return fail(error_text(cfg.error()));
  auto sys_cfg = o.join_nodes ? make_networked_system_config(*cfg) : make_local_system_config();
  caf::actor_system sys{sys_cfg};
  actors::serving_options so;
  so.api_port = 0;  // ephemeral: training never collides with a running `moe serve`
  so.metrics_port = 0;
  so.join_nodes = o.join_nodes;
  auto cluster = actors::serving_cluster::start(sys, *cfg, so);
  if (!cluster) return fail(error_text(cluster.error()));
  auto& c = **cluster;
  auto tok = model::make_tokenizer(c.model().vocab_size);
  if (!tok) return fail(error_text(tok.error()));
  auto corpus = read_corpus(o.data, **tok);
  if (!corpus) return fail(error_text(corpus.error()));
  actors::training_job job;
  job.tokens = std::move(*corpus);
  job.sequence_length = o.seq_len;
  job.batch_sequences = o.batch;
  job.steps = o.steps.value_or(200);
  job.warmup_steps = o.warmup_steps;
  job.min_lr = o.min_lr;
  job.seed = o.seed;
  job.hyper.lr = o.lr;
  job.hyper.beta1 = betas->first;
  job.hyper.beta2 = betas->second;
  job.hyper.eps = o.eps;
  job.hyper.weight_decay = o.weight_decay;
  job.hyper.grad_clip = o.grad_clip.value_or(1.0);
  job.hyper.balance_alpha = o.balance_loss_weight.value_or(0.0001);
  job.hyper.bias_update_speed = o.bias_update_speed;
  fmt::print("training '{}' ({} attention shard(s), {} expert group(s)) on {}: {} tokens ({} tokenizer), {} steps of "
             "{} x {} tokens\nmetrics: {}\n",
             cfg->name, c.shards().size(), c.placement().expert_groups.size(), o.data, job.tokens.size(),
             (*tok)->name(), job.steps, o.batch, o.seq_len, c.metrics_url());
  std::fflush(stdout);
  auto summary = run_training_job(c, std::move(job));
  if (!summary) return fail(error_text(summary.error()));
  print_training_summary(*summary);
  if (!o.save.empty()) {
    caf::scoped_actor self{sys};
    caf::error failure;
    self->request(c.training_jobs(), caf::infinite, actors::train_checkpoint_atom::value, o.save)
        .receive([](const std::string&) {}, [&](caf::error& e) { failure = std::move(e); });
    if (failure) return fail("saving " + o.save + ": " + error_text(failure));
    fmt::print("saved a training checkpoint to {} (serve it with model.path: {})\n", o.save, o.save);
  }
  c.stop();
  return 0;
}

int run_train(const train_options& o) {
  if (!o.config.empty()) return run_cluster_train(o);
  if (!o.data.empty()) return fail("--data trains on a cluster: give --config FILE too");
  if (o.model.empty() || o.batch_ids.empty())
    return fail("give --config FILE --data FILE (train on a cluster), or --model DIR and --batch-ids "
                "FILE.safetensors (the single-process check contract); see `moe train --help`");
  const int64_t num_steps = o.steps.value_or(1);
  if (num_steps < 1) return fail("--steps must be at least 1");
  if (!(o.lr > 0)) return fail("--lr must be positive");
  if (o.mtp_weight && *o.mtp_weight < 0) return fail("--mtp-weight must be >= 0");
  auto betas = parse_betas(o.betas);
  if (!betas) return fail(error_text(betas.error()));
  // A training checkpoint (model_dir/training_state.json) resumes its optimizer and step; a
  // plain hub checkpoint starts fresh.
  model::training_checkpoint_options lo;
  lo.progress = false;
  auto loaded = model::load_training_checkpoint(o.model, lo);
  if (!loaded) return fail(error_text(loaded.error()));
  const auto& c = loaded->weights.config;
  model::training_options to;
  to.mtp_weight = o.mtp_weight.value_or(c.num_nextn_predict_layers > 0 ? 0.3 : 0.0);
  to.mtp_depth = to.mtp_weight > 0 ? (o.mtp_depth >= 0 ? o.mtp_depth : c.num_nextn_predict_layers) : 0;
  if (to.mtp_weight > 0 && to.mtp_depth == 0)
    return fail("--mtp-weight " + fmt::format("{}", to.mtp_weight) + " but " + o.model +
                " has no multi-token-prediction module (num_nextn_predict_layers is 0): pass --mtp-weight 0");
  auto batch = read_batch(o.batch_ids);
  if (!batch) return fail(error_text(batch.error()));
  auto weights = std::make_shared<model::checkpoint>(std::move(loaded->weights));
  auto m = model::training_model::bind(weights, to);
  if (!m) return fail(error_text(m.error()));
  model::adamw_options ao;
  ao.beta1 = betas->first;
  ao.beta2 = betas->second;
  ao.eps = o.eps;
  ao.weight_decay = o.weight_decay;
  model::adamw opt(ao);
  if (loaded->optimizer.steps() > 0) opt.restore(loaded->optimizer.steps(), loaded->optimizer.state());
  const int64_t first_step = loaded->step;
  if (o.micro_batches < 1 || o.micro_batches > static_cast<int64_t>(batch->size()))
    return fail("--micro-batches must be between 1 and the batch's " + std::to_string(batch->size()) + " rows");
  // Micro-batches: consecutive slices of rows, each weighted by its share of the predicted
  // positions (and of the sequences, for the balance loss), so the gradients add up to the batch's.
  std::vector<std::vector<std::vector<int32_t>>> micro(static_cast<size_t>(o.micro_batches));
  for (size_t r = 0; r < batch->size(); ++r)
    micro[r * micro.size() / batch->size()].push_back((*batch)[r]);
  const double predicted = static_cast<double>(model::training_model::predicted_positions(*batch));
  for (int64_t step = 0; step < num_steps; ++step) {
    m->zero_grads();
    double loss = 0;
    for (const auto& part : micro) {
      const double share = static_cast<double>(model::training_model::predicted_positions(part)) / predicted;
      const double rows = static_cast<double>(part.size()) / static_cast<double>(batch->size());
      auto part_loss = m->forward_backward(part, o.balance_loss_weight.value_or(0.0) * rows, share);
      if (!part_loss) return fail(error_text(part_loss.error()));
      loss += share * *part_loss;
    }
    if (o.print_losses) fmt::print("{:.9g}\n", loss);
    if (step == 0 && !o.dump_grads.empty()) {
      if (auto written = dump_grads(o.dump_grads, *m); !written) return fail(error_text(written.error()));
    }
    if (o.grad_clip.value_or(0.0) > 0) m->clip_gradients(*o.grad_clip);
    if (auto err = opt.step(m->parameters(), o.lr)) return fail(error_text(err));
    m->update_routing_bias(o.bias_update_speed);
  }
  if (!o.save.empty()) {
    model::training_checkpoint_options so;
    so.progress = false;
    if (auto saved = model::save_training_checkpoint(o.save, *weights, opt, first_step + num_steps, so); !saved)
      return fail(error_text(saved.error()));
    fmt::print(stderr, "saved step {} to {}\n", first_step + num_steps, o.save);
  }
  return 0;
}

}  // namespace

void add_train_command(CLI::App& app, command_context& ctx) {
  auto o = std::make_shared<train_options>();
  auto* cmd = app.add_subcommand(
      "train", "Train on a cluster (--config, --data), or on this process (--model, --batch-ids: the check contract)");
  cmd->add_option("--config", o->config, "Cluster config (YAML): train through its actors");
  cmd->add_option("--data", o->data,
                  "With --config: the corpus, a text file (byte-level tokens) or a .safetensors file of input_ids");
  cmd->add_option("--seq-len", o->seq_len, "With --config: tokens per sequence (default 64)");
  cmd->add_option("--batch", o->batch, "With --config: sequences per step (default 8)");
  cmd->add_option("--warmup-steps", o->warmup_steps, "With --config: linear warmup steps before the cosine decay (default 0)");
  cmd->add_option("--min-lr", o->min_lr, "With --config: the learning rate the cosine decay ends at (default 0)");
  cmd->add_option("--seed", o->seed, "With --config: the order in which the corpus is visited (default 0)")
      ->check(seed_number());
  cmd->add_flag("--join-nodes", o->join_nodes, "With --config: the nodes run as `moe node` processes; join them");
  cmd->add_option("--secret-file", o->secret_file, "With --config: read the cluster secret from this file");
  cmd->add_option("--model", o->model, "Checkpoint directory (hub layout)");
  cmd->add_option("--batch-ids", o->batch_ids, "safetensors file with an int64 tensor input_ids (batch, sequence)");
  cmd->add_option("--steps", o->steps, "AdamW steps (default 1; 200 on a cluster)");
  cmd->add_option("--lr", o->lr, "Learning rate (default 1e-3)");
  cmd->add_option("--betas", o->betas, "AdamW betas, e.g. 0.9,0.95 (default)");
  cmd->add_option("--eps", o->eps, "AdamW epsilon (default 1e-8)");
  cmd->add_option("--weight-decay", o->weight_decay, "Decoupled weight decay (default 0.1)");
  cmd->add_option("--bias-update-speed", o->bias_update_speed,
                  "Auxiliary-loss-free balancing: gamma of the routing-bias update after each step (default 0.001; 0 off)");
  cmd->add_option("--mtp-weight", o->mtp_weight,
                  "Multi-token prediction loss weight lambda (default 0.3 where the checkpoint has MTP modules, else 0)");
  cmd->add_option("--mtp-depth", o->mtp_depth, "MTP modules trained (default: all the checkpoint has)");
  cmd->add_option("--balance-loss-weight", o->balance_loss_weight,
                  "Sequence-wise balance loss weight alpha (default 0.0001 on a cluster, as DeepSeek-V3; 0 for the "
                  "check contract, so that it reproduces the reference)");
  cmd->add_option("--micro-batches", o->micro_batches,
                  "Accumulate gradients over this many slices of the batch (default 1: the whole batch at once)");
  cmd->add_option("--save", o->save, "Write a training checkpoint (model, optimizer state, step) here after the last step");
  cmd->add_option("--grad-clip", o->grad_clip,
                  "Clip gradients to this global norm (default 1.0 on a cluster; 0, off, for the check contract)");
  cmd->add_flag("--print-losses", o->print_losses, "Print the loss before each step, one per line");
  cmd->add_option("--dump-grads", o->dump_grads, "Write the first step's gradients (hub names) to this safetensors file");
  cmd->callback([o, &ctx] { ctx.exit_code = run_train(*o); });
}

}  // namespace moe::cli
