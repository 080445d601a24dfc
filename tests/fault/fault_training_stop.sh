#!/usr/bin/env bash
# Fault i: SIGSTOP the node of expert group 0 (its routed experts and the shared experts) in the
# middle of a training job, for longer than the failure timeout (heartbeat 200 ms,
# failure_timeout_ms 1500), then SIGCONT.
#
# As fault_training_kill.sh: three nodes, one attention shard, three expert groups; a baseline
# run, a fresh coordinator, the same job with the fault a third of the way in. Expected: the
# heartbeat declares the node down, the failover moves its experts to the survivors, they roll
# back to the job's last snapshot, and the job finishes with every step's loss equal to the
# baseline's (1e-4). The node, continued, comes back up; the cluster trains on without it.
#
#   fault_training_stop.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" training_stop

three_node_config 200 1500 'training: {snapshot_every_steps: 5}'

# Group 0 holds the shared experts too: they move with its routed experts.
pick_victim '*group:0:*'
[[ -n $VICTIM ]] || die "no node holds expert group 0 without an attention shard (adapt the config)"

# The fault: SIGSTOP, held past the failure timeout (1.5 s) so that the heartbeat detection must
# act, then SIGCONT. The fault's time (FAULT_UNIX) is the stop's.
# shellcheck disable=SC2317  # called by training_fault_run
stop_then_cont() {
  chaos stop --config "$CONFIG" --node "$1" --run-dir "$RUN"
  local stop_unix=$FAULT_UNIX
  sleep 4
  step "SIGCONT $1"
  chaos cont --config "$CONFIG" --node "$1" --run-dir "$RUN"
  FAULT_UNIX=$stop_unix
}

training_fault_run "$VICTIM" SIGSTOP stop_then_cont \
  "SIGSTOP of $VICTIM (4 s) during training (at step %s of %s), then SIGCONT"
finish
