#!/usr/bin/env bash
# Fault e: delayed and lossy network to one node, under steady load (tc netem in its namespace).
#
# The layout of tests/integration/cluster_netns.sh: nodes n0 and n1 in network namespaces of
# their own joined by a bridge, the coordinator in the root namespace. While ~300 requests run,
# `moe chaos netem` adds 20 ms (+-5 ms) of delay to n1's interface, then 2% packet loss, then
# clears it. Nothing has to recover: every request finishes with the baseline's tokens, none is
# lost, no node is declared down. Skipped (77) without root, iproute2, network namespaces or the
# kernel's netem qdisc.
#
#   fault_netem.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" netem

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
# netem itself: `moe chaos netem` exits 2 when this host cannot do it (no tc, no sch_netem).
out=$("$MOE" chaos netem --netns "$NS_A" --dev lo --delay 1 2>&1)
rc=$?
[[ $rc -eq 2 ]] && skip "$out"
[[ $rc -eq 0 ]] || die "moe chaos netem on lo failed ($rc): $out"
"$MOE" chaos netem --netns "$NS_A" --dev lo --clear >/dev/null || die "moe chaos netem --clear failed"
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

load_start --requests 300 --rate 15 --deadline 60
wait_progress 30
step "delay 20 ms (+-5 ms) on n1's $PEER_B"
chaos netem --netns "$NS_B" --dev "$PEER_B" --delay 20 --jitter 5
DELAY_UNIX=$FAULT_UNIX
wait_progress 130
step "2% loss on n1's $PEER_B"
chaos netem --netns "$NS_B" --dev "$PEER_B" --loss 2
wait_progress 230
step "clear"
chaos netem --netns "$NS_B" --dev "$PEER_B" --clear
load_wait
grep -E "node n[01] .* -> (suspect|down)" "$TMP/serve.out" &&
  fail "a node was suspected or declared down under delay/loss (failure_timeout_ms 5000)"
compare --label "netem delay 20 ms, then 2% loss, on one node" --fault-unix "$DELAY_UNIX" --require-all-finished
finish
