#!/usr/bin/env bash
# Fault d: SIGSTOP a node (it hangs with its connections open) under steady load, SIGCONT it later.
#
# The cluster of fault a (n1 holds attention shard 1 only), with a short failure timeout
# (heartbeat 200 ms, failure_timeout_ms 1500): the coordinator must declare n1 down by heartbeat
# timeout, the requests of its shard are replayed on shard 0; once continued, n1 rejoins. Every
# request finishes with the baseline's tokens (or fails with a clear deadline error), none is lost.
#
#   fault_stop_node.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" stop_node

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 200 1500
  printf 'nodes:\n'
  node_yaml 0 1
  node_yaml 1 1
  node_yaml 2 1
  model_yaml
  printf 'attention_shards: 2\nexpert_groups: 2\n'
} >"$CONFIG"

VICTIM=n1
held=$(holdings $VICTIM)
[[ $held == attention:* && $held != *group:* ]] ||
  die "the placement changed: $VICTIM holds '$held', not attention shards only (adapt the config)"

cluster_up
serve_start
baseline
load_start --requests 600
wait_progress 150
step "SIGSTOP $VICTIM under load"
chaos stop --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
STOP_UNIX=$FAULT_UNIX
# Held past the failure timeout (1.5 s), so that the heartbeat detection must act.
sleep 4
step "SIGCONT $VICTIM"
chaos cont --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
FAULT_UNIX=$STOP_UNIX
load_wait
compare --label "SIGSTOP of a node (4 s), then SIGCONT" --fault-unix "$FAULT_UNIX" --node $VICTIM \
  --allow-failed deadline
finish
