#!/usr/bin/env bash
# Fault b: SIGKILL a node whose expert group's experts all have replicas on other nodes.
#
# Explicit expert lists: group 0 holds every expert (and the shared ones), groups 1 and 2 hold
# halves of them again, so each of groups 1 and 2 is fully replicated by group 0. The victim is
# the node that holds such a group and no attention shard (found with `moe plan`). Expected: the
# routers switch to the replicas and the affected requests are replayed: every request finishes
# with the baseline's tokens (or fails with a clear deadline error), none is lost.
#
#   fault_kill_replicated.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" kill_replicated

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 100 3000
  printf 'nodes:\n'
  node_yaml 0 1
  node_yaml 1 1
  node_yaml 2 1
  model_yaml
  printf 'attention_shards: 1\nexpert_groups:\n  experts:\n    - [0-15]\n    - [0-7]\n    - [8-15]\n'
} >"$CONFIG"

VICTIM=
for n in n0 n1 n2; do
  held=$(holdings $n)
  echo "    placement: $n: $held"
  [[ $held == *group:* && $held != *attention:* ]] || continue
  # Every expert this node holds must be held elsewhere too.
  mine=$(tr ' ' '\n' <<<"$held" | sed -n 's/^group:[0-9]*://p' | tr ',' '\n' |
    awk -F- '{ for (i = $1; i <= ($2 == "" ? $1 : $2); i++) print i }' | sort -u)
  others=$(experts_elsewhere $n | tr ' ' '\n' | sort -u)  # comm wants the same (lexical) order
  [[ -z $(comm -23 <(echo "$mine") <(echo "$others")) ]] && [[ $held != *group:0:* ]] && { VICTIM=$n; break; }
done
[[ -n $VICTIM ]] || die "no node holds only fully replicated expert groups (adapt the config)"

cluster_up
serve_start
baseline
load_start --requests 600
wait_progress 150
step "SIGKILL $VICTIM (an expert group whose experts all have replicas elsewhere) under load"
chaos kill --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
load_wait
compare --label "SIGKILL of a node with replicated experts" --fault-unix "$FAULT_UNIX" --node $VICTIM \
  --allow-failed deadline
finish
