@0xddfe017642beb9cb;
# The job-submission API: what clients (the `moe submit` command, the C++ moe::client library,
# the Python moe_client package) ask of a cluster's controller over Cap'n Proto RPC.
#
# A connection's bootstrap capability is a Gateway; nothing else is reachable before login.
# Gateway.login checks the cluster's shared secret (config `cluster.secret`) and the client's
# apiVersion and answers a JobService capability that lives as long as the connection.
# Errors are RPC exceptions whose description starts with a stable code and a colon:
#   unauthenticated:, unsupported_version:, invalid_request:, overloaded:, unknown_job:,
#   unavailable:, internal:
# `overloaded:` and `unavailable:` (the server is stopping, or a node the work needs is down)
# are transient (exception type OVERLOADED / DISCONNECTED); the others are permanent for the
# same request.
#
# Compatibility: fields are only ever added (with new ordinals); a change that old clients
# would misread bumps apiVersion, and the server refuses other versions at login.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moe::protocol::capnp");

const apiVersion :UInt16 = 1;

interface Gateway {
  login @0 (secret :Text, clientVersion :UInt16) -> (service :JobService, serverVersion :UInt16);
}

interface JobService {
  submit @0 (job :JobSpec, sink :TokenSink) -> (jobId :UInt64);
  # Queues the job. `sink` (optional) receives the job's events in order, the last one with
  # finished = true; events may arrive before submit returns. If the connection drops while
  # the job is streaming, the job is cancelled. Without a sink, poll with status().

  status @1 (jobId :UInt64) -> (status :JobStatus);
  cancel @2 (jobId :UInt64) -> (wasActive :Bool);
  describe @3 () -> (cluster :ClusterDescription);

  rebalance @4 () -> (report :RebalanceReport);
  # Rebalances the experts now (online: serving continues) and answers what it did. Takes as
  # long as the rebalance (new replicas' weights are loaded): minutes, not milliseconds.
  # Errors: unavailable (rebalancing is not enabled on this cluster; the routers counted no
  # load yet; a phase failed and the placement did not change), overloaded (a rebalance is
  # already running), invalid_request (this layout cannot be rebalanced; the text says why).
  # Added within apiVersion 1: an older server answers it with an UNIMPLEMENTED exception.

  # Training (train, trainingStatus, cancelTraining, checkpoint): added within apiVersion 1; an
  # older server answers them with an UNIMPLEMENTED exception. A server whose cluster does not
  # train answers them `unavailable:`. One training job runs at a time, on the serving weights;
  # later ones wait in the server's queue (overloaded: when it is full).

  train @5 (job :TrainingJob, sink :TrainingSink) -> (jobId :UInt64);
  # Queues a training job. `sink` (optional) receives a TrainingEvent after every step and a
  # last one with finished = true; events may arrive before train returns. If the connection
  # drops while the job is streaming, the job is cancelled (after its running step). Without a
  # sink, poll with trainingStatus(). Errors: invalid_request (the text names the field, or
  # says what the model refuses: a token id outside the vocabulary, a sequenceLength beyond its
  # context, a corpus shorter than one sequence), overloaded (the queue of training jobs is full).

  trainingStatus @6 (jobId :UInt64) -> (event :TrainingEvent);
  # The job's latest event (step 0 and state queued before its first step). unknown_job for an
  # id that train() never answered (training jobs have ids of their own, apart from submit's).

  cancelTraining @7 (jobId :UInt64) -> (wasActive :Bool);
  # Whether the job was still queued or running; it stops after its running step.

  checkpoint @8 (directory :Text) -> (directory :Text);
  # Writes a training checkpoint (the model in the hub layout, the optimizer state, the steps
  # trained) to `directory` on the SERVER's file system, replacing what is there, and answers
  # the directory written. While a training job runs it is written between two steps (and the
  # job's next event carries `checkpoint`); otherwise now. `directory` must be an absolute path.
  # Takes as long as the running step plus the write. Errors: invalid_request (not an absolute
  # path), internal (the write failed; the text says why).
}

struct JobSpec {
  union {
    generation @0 :GenerationJob;
    training @1 :TrainingJobPlaceholder;  # refused (invalid_request): train() runs training jobs
  }
}

struct TrainingJobPlaceholder {}
# Kept so that the union's ordinals stay; submit() refuses it and points to JobService.train().

struct GenerationJob {
  prompt @0 :List(Int32);          # token ids, non-empty, each >= 0
  maxNewTokens @1 :Int64;          # >= 0 (0: prefill only)
  temperature @2 :Float32;         # >= 0; 0 is greedy
  topK @3 :UInt32;                 # 0: all tokens
  topP @4 :Float32 = 1.0;          # in (0, 1]
  seed @5 :UInt64;
  stopTokenIds @6 :List(Int32);
  deadlineMs @7 :UInt64;           # must finish within this many ms of submission, else it fails
                                   # ("deadline exceeded"); 0: the cluster's batching.request_timeout_ms
}

enum JobState {
  queued @0;
  running @1;
  finished @2;
  cancelled @3;
  failed @4;
}

struct JobEvent {
  jobId @0 :UInt64;
  tokens @1 :List(Int32);          # new tokens since the previous event of this job
  finished @2 :Bool;               # the last event of the job
  state @3 :JobState;
  finishReason @4 :Text;           # "length", "stop", "cancelled" or "error" once finished
  error @5 :Text;                  # set when state == failed
}

interface TokenSink {
  event @0 (event :JobEvent) -> ();
  # The server waits for each call to return before it sends the next (back-pressure). When
  # the client falls behind, queued events are merged into one (tokens concatenated).
}

struct JobStatus {
  jobId @0 :UInt64;
  state @1 :JobState;
  tokens @2 :List(Int32);          # generated so far
  finishReason @3 :Text;
  error @4 :Text;
  shard @5 :Int32 = -1;            # attention shard serving it; -1 before placement
}

struct ClusterDescription {
  name @0 :Text;
  nodes @1 :List(Node);
  actors @2 :List(ActorInfo);
  placementVersion @3 :UInt64;
  placementJson @4 :Text;          # the scheduler's placement plan as JSON ("" when none)

  struct Node {
    name @0 :Text;
    host @1 :Text;
    devices @2 :List(Text);        # e.g. "n1/gpu0", "n1/cpu0"
  }

  struct ActorInfo {
    kind @0 :Text;                 # "attention", "router", "expert_group", "engine_shard", "controller", ...
    id @1 :Text;
    node @2 :Text;
    device @3 :Text;
  }
}

# What one rebalance did. Balance ratios are max / mean expert-group load of a MoE layer
# (1 is perfect): `before` as measured under the old placement, `after` predicted for the new
# one from the same counts; balanceBefore / balanceAfter are the means over the MoE layers.
struct RebalanceReport {
  changed @0 :Bool;                    # false: the placement was kept (nothing moved)
  versionBefore @1 :UInt64;            # placement versions
  versionAfter @2 :UInt64;             # == versionBefore when nothing changed
  balanceBefore @3 :Float64;
  balanceAfter @4 :Float64;
  layerBalanceBefore @5 :List(Float64);  # per MoE layer, ascending layer id
  layerBalanceAfter @6 :List(Float64);   # the same layers
  tokensCounted @7 :UInt64;            # routed (token, expert) choices counted, all layers
  replicasMoved @8 :Int64;             # (layer, expert) replicas some expert group loaded
  bytesMoved @9 :UInt64;               # weight bytes those loads read
  durationSeconds @10 :Float64;        # from the load reports to the commit
  trigger @11 :Text;                   # "on_demand" or "periodic"
}

# A training job: a corpus cut into windows of sequenceLength tokens (no overlap), visited in a
# seeded shuffled order (reshuffled every epoch); each of `steps` AdamW steps trains on
# batchSequences windows, with a learning rate warming up linearly over warmupSteps to
# learningRate, then decaying (cosine) to minLearningRate at the last step. The defaults are
# those of `moe train` (actors::training_job).
struct TrainingJob {
  corpus :union {
    tokens @0 :List(Int32);        # token ids, each >= 0 (and below the model's vocabulary)
    text @1 :Text;                 # UTF-8, tokenised by the server (byte level: one id per byte)
  }
  sequenceLength @2 :Int64 = 64;   # tokens per sequence, >= 2, at most the model's context
  batchSequences @3 :Int64 = 8;    # sequences per step, >= 1
  steps @4 :Int64 = 100;           # >= 1
  learningRate @5 :Float64 = 0.001;  # the peak, > 0
  warmupSteps @6 :Int64 = 0;       # >= 0
  minLearningRate @7 :Float64 = 0;   # in [0, learningRate]
  beta1 @8 :Float64 = 0.9;         # AdamW, each in [0, 1)
  beta2 @9 :Float64 = 0.95;
  eps @10 :Float64 = 1e-8;         # > 0
  weightDecay @11 :Float64 = 0.1;  # >= 0
  gradClip @12 :Float64 = 1.0;     # max global gradient norm; <= 0: no clipping
  balanceLossWeight @13 :Float64 = 0.0001;  # the sequence-wise balance loss weight (alpha), >= 0
  biasUpdateSpeed @14 :Float64 = 0.001;     # gamma of the routing-bias update, >= 0
  seed @15 :UInt64;                # the order in which windows are visited
}

# A training job's progress: after every step, and once more when it ends (finished = true).
struct TrainingEvent {
  jobId @0 :UInt64;
  step @1 :Int64;                  # steps done
  steps @2 :Int64;                 # steps asked for
  loss @3 :Float64;                # the last step's mean next-token cross-entropy
  learningRate @4 :Float64;        # the last step's
  gradNorm @5 :Float64;            # the last step's global gradient norm, before clipping
  tokensPerSecond @6 :Float64;     # since the job started
  loadBalance @7 :List(Float64);   # the last step's max / mean expert load per MoE layer
  finished @8 :Bool;               # the last event of the job
  state @9 :JobState;
  error @10 :Text;                 # set when state == failed
  checkpoint @11 :Text;            # set on the event after a checkpoint was written there
  rollbacks @12 :UInt32;           # node failures the job survived by rolling back to a snapshot
                                   # (step went back to the snapshot's and the steps after it ran again)
}

interface TrainingSink {
  event @0 (event :TrainingEvent) -> ();
  # The server waits for each call to return before it sends the next (back-pressure). When
  # the client falls behind, only the newest queued event is sent (progress events in between
  # are dropped; the finished event never is, and a dropped event's checkpoint is carried over).
}
