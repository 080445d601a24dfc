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

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 200 1500
  printf 'nodes:\n'
  node_yaml 0 1
  node_yaml 1 1
  node_yaml 2 1
  model_yaml
  printf 'attention_shards: 1\nexpert_groups: 3\ntraining: {snapshot_every_steps: 5}\n'
} >"$CONFIG"

VICTIM=
for n in n2 n1 n0; do
  held=$(holdings $n)
  echo "    placement: $n: $held"
  # Group 0 holds the shared experts too: they move with its routed experts.
  [[ -z $VICTIM && $held == *group:0:* && $held != *attention:* ]] && VICTIM=$n
done
[[ -n $VICTIM ]] || die "no node holds expert group 0 without an attention shard (adapt the config)"

STEPS=40
KILL_AT=12
TRAIN=(--corpus "$ROOT/tests/data/corpus/apache-2.0.txt" --corpus-bytes 8192 --steps $STEPS --seq-len 32
  --batch 8 --lr 3e-3 --seed 3 --bound 150)

cluster_up
serve_start
step "baseline training: $STEPS steps on the healthy cluster"
load_py train --address "$API" --secret-file "$TMP/secret" --out "$TMP/train-baseline.json" "${TRAIN[@]}" ||
  die "the baseline training run failed"

step "a new coordinator on the same nodes (fresh weights from the checkpoint)"
serve_stop
SERVE_STARTS=2 serve_start

step "training again; SIGSTOP $VICTIM at step $KILL_AT"
rm -f "$TMP/progress"
load_py train --address "$API" --secret-file "$TMP/secret" --out "$TMP/train-fault.json" \
  --progress "$TMP/progress" "${TRAIN[@]}" >"$TMP/load.out" 2>&1 {SAVED_OUT}>&- {SAVED_ERR}>&- &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
wait_progress $KILL_AT
at=$(cut -d' ' -f1 "$TMP/progress")
[[ $at -lt $STEPS ]] || die "harness: the job finished (step $at) before the fault could be injected"
chaos stop --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
STOP_UNIX=$FAULT_UNIX
# Held past the failure timeout (1.5 s), so that the heartbeat detection must act.
sleep 4
step "SIGCONT $VICTIM"
chaos cont --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
FAULT_UNIX=$STOP_UNIX
load_wait
load_py compare-train --baseline "$TMP/train-baseline.json" --run "$TMP/train-fault.json" \
  --label "SIGSTOP of $VICTIM (4 s) during training (at step $at of $STEPS), then SIGCONT" --fault-unix "$FAULT_UNIX" \
  --node $VICTIM --coordinator-log "$TMP/serve.out" --expect-rollbacks 1 ||
  FAILURES=$((FAILURES + 1))
finish
