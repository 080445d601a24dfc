#!/usr/bin/env bash
# Fault e: a slow and lossy network to one node, under steady load.
#
# The layout of tests/integration/cluster_netns.sh: nodes n0 and n1 in network namespaces of
# their own joined by a bridge, the coordinator in the root namespace. While ~300 requests run,
# n1's interface gets, with tc netem where the kernel has it, 20 ms (+-5 ms) of delay, then 2%
# packet loss; then, with `moe chaos link` (no netem needed: tc tbf and nftables), a rate limit
# that makes its traffic queue, then 2% loss again; then nothing. Nothing has to recover: every
# request finishes with the baseline's tokens, none is lost, no node is declared down; the
# drops and the queueing are read back from the kernel, so a fault that did nothing fails the
# test. Then the same faults during a training job: no rollback, every step's loss unchanged. Skipped (77) without root, iproute2, network namespaces, or both netem and tbf/nftables.
#
#   fault_network.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" network

[[ $(id -u) -eq 0 ]] || skip "not root (network namespaces and tc need it)"
command -v ip >/dev/null || skip "no 'ip' command (iproute2)"
NS_A=moef-$$-a
NS_B=moef-$$-b
BR=moefb$$
VETH_A=moef$$a
VETH_B=moef$$b
PEER_A=moef$$ai
PEER_B=moef$$bi
STARTED_NS=()
STARTED_LINKS=()
fault_extra_cleanup() {
  local ns link pid
  for ns in "${STARTED_NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  for link in "${STARTED_LINKS[@]}"; do ip link del "$link" 2>/dev/null; done
  for ns in "${STARTED_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
}

step "network namespaces $NS_A and $NS_B"
out=$(ip netns add "$NS_A" 2>&1) || skip "cannot make a network namespace: $out"
STARTED_NS+=("$NS_A")
out=$(ip netns exec "$NS_A" true 2>&1) || skip "cannot enter a network namespace: $out"
ip -n "$NS_A" link set lo up
# What this host can do: `moe chaos netem|link` exit 2 when it cannot (no tc or nft, no qdisc).
can() {
  local out rc
  out=$("$MOE" chaos "$1" --netns "$NS_A" --dev lo "${@:2}" 2>&1)
  rc=$?
  [[ $rc -eq 2 ]] && { echo "    $1: not on this host: $out"; return 1; }
  [[ $rc -eq 0 ]] || die "moe chaos $1 on lo failed ($rc): $out"
  "$MOE" chaos "$1" --netns "$NS_A" --dev lo --clear >/dev/null || die "moe chaos $1 --clear failed"
}
HAVE_NETEM=0
HAVE_LINK=0
can netem --delay 1 && HAVE_NETEM=1
can link --rate 1000 --loss 1 && HAVE_LINK=1
((HAVE_NETEM + HAVE_LINK > 0)) || skip "neither netem nor tbf with nftables can shape traffic on this host"
ip netns add "$NS_B" || die "ip netns add $NS_B failed"
STARTED_NS+=("$NS_B")
out=$(ip link add "$BR" type bridge 2>&1) || skip "cannot make a bridge: $out"
STARTED_LINKS+=("$BR")
out=$(ip link add "$VETH_A" type veth peer name "$PEER_A" 2>&1) || skip "cannot make a veth pair: $out"
STARTED_LINKS+=("$VETH_A")
ip link add "$VETH_B" type veth peer name "$PEER_B" || die "cannot make veth $VETH_B"
STARTED_LINKS+=("$VETH_B")
# A /24 in 10.214.0.0/16 that this host does not use yet (chosen under the lock cluster_netns.sh takes).
command -v flock >/dev/null && exec {LOCK}</run/netns && flock -w 30 "$LOCK"
X=
for i in $(seq 0 249); do
  x=$(((($$ + i) % 250) + 1))
  ip -4 -o addr show 2>/dev/null | grep -q " 10\.214\.$x\." || { X=$x; break; }
done
[[ -n $X ]] || die "no free 10.214.X.0/24 subnet on this host"
COORD=10.214.$X.1
HOST_A=10.214.$X.2
HOST_B=10.214.$X.3
ip addr add "$COORD/24" dev "$BR" || die "cannot address $BR"
[[ -n ${LOCK:-} ]] && exec {LOCK}<&-
{
  ip link set "$BR" up && ip link set "$VETH_A" master "$BR" && ip link set "$VETH_A" up &&
    ip link set "$VETH_B" master "$BR" && ip link set "$VETH_B" up &&
    ip link set "$PEER_A" netns "$NS_A" && ip link set "$PEER_B" netns "$NS_B" &&
    ip -n "$NS_B" link set lo up &&
    ip -n "$NS_A" addr add "$HOST_A/24" dev "$PEER_A" && ip -n "$NS_A" link set "$PEER_A" up &&
    ip -n "$NS_B" addr add "$HOST_B/24" dev "$PEER_B" && ip -n "$NS_B" link set "$PEER_B" up
} || die "cannot configure the bridge, veths or addresses"

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 200 5000
  printf 'nodes:\n'
  node_yaml 0 2 "$HOST_A"
  node_yaml 1 2 "$HOST_B"
  model_yaml
  printf 'attention_shards: 1\nexpert_groups: 3\n'
} >"$CONFIG"
echo "    placement: n0 ($NS_A): $(holdings n0); n1 ($NS_B): $(holdings n1)"
# The namespaces share /dev/shm: keep UCX on tcp so that the bytes cross the veths.
export UCX_TLS=tcp

# `moe cluster up` starts local hosts only; these are separate hosts as far as the network goes,
# so each node runs under `ip netns exec` with its pid file where `moe chaos` would look.
step "nodes n0 in $NS_A, n1 in $NS_B"
mkdir -p "$RUN"
for i in 0 1; do
  ns=$NS_A
  ((i == 1)) && ns=$NS_B
  setsid ip netns exec "$ns" "$MOE" node --config "$CONFIG" --name n$i >"$RUN/n$i.log" 2>&1 \
    {SAVED_OUT}>&- {SAVED_ERR}>&- </dev/null &
  echo $! >"$RUN/n$i.pid"
  disown  # stopped by `moe cluster down` and the namespace cleanup, not by this shell's job control
done
for i in 0 1; do
  for _ in $(seq 300); do grep -q "up: cluster" "$RUN/n$i.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "up: cluster" "$RUN/n$i.log" || die "node n$i did not come up"
done
serve_start "$COORD"
baseline

# The kernel's own count of what a fault did: packets the drop rule took; for the rate limit,
# times a packet had to wait for tokens (tbf's "overlimits").
dropped() {
  ip netns exec "$NS_B" nft list chain inet "moe_chaos_$PEER_B" egress 2>/dev/null |
    sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | head -n 1
}
throttled() {
  ip netns exec "$NS_B" tc -s qdisc show dev "$PEER_B" | sed -n 's/.*overlimits \([0-9]*\).*/\1/p' | head -n 1
}

# hold_until_counted COUNTER MARK: until the load reached MARK and COUNTER (one of the two above)
# shows the fault acted, or the load ended. On a quiet link a progress mark alone can come first:
# the training job's traffic between two marks is a few (segmentation-offloaded, so large) packets,
# and 2% of them was sometimes none.
hold_until_counted() {
  wait_progress "$2"
  local n
  while n=$("$1") && [[ ${n:-0} -le 0 ]] && kill -0 "$LOAD_PID" 2>/dev/null; do sleep 0.05; done
}

KBIT=${MOE_FAULT_LINK_KBIT:-2000}
# The two faults of each kind, each until the load (or the job) reached a progress mark; FAULT_UNIX
# ends at the first one's time. CONTEXT prefixes failures ("" or "training: ").
netem_faults() {  # UNTIL_LOSS UNTIL_CLEAR
  step "netem: delay 20 ms (+-5 ms) on n1's $PEER_B"
  chaos netem --netns "$NS_B" --dev "$PEER_B" --delay 20 --jitter 5
  local first=$FAULT_UNIX
  wait_progress "$1"
  step "netem: 2% loss on n1's $PEER_B"
  chaos netem --netns "$NS_B" --dev "$PEER_B" --loss 2
  wait_progress "$2"
  chaos netem --netns "$NS_B" --dev "$PEER_B" --clear
  FAULT_UNIX=$first
}
link_faults() {  # UNTIL_LOSS UNTIL_CLEAR CONTEXT
  # Low enough that n1's share of the traffic queues, high enough that its heartbeats still get
  # through well within the failure timeout.
  step "link: rate limit $KBIT kbit/s on n1's $PEER_B"
  chaos link --netns "$NS_B" --dev "$PEER_B" --rate "$KBIT"
  local first=$FAULT_UNIX waited lost
  hold_until_counted throttled "$1"
  waited=$(throttled)
  echo "    packets that waited for the rate limit: ${waited:-?}"
  [[ ${waited:-0} -gt 0 ]] || fail "${3}the rate limit delayed no packet before the load ended (tbf overlimits ${waited:-?})"
  step "link: 2% loss on n1's $PEER_B"
  chaos link --netns "$NS_B" --dev "$PEER_B" --loss 2
  hold_until_counted dropped "$2"
  lost=$(dropped)
  echo "    packets dropped: ${lost:-?}"
  [[ ${lost:-0} -gt 0 ]] || fail "${3}the drop rule dropped no packet before the load ended"
  chaos link --netns "$NS_B" --dev "$PEER_B" --clear
  FAULT_UNIX=$first
}

load_start --requests 300 --rate 15 --deadline 60
wait_progress 30
FIRST_UNIX=
LABEL=()
if ((HAVE_NETEM)); then
  netem_faults $((HAVE_LINK ? 80 : 130)) $((HAVE_LINK ? 130 : 230))
  FIRST_UNIX=$FAULT_UNIX
  LABEL+=("netem delay 20 ms, then 2% loss")
fi
if ((HAVE_LINK)); then
  from=$((HAVE_NETEM ? 150 : 30))
  wait_progress "$from"
  link_faults $((from + 50)) $((from + 100)) ""
  FIRST_UNIX=${FIRST_UNIX:-$FAULT_UNIX}
  LABEL+=("a $KBIT kbit/s rate limit, then 2% loss (tbf, nftables)")
fi
load_wait
# A late heartbeat may make n1 suspect (a warning; work goes on), never down.
echo "    times a node was suspected: $(grep -cE "node n[01] .* -> suspect" "$TMP/serve.out")"
grep -E "node n[01] .* -> down" "$TMP/serve.out" &&
  fail "a node was declared down under delay/loss (failure_timeout_ms 5000)"
label=$(IFS=';'; echo "${LABEL[*]}")
compare --label "${label//;/; }, on one node" --fault-unix "$FIRST_UNIX" --require-all-finished

# The same faults during training: nothing fails, so nothing rolls back, and every step's loss
# equals the baseline's. Two of the three expert groups (and their gradients) are on n1.
# shellcheck disable=SC2317  # called by training_fault_run
shape_during_training() {
  if ((HAVE_LINK)); then link_faults 20 28 "training: "; else netem_faults 20 28; fi
}
what="$KBIT kbit/s, then 2%% loss"  # a printf format
((HAVE_LINK)) || what="20 ms delay, then 2%% loss"
# Twice the default job, so that the loss usually meets a packet long before the job ends.
# shellcheck disable=SC2034  # read by training_fault_run
TRAIN_STEPS=80
training_fault_run n1 "a slow and lossy link on" shape_during_training \
  "$what on n1's link during training (from step %s of %s)" 0
grep -E "node n[01] .* -> down" "$TMP/serve.out" &&
  fail "a node was declared down under delay/loss during training"
finish
