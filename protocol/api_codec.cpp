#include "protocol/api_codec.hpp"

#include <string_view>

namespace moe::protocol {

namespace {

// Explicit mappings: reordering either enum must never change what a state means on the wire.
capnp::JobState to_wire(api_job_state s) {
  switch (s) {
    case api_job_state::queued: return capnp::JobState::QUEUED;
    case api_job_state::running: return capnp::JobState::RUNNING;
    case api_job_state::finished: return capnp::JobState::FINISHED;
    case api_job_state::cancelled: return capnp::JobState::CANCELLED;
    case api_job_state::failed: return capnp::JobState::FAILED;
  }
  return capnp::JobState::FAILED;
}

// A state added by a newer server reads as failed: the safe reading for a client that cannot
// know what it means.
api_job_state from_wire(capnp::JobState s) {
  switch (s) {
    case capnp::JobState::QUEUED: return api_job_state::queued;
    case capnp::JobState::RUNNING: return api_job_state::running;
    case capnp::JobState::FINISHED: return api_job_state::finished;
    case capnp::JobState::CANCELLED: return api_job_state::cancelled;
    case capnp::JobState::FAILED: return api_job_state::failed;
  }
  return api_job_state::failed;
}

template <class List, class T>
void fill_list(List list, const std::vector<T>& values) {
  for (size_t i = 0; i < values.size(); ++i) list.set(static_cast<unsigned>(i), values[i]);
}

template <class T, class Reader>
std::vector<T> read_list(Reader list) {
  std::vector<T> out;
  out.reserve(list.size());
  for (auto v : list) out.push_back(v);
  return out;
}

kj::StringPtr text(const std::string& s) { return kj::StringPtr(s.c_str(), s.size()); }
std::string text(::capnp::Text::Reader r) { return std::string(r.cStr(), r.size()); }

}  // namespace

void to_wire(const api_generation_spec& spec, capnp::GenerationJob::Builder b) {
  fill_list(b.initPrompt(static_cast<unsigned>(spec.prompt.size())), spec.prompt);
  b.setMaxNewTokens(spec.max_new_tokens);
  b.setTemperature(spec.temperature);
  b.setTopK(spec.top_k);
  b.setTopP(spec.top_p);
  b.setSeed(spec.seed);
  fill_list(b.initStopTokenIds(static_cast<unsigned>(spec.stop_token_ids.size())),
           spec.stop_token_ids);
  b.setDeadlineMs(spec.deadline_ms);
}

api_generation_spec from_wire(capnp::GenerationJob::Reader r) {
  api_generation_spec spec;
  spec.prompt = read_list<int32_t>(r.getPrompt());
  spec.max_new_tokens = r.getMaxNewTokens();
  spec.temperature = r.getTemperature();
  spec.top_k = r.getTopK();
  spec.top_p = r.getTopP();
  spec.seed = r.getSeed();
  spec.stop_token_ids = read_list<int32_t>(r.getStopTokenIds());
  spec.deadline_ms = r.getDeadlineMs();
  return spec;
}

void to_wire(const api_job_event& e, capnp::JobEvent::Builder b) {
  b.setJobId(e.job_id);
  fill_list(b.initTokens(static_cast<unsigned>(e.tokens.size())), e.tokens);
  b.setFinished(e.finished);
  b.setState(to_wire(e.state));
  b.setFinishReason(text(e.finish_reason));
  b.setError(text(e.error));
}

api_job_event from_wire(capnp::JobEvent::Reader r) {
  api_job_event e;
  e.job_id = r.getJobId();
  e.tokens = read_list<int32_t>(r.getTokens());
  e.finished = r.getFinished();
  e.state = from_wire(r.getState());
  e.finish_reason = text(r.getFinishReason());
  e.error = text(r.getError());
  return e;
}

void to_wire(const api_job_status& s, capnp::JobStatus::Builder b) {
  b.setJobId(s.job_id);
  b.setState(to_wire(s.state));
  fill_list(b.initTokens(static_cast<unsigned>(s.tokens.size())), s.tokens);
  b.setFinishReason(text(s.finish_reason));
  b.setError(text(s.error));
  b.setShard(s.shard);
}

api_job_status from_wire(capnp::JobStatus::Reader r) {
  api_job_status s;
  s.job_id = r.getJobId();
  s.state = from_wire(r.getState());
  s.tokens = read_list<int32_t>(r.getTokens());
  s.finish_reason = text(r.getFinishReason());
  s.error = text(r.getError());
  s.shard = r.getShard();
  return s;
}

void to_wire(const api_cluster_description& c, capnp::ClusterDescription::Builder b) {
  b.setName(text(c.name));
  auto nodes = b.initNodes(static_cast<unsigned>(c.nodes.size()));
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    const api_node& n = c.nodes[i];
    auto nb = nodes[static_cast<unsigned>(i)];
    nb.setName(text(n.name));
    nb.setHost(text(n.host));
    auto devices = nb.initDevices(static_cast<unsigned>(n.devices.size()));
    for (size_t d = 0; d < n.devices.size(); ++d)
      devices.set(static_cast<unsigned>(d), text(n.devices[d]));
  }
  auto actors = b.initActors(static_cast<unsigned>(c.actors.size()));
  for (size_t i = 0; i < c.actors.size(); ++i) {
    const api_actor_info& a = c.actors[i];
    auto ab = actors[static_cast<unsigned>(i)];
    ab.setKind(text(a.kind));
    ab.setId(text(a.id));
    ab.setNode(text(a.node));
    ab.setDevice(text(a.device));
  }
  b.setPlacementVersion(c.placement_version);
  b.setPlacementJson(text(c.placement_json));
}

api_cluster_description from_wire(capnp::ClusterDescription::Reader r) {
  api_cluster_description c;
  c.name = text(r.getName());
  for (auto n : r.getNodes()) {
    api_node node;
    node.name = text(n.getName());
    node.host = text(n.getHost());
    for (auto d : n.getDevices()) node.devices.push_back(text(d));
    c.nodes.push_back(std::move(node));
  }
  for (auto a : r.getActors()) {
    c.actors.push_back({text(a.getKind()), text(a.getId()), text(a.getNode()), text(a.getDevice())});
  }
  c.placement_version = r.getPlacementVersion();
  c.placement_json = text(r.getPlacementJson());
  return c;
}

void to_wire(const api_rebalance_report& r, capnp::RebalanceReport::Builder b) {
  b.setChanged(r.changed);
  b.setVersionBefore(r.version_before);
  b.setVersionAfter(r.version_after);
  b.setBalanceBefore(r.balance_before);
  b.setBalanceAfter(r.balance_after);
  fill_list(b.initLayerBalanceBefore(static_cast<unsigned>(r.layer_balance_before.size())),
            r.layer_balance_before);
  fill_list(b.initLayerBalanceAfter(static_cast<unsigned>(r.layer_balance_after.size())),
            r.layer_balance_after);
  b.setTokensCounted(r.tokens_counted);
  b.setReplicasMoved(r.replicas_moved);
  b.setBytesMoved(r.bytes_moved);
  b.setDurationSeconds(r.duration_seconds);
  b.setTrigger(text(r.trigger));
}

api_rebalance_report from_wire(capnp::RebalanceReport::Reader r) {
  api_rebalance_report out;
  out.changed = r.getChanged();
  out.version_before = r.getVersionBefore();
  out.version_after = r.getVersionAfter();
  out.balance_before = r.getBalanceBefore();
  out.balance_after = r.getBalanceAfter();
  out.layer_balance_before = read_list<double>(r.getLayerBalanceBefore());
  out.layer_balance_after = read_list<double>(r.getLayerBalanceAfter());
  out.tokens_counted = r.getTokensCounted();
  out.replicas_moved = r.getReplicasMoved();
  out.bytes_moved = r.getBytesMoved();
  out.duration_seconds = r.getDurationSeconds();
  out.trigger = text(r.getTrigger());
  return out;
}

void to_wire(const api_training_spec& spec, capnp::TrainingJob::Builder b) {
  auto corpus = b.initCorpus();
  if (const auto* tokens = std::get_if<std::vector<int32_t>>(&spec.corpus)) {
    fill_list(corpus.initTokens(static_cast<unsigned>(tokens->size())), *tokens);
  } else {
    corpus.setText(text(std::get<std::string>(spec.corpus)));
  }
  b.setSequenceLength(spec.sequence_length);
  b.setBatchSequences(spec.batch_sequences);
  b.setSteps(spec.steps);
  b.setLearningRate(spec.learning_rate);
  b.setWarmupSteps(spec.warmup_steps);
  b.setMinLearningRate(spec.min_learning_rate);
  b.setBeta1(spec.beta1);
  b.setBeta2(spec.beta2);
  b.setEps(spec.eps);
  b.setWeightDecay(spec.weight_decay);
  b.setGradClip(spec.grad_clip);
  b.setBalanceLossWeight(spec.balance_loss_weight);
  b.setBiasUpdateSpeed(spec.bias_update_speed);
  b.setSeed(spec.seed);
}

api_training_spec from_wire(capnp::TrainingJob::Reader r) {
  api_training_spec spec;
  auto corpus = r.getCorpus();
  switch (corpus.which()) {
    case capnp::TrainingJob::Corpus::TOKENS: spec.corpus = read_list<int32_t>(corpus.getTokens()); break;
    case capnp::TrainingJob::Corpus::TEXT: spec.corpus = text(corpus.getText()); break;
    default: spec.corpus = std::vector<int32_t>{}; break;
  }
  spec.sequence_length = r.getSequenceLength();
  spec.batch_sequences = r.getBatchSequences();
  spec.steps = r.getSteps();
  spec.learning_rate = r.getLearningRate();
  spec.warmup_steps = r.getWarmupSteps();
  spec.min_learning_rate = r.getMinLearningRate();
  spec.beta1 = r.getBeta1();
  spec.beta2 = r.getBeta2();
  spec.eps = r.getEps();
  spec.weight_decay = r.getWeightDecay();
  spec.grad_clip = r.getGradClip();
  spec.balance_loss_weight = r.getBalanceLossWeight();
  spec.bias_update_speed = r.getBiasUpdateSpeed();
  spec.seed = r.getSeed();
  return spec;
}

void to_wire(const api_training_event& e, capnp::TrainingEvent::Builder b) {
  b.setJobId(e.job_id);
  b.setStep(e.step);
  b.setSteps(e.steps);
  b.setLoss(e.loss);
  b.setLearningRate(e.learning_rate);
  b.setGradNorm(e.grad_norm);
  b.setTokensPerSecond(e.tokens_per_second);
  fill_list(b.initLoadBalance(static_cast<unsigned>(e.load_balance.size())), e.load_balance);
  b.setFinished(e.finished);
  b.setState(to_wire(e.state));
  b.setError(text(e.error));
  b.setCheckpoint(text(e.checkpoint));
  b.setRollbacks(e.rollbacks);
}

api_training_event from_wire(capnp::TrainingEvent::Reader r) {
  api_training_event e;
  e.job_id = r.getJobId();
  e.step = r.getStep();
  e.steps = r.getSteps();
  e.loss = r.getLoss();
  e.learning_rate = r.getLearningRate();
  e.grad_norm = r.getGradNorm();
  e.tokens_per_second = r.getTokensPerSecond();
  e.load_balance = read_list<double>(r.getLoadBalance());
  e.finished = r.getFinished();
  e.state = from_wire(r.getState());
  e.error = text(r.getError());
  e.checkpoint = text(r.getCheckpoint());
  e.rollbacks = r.getRollbacks();
  return e;
}

kj::Exception make_api_exception(api_errc code, const std::string& message) {
  auto type = kj::Exception::Type::FAILED;
  if (code == api_errc::overloaded) type = kj::Exception::Type::OVERLOADED;
  if (code == api_errc::unavailable) type = kj::Exception::Type::DISCONNECTED;
  // A reason that already starts with its code ("overloaded: 3 waiting") keeps one prefix.
  const std::string prefix = std::string(to_string(code)) + ": ";
  const std::string text = message.rfind(prefix, 0) == 0 ? message : prefix + message;
  return kj::Exception(type, __FILE__, __LINE__, kj::str(text.c_str()));
}

api_failure parse_api_exception(const kj::Exception& e) {
  api_failure f;
  f.type = e.getType();
  std::string_view d(e.getDescription().cStr(), e.getDescription().size());
  constexpr std::string_view remote = "remote exception: ";
  if (d.substr(0, remote.size()) == remote) d.remove_prefix(remote.size());
  if (auto colon = d.find(": "); colon != std::string_view::npos) {
    if (auto code = parse_api_errc(d.substr(0, colon))) {
      f.code = code;
      d.remove_prefix(colon + 2);
    }
  }
  f.text = std::string(d);
  return f;
}

}  // namespace moe::protocol
