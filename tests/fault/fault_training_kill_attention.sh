#!/usr/bin/env bash
# Fault h: SIGKILL the node of an attention shard (and its router) in the middle of a training job.
#
# Three nodes, two attention shards, two expert groups; the victim runs attention shard 1 only.
# As fault_training_kill.sh: a baseline run, a fresh coordinator, the same job with the kill a
# third of the way in. Expected: the job rolls back to its last snapshot, the surviving shard
# takes the whole batch from then on, the job finishes, and every step's loss equals the
# baseline's (1e-4: one shard sums in another order what two did).
#
#   fault_training_kill_attention.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" training_kill_attention

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 100 3000
  printf 'nodes:\n'
  node_yaml 0 1
  node_yaml 1 1
  node_yaml 2 1
  model_yaml
  printf 'attention_shards: 2\nexpert_groups: 2\ntraining: {snapshot_every_steps: 5}\n'
} >"$CONFIG"

VICTIM=
for n in n2 n1 n0; do
  held=$(holdings $n)
  echo "    placement: $n: $held"
  [[ -z $VICTIM && $held == "attention:1" ]] && VICTIM=$n
done
[[ -n $VICTIM ]] || die "no node holds attention shard 1 alone (adapt the config)"

# The fault: SIGKILL.
# shellcheck disable=SC2317  # called by training_fault_run
kill_node() { chaos kill --config "$CONFIG" --node "$1" --run-dir "$RUN"; }

training_fault_run "$VICTIM" SIGKILL kill_node \
  "SIGKILL of $VICTIM (attention shard 1) during training (at step %s of %s)"
finish
