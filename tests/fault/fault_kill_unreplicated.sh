#!/usr/bin/env bash
# Fault c: SIGKILL a node holding an expert group whose experts exist nowhere else.
#
# Three nodes, one attention shard, three expert groups (even split, no replicas): the victim is
# a node with a group and no attention shard (found with `moe plan`). Expected: the lost experts'
# weights are reloaded from the checkpoint on the survivors, the routers switch to them, and the
# affected requests are replayed: every request finishes with the baseline's tokens (or fails
# with a clear deadline error), none is lost.
#
#   fault_kill_unreplicated.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" kill_unreplicated

three_node_config 100 3000

pick_victim '*group:*'
[[ -n $VICTIM ]] || die "no node holds expert groups without an attention shard (adapt the config)"
[[ -n $(experts_elsewhere $VICTIM) ]] || die "every expert is on $VICTIM"

cluster_up
serve_start
baseline
load_start --requests 600
wait_progress 150
step "SIGKILL $VICTIM (an expert group without replicas: $(holdings $VICTIM)) under load"
chaos kill --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
load_wait
compare --label "SIGKILL of a node with unreplicated experts" --fault-unix "$FAULT_UNIX" --node $VICTIM \
  --allow-failed deadline
finish
