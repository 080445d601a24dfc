#!/usr/bin/env bash
# Fault g: SIGKILL a node holding an expert group in the middle of a training job.
# (fault_training_stop.sh freezes the same node instead.)
#
# Three nodes, one attention shard, three expert groups (no replicas). A training job (the job
# API's train, tests/data/corpus) runs once on the healthy cluster for the baseline losses; the
# coordinator is restarted (the nodes drop its actors; the new one places fresh ones from the
# checkpoint) and the same job runs again while the node of expert group 0 (its routed experts
# and the shared experts) is killed a third of the way in. Expected: the step in flight stops,
# the failover moves the lost group's experts to the survivors, every survivor rolls back to the
# job's last snapshot (training.snapshot_every_steps), the job runs the steps after it again and
# finishes, and every step's loss equals the baseline's (1e-4). Detection and recovery times are
# printed.
#
#   fault_training_kill.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" training_kill

three_node_config 100 3000 'training: {snapshot_every_steps: 5}'

# Group 0 holds the shared experts too: they move with its routed experts.
pick_victim '*group:0:*'
[[ -n $VICTIM ]] || die "no node holds expert group 0 without an attention shard (adapt the config)"

# The fault: SIGKILL.
# shellcheck disable=SC2317  # called by training_fault_run
kill_node() { chaos kill --config "$CONFIG" --node "$1" --run-dir "$RUN"; }

training_fault_run "$VICTIM" SIGKILL kill_node "SIGKILL of $VICTIM during training (at step %s of %s)"
finish
