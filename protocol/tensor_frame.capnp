@0xd1d9e8ad22c1c426;
# Header of one tensor moved on the data plane (UCX, NCCL, or in-process hand-off).
# The header travels as a small message; the bulk bytes travel separately (a UCX tag message
# or rendezvous) and are identified by `transfer`. Decoders reject any frame whose
# `version` they do not know, whose shape does not match `byteLength`, or whose indices are
# out of range for the receiving actor.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moe::protocol::capnp");

const tensorFrameVersion :UInt16 = 1;

enum DType {
  f32 @0;
  f16 @1;
  bf16 @2;
  f8E4m3 @3;
  i64 @4;
  i32 @5;
  u8 @6;
}

enum FrameKind {
  activations @0;   # hidden states on their way from a router to an expert group
  expertOutput @1;  # expert outputs on their way back to the router
  kvBlock @2;       # latent KV-cache blocks
  expertWeights @3; # weights of an expert replica during migration
  gradients @4;
  parameters @5;    # model parameters and optimizer moments gathered for a training checkpoint
}

struct TransferHandle {
  # Where the bulk bytes are: a UCX tag on the sender's endpoint, or an in-process buffer id.
  tag @0 :UInt64;
  byteLength @1 :UInt64;
  offset @2 :UInt64;
}

struct TensorFrame {
  version @0 :UInt16;
  kind @1 :FrameKind;
  dtype @2 :DType;
  shape @3 :List(UInt64);
  layer @4 :UInt32;
  step @5 :UInt64;
  placementVersion @6 :UInt32;
  tokenIndices @7 :List(UInt32);   # which rows of the sender's batch these are
  expertIndices @8 :List(UInt32);  # physical expert slot of each row
  transfer @9 :TransferHandle;
  # Small payloads (under the data plane's eager threshold) may ride inline.
  inline @10 :Data;
}
