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
}

struct JobSpec {
  union {
    generation @0 :GenerationJob;
    training @1 :TrainingJobPlaceholder;  # reserved for the training issue; refused for now
  }
}

struct TrainingJobPlaceholder {}

struct GenerationJob {
  prompt @0 :List(Int32);          # token ids, non-empty, each >= 0
  maxNewTokens @1 :Int64;          # >= 0 (0: prefill only)
  temperature @2 :Float32;         # >= 0; 0 is greedy
  topK @3 :UInt32;                 # 0: all tokens
  topP @4 :Float32 = 1.0;          # in (0, 1]
  seed @5 :UInt64;
  stopTokenIds @6 :List(Int32);
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
    kind @0 :Text;                 # "attention", "router", "expert_group", "controller", ...
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
