#!/usr/bin/env bash
# Fault i: malformed frames at the job API and at a node's control port in the middle of a
# training job.
#
# The cluster of fault_training_kill.sh. A training job runs once on the healthy cluster for the
# baseline losses, then again on a fresh coordinator while `moe chaos garbage` sends malformed
# Cap'n Proto frames (truncated, oversized, random, an unknown API version / method / interface)
# to the job API, and the kinds a node's CAF port reads without allocating what they announce
# (truncated, wrong-version; see fault_garbage_proxy.sh) to the control port of a node holding
# an expert group. Expected: every frame rejected, nothing fails, so nothing rolls back, and
# every step's loss equals the baseline's (1e-4).
#
#   fault_training_garbage.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" training_garbage

three_node_config 100 3000 'training: {snapshot_every_steps: 5}'
VICTIM=n1
[[ $(holdings $VICTIM) == *group:* ]] || die "$VICTIM holds no expert group: $(holdings $VICTIM) (adapt the config)"

# shellcheck disable=SC2317  # called by training_fault_run
garbage_during_training() {
  local node_port at
  node_port=127.0.0.1:$(control_port "${1#n}")
  chaos garbage --address "$API" --kind all --count 2 --timeout 0.3 --secret-file "$TMP/secret"
  local first=$FAULT_UNIX
  chaos garbage --address "$node_port" --kind truncated,wrong-version --count 2 --timeout 0.3 \
    --secret-file "$TMP/secret"
  FAULT_UNIX=$first
  at=$(cut -d' ' -f1 "$TMP/progress")
  echo "    the job was at step $at when the last frame had been rejected"
  [[ $at -lt $TRAIN_STEPS ]] || die "harness: the job ended (step $at) before the garbage did: make TRAIN_STEPS larger"
}
# Long enough that the job still runs when the last frame has been rejected (checked).
TRAIN_STEPS=120
training_fault_run $VICTIM "garbage frames at the API and at" garbage_during_training \
  "garbage frames at the API and at $VICTIM's control port during training (from step %s of %s)" 0
finish
