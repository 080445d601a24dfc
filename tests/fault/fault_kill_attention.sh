#!/usr/bin/env bash
# Fault a: SIGKILL a node that holds only attention shards, under steady load.
#
# Three nodes, two attention shards, two expert groups: the placement puts shard 0 and a group on
# n0, shard 1 alone on n1 and the other group on n2 (checked with `moe plan` first). n1 is killed
# while ~300 greedy requests run 16 at a time. Expected: the requests of n1's shard are replayed
# (prompt + tokens so far) on shard 0, so every request finishes with the baseline's tokens (or
# fails with a clear deadline error), none is lost.
#
#   fault_kill_attention.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" kill_attention

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 100 3000
  printf 'nodes:\n'
  node_yaml 0 1
  node_yaml 1 1
  node_yaml 2 1
  model_yaml
  printf 'attention_shards: 2\nexpert_groups: 2\n'
} >"$CONFIG"

VICTIM=n1
held=$(holdings $VICTIM)
echo "    placement: n0: $(holdings n0); n1: $held; n2: $(holdings n2)"
[[ $held == attention:* && $held != *group:* ]] ||
  die "the placement changed: $VICTIM holds '$held', not attention shards only (adapt the config)"

cluster_up
serve_start
baseline
load_start --requests 600
wait_progress 150
step "SIGKILL $VICTIM (attention only) under load"
chaos kill --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
load_wait
compare --label "SIGKILL of an attention-only node" --fault-unix "$FAULT_UNIX" --node $VICTIM \
  --allow-failed deadline
finish
