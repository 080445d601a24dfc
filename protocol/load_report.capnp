@0xd976a69e864cf52c;
# Expert load statistics a router sends to the scheduler for load balancing (EPLB-style
# rebalancing): over a window of recent steps, how many tokens each logical expert was routed
# and how many rows each physical slot (replica) served, per MoE layer. Decoders reject any
# report whose `version` they do not know, whose step range is reversed, whose layers repeat,
# or whose per-layer lists disagree in length (every layer has the same experts and slots).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moe::protocol::capnp");

const loadReportVersion :UInt16 = 1;

struct LayerLoad {
  layer @0 :UInt32;             # the model's layer id (only MoE layers are reported)
  logical @1 :List(UInt64);     # tokens per logical expert in the window, indexed by expert id
  physical @2 :List(UInt64);    # rows per physical slot in the window, slots in placement order
}

struct LoadReport {
  version @0 :UInt16;
  shard @1 :UInt32;             # which router (attention shard) measured this
  placementVersion @2 :UInt32;  # the placement the physical counts refer to
  firstStep @3 :UInt64;         # oldest step in the window (inclusive)
  lastStep @4 :UInt64;          # newest step in the window (inclusive)
  windowSteps @5 :UInt32;       # the window's configured length in steps
  layers @6 :List(LayerLoad);
}
